"""imp-jax beside llama.cpp on the same GGUF files, same GPU, same call (issue 22 item 3; issues 14, 17).

How to run it on the H200. Here first: ``python scripts/llamacpp_tree.py`` and ``python benchmarks/random_gguf.py
tokenizer``; every call carries ``[".llama"]`` (29 MiB: llama.cpp source, gguf wheel, tokenizer) and starts with
``S="pip install -q --no-index --no-deps --target /tmp/site .llama/wheels/*.whl"; $S; export PYTHONPATH=.:/tmp/site
PYTHONUNBUFFERED=1;`` (called P below).

1. build start (seconds; the build then runs about 7 minutes under setsid, GPU tests can follow in the same call):
   ``bash benchmarks/device_llamacpp.sh start``
2. build wait, write the 16 GB F16 file and quantize the four others (about 3 minutes after the build):
   ``P; bash benchmarks/device_llamacpp.sh wait 540 && python benchmarks/vs_llamacpp.py --prepare-only``
3. benchmark, split across calls (llama-bench about 1 minute a file, imp-jax 1-2 minutes a file):
   ``P; python benchmarks/vs_llamacpp.py --files f16,q8_0 --out $OUT/vs_a.json`` then
   ``P; python benchmarks/vs_llamacpp.py --files q4_k_m,q5_k_m,mxfp4 --out $OUT/vs_b.json``

Files live in /tmp/vs-llamacpp (the device's disk, kept while the machine stays warm). For every file: llama-bench
(``-p 512 -n 128 -r 5 -ngl 99 -fa 1``, median of its samples) beside imp-jax's pp512 and tg128 at batch 1 and 8
(``imp_jax.bench.run``), and the decode roofline: weight bytes a token reads (every tensor in the file but the
embedding table) over the copy bandwidth measured in the same run (``e2e.copy_bandwidth``).
``model_files`` and ``llama_load_time`` are for the cold-start benchmark to import.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from random_gguf import DEFAULT_TOKENIZER, SHAPES, write_model  # noqa: E402

BIN = Path("/tmp/llama-build/bin")
WORK = Path("/tmp/vs-llamacpp")
SHAPE = "qwen3-8b"
# file -> (llama-quantize type, extra arguments); all files are made from the F16 one.
QUANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "q8_0": ("Q8_0", ()),
    "q4_k_m": ("Q4_K_M", ()),
    "q5_k_m": ("Q5_K_M", ()),
    "mxfp4": ("Q8_0", ("--tensor-type", r"blk\.=mxfp4")),  # every block matrix MXFP4, embeddings Q8_0
}
FILES = ("f16", *QUANTS)
BENCH_ARGS = ("-p", "512", "-n", "128", "-r", "5", "-ngl", "99", "-fa", "1", "-o", "json")


def model_files(names: tuple[str, ...] = FILES, work: Path = WORK) -> dict[str, Path]:
    """Where each file of the Qwen3-8B shape lives on the device."""
    return {name: work / f"{SHAPE}-{name}.gguf" for name in names}


def prepare(names: tuple[str, ...], tokenizer: Path = DEFAULT_TOKENIZER) -> dict[str, Path]:
    """Write the F16 file and quantize the others with llama-quantize, each only if it is not there yet."""
    paths = model_files(("f16", *names))
    paths["f16"].parent.mkdir(parents=True, exist_ok=True)
    if not paths["f16"].exists():
        t0 = time.perf_counter()
        write_model(SHAPES[SHAPE], tokenizer, paths["f16"].with_suffix(".tmp"))
        paths["f16"].with_suffix(".tmp").rename(paths["f16"])
        print(f"wrote {paths['f16']} in {time.perf_counter() - t0:.0f} s", flush=True)
    for name in names:
        if name == "f16" or paths[name].exists():
            continue
        qtype, extra = QUANTS[name]
        tmp = paths[name].with_suffix(".tmp")
        t0 = time.perf_counter()
        run = subprocess.run([str(BIN / "llama-quantize"), *extra, str(paths["f16"]), str(tmp), qtype, "16"],
                             capture_output=True, text=True)  # fmt: skip
        if run.returncode:
            raise SystemExit(f"llama-quantize {name} failed:\n{run.stderr[-2000:]}")
        tmp.rename(paths[name])
        print(f"quantized {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {n: paths[n] for n in names}


def parse_llama_bench(text: str) -> dict[str, dict]:
    """llama-bench ``-o json`` -> {"pp512": {...}, "tg128": {...}}: tok/s as the median of the samples."""
    out = {}
    for r in json.loads(text):
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        samples = r.get("samples_ts") or [r["avg_ts"]]
        out[test] = dict(tok_s=statistics.median(samples), mean=r["avg_ts"], stdev=r["stddev_ts"], n=len(samples))
    return out


def llama_bench(path: Path) -> dict[str, dict]:
    run = subprocess.run([str(BIN / "llama-bench"), "-m", str(path), *BENCH_ARGS], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"llama-bench {path.name} failed:\n{run.stderr[-2000:]}")
    return parse_llama_bench(run.stdout)


LOAD_RE = re.compile(r"load time\s*=\s*([\d.]+) ms")
TOTAL_RE = re.compile(r"total time\s*=\s*([\d.]+) ms")


def parse_load_time(log: str) -> dict[str, float]:
    """llama.cpp's own load and total times (ms) from its perf printout."""
    load, total = LOAD_RE.findall(log), TOTAL_RE.findall(log)
    return dict(load_ms=float(load[-1]) if load else float("nan"), total_ms=float(total[-1]) if total else float("nan"))


def llama_load_time(path: Path, n: int = 32) -> dict[str, float]:
    """Cold start of llama.cpp: llama-completion on a short prompt, its printed load/total times and the wall time."""
    cmd = [str(BIN / "llama-completion"), "-m", str(path), "-p", "hi", "-n", str(n), "-ngl", "99", "-no-cnv"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"llama-completion {path.name} failed:\n{run.stderr[-2000:]}")
    return dict(parse_load_time(run.stderr + run.stdout), wall_s=wall)


def decode_bytes(path: Path) -> int:
    """Weight bytes one decode step reads, from the file: every tensor but the embedding table (gathered)."""
    from imp_jax.gguf.reader import open_gguf

    mf = open_gguf(path)
    return sum(t.nbytes for name, t in mf.tensors.items() if name != "token_embd.weight")


def imp_bench(path: Path, batches: tuple[int, ...]) -> dict[str, dict]:
    """imp-jax's pp512 / tg128 on the file (``imp_jax.bench.run``'s timing), tg at each batch size."""
    import jax.numpy as jnp

    import imp_jax
    from imp_jax import bench

    model = imp_jax.load(path, max_context=1024, batch=max(batches), progress=False)
    common = dict(name=SHAPE, quant=path.stem, size_bytes=path.stat().st_size, n_params=0, dtype=jnp.bfloat16, reps=5,
                  kernels=model.kernels)  # fmt: skip
    out = {}
    for b in batches:
        for row in bench.run(model.params, model.config, pp=512 if b == 1 else 0, tg=128, batch=b, **common):
            out[row.test if b == 1 else f"{row.test}_b{b}"] = dict(tok_s=row.tok_s, stdev=row.stdev, batch=b)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default=",".join(FILES), help=f"comma list of {', '.join(FILES)}")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prepare-only", action="store_true", help="write and quantize the files, no benchmark")
    ap.add_argument("--skip-imp", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    names = tuple(args.files.split(","))
    if unknown := set(names) - set(FILES):
        ap.error(f"unknown files {sorted(unknown)}; known: {', '.join(FILES)}")
    paths = prepare(names, args.tokenizer)
    if args.prepare_only:
        return
    from e2e import copy_bandwidth

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    results = {}
    for name, path in paths.items():
        per_token = decode_bytes(path)
        r = dict(file=str(path), gib=path.stat().st_size / 2**30, gb_per_token=per_token / 1e9,
                 roofline_tok_s=bw * 1e9 / per_token)  # fmt: skip
        if not args.skip_llama:
            r["llama.cpp"] = llama_bench(path)
        if not args.skip_imp:
            r["imp-jax"] = imp_bench(path, tuple(int(b) for b in args.batches.split(",")))
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(dict(copy_gb_s=bw, shape=SHAPE, files=results), indent=1))


def table(results: dict[str, dict]) -> str:
    """One row per file and test: both engines' tok/s and each one's % of the decode roofline (tg at batch 1)."""
    lines = ["| file | GiB | test | llama.cpp t/s | imp-jax t/s | imp/llama | llama % roof | imp % roof |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        llama, imp = r.get("llama.cpp", {}), r.get("imp-jax", {})
        for test in dict.fromkeys([*llama, *imp]):
            lt, it = llama.get(test, {}).get("tok_s"), imp.get(test, {}).get("tok_s")
            roof = r["roofline_tok_s"] if test.startswith("tg") and "_b" not in test else None
            ratio = f"{it / lt:.2f}" if lt and it else "-"
            cells = [_num(lt), _num(it), ratio, _pct(lt, roof), _pct(it, roof)]
            lines.append(f"| {name} | {r['gib']:.2f} | {test} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return f"{x:.1f}" if x else "-"


def _pct(x: float | None, roof: float | None) -> str:
    return f"{100 * x / roof:.0f}%" if x and roof else "-"


if __name__ == "__main__":
    main()
