"""Incremental detokenization with stop strings.

Text is decoded a few tokens at a time (re-decoding a short window keeps multi-byte characters
and leading spaces right), checked for stop strings, and released for streaming only once it
can no longer turn out to be the start of a stop string.
"""

from __future__ import annotations

# Decoding the first output token alone can lose a leading space (SentencePiece); a few prompt
# tokens before it give the tokenizer the context it needs.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self._released = 0  # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> bool:
        """Append a token; True when the text now contains a stop string (it is cut there)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete character: wait for the next token
        new_text = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new_text
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def release(self, finished: bool) -> str:
        """Text not yet handed out that can no longer become part of a stop string."""
        end = len(self.text) if finished else max(self._released, len(self.text) - self._holdback)
        delta = self.text[self._released:end]
        self._released = end
        return delta
