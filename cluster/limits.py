"""Limits on what one request may ask for, checked before any work is done for it.

Each limit is a key of the `server.limits` config section, and a request past one is refused
with a message that names it (INVALID_ARGUMENT over gRPC). They bound the memory and CPU one
request can take before the engine sees it: a 100 MB prompt is not tokenized, a thousand stop
strings are not searched after every token. Every front end calls `check_request`.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB, MIB = 2 ** 10, 2 ** 20


@dataclass
class RequestLimits:
    max_message_bytes: int = 4 * MIB  # one request message, as received
    max_prompt_bytes: int = 1 * MIB  # prompt text, or the chat messages' contents together
    max_prompt_tokens: int | None = None  # None: the model's context limit (max_model_len)
    max_chat_messages: int = 256
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256  # each stop string
    max_stop_token_ids: int = 64
    max_request_id_bytes: int = 256

    def validate(self) -> None:
        for name, value in vars(self).items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"server.limits.{name} must be a positive integer")


def check_request(limits: RequestLimits, *, text: str | None = None,
                  token_ids: list[int] | None = None,
                  chat: list[dict[str, str]] | None = None, stop: tuple[str, ...] = (),
                  stop_token_ids: tuple[int, ...] = (), request_id: str = "") -> None:
    """Raise ValueError naming the first limit the request is past."""

    def refuse(what: str, value: int, name: str) -> None:
        raise ValueError(f"{what} is {value:,}, over the server's limit of "
                         f"{getattr(limits, name):,} (server.limits.{name})")

    def utf8(s: str) -> int:
        return len(s.encode("utf-8", "surrogatepass"))

    if utf8(request_id) > limits.max_request_id_bytes:
        refuse("request_id length in bytes", utf8(request_id), "max_request_id_bytes")
    if text is not None and utf8(text) > limits.max_prompt_bytes:
        refuse("prompt length in bytes", utf8(text), "max_prompt_bytes")
    if token_ids is not None:
        check_prompt_tokens(limits, len(token_ids))
    if chat is not None:
        if len(chat) > limits.max_chat_messages:
            refuse("the number of chat messages", len(chat), "max_chat_messages")
        size = sum(utf8(m.get("content") or "") + utf8(m.get("role") or "") for m in chat)
        if size > limits.max_prompt_bytes:
            refuse("the chat messages' length in bytes", size, "max_prompt_bytes")
    if len(stop) > limits.max_stop_strings:
        refuse("the number of stop strings", len(stop), "max_stop_strings")
    longest = max((utf8(s) for s in stop), default=0)
    if longest > limits.max_stop_string_bytes:
        refuse("a stop string's length in bytes", longest, "max_stop_string_bytes")
    if len(stop_token_ids) > limits.max_stop_token_ids:
        refuse("the number of stop_token_ids", len(stop_token_ids), "max_stop_token_ids")


def check_prompt_tokens(limits: RequestLimits, count: int) -> None:
    if limits.max_prompt_tokens is not None and count > limits.max_prompt_tokens:
        raise ValueError(f"the prompt has {count:,} tokens, over the server's limit of "
                         f"{limits.max_prompt_tokens:,} (server.limits.max_prompt_tokens)")
