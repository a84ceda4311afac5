"""End-to-end decode/prefill on one GPU, one call, one table (issue 7).

For each synthetic model shape and quant: imp-jax with the Pallas kernels, imp-jax on the XLA path
(IMP_JAX_KERNELS=0: dequantize + dot inside the step), and transformers/PyTorch bf16 (static-shape eager decode)
on the same GPU, built from the same shape (dense, GDN hybrid, MoE, gpt-oss). Decode tok/s at batch 1 and 8
(tg), prefill tok/s (pp), and the decode roofline: bytes read per token (every weight but the embedding table; of
each MoE layer only the routed experts) over the HBM copy bandwidth measured in the same run.

Usage (device; JAX must not preallocate so PyTorch has room):
XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/e2e.py --paths pallas,xla --torch
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp

from imp_jax import bench
from imp_jax.models.config import GPT_OSS, LLAMA, QWEN3, QWEN3MOE, QWEN35, RECURRENT
from imp_jax.ops.policy import resolve_kernels
from imp_jax.weights.synthetic import SHAPES


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
    policy = resolve_kernels("auto" if kernels else "off")
    params, cfg, _, _ = bench.synthetic_model(shape, quant, "bfloat16", kernels=policy)
    per_token = bench.decode_bytes_per_token(params, cfg)
    label = "imp-jax pallas" if kernels else "imp-jax xla"
    out = []
    for n in pp:
        bench.time_prefill(params, cfg, n, jnp.bfloat16, 1, policy)
        t = min(bench.time_prefill(params, cfg, n, jnp.bfloat16, 1, policy) for _ in range(3))
        out.append(dict(engine=label, shape=shape, quant=quant, test=f"pp{n}", batch=1, tok_s=n / t))
    for b in batches:
        bench.time_decode(params, cfg, tg, jnp.bfloat16, b, policy)
        t = min(bench.time_decode(params, cfg, tg, jnp.bfloat16, b, policy) for _ in range(3))
        row = dict(engine=label, shape=shape, quant=quant, test=f"tg{tg}", batch=b, tok_s=b * tg / t)
        if b == 1:
            roof = bw * 1e9 / per_token
            row.update(gb_per_token=per_token / 1e9, roofline=roof, pct=100 * (tg / t) / roof)
        out.append(row)
    del params
    gc.collect()
    return out


def hf_config(shape: str):
    """The transformers config of a synthetic shape, every size taken from imp-jax's own ModelConfig of it, so both
    engines run the same layers (routed experts, GDN heads, sliding windows included)."""
    import transformers as tf

    c = SHAPES[shape].config
    common = dict(
        hidden_size=c.n_embd, num_hidden_layers=c.n_layers, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head_kv, head_dim=c.head_dim, vocab_size=c.vocab_size,
        tie_word_embeddings=c.tied_output, max_position_embeddings=c.context_length,
    )  # fmt: skip
    m, g = c.moe, c.gdn
    if c.arch == LLAMA:
        return tf.LlamaConfig(**common, intermediate_size=c.n_ff)
    if c.arch == QWEN3:
        return tf.Qwen3Config(**common, intermediate_size=c.n_ff)
    if c.arch == QWEN3MOE:
        return tf.Qwen3MoeConfig(
            **common, moe_intermediate_size=m.n_ff_exp, num_experts=m.n_experts, num_experts_per_tok=m.top_k,
            norm_topk_prob=m.norm_topk, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if c.arch == QWEN35:  # rope: the config's defaults are Qwen3.5's (partial 0.25, interleaved mrope)
        return tf.Qwen3_5TextConfig(
            **common, intermediate_size=c.n_ff, linear_conv_kernel_dim=g.conv_kernel,
            linear_key_head_dim=g.head_k_dim, linear_value_head_dim=g.head_v_dim, linear_num_key_heads=g.n_k_heads,
            linear_num_value_heads=g.n_v_heads,
            layer_types=["linear_attention" if k == RECURRENT else "full_attention" for k in c.kinds],
        )  # fmt: skip
    if c.arch == GPT_OSS:
        return tf.GptOssConfig(
            **common, intermediate_size=m.n_ff_exp, num_local_experts=m.n_experts, num_experts_per_tok=m.top_k,
            sliding_window=max(c.layer_window),
            layer_types=["sliding_attention" if w else "full_attention" for w in c.layer_window],
        )  # fmt: skip
    raise SystemExit(f"--torch: no transformers baseline for {shape} ({c.arch})")


def torch_bytes_per_token(model, config) -> int:
    """bf16 bytes one batch-1 decode step reads: every parameter but the embedding table, and of the routed expert
    stacks (transformers keeps them as 3-D ``experts.*`` parameters) only the ``top_k`` experts of a token."""
    routed = getattr(config, "num_experts_per_tok", 0) / max(
        getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0), 1
    )
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size() * (routed if ".experts." in name else 1)
    return int(total)


def torch_rows(shape: str, pp: list[int], tg: int, batches: list[int], bw: float, device: str = "cuda"):
    """transformers in bf16 on the same GPU: eager, static cache (no per-step allocation), greedy host loop."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import StaticCache

    config = hf_config(shape)
    torch.manual_seed(0)
    with torch.device(device):  # built in bf16 where it runs: a 27B model has no room for an f32 copy
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    per_token = torch_bytes_per_token(model, config)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    out = []
    with torch.no_grad():
        for n in pp:
            ids = torch.arange(n, device=device)[None] % config.vocab_size
            model(ids)
            sync()
            t0 = time.perf_counter()
            model(ids)
            sync()
            out.append(dict(engine="torch bf16", shape=shape, quant="bf16", test=f"pp{n}", batch=1,
                            tok_s=n / (time.perf_counter() - t0)))  # fmt: skip
        for b in batches:
            cache = StaticCache(config=config, max_cache_len=tg + 8)
            tok = torch.zeros((b, 1), dtype=torch.long, device=device)

            def run(cache=cache, tok=tok, model=model) -> float:
                """Seconds for tg greedy steps after a one-token prompt (as bench.time_decode times imp-jax)."""
                cache.reset()
                model(tok, past_key_values=cache, cache_position=torch.tensor([0], device=device))
                sync()
                t0 = time.perf_counter()
                for i in range(tg):
                    pos = torch.tensor([i + 1], device=device)
                    logits = model(tok, past_key_values=cache, cache_position=pos).logits
                    tok = logits[:, -1:].argmax(-1)
                sync()
                return time.perf_counter() - t0

            run()
            t = run()
            row = dict(engine="torch bf16", shape=shape, quant="bf16", test=f"tg{tg}", batch=b, tok_s=b * tg / t)
            if b == 1:
                roof = bw * 1e9 / per_token
                row.update(gb_per_token=per_token / 1e9, roofline=roof, pct=100 * (tg / t) / roof)
            out.append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-8b")
    ap.add_argument("--quants", default="mxfp4,q8_0")
    ap.add_argument("--pp", default="512,4096")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument(
        "--paths", default="pallas", help="imp-jax paths: pallas (kernels), xla (dequantize + dot), both, or none"
    )
    ap.add_argument("--torch", action="store_true", help="also transformers bf16 (eager, static cache)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    paths = [] if args.paths == "none" else args.paths.split(",")
    if not set(paths) <= {"pallas", "xla"} or not (paths or args.torch):
        ap.error(f"--paths takes pallas and/or xla, or none with --torch; not {args.paths}")
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
        if args.torch:
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
