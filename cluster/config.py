"""The one typed configuration, loaded from YAML and validated with errors that name the key.

    model: smollm2            # embedded default, a .gguf file, or a Hugging Face directory
    dtype: auto               # auto | float32 | bfloat16 | float16
    parallel: {tensor_parallel_size: 1, pipeline_parallel_size: 1}
    kv_cache: {block_size: 16, kv_cache_memory: 2GiB}
    scheduler: {scheduling_policy: continuous, max_num_seqs: 64}
    server: {port: 50051, metrics_port: 9400, http_port: 8000, drain_grace_s: 30.0}
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .limits import RequestLimits

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """1073741824, "1GiB", "512MB" -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 2GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Norms and residual adds on 1/TP of the tokens (reduce-scatter + all-gather).
    sequence_parallel: bool = False
    # Layers per pipeline stage, e.g. [14, 16]; None splits them evenly.
    stage_layers: list[int] | None = None
    # Batches in flight through the pipeline at once (each its own set of sequences, sent
    # again as soon as its previous step returns); None means one per stage.
    micro_batches: int | None = None
    # Independent copies of the whole model, each with its own shards and KV pool.
    replicas: int = 1
    # Ray placement. "stage": each stage's TP group packed on one node (STRICT_PACK), stages
    # placed independently. Or one Ray strategy for all shards: PACK, SPREAD, STRICT_PACK,
    # STRICT_SPREAD.
    placement_strategy: str = "stage"
    # Ray resources each shard asks for; None: 1 GPU per shard when the cluster has GPUs.
    num_gpus_per_shard: float | None = None
    num_cpus_per_shard: float = 0.5
    # A stuck peer fails a collective after this long instead of torch's 30 minutes.
    collective_timeout_s: float = 120.0
    # A step that takes longer than this counts as a failed shard.
    step_timeout_s: float = 600.0
    # How long to wait for the cluster to have room for the shards (at start and restart).
    placement_timeout_s: float = 120.0


@dataclass
class CacheConfig:
    block_size: int = 16
    # Per-shard KV budget in bytes ("2GiB"); None uses kv_memory_fraction of free memory.
    kv_cache_memory: int | None = None
    kv_memory_fraction: float = 0.25
    # Exact number of blocks (mostly for tests); overrides both budgets.
    num_kv_blocks: int | None = None
    # Reuse the KV of full blocks whose prefix an earlier request computed (cluster/kv_manager.py).
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    scheduling_policy: str = "continuous"  # continuous | static
    max_num_seqs: int = 64
    # Tokens per step; None: 512 on CPU, 2048 on GPU (bench/batched_tokens.py: on CPU, larger
    # budgets gain no throughput and stall every running stream for seconds per step).
    max_num_batched_tokens: int | None = None
    # Requests waiting beyond this are refused (RESOURCE_EXHAUSTED) instead of queued.
    max_waiting_requests: int = 1024


@dataclass
class SpeculativeConfig:
    """Speculative decoding (cluster/speculative.py): a cheap proposer guesses num_tokens
    tokens per decoding sequence and the model verifies them in one step. Greedy outputs are
    unchanged, sampled ones keep the model's distribution."""
    # none | ngram (prompt lookup) | draft (a small model) | draft_head (a small MLP on the
    # model's own last hidden state: workers/draft_head.py)
    method: str = "none"
    num_tokens: int = 3  # proposed per sequence per step (a request may ask for fewer)
    # method draft: a model with the target's tokenizer; draft_head: a head's directory
    # (both from shardserve distill)
    draft_model: str | None = None
    # The draft's weights: auto is int8-weight on CPU (half the bytes, and the draft's
    # numbers cannot change an output), none on GPU; or none / int8-weight.
    draft_quantization: str = "auto"
    # A draft stops proposing for a sequence after a token it gives less than this
    # probability (0: always num_tokens).
    draft_min_probability: float = 0.0
    ngram_max: int = 4  # method ngram: longest and shortest suffix looked up
    ngram_min: int = 1
    # method draft or draft_head: a sequence whose latest tokens occurred before takes the
    # n-gram proposal (no draft step), the draft proposes for the rest.
    ngram_first: bool = False
    # Above this many running (or waiting) sequences, nobody speculates that step: verifying
    # k+1 tokens per sequence then costs more compute than the saved steps give back
    # (bench/README.md); 0 never switches off.
    disable_above_batch: int = 8


SPECULATIVE_METHODS = ("none", "ngram", "draft", "draft_head")
QUANTIZATIONS = ("none", "int8-weight", "w8a8-smoothquant", "llm-int8")
CPU_GEMMS = ("auto", "panels", "onednn")
SPARSITIES = ("none", "2:4")
SPARSITY_SCORES = ("activation", "magnitude")


@dataclass
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "auto"
    # How keys and values are stored: auto (the model's dtype, token-exact), float32,
    # bfloat16 or float16 (half the memory and traffic), int8 (about a quarter of float32's,
    # a scale per cached vector); the last three within a stated tolerance.
    kv_cache_dtype: str = "auto"
    # none; int8-weight: int8 weights with a scale per output channel (a quarter of
    # float32's bytes), activations unchanged; w8a8-smoothquant: the weights of a smoothed
    # checkpoint as int8 and each token's activations quantized to int8, int8 x int8 GEMMs;
    # llm-int8: int8 x int8 too, but the outlier features (llm_int8_threshold) in float32.
    # Within a stated tolerance (README).
    quantization: str = "none"
    # w8a8-smoothquant's migration strength: 0 keeps the activations' range, 1 moves all of it
    # into the weights.
    smoothquant_alpha: float = 0.5
    # llm-int8: input features with any |x| above this are multiplied in float32.
    llm_int8_threshold: float = 6.0
    # 2:4: two of every four input weights of each decoder linear zeroed once at start (the
    # pruned copy is cached), stored as values plus places (about 9/16 of float32's bytes, or
    # 3/4 of int8's); composes with int8-weight. Changes the model's outputs (README).
    sparsity: str = "none"
    # which two stay: activation (|W| times the input channel's norm on a calibration text,
    # Wanda) or magnitude (|W|)
    sparsity_score: str = "activation"
    # CPU layout of float32 weights: panels (our gemm.c), onednn, or auto (oneDNN on Intel
    # CPUs, the panels elsewhere: what measured faster on each, bench/README.md).
    cpu_gemm: str = "auto"
    device: str = "auto"
    # Longest prompt + output; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    seed: int = 0
    # CPU threads per shard; None: torch's default in-process, cores / shards per node in Ray.
    num_threads: int | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p, c, s, sp = self.parallel, self.kv_cache, self.scheduler, self.speculative
        if isinstance(c.kv_cache_memory, str):
            c.kv_cache_memory = parse_bytes(c.kv_cache_memory)
        checks = [
            (p.tensor_parallel_size >= 1, "parallel.tensor_parallel_size must be >= 1"),
            (p.pipeline_parallel_size >= 1, "parallel.pipeline_parallel_size must be >= 1"),
            (p.replicas >= 1, "parallel.replicas must be >= 1"),
            (p.micro_batches is None or p.micro_batches >= 1,
             "parallel.micro_batches must be >= 1"),
            (p.stage_layers is None or len(p.stage_layers) == p.pipeline_parallel_size,
             "parallel.stage_layers needs one entry per pipeline stage "
             f"({p.pipeline_parallel_size})"),
            (p.stage_layers is None or all(n >= 1 for n in p.stage_layers),
             "parallel.stage_layers entries must be >= 1"),
            (p.placement_strategy in ("stage", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "parallel.placement_strategy must be stage, PACK, SPREAD, STRICT_PACK or "
             "STRICT_SPREAD"),
            (c.block_size >= 1, "kv_cache.block_size must be >= 1"),
            (0 < c.kv_memory_fraction <= 1, "kv_cache.kv_memory_fraction must be in (0, 1]"),
            (c.kv_cache_memory is None or c.kv_cache_memory > 0,
             "kv_cache.kv_cache_memory must be positive"),
            (c.num_kv_blocks is None or c.num_kv_blocks >= 1,
             "kv_cache.num_kv_blocks must be >= 1"),
            (s.scheduling_policy in ("continuous", "static"),
             "scheduler.scheduling_policy must be continuous or static"),
            (s.max_num_seqs >= 1, "scheduler.max_num_seqs must be >= 1"),
            (s.max_num_batched_tokens is None or s.max_num_batched_tokens >= 1,
             "scheduler.max_num_batched_tokens must be >= 1"),
            (s.max_waiting_requests >= 0, "scheduler.max_waiting_requests must be >= 0"),
            (self.max_model_len is None or self.max_model_len >= 2,
             "max_model_len must be >= 2"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "dtype must be auto, float32, bfloat16 or float16"),
            (self.kv_cache_dtype in ("auto", "float32", "bfloat16", "float16", "int8"),
             "kv_cache_dtype must be auto, float32, bfloat16, float16 or int8"),
            (self.cpu_gemm in CPU_GEMMS, "cpu_gemm must be auto, panels or onednn"),
            (self.quantization in QUANTIZATIONS,
             f"quantization must be none, int8-weight, w8a8-smoothquant or llm-int8, got "
             f"{self.quantization!r}"),
            (self.llm_int8_threshold > 0, "llm_int8_threshold must be > 0"),
            (0 <= self.smoothquant_alpha <= 1, "smoothquant_alpha must be in [0, 1]"),
            (self.sparsity in SPARSITIES, f"sparsity must be none or 2:4, got {self.sparsity!r}"),
            (self.sparsity_score in SPARSITY_SCORES,
             f"sparsity_score must be activation or magnitude, got {self.sparsity_score!r}"),
            (sp.method in SPECULATIVE_METHODS,
             f"speculative.method must be none, ngram, draft or draft_head, got {sp.method!r}"),
            (sp.num_tokens >= 1, "speculative.num_tokens must be >= 1"),
            (sp.method != "draft" or bool(sp.draft_model),
             "speculative.method draft needs speculative.draft_model: a model directory with "
             "the target's tokenizer (shardserve distill makes one)"),
            (sp.method != "draft_head" or bool(sp.draft_model),
             "speculative.method draft_head needs speculative.draft_model: a draft head's "
             "directory (shardserve distill --head makes one)"),
            (1 <= sp.ngram_min <= sp.ngram_max,
             "speculative.ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max"),
            (sp.disable_above_batch >= 0, "speculative.disable_above_batch must be >= 0"),
            (sp.draft_quantization in ("auto", "none", "int8-weight"),
             "speculative.draft_quantization must be auto, none or int8-weight, got "
             f"{sp.draft_quantization!r}"),
            (0.0 <= sp.draft_min_probability < 1.0,
             "speculative.draft_min_probability must be in [0, 1)"),
            (self.sparsity == "none" or self.quantization in ("none", "int8-weight"),
             f"sparsity 2:4 composes with quantization none or int8-weight, not "
             f"{self.quantization} (its int8 x int8 kernel is dense)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def num_shards(self) -> int:
        return self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size

    def with_overrides(self, **overrides) -> "EngineConfig":
        """A copy with fields changed by their own name, whichever section holds them:
        `with_overrides(tensor_parallel_size=2, num_kv_blocks=64)`."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if dataclasses.is_dataclass(getattr(self, f.name))}
        top, nested = {}, {name: {} for name in sections}
        for key, value in overrides.items():
            if key in sections and isinstance(value, dict):  # a whole section by name
                nested[key].update(value)
                continue
            owner = next((name for name, sec in sections.items()
                          if key in {f.name for f in dataclasses.fields(sec)}), None)
            if owner:
                nested[owner][key] = value
            elif key in {f.name for f in dataclasses.fields(self)}:
                top[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return dataclasses.replace(
            self, **top, **{name: dataclasses.replace(sec, **nested[name])
                            for name, sec in sections.items()})


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9400  # None disables the Prometheus endpoint
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API; None disables it
    # Where the Prometheus endpoint listens; None: the same address as gRPC (host).
    metrics_host: str | None = None
    # Ray cluster to join: None starts a local one; "auto" joins the one on this node.
    address: str | None = None
    # On SIGTERM/SIGINT: requests in flight get this long to finish (new ones are refused
    # with UNAVAILABLE, health says NOT_SERVING); those still running then are aborted.
    drain_grace_s: float = 30.0
    # gRPC over TLS: a PEM certificate (chain) and its private key, both or neither. The
    # HTTP front end reads the same two keys.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # API keys, one per line; with any key (here or in the SHARDSERVE_API_KEY environment
    # variable, comma-separated) the Generation service needs `authorization: Bearer <key>`.
    api_key_file: str | None = None
    # What one request may ask for; past a limit it gets INVALID_ARGUMENT naming it.
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        self.limits.validate()
        if self.drain_grace_s < 0:
            raise ValueError(f"server.drain_grace_s must be >= 0 (seconds), got "
                             f"{self.drain_grace_s}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together: set "
                             "both (TLS) or neither (plaintext)")


def _from_dict(cls, data, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where or 'the config'}; "
                         f"known keys: {', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        hint, name = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            values[key] = _from_dict(hint, value, name)
            continue
        values[key] = _check_type(value, hint, name)
    return cls(**values)


def _check_type(value, hint, name: str):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    origin = typing.get_origin(base) or base
    if name.endswith(("kv_cache_memory", "_bytes")):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a size such as 4MiB, got {value!r}")
        try:
            return parse_bytes(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        return value
    if origin in (int, float, str, bool) and type(value) is origin:
        return value
    raise ValueError(f"{name} must be {getattr(origin, '__name__', origin)}, got {value!r}")


def load_config(path: str | Path | None) -> tuple[EngineConfig, ServerConfig]:
    """Engine and server settings from a YAML file (None: all defaults)."""
    if path is None:
        return EngineConfig(), ServerConfig()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    server = _from_dict(ServerConfig, data.pop("server", None), "server")
    try:
        engine = _from_dict(EngineConfig, data, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return engine, server
