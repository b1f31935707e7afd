"""shardserve: distributed LLM inference on Ray.

The offline API lives here: `from shardserve import LLM, SamplingParams`.
The server, CLI and client are in `shardserve.cluster`; model shards in `shardserve.workers`.
"""

from shardserve.cluster.config import EngineConfig
from shardserve.cluster.llm import LLM, CompletionResult
from shardserve.workers.step import SamplingParams

__all__ = ["LLM", "SamplingParams", "CompletionResult", "EngineConfig"]
__version__ = "0.1.0"
