"""Streaming text that may stop in the middle of a marker (``<think>``, ``<|end|>``): what is safe to show."""

from __future__ import annotations

from collections.abc import Sequence


def held(text: str, markers: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of one of ``markers`` (kept back until the
    next piece tells)."""
    longest = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), longest, -1):
            if m.startswith(text[-k:]):
                longest = k
                break
    return longest
