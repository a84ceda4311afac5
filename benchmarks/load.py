"""Cold start: load seconds and GB/s, compile seconds (cold and cached), time to first token, whole-run wall time.

Usage:
    python benchmarks/load.py --models smollm2-135m,gemma3-270m,qwen2.5-0.5b        # CPU: the registry models
    python benchmarks/load.py --models /tmp/q8_0.gguf,/tmp/q4_k_m.gguf --llama-completion BUILD/bin/llama-completion

Each model runs in new processes, the page cache warm (the file is read once first):

- ``cold``: an empty compile cache; ``cached``: the same cache again (what every run after the first sees);
- in each process: ``load_s`` (``imp_jax.load``: open, plan, weights on the device), the file's GB/s over it,
  ``compile_s`` (XLA backend compiles or compile-cache reads during load + first generation, from
  jax.monitoring; ``cache_hits`` says how many were reads), ``ttft_s`` (first
  ``generate`` of a 5-token prompt until its first token, compiles included) and ``gen_s`` (32 tokens);
- ``load_s`` ends when the weights are on the device; the first prefill and decode steps compile ahead on a
  worker thread meanwhile (``runtime.compiled_steps``), and what is left of that wait is in ``ttft_s``;
- ``phases``: ``Model.load_timings``, the seconds of each part of the load (open, tokenizer, plan, engine,
  weights); ``--stacks FILE`` also appends every thread's stack to FILE every 10 s, for a load that outlives a
  device call's limit;
- ``wall_s``: the whole ``imp-jax generate -n 32`` command in a new process, the way a user runs it;
- llama.cpp, with ``--llama-completion``: the same prompt and 32 tokens through ``llama-completion``, its wall
  time and the load time it prints.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PROMPT = "The capital of France is"
TOKENS = 32


def _dump_stacks_every(seconds: float, path: str) -> None:
    """Append every thread's Python stack to ``path`` every ``seconds``, from a daemon thread that holds the GIL
    while it reads them (faulthandler's periodic dump reads running threads' frames without it, and segfaulted
    the load on the H200)."""

    def loop() -> None:
        while True:
            time.sleep(seconds)
            frames = sys._current_frames()
            with open(path, "a") as f:
                f.write(f"--- {time.strftime('%H:%M:%S')}\n")
                for ident, frame in frames.items():
                    if ident != threading.get_ident():
                        f.write(f"thread {ident}\n" + "".join(traceback.format_stack(frame)))

    threading.Thread(target=loop, daemon=True).start()


def child(model: str, cache: str, max_context: int, stacks: str | None = None, profile: str | None = None) -> dict:
    """Runs inside a new process: one load and one generation, timed. With ``stacks``, every thread's Python
    stack is appended to that file every 10 s: where a load that outlives its time limit is. With
    ``profile``, the load and the first generation run under cProfile and the 40 costliest calls (cumulative) are
    appended to that file."""
    t_start = time.perf_counter()
    if stacks:
        _dump_stacks_every(10, stacks)
    import jax

    compiles: list[float] = []
    hits: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compiles.append(secs) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    jax.monitoring.register_event_listener(
        lambda name, **_: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
    )
    import imp_jax
    from imp_jax.weights.files import open_model_file

    imp_jax.load  # noqa: B018 - imports imp_jax.model (import_s, not load_s)
    t_import = time.perf_counter()
    size = sum(t.nbytes for t in open_model_file(model).tensors.values())
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    m = imp_jax.load(model, max_context=max_context, compile_cache=cache)
    jax.block_until_ready(m.params)
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    load_compile = sum(compiles)
    t1 = time.perf_counter()
    stream = imp_jax.generate(m, PROMPT, max_tokens=TOKENS, stream=True)
    next(stream)
    ttft = time.perf_counter() - t1
    for _ in stream:
        pass
    if profiler:
        profiler.disable()
        with open(profile, "a") as f:
            f.write(f"=== {model} cache {cache} ({len(os.listdir(cache))} entries after)\n")
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
    return dict(
        import_s=t_import - t_start,
        load_s=load_s,
        phases={k: round(v, 3) for k, v in m.load_timings.items()},  # open, tokenizer, plan, engine, weights
        load_cpu_s=load_cpu_s,  # CPU seconds of every thread: what a shared, loaded machine does not inflate
        gb_s=size / load_s / 1e9,
        file_gb=size / 1e9,
        compile_load_s=load_compile,
        compile_s=sum(compiles),
        cache_hits=len(hits),
        ttft_s=ttft,
        gen_s=time.perf_counter() - t1,
        backend=jax.devices()[0].platform,
        loadavg=os.getloadavg()[0],
    )


def _run_child(model: str, cache: str, max_context: int, stacks: str | None, profile: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", model, "--cache", cache, "--max-context", str(max_context)]
    cmd += ["--stacks", stacks] if stacks else []
    cmd += ["--profile", profile] if profile else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - t0, out.stdout + out.stderr


def _warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def _llama(binary: str, model: Path) -> dict:
    cmd = [binary, "-m", str(model), "-p", PROMPT, "-n", str(TOKENS), "-ngl", "99", "--temp", "0", "-no-cnv"]
    wall, text = _wall(cmd, dict(os.environ))
    m = re.search(r"load time\s*=\s*([\d.]+)\s*ms", text)
    return dict(llama_wall_s=wall, llama_load_s=float(m.group(1)) / 1e3 if m else None)


def measure(
    model: str,
    max_context: int,
    llama: str | None,
    stacks: str | None = None,
    profile: str | None = None,
    wall: bool = True,
) -> dict:
    from imp_jax import registry

    path = registry.resolve(model)
    _warm_page_cache(Path(path))
    row: dict = dict(model=Path(path).name)
    with tempfile.TemporaryDirectory() as cache:
        row["cold"] = _run_child(str(path), cache, max_context, stacks, profile)
        print(json.dumps(row), flush=True)  # a row cut short by a time limit still says how the cold load went
        row["cached"] = _run_child(str(path), cache, max_context, stacks, profile)
        cli = [sys.executable, "-m", "imp_jax.cli", "generate", "--model", str(path), "-n", str(TOKENS), PROMPT]
        if wall:
            row["wall_cached_s"], _ = _wall(cli, dict(os.environ, IMP_JAX_COMPILE_CACHE=cache))
    if wall:
        with tempfile.TemporaryDirectory() as cache:
            row["wall_cold_s"], _ = _wall(cli, dict(os.environ, IMP_JAX_COMPILE_CACHE=cache))
    if llama:
        row.update(_llama(llama, Path(path)))
    return row


def table(rows: list[dict]) -> str:
    head = (
        f"{'model':<34} {'GB':>6} {'load s':>13} {'GB/s':>11} {'compile s':>13} {'TTFT s':>13} "
        f"{'wall s':>13} {'llama.cpp load/wall s':>22}"
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")  # a column not measured (--no-wall)
    for r in rows:
        c, w = r["cold"], r["cached"]
        if "error" in c or "error" in w:
            lines.append(f"{r['model']:<34} error: {c.get('error') or w.get('error')}")
            continue
        llama = f"{r['llama_load_s'] or float('nan'):.2f} / {r['llama_wall_s']:.2f}" if "llama_wall_s" in r else "-"
        lines.append(
            f"{r['model']:<34} {w['file_gb']:>6.2f} {c['load_s']:>6.2f}/{w['load_s']:<6.2f} "
            f"{c['gb_s']:>5.3f}/{w['gb_s']:<5.3f} {c['compile_s']:>6.2f}/{w['compile_s']:<6.2f} "
            f"{c['ttft_s']:>6.2f}/{w['ttft_s']:<6.2f} {r.get('wall_cold_s', nan):>6.2f}/"
            f"{r.get('wall_cached_s', nan):<6.2f} {llama:>22}"
        )
    lines.append("cold/cached: an empty compile cache / the same cache again; page cache warm in both")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--llama-completion", default=None, help="llama.cpp's llama-completion binary, to run beside")
    ap.add_argument("--json", default=None, help="write the rows here too")
    ap.add_argument("--stacks", default=None, help="append every thread's stack here every 10 s (slow loads)")
    ap.add_argument("--profile", default=None, help="append a cProfile of each load + first generation here")
    ap.add_argument("--no-wall", action="store_true", help="skip the whole-command wall times (two processes)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.max_context, args.stacks, args.profile)))
        return 0
    rows = []
    for name in args.models.split(","):  # each row printed and saved as soon as it is measured
        rows.append(
            measure(name, args.max_context, args.llama_completion, args.stacks, args.profile, wall=not args.no_wall)
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
