"""XLA's memory accounting of the serving engine's programs at several page-pool sizes.

The pool planner (``planning.pool``) measures engine_step's workspace on a small probe pool and assumes the pool's
size does not change it: the paged cache is donated and updated in place. This prints, for each pool size and
kernel mode, the compiled program's temp, argument, output and alias bytes, and how many whole-cache copies its
optimized HLO holds, so a workspace that grows with the pool (a copy of K or V) shows at once.

    PYTHONPATH=/tmp/site:. python3 benchmarks/step_memory.py --shape qwen3-8b --quant mxfp4 --pages 1024,8192
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import SyntheticModel

from imp_jax import bench
from imp_jax.ops.policy import REFERENCE, resolve_dtype, resolve_kernels
from imp_jax.runtime.engine import Engine
from imp_jax.runtime.steps import engine_step


def cache_copies(hlo: str, shape: tuple[int, ...]) -> int:
    """Copy instructions whose result has the paged cache's K (or V) shape."""
    dims = ",".join(str(d) for d in shape)
    return len(re.findall(rf"\[{dims}\]\{{[^}}]*\}} copy\(", hlo))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--quant", default="mxfp4")
    p.add_argument("--pages", default="1024,8192", help="page-pool sizes (pages of 16 tokens)")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--max-seqs", type=int, default=64)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--modes", default="kernels,reference", help="kernels (the device's default policy), reference")
    p.add_argument("--dump", default=None, help="write each program's optimized HLO into this folder")
    args = p.parse_args(argv)
    dtype = resolve_dtype("auto")
    print("| mode | pages | program | cache GiB | temp GiB | args GiB | output GiB | alias GiB | cache copies |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        kernels = resolve_kernels() if mode == "kernels" else REFERENCE
        params, cfg, _, _ = bench.synthetic_model(args.shape, args.quant, dtype, kernels=kernels)
        model = SyntheticModel(cfg, params, dtype, args.max_context, kernels)
        for pages in (int(n) for n in args.pages.split(",")):
            engine = Engine(model, page_size=16, n_pages=pages, max_seqs=args.max_seqs, prefix_caching=False,
                            token_budget=args.token_budget, decode_steps=8)  # fmt: skip
            cache_gib = sum(a.nbytes for a in jax.tree.leaves(engine.cache)) / 2**30
            covers = engine.cover_variants()
            prefill = [v for v in covers if not v.decode]
            for v in (*(v for v in covers if v.decode), prefill[0], prefill[-1]):
                call, statics = engine._abstract_call(v)
                compiled = engine_step.lower(*call, **statics).compile()
                m = compiled.memory_analysis()
                hlo = compiled.as_text()
                name = f"{'decode' if v.decode else 'prefill'} {v.rows}x{v.tokens} k={v.n_steps}"
                if args.dump:
                    out = Path(args.dump) / f"{mode}-{pages}-{name.replace(' ', '_')}.hlo.txt"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(hlo)
                gib = [x / 2**30 for x in (m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes,
                                           m.alias_size_in_bytes)]  # fmt: skip
                copies = cache_copies(hlo, tuple(engine.cache.k.shape))
                print(f"| {mode} | {pages} | {name} | {cache_gib:.2f} | " + " | ".join(f"{x:.2f}" for x in gib)
                      + f" | {copies} |", flush=True)  # fmt: skip
            del engine
            gc.collect()
        del params, model
        gc.collect()


if __name__ == "__main__":
    main()
