"""OpenAI's harmony response format (gpt-oss): a reply's reasoning apart from its final answer.

After a prompt that ends in ``<|start|>assistant``, a harmony model writes messages such as
``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...`` and ends with
``<|return|>`` (or ``<|call|>`` after a tool call). The tokenizer shows ``<|start|>``, ``<|channel|>``,
``<|message|>`` and ``<|end|>`` as text (as llama.cpp does for these vocabularies), so the split works on the
generated text alone.
"""

from __future__ import annotations

import re

from imp_jax.text.tokenizer import Tokenizer

MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")

# One message: optional ``<|start|>role``, the channel and the rest of the header (`` to=functions.f``,
# ``<|constrain|>json``), then the content up to the token that closes it or the end of the text.
_MESSAGE = re.compile(
    r"(?:<\|start\|>[^<]*)?<\|channel\|>(?P<channel>[^<\s]+)[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>"
    r"(?P<content>.*?)(?:<\|end\|>|<\|return\|>|<\|call\|>|$)",
    re.DOTALL,
)


def is_harmony(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary has harmony's framing tokens (gpt-oss's o200k_harmony does)."""
    return all(tokenizer.piece_to_id(m) is not None for m in MARKERS)


def split_reply(text: str) -> tuple[str, str | None]:
    """(answer, reasoning) of a generated harmony reply.

    The reasoning is the ``analysis`` messages, None when there are none. The answer is the ``final`` messages;
    without one (a tool call, or a reply cut off while reasoning) it is the text left once the analysis messages
    are taken out, framing included, so nothing the model wrote is lost. Text without harmony framing is returned
    as it is.
    """
    messages = list(_MESSAGE.finditer(text))
    if not messages:
        return text, None
    analysis = [m["content"] for m in messages if m["channel"] == "analysis"]
    final = [m["content"] for m in messages if m["channel"] == "final"]
    reasoning = "\n".join(analysis) if analysis else None
    if final:
        return "\n".join(final), reasoning
    return _MESSAGE.sub(lambda m: "" if m["channel"] == "analysis" else m[0], text), reasoning
