"""Server-sent events as OpenAI streams them: ``data: JSON`` blocks, ``data: [DONE]`` last.

A chunk's text is a Python str the engine's detokenizer completed, so each carries whole UTF-8 characters.
"""

from __future__ import annotations

import json


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def done() -> str:
    return "data: [DONE]\n\n"
