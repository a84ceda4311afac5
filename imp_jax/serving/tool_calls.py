"""Tool calls in a model's reply, as OpenAI's ``message.tool_calls``.

Qwen / Hermes templates ask for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in the text;
harmony (gpt-oss) writes a ``commentary`` message ``to=functions.NAME`` whose body is the arguments (split out by
``reasoning.HarmonySplitter``). A call that does not parse stays in the reply as the text the model wrote.
"""

from __future__ import annotations

import json
import re
import uuid

from imp_jax.serving.holdback import held
from imp_jax.serving.schemas import FunctionCall, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def make_call(name: str | None, arguments: object) -> ToolCall | None:
    """A ToolCall when ``name`` is a name and ``arguments`` a JSON object (or its text); None otherwise."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=json.dumps(arguments)))


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """(the text left, the calls) of a reply with ``<tool_call>`` blocks; a block that does not parse stays."""
    calls: list[ToolCall] = []

    def take(m: re.Match) -> str:
        try:
            body = json.loads(m[1])
        except ValueError:
            return m[0]
        call = make_call(body.get("name"), body.get("arguments", {})) if isinstance(body, dict) else None
        if call is None:
            return m[0]
        calls.append(call)
        return ""

    rest = _BLOCK.sub(take, text)
    return (rest.strip() if calls else rest), calls


class HermesStream:
    """Answer text in, the part that is surely not a tool call out; from the first ``<tool_call>`` on, the text
    is kept for ``finish`` to parse (OpenAI streams a call whole once it is known)."""

    def __init__(self):
        self._buf = ""
        self._in_calls = False

    def push(self, text: str) -> str:
        self._buf += text
        if self._in_calls:
            return ""
        i = self._buf.find(OPEN)
        if i >= 0:
            self._in_calls = True
            out, self._buf = self._buf[:i], self._buf[i:]
            return out
        keep = held(self._buf, (OPEN,))
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buf = self._buf, ""
        return parse_hermes(text) if self._in_calls else (text, [])
