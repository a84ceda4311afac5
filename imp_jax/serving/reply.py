"""One chat choice's reply as it streams: text pieces in, OpenAI delta fields and tool calls out."""

from __future__ import annotations

from imp_jax.serving.reasoning import CALL, CONTENT, REASONING, HarmonySplitter, Part, ThinkSplitter
from imp_jax.serving.schemas import ToolCall
from imp_jax.serving.tool_calls import HermesStream, make_call


class ChatReply:
    """``push`` a text piece, get ``[(field, text)]`` to send; ``finish`` gives the rest and the tool calls.
    ``splitter`` separates reasoning (None: the model does not reason); ``tools``: parse tool calls."""

    def __init__(self, splitter: ThinkSplitter | HarmonySplitter | None, *, tools: bool):
        self._splitter = splitter
        self._hermes = HermesStream() if tools and not isinstance(splitter, HarmonySplitter) else None
        self._tools = tools
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[tuple[str, str]]:
        parts = self._splitter.push(text) if self._splitter else [Part(CONTENT, text)]
        return self._fields(parts)

    def finish(self) -> list[tuple[str, str]]:
        out = self._fields(self._splitter.finish()) if self._splitter else []
        if self._hermes is not None:
            rest, calls = self._hermes.finish()
            self.calls += calls
            if rest:
                out.append((CONTENT, rest))
        return out

    def _fields(self, parts: list[Part]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for p in parts:
            if p.field == CALL:
                call = make_call(p.name, p.text) if self._tools else None
                if call is None:
                    out.append((CONTENT, p.raw))
                else:
                    self.calls.append(call)
            elif p.field == CONTENT and self._hermes is not None:
                if text := self._hermes.push(p.text):
                    out.append((CONTENT, text))
            elif p.text:
                out.append((p.field if p.field in (CONTENT, REASONING) else CONTENT, p.text))
        return out
