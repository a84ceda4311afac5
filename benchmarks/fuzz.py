"""The load-path fuzz at scale: tests/mutants.py's cases over a worker pool, each with a time limit.

    python benchmarks/fuzz.py --n 20000 [--workers 1] [--limit-s 30] [--record docs/FUZZ.md]
    python benchmarks/fuzz.py --corruption 300 --record docs/FUZZ.md   # issue 20's SmolLM2 corruption run

Cases are spread over the bases in the proportions of the CI run (tests/fuzz_cases.py: CI_COUNTS) and run
through the same ``run_case``. Each worker is a spawned process; a case that outlives its limit (plus a grace
period, for code that does not return to Python to see the alarm) has its worker killed and counts as a hang, a
worker that dies counts as a crash, and both are restarted. Workers run under an ``RLIMIT_DATA`` cap, so a case
that tries to allocate past it fails with MemoryError (an escape) instead of swapping. The outcome table (counts
by ImpError class, escapes, hangs, crashes, the slowest case) is printed, and with ``--record`` written into the
file between ``<!-- fuzz:MODE -->`` markers.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import resource
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.mutants import CORRUPTION, KINDS

GRACE_S = 15.0


def _worker(conn, labels: tuple[str, ...], kinds: tuple[str, ...], seed: int, limit_s: float, data_cap: int) -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (data_cap, data_cap))
    from tests.fuzz_cases import open_bases, run_case
    from tests.mutants import mutant

    folder = Path(tempfile.mkdtemp(prefix="imp-jax-fuzz-"))
    bases = {b.label: b for b in open_bases(folder, labels)}
    path = folder / "case.gguf"
    conn.send("ready")
    while (job := conn.recv()) is not None:
        label, index = job
        case = mutant(bases[label], index, seed, kinds)
        outcome = run_case(case.write(path), small=bases[label].small, limit_s=limit_s)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send((case.kind, case.label, outcome.kind, outcome.detail, outcome.seconds, rss))


class _Slot:
    """One worker process and the case it is running."""

    def __init__(self, ctx, args):
        self.ctx, self.args = ctx, args
        self.start()

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        child.close()
        self.conn.recv()  # "ready": the bases are open
        self.job, self.t0 = None, 0.0

    def restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.start()


def run(jobs: list[tuple[str, int]], *, labels, kinds, seed, workers, limit_s, data_cap) -> list[tuple]:
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx, (labels, kinds, seed, limit_s, data_cap)) for _ in range(workers)]
    pending = list(reversed(jobs))
    results: list[tuple] = []
    t_start, shown = time.perf_counter(), 0
    while pending or any(s.job for s in slots):
        for s in slots:
            if s.job is None and pending:
                s.job, s.t0 = pending.pop(), time.perf_counter()
                s.conn.send(s.job)
        busy = [s for s in slots if s.job]
        ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
        for s in busy:
            label, index = s.job
            if s.conn in ready:
                try:
                    results.append(s.conn.recv())
                    s.job = None
                    continue
                except EOFError:
                    pass
            elapsed = time.perf_counter() - s.t0
            if s.proc.sentinel in ready or not s.proc.is_alive():
                results.append(("?", f"{label}#{index}", "crash", f"exit code {s.proc.exitcode}", elapsed, 0))
                s.restart()
            elif elapsed > limit_s + GRACE_S:
                results.append(("?", f"{label}#{index}", "hang", f"killed after {elapsed:.0f} s", elapsed, 0))
                s.restart()
        if len(results) >= shown + 500:
            shown = len(results)
            rate = len(results) / (time.perf_counter() - t_start)
            print(f"{len(results)}/{len(jobs)} cases, {rate:.1f}/s", file=sys.stderr, flush=True)
    for s in slots:
        s.conn.send(None)
        s.proc.join(timeout=10)
    return results


def spread(n: int, counts: dict[str, int]) -> list[tuple[str, int]]:
    """n (base, index) jobs in the proportions of ``counts``, interleaved so a cut-short run still covers all."""
    total = sum(counts.values())
    per = {label: max(1, round(n * c / total)) for label, c in counts.items()}
    jobs = [(label, i) for label, k in per.items() for i in range(k)]
    return sorted(jobs, key=lambda j: (j[1] / per[j[0]], j[0]))


def report(results: list[tuple], *, title: str, wall_s: float, note: str) -> str:
    by_outcome = collections.Counter(r[2] for r in results)
    by_base = collections.defaultdict(collections.Counter)
    by_kind = collections.defaultdict(collections.Counter)
    for kind, label, outcome, *_ in results:
        by_base[label.split("#")[0]][outcome] += 1
        by_kind[kind][outcome] += 1
    columns = sorted(by_outcome, key=lambda k: (k != "ok", -by_outcome[k]))
    bad = [r for r in results if r[2] in ("escape", "timeout", "hang", "crash", "over_plan")]
    slowest = max(results, key=lambda r: r[4])
    peak = max(r[5] for r in results)
    lines = [f"### {title}", "", note, "",
             f"{len(results)} cases in {wall_s / 60:.1f} min; peak worker RSS {peak / 2**20:.0f} MiB; "
             f"non-ImpError outcomes (escape, timeout, hang, crash, over_plan): **{len(bad)}**.", "",
             "| | " + " | ".join(columns) + " | total |", "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    for name, table in [("all", {"all": by_outcome}), ("base", by_base), ("mutation", by_kind)]:
        for row, c in sorted(table.items()):
            label = row if name != "all" else "**all**"
            lines.append(f"| {label} | " + " | ".join(str(c.get(k, 0)) for k in columns) + f" | {sum(c.values())} |")
    lines += ["", f"Slowest case: {slowest[4]:.2f} s, `{slowest[1]}` ({slowest[2]}: {slowest[3][:160]})"]
    lines += [f"- `{r[1]}`: {r[2]}: {r[3][:200]}" for r in bad[:20]]
    return "\n".join(lines) + "\n"


def record(path: Path, mode: str, text: str) -> None:
    begin, end = f"<!-- fuzz:{mode} -->", f"<!-- /fuzz:{mode} -->"
    old = path.read_text() if path.exists() else "# Fuzzing the load path\n"
    block = f"{begin}\n{text}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="cases over all bases")
    ap.add_argument("--corruption", type=int, default=0, help="run issue 20's SmolLM2 corruption run of N cases")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--limit-s", type=float, default=30.0, help="per-case time limit")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data-cap-gib", type=float, default=6.0, help="RLIMIT_DATA of each worker")
    ap.add_argument("--record", type=Path, help="write the table into this markdown file")
    args = ap.parse_args()
    from tests.fuzz_cases import CI_COUNTS

    if args.corruption:
        mode, labels, kinds = "corruption", ("smollm2-135m",), CORRUPTION
        jobs = [("smollm2-135m", i) for i in range(args.corruption)]
        title = f"SmolLM2 corruption run ({args.corruption} cases)"
        note = (
            "Issue 20's run: SmolLM2-135M-Instruct.Q4_1.gguf cut short, a tensor's data offset rewritten, or 1-4 "
            f"bytes of the first 64 KiB set (kinds {', '.join(kinds)}), each case in a worker process. Measured "
            "2026-12-03 before the fix: 282 GGUFError, 18 bare `Exception` from `tokenizers`."
        )
    else:
        mode, labels, kinds = "scale", tuple(CI_COUNTS), tuple(KINDS)
        jobs = spread(args.n, CI_COUNTS)
        title = f"{len(jobs)} mutants over the two tiny fixtures and three registry models"
        note = ("Every mutation kind of tests/mutants.py, bases in the CI run's proportions, through "
                "tests/fuzz_cases.py's `run_case`.")  # fmt: skip
    command = " ".join(sys.argv[1:])
    note += (
        f" Seed {args.seed}, {args.workers} worker(s), per-case limit {args.limit_s:g} s, RLIMIT_DATA "
        f"{args.data_cap_gib:g} GiB. Command: `python benchmarks/fuzz.py {command}`."
    )
    t0 = time.perf_counter()
    results = run(jobs, labels=labels, kinds=kinds, seed=args.seed, workers=args.workers, limit_s=args.limit_s,
                  data_cap=int(args.data_cap_gib * 2**30))  # fmt: skip
    text = report(results, title=title, wall_s=time.perf_counter() - t0, note=note)
    print(text)
    if args.record:
        record(args.record, mode, text)


if __name__ == "__main__":
    main()
