"""What a user sees while imp-jax works: the loading line, load progress (also off a terminal), and the end-of-run
numbers llama.cpp users expect (load time, prompt and decode tok/s, time to first token).

Everything goes to stderr, so stdout stays the model's text and can be piped. Nothing here decides whether to
speak: callers pass that in (the CLI from --quiet, ``load(progress=...)`` from its argument).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

PLAIN_INTERVAL_S = 2.0  # off a terminal, at most one progress line this often


def say(message: str) -> None:
    """One line on stderr, prefixed like the CLI's errors so a log shows who spoke."""
    print(f"imp-jax: {message}", file=sys.stderr, flush=True)


def size_words(n: int) -> str:
    """File sizes as people read them (decimal, like ls -h --si and download pages): "98.4 MB", "1.12 GB"."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n} B"


def byte_progress(label: str, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(advance(n_bytes), close()) for a long copy: a rich bar on a terminal, else a plain line every couple of
    seconds (a log or CI shows the load is moving; a fast load prints nothing)."""
    console = Console(stderr=True)
    if console.is_terminal:
        bar = Progress(
            TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True
        )
        task = bar.add_task(label, total=total)
        bar.start()
        return (lambda n: bar.advance(task, n)), bar.stop
    state = {"done": 0, "last": time.monotonic()}

    def advance(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= PLAIN_INTERVAL_S:
            state["last"] = now
            say(f"{label}: {100 * state['done'] // max(total, 1)}% of {size_words(total)}")

    return advance, lambda: None


@dataclasses.dataclass
class RunStats:
    """One generation as the user saw it, timed from outside the engine (the CLI's summary line)."""

    load_s: float | None
    prompt_tokens: int
    ttft_s: float = 0.0  # call to first piece: the prefill and the first sampled token
    generated_tokens: int = 0
    decode_s: float = 0.0  # first piece to last

    def line(self) -> str:
        """`load 6.2 s, prompt 8 tok at 54.9 tok/s, decode 31 tok at 14.7 tok/s, TTFT 0.15 s`."""
        parts = [] if self.load_s is None else [f"load {self.load_s:.1f} s"]
        parts.append(f"prompt {self.prompt_tokens} tok at {_rate(self.prompt_tokens, self.ttft_s)}")
        parts.append(f"decode {self.generated_tokens} tok at {_rate(self.generated_tokens - 1, self.decode_s)}")
        parts.append(f"TTFT {self.ttft_s:.2f} s")
        return ", ".join(parts)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if seconds > 0 and n > 0 else "- tok/s"


def timed(pieces: Iterable[str], stats: RunStats, count: Callable[[str], int]) -> Iterator[str]:
    """Pass the pieces through, filling ``stats`` as they come; ``count`` gives the tokens of the text so far
    (the stream yields text, not ids). Closing this generator closes ``pieces``: a stopped reply stops the engine."""
    t0 = time.perf_counter()
    first = None
    text = []
    try:
        for piece in pieces:
            if first is None:
                first = time.perf_counter()
                stats.ttft_s = first - t0
            text.append(piece)
            yield piece
    finally:
        if first is not None:
            stats.decode_s = time.perf_counter() - first
        stats.generated_tokens = count("".join(text))
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
