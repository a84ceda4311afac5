"""A chat reply split into its reasoning and its answer, piece by piece as it streams.

Two formats, as llama.cpp's and vLLM's reasoning parsers read them:
- ``ThinkSplitter``: Qwen3 / DeepSeek-R1 ``<think>...</think>`` blocks (a template that opens the block in the
  prompt starts the reply inside it);
- ``HarmonySplitter``: gpt-oss harmony messages: the ``analysis`` channel is reasoning, ``final`` (and a
  ``commentary`` preamble) is the answer, and a ``commentary`` message ``to=functions.NAME`` is a tool call.

Both turn text pieces into ``Part``s; joining the parts of one field gives the same text however the reply was
cut into pieces, so a streamed reply joins to the non-streamed one.
"""

from __future__ import annotations

import dataclasses
import re

from imp_jax.serving.holdback import held

CONTENT, REASONING, CALL = "content", "reasoning_content", "call"


@dataclasses.dataclass(frozen=True)
class Part:
    """Text for one field of the reply. A CALL part is a whole tool call: ``name`` and its argument text, with
    ``raw`` the framing it came in (shown as content when the arguments are malformed)."""

    field: str
    text: str
    name: str | None = None
    raw: str = ""


class ThinkSplitter:
    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, *, in_reasoning: bool = False):
        self._reasoning = in_reasoning
        self._strip = in_reasoning  # whitespace right after a tag is framing, not text
        self._buf = ""

    def push(self, text: str) -> list[Part]:
        self._buf += text
        parts: list[Part] = []
        while True:
            marker = self.CLOSE if self._reasoning else self.OPEN
            i = self._buf.find(marker)
            if i < 0:
                break
            self._emit(parts, self._buf[:i])
            self._buf = self._buf[i + len(marker) :]
            self._reasoning = not self._reasoning
            self._strip = True
        keep = held(self._buf, (self.CLOSE if self._reasoning else self.OPEN,))
        self._emit(parts, self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return parts

    def finish(self) -> list[Part]:
        parts: list[Part] = []
        self._emit(parts, self._buf)
        self._buf = ""
        return parts

    def _emit(self, parts: list[Part], text: str) -> None:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        if text:
            parts.append(Part(REASONING if self._reasoning else CONTENT, text))


_CLOSERS = ("<|end|>", "<|return|>", "<|call|>")
_CHANNEL = re.compile(r"<\|channel\|>([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class HarmonySplitter:
    """Harmony framing in, parts out. A reply starts in a message header (the prompt ends ``<|start|>assistant``);
    the header runs to ``<|message|>``, the body to ``<|end|>`` (or the end of generation: the EOS tokens
    ``<|return|>`` / ``<|call|>`` are not in the text)."""

    def __init__(self):
        self._buf = ""
        self._header: str | None = ""  # None while in a message body
        self._field = CONTENT
        self._name: str | None = None
        self._call = ""

    def push(self, text: str) -> list[Part]:
        self._buf += text
        parts: list[Part] = []
        while True:
            if self._header is not None:
                i = self._buf.find("<|message|>")
                if i < 0:
                    return parts
                self._open(self._header + self._buf[:i])
                self._buf = self._buf[i + len("<|message|>") :]
                continue
            hits = [(j, c) for c in _CLOSERS if (j := self._buf.find(c)) >= 0]
            if not hits:
                keep = held(self._buf, _CLOSERS)
                self._body(parts, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return parts
            j, closer = min(hits)
            self._body(parts, self._buf[:j])
            self._buf = self._buf[j + len(closer) :]
            self._close(parts)

    def finish(self) -> list[Part]:
        parts: list[Part] = []
        if self._header is None:
            self._body(parts, self._buf)
            self._close(parts)
        else:
            rest = self._header + self._buf
            if rest.strip() and not re.fullmatch(r"\s*(<\|start\|>)?\s*assistant\s*", rest):
                parts.append(Part(CONTENT, rest))
        self._buf, self._header = "", ""
        return parts

    def _open(self, header: str) -> None:
        channel = m[1] if (m := _CHANNEL.search(header)) else ""
        recipient = m[1] if (m := _RECIPIENT.search(header)) else ""
        self._header = None
        self._raw_header = header
        if recipient.startswith("functions."):
            self._field, self._name, self._call = CALL, recipient[len("functions.") :], ""
        else:
            self._field, self._name = (REASONING if channel == "analysis" else CONTENT), None

    def _body(self, parts: list[Part], text: str) -> None:
        if self._field == CALL:
            self._call += text
        elif text:
            parts.append(Part(self._field, text))

    def _close(self, parts: list[Part]) -> None:
        if self._field == CALL:
            raw = f"{self._raw_header}<|message|>{self._call}"
            parts.append(Part(CALL, self._call, name=self._name, raw=raw))
        self._header, self._field, self._name, self._call = "", CONTENT, None, ""
