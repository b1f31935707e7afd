"""Admission: the checks every front end runs on a request before it is queued.

The gRPC servicer (server.py) and the OpenAI-compatible HTTP API (openai_api.py) take
requests in different shapes but admit them the same way: the request must be within the
server's limits (`server.limits`), its prompt is tokenized (or put through the chat template),
and the prompt and sampling options must be valid for the model. Tokenization and validation
run on worker threads, so a large prompt never stalls other streams or health checks. Bad
input raises ValueError with a message that names the field or the limit; each front end turns
that into its own "invalid argument" answer.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from shardserve.workers.step import SamplingParams

from .limits import RequestLimits, check_prompt_tokens, check_request
from .router import Router


class Admission:
    def __init__(self, router: Router, limits: RequestLimits):
        self.router = router
        self.limits = limits
        # Few threads: a pile of huge prompts waits its turn here rather than crowding the
        # event loop's thread off the CPU.
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def prompt_tokens(self, *, text: str | None = None, token_ids: list[int] | None = None,
                            chat: list[dict[str, str]] | None = None,
                            stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
                            request_id: str = "") -> list[int]:
        """The prompt (exactly one of text, token_ids, chat) as token ids, within the limits.
        No prompt at all gives no tokens, which `validate` refuses. Raises ValueError."""
        check_request(self.limits, text=text, token_ids=token_ids, chat=chat, stop=stop,
                      stop_token_ids=stop_token_ids, request_id=request_id)
        return await self.off_loop(self._tokenize, text, token_ids, chat)

    def _tokenize(self, text: str | None, token_ids: list[int] | None,
                  chat: list[dict[str, str]] | None) -> list[int]:
        if chat is not None:
            ids = self.router.tokenize_chat(chat)
        elif text is not None:
            ids = self.router.tokenize(text)
        else:
            ids = list(token_ids or [])
        check_prompt_tokens(self.limits, len(ids))
        return ids

    async def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the prompt or the options are not valid for the model."""
        await self.off_loop(self.router.validate, token_ids, params)

    def room_for_output(self, prompt_tokens: int) -> int:
        """The most tokens a request with this prompt may generate: what is left of the
        context limit and of the KV cache (at least 1, so `validate` names the real problem)."""
        engine = self.router.engine
        return max(1, min(engine.max_model_len, engine.kv.capacity_tokens) - prompt_tokens)
