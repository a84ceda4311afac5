"""End-to-end decode/prefill on one GPU, one call, one table (issue 7).

For each synthetic model shape and quant: imp-jax with the Pallas kernels, imp-jax on the XLA path
(IMP_JAX_KERNELS=0: dequantize + dot inside the step), and transformers/PyTorch bf16 (static-shape eager decode)
on the same GPU. Decode tok/s at batch 1 and 8 (tg), prefill tok/s (pp), and the decode roofline: bytes read per
token (every weight but the embedding table) over the HBM copy bandwidth measured in the same run.

Usage (device; JAX must not preallocate so PyTorch has room):
XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/e2e.py --paths pallas,xla --torch
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import jax
import jax.numpy as jnp

from imp_jax import bench
from imp_jax.config import QWEN3
from imp_jax.synthetic import SHAPES


def copy_bandwidth() -> float:
    """Device copy GB/s counting bytes read + written (the roofline's denominator)."""
    x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB, updated in place so no step waits on an allocation
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(x).block_until_ready()
    nbytes, reps = x.nbytes, 20
    t0 = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t0) / 1e9


def imp_rows(shape: str, quant: str, kernels: bool, pp: list[int], tg: int, batches: list[int], bw: float):
    os.environ["IMP_JAX_KERNELS"] = "1" if kernels else "0"
    params, cfg, _, _ = bench.synthetic_model(shape, quant, "bfloat16")
    per_token = bench.decode_bytes_per_token(params, cfg)
    label = "imp-jax pallas" if kernels else "imp-jax xla"
    out = []
    for n in pp:
        bench.time_prefill(params, cfg, n, jnp.bfloat16)
        t = min(bench.time_prefill(params, cfg, n, jnp.bfloat16) for _ in range(3))
        out.append(dict(engine=label, shape=shape, quant=quant, test=f"pp{n}", batch=1, tok_s=n / t))
    for b in batches:
        bench.time_decode(params, cfg, tg, jnp.bfloat16, b)
        t = min(bench.time_decode(params, cfg, tg, jnp.bfloat16, b) for _ in range(3))
        row = dict(engine=label, shape=shape, quant=quant, test=f"tg{tg}", batch=b, tok_s=b * tg / t)
        if b == 1:
            roof = bw * 1e9 / per_token
            row.update(gb_per_token=per_token / 1e9, roofline=roof, pct=100 * (tg / t) / roof)
        out.append(row)
    del params
    gc.collect()
    return out


def torch_rows(shape: str, pp: list[int], tg: int, batches: list[int], bw: float):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.cache_utils import StaticCache

    s = SHAPES[shape].config
    config = Qwen3Config(
        hidden_size=s.n_embd, intermediate_size=s.n_ff, num_hidden_layers=s.n_layers, num_attention_heads=s.n_head,
        num_key_value_heads=s.n_head_kv, head_dim=s.head_dim, vocab_size=s.vocab_size, tie_word_embeddings=False,
        max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    per_token = sum(p.numel() * 2 for p in model.parameters()) - s.vocab_size * s.n_embd * 2
    out = []
    with torch.no_grad():
        for n in pp:
            ids = torch.arange(n, device="cuda")[None] % s.vocab_size
            model(ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            out.append(dict(engine="torch bf16", shape=shape, quant="bf16", test=f"pp{n}", batch=1,
                            tok_s=n / (time.perf_counter() - t0)))  # fmt: skip
        for b in batches:
            cache = StaticCache(config=config, max_cache_len=tg + 8)
            tok = torch.zeros((b, 1), dtype=torch.long, device="cuda")
            model(tok, past_key_values=cache, cache_position=torch.tensor([0], device="cuda"))

            def run(cache=cache, tok=tok, model=model):
                for i in range(tg):
                    pos = torch.tensor([i + 1], device="cuda")
                    logits = model(tok, past_key_values=cache, cache_position=pos).logits
                    tok = logits[:, -1:].argmax(-1)
                return tok

            cache.reset()
            run()
            cache.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            row = dict(engine="torch bf16", shape=shape, quant="bf16", test=f"tg{tg}", batch=b, tok_s=b * tg / t)
            if b == 1:
                roof = bw * 1e9 / per_token
                row.update(gb_per_token=per_token / 1e9, roofline=roof, pct=100 * (tg / t) / roof)
            out.append(row)
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-8b")
    ap.add_argument("--quants", default="mxfp4,q8_0")
    ap.add_argument("--pp", default="512,4096")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--paths", default="pallas", help="pallas (kernels), xla (dequantize + dot), or both")
    ap.add_argument("--torch", action="store_true", help="also transformers bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    paths = args.paths.split(",")
    if not set(paths) <= {"pallas", "xla"}:
        ap.error(f"--paths takes pallas and/or xla, not {args.paths}")
    pp = [int(x) for x in args.pp.split(",") if x]
    batches = [int(x) for x in args.batches.split(",")]
    bw = copy_bandwidth()
    print(f"device {jax.devices()[0].device_kind}, copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for quant in args.quants.split(","):
            for kernels in [p == "pallas" for p in paths]:
                new = imp_rows(shape, quant, kernels, pp, args.tg, batches, bw)
                rows += new
                for r in new:
                    print(json.dumps(r), flush=True)
        if args.torch and SHAPES[shape].arch == QWEN3:  # the transformers baseline is built for dense Qwen3
            jax.clear_caches()
            new = torch_rows(shape, pp, args.tg, batches, bw)
            rows += new
            for r in new:
                print(json.dumps(r), flush=True)
    print("\n| engine | shape | quant | test | batch | tok/s | GB/token | roofline tok/s | % roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f"{r['gb_per_token']:.2f} | {r['roofline']:.0f} | {r['pct']:.0f}%" if "pct" in r else "- | - | -"
        print(
            f"| {r['engine']} | {r['shape']} | {r['quant']} | {r['test']} | {r['batch']} | {r['tok_s']:.1f} | {extra} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(copy_gb_s=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
