"""Per-request detokenizer: generated ids in, text pieces out, with EOS and stop strings.

Each request of the engine owns one. Text that could be the start of a stop string is held back until it can no
longer be (so a streamed piece never shows text a stop string later cuts); a stop string ends the text right
before it.
"""

from __future__ import annotations

from collections.abc import Iterable

from imp_jax.text.tokenizer import Tokenizer


class StopDetokenizer:
    """Push generated ids one at a time; ``finished`` and ``finish_reason`` ("stop") turn on at an EOS id or a
    stop string. ``text`` is everything generated so far (up to any stop string); the pieces returned by ``push``
    and ``flush`` join to it."""

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), *, eos: bool = True):
        self.stop = tuple(s for s in stop if s)
        self.eos_ids = tokenizer.eos_ids if eos else frozenset()
        self._decoder = tokenizer.stream()
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._emitted = 0
        self.text = ""
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        """The newly safe text after this token ('' when held back or finished). An EOS id is not part of the
        output; the token that completes a stop string is (its text is cut)."""
        if self.finished:
            return ""
        if token_id in self.eos_ids:
            self._finish()
            return self.flush()
        self.token_ids.append(int(token_id))
        self.text += self._decoder.push(token_id)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._finish(flush_decoder=False)
            return self.flush()
        safe = len(self.text) - self._hold
        if safe > self._emitted:
            piece, self._emitted = self.text[self._emitted : safe], safe
            return piece
        return ""

    def _finish(self, *, flush_decoder: bool = True) -> None:
        if flush_decoder:
            self.text += self._decoder.finish()
        self.finished = True
        self.finish_reason = "stop"

    def flush(self) -> str:
        """Everything not yet returned (call once when the request ends for any reason)."""
        if not self.finished:
            self.text += self._decoder.finish()
            self.finished = True
        piece, self._emitted = self.text[self._emitted :], len(self.text)
        return piece
