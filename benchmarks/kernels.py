"""One-call GPU benchmark of the Pallas kernels against their ceilings and the XLA path.

Run on the device machine from the repository root::

    PYTHONPATH=. python3 benchmarks/kernels.py [--only tune,bf16,matmul,attention,paged] [--out DIR]

The full matmul + attention run takes ~7 minutes on an H100 (compiles included); ``--models`` / ``--formats`` /
``--m`` narrow it. ``tune`` prints time and error of candidate matmul tilings (how ``pick_config`` was chosen).

Measures, in the same process: the HBM copy bandwidth (a 2 GiB device-to-device copy, bytes read + written) and
the bf16 dense matmul rate (8192^3 ``jnp.dot``), then each kernel at Qwen3-8B, Qwen3.5-9B and gpt-oss-20b shapes
next to the XLA path (dequantize + ``jnp.dot``; ``jax.nn.dot_product_attention``). Times are CUPTI device times
of every kernel a call launches (``mosaic.gpu.profiler.measure``), median over repetitions; weights rotate over
enough copies to exceed twice the L2 cache, so no timing reads its weights from L2. Prints a markdown table and
writes ``kernels.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax.experimental.mosaic.gpu import profiler

import pallas
from imp_jax.gguf.qtensor import QTensor
from imp_jax.ops.attention import attention_paged_gather
from pallas.attention_decode import paged_reference
from pallas.attention_decode import reference as decode_reference
from pallas.attention_prefill import reference as flash_reference

L2_BYTES = 50 * 2**20
REPS = 20

MATMUL_SHAPES = {  # (N, K) of y = x @ W.T
    "qwen3-8b": [(4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288)],
    "qwen3.5-9b": [(8192, 4096)],  # its FFN and GDN in-projection are 12288 x 4096, as Qwen3-8B's
    "gpt-oss-20b": [(2880, 2880), (4096, 2880)],
}
_T = GGMLQuantizationType
QTYPES = {"mxfp4": _T.MXFP4, "q8_0": _T.Q8_0, "q4_k": _T.Q4_K, "q5_k": _T.Q5_K, "q6_k": _T.Q6_K, "iq4_xs": _T.IQ4_XS}
F16_FIELDS = {_T.Q8_0: (0,), _T.Q4_K: (0, 2), _T.Q5_K: (0, 2), _T.Q6_K: (208,), _T.IQ4_XS: (0,)}  # f16 scales at


@dataclasses.dataclass
class Row:
    kernel: str
    model: str
    shape: str
    time_us: float
    gbps: float
    tflops: float
    pct_hbm: float
    pct_mma: float
    xla_us: float
    note: str = ""


def wall_clock_measure(fn, *, aggregate: bool = True, iterations: int = 1):
    """``profiler.measure``'s interface on wall-clock time, for runs under Nsight Compute (``--wall-clock``), which
    the CUPTI profiler refuses to share the GPU with. Its times include the dispatch: they are not for tables."""

    def run(*args):
        out = jax.block_until_ready(fn(*args))
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - t0) * 1e3)
        return out, times if aggregate else [[("pallas_wall_clock", t)] for t in times]

    return run


MEASURE = {"cupti": profiler.measure, "wall-clock": wall_clock_measure}
measure = MEASURE["cupti"]  # main() switches it for --wall-clock


def median_time_us(fn, *args, per_call: int = 1) -> float:
    """Median CUPTI device time of ``fn(*args)`` over REPS calls, divided by the work items it does."""
    _, times = measure(fn, iterations=REPS)(*args)
    return statistics.median(times) * 1e3 / per_call


def kernel_only_us(fn, *args, per_call: int = 1, prefix: str = "pallas_") -> float:
    """Median CUPTI time of just the Pallas kernels of ``fn(*args)`` (without XLA's epilogue ops)."""
    _, per_iter = measure(fn, aggregate=False, iterations=REPS)(*args)
    return statistics.median(sum(t for name, t in it if prefix in name) for it in per_iter) * 1e3 / per_call


def ceilings() -> dict:
    n = 2**30  # bf16 elements: 2 GiB read + 2 GiB written
    a = jnp.ones((n,), jnp.bfloat16)
    copy_us = median_time_us(jax.jit(lambda a, s: a * s), a, jnp.bfloat16(1.0))
    del a
    m = 8192
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, m)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((m, m)), jnp.bfloat16)
    mm_us = median_time_us(jax.jit(jnp.dot), x, y)
    return {"hbm_gbps": 4 * n / copy_us / 1e3, "bf16_tflops": 2 * m**3 / mm_us / 1e6}


def random_qtensor(rng, qtype, n, k) -> QTensor:
    block, type_size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n, k // block, type_size), dtype=np.uint8)
    if qtype == _T.MXFP4:
        b[..., 0] = rng.integers(112, 132, b.shape[:-1])
    for at in F16_FIELDS.get(qtype, ()):
        f16 = rng.uniform(1e-4, 2e-3, b.shape[:-1]).astype(np.float16)
        b[..., at : at + 2] = f16.view(np.uint8).reshape(*b.shape[:-1], 2)
    return QTensor(data=jnp.asarray(b.reshape(n, -1)), scale=None, qtype=int(qtype), shape=(n, k))


def bench_matmul(ceil: dict, ms: tuple[int, ...], formats: set[str], models: set[str]) -> list[Row]:
    rng = np.random.default_rng(1)
    rows = []
    for qname, qtype in QTYPES.items():
        for model, shapes in MATMUL_SHAPES.items():
            for n, k in shapes:
                if k % GGML_QUANT_SIZES[qtype][0] or qname not in formats or model not in models:
                    continue
                w = random_qtensor(rng, qtype, n, k)
                pw = pallas.repack(w)
                copies = max(2, min(16, math.ceil(2 * L2_BYTES / pw.nbytes)))
                pws = [jax.tree.map(jnp.copy, pw) for _ in range(copies)]
                qts = [jax.tree.map(jnp.copy, w) for _ in range(copies)]
                kern = jax.jit(lambda x, ws: [pallas.quantized_matmul(x, w) for w in ws])
                xla = jax.jit(lambda x, ws: [x @ w.dequantize(jnp.bfloat16).T for w in ws])
                for m in ms:
                    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                    ref = x.astype(jnp.float32) @ w.dequantize(jnp.float32).T
                    try:
                        got = kern(x, pws[:1])[0].astype(jnp.float32)
                        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                        t = median_time_us(kern, x, pws, per_call=copies)
                        t_kernel = kernel_only_us(kern, x, pws, per_call=copies)
                    except Exception as e:  # report and go on: one failing config must not hide the rest
                        print(f"FAILED {qname} M={m} N={n} K={k}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                        continue
                    t_xla = median_time_us(xla, x, qts, per_call=copies)
                    gbps, gguf_gbps = pw.nbytes / t / 1e3, w.data.nbytes / t / 1e3
                    tflops = 2 * m * n * k / t / 1e6
                    rows.append(
                        Row(
                            f"{qname} matmul",
                            model,
                            f"M={m} N={n} K={k}",
                            t,
                            gbps,
                            tflops,
                            100 * gbps / ceil["hbm_gbps"],
                            100 * tflops / ceil["bf16_tflops"],
                            t_xla,
                            f"err {err:.1e}; kernel alone {t_kernel:.1f} us; GGUF bytes {gguf_gbps:.0f} GB/s "
                            f"({100 * gguf_gbps / ceil['hbm_gbps']:.0f}%)",
                        )
                    )
                    print(_fmt(rows[-1]), flush=True)
                del pws, qts
    return rows


def bench_bf16(ceil: dict, ms: tuple[int, ...], models: set[str]) -> list[Row]:
    """bf16 weights: XLA's dot (cuBLAS), and the Pallas kernel reading the same weights in place (BF16 format)
    where the shape is on its grid, with XLA's time as its baseline."""
    rng = np.random.default_rng(2)
    rows = []
    for model, shapes in MATMUL_SHAPES.items():
        if model not in models:
            continue
        for n, k in shapes[:2]:
            copies = max(2, min(16, math.ceil(2 * L2_BYTES / (2 * n * k))))
            ws = [jnp.asarray(rng.standard_normal((n, k)) / 64, jnp.bfloat16) for _ in range(copies)]
            f = jax.jit(lambda x, ws: [x @ w.T for w in ws])
            kern = jax.jit(lambda x, ws: [pallas.quantized_matmul(x, pallas.dense_weight(w)) for w in ws])
            for m in ms:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                t_xla = median_time_us(f, x, ws, per_call=copies)
                timed = [("bf16 jnp.dot (XLA)", t_xla, "")]
                if pallas.can_view_dense(ws[0]):
                    try:
                        ref = x.astype(jnp.float32) @ ws[0].astype(jnp.float32).T
                        got = kern(x, ws[:1])[0].astype(jnp.float32)
                        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                        t = median_time_us(kern, x, ws, per_call=copies)
                        t_kernel = kernel_only_us(kern, x, ws, per_call=copies)
                        timed.append(("bf16 matmul (Pallas)", t, f"err {err:.1e}; kernel alone {t_kernel:.1f} us"))
                    except Exception as e:
                        print(f"FAILED bf16 M={m} N={n} K={k}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                for name, t, note in timed:
                    gbps, tflops = 2 * n * k / t / 1e3, 2 * m * n * k / t / 1e6
                    rows.append(Row(name, model, f"M={m} N={n} K={k}", t, gbps, tflops, 100 * gbps / ceil["hbm_gbps"],
                                    100 * tflops / ceil["bf16_tflops"], t_xla, note))  # fmt: skip
                    print(_fmt(rows[-1]), flush=True)
    return rows


ATTN_SHAPES = {  # heads, kv heads, head_dim, window, sinks
    "qwen3-8b": (32, 8, 128, None, False),
    "qwen3.5-9b": (16, 4, 256, None, False),
    "gpt-oss-20b": (64, 8, 64, 128, True),
}


def bench_flash(ceil: dict, models: set[str], seq: int = 4096) -> list[Row]:
    rng = np.random.default_rng(3)
    rows = []
    for model, (h, kv, hd, window, sink) in ATTN_SHAPES.items():
        if model not in models:
            continue
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, n, hd)), jnp.bfloat16) for n in (h, kv, kv))
        sinks = jnp.asarray(rng.standard_normal((h,)), jnp.float32) if sink else None
        kw = dict(causal=True, window=window, sinks=sinks, scale=hd**-0.5)
        f = jax.jit(functools.partial(pallas.flash_attention, **kw))
        try:
            out = f(q, k, v)
            ref = flash_reference(q, k, v, **kw)
            err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            t = median_time_us(f, q, k, v)
        except Exception as e:
            print(f"FAILED flash {model}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        xla = jax.jit(functools.partial(flash_reference, **kw))
        t_xla = median_time_us(xla, q, k, v)
        note = f"err {err:.1e}"
        if window is None:  # cuDNN flash attention has no sinks; compare where it applies
            cudnn = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            )
            try:
                note += f"; cuDNN {median_time_us(cudnn, q, k, v):.0f} us"
            except Exception as e:
                note += f"; cuDNN failed ({type(e).__name__})"
        # Visible (query, key) pairs: causal triangle, or the window band.
        pairs = seq * (seq + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(seq))
        tflops = 4 * h * pairs * hd / t / 1e6
        rows.append(Row(f"flash attention hd{hd}", model, f"T=S={seq} H={h}/{kv} w={window}", t, 0, tflops, 0,
                        100 * tflops / ceil["bf16_tflops"], t_xla, note))  # fmt: skip
        print(_fmt(rows[-1]), flush=True)
    return rows


def bench_decode_attention(ceil: dict, models: set[str]) -> list[Row]:
    rng = np.random.default_rng(4)
    rows = []
    for model, (h, kv, hd, window, sink) in ATTN_SHAPES.items():
        if model not in models:
            continue
        for b, ctx in ((1, 4096), (1, 32768), (8, 4096)):
            q = jnp.asarray(rng.standard_normal((b, 1, h, hd)), jnp.bfloat16)
            kc, vc = (jnp.asarray(rng.standard_normal((b, ctx, kv, hd)), jnp.bfloat16) for _ in range(2))
            lengths = jnp.full((b,), ctx, jnp.int32)
            sinks = jnp.asarray(rng.standard_normal((h,)), jnp.float32) if sink else None
            kw = dict(window=window, sinks=sinks, scale=hd**-0.5)
            f = jax.jit(functools.partial(pallas.decode_attention, **kw))
            try:
                out = f(q, kc, vc, lengths)
                ref = decode_reference(q, kc, vc, lengths, **kw)
                err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                t = median_time_us(f, q, kc, vc, lengths)
                t_kernel = kernel_only_us(f, q, kc, vc, lengths)
            except Exception as e:
                print(f"FAILED decode attention {model} B={b} ctx={ctx}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            t_xla = median_time_us(jax.jit(functools.partial(decode_reference, **kw)), q, kc, vc, lengths)
            keys = ctx if window is None else min(ctx, window)
            nbytes = 2 * b * keys * kv * hd * 2
            gbps = nbytes / t / 1e3
            rows.append(Row(f"decode attention hd{hd}", model, f"B={b} ctx={ctx} H={h}/{kv} w={window}", t, gbps,
                            4 * b * h * keys * hd / t / 1e6, 100 * gbps / ceil["hbm_gbps"], 0, t_xla,
                            f"err {err:.1e}; kernel alone {t_kernel:.1f} us"))  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
    return rows


def bench_paged_attention(ceil: dict, models: set[str], rows_ctx=((1, 4096), (16, 4096), (64, 4096)), page=16):
    """Decode attention through page tables (the engine's layout: layer 1 of a 2-layer pool read in place, every
    row's pages shuffled over the pool) against the jnp gather path and the contiguous kernel at the same shape."""
    rng = np.random.default_rng(5)
    rows = []
    for model, (h, kv, hd, window, sink) in ATTN_SHAPES.items():
        if model not in models:
            continue
        for b, ctx in rows_ctx:
            n_pg = ctx // page
            q = jnp.asarray(rng.standard_normal((b, 1, h, hd)), jnp.bfloat16)
            kp, vp = (jnp.asarray(rng.standard_normal((2, b * n_pg, page, kv, hd)), jnp.bfloat16) for _ in range(2))
            table = jnp.asarray(rng.permutation(b * n_pg).reshape(b, n_pg), jnp.int32)
            lengths = jnp.full((b,), ctx, jnp.int32)
            sinks = jnp.asarray(rng.standard_normal((h,)), jnp.float32) if sink else None
            kw = dict(window=window, sinks=sinks, scale=hd**-0.5)
            layer = jnp.int32(1)
            f = jax.jit(functools.partial(pallas.paged_decode_attention, layer=layer, **kw))
            args = (q, kp, vp, table, lengths)
            try:
                out = f(*args)
                ref = paged_reference(q, kp[1], vp[1], table, lengths, **kw)
                err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                t = median_time_us(f, *args)
                t_kernel = kernel_only_us(f, *args)
                kc, vc = (a[1][table].reshape(b, ctx, kv, hd) for a in (kp, vp))
                t_contig = median_time_us(jax.jit(functools.partial(pallas.decode_attention, **kw)), q, kc, vc, lengths)
            except Exception as e:
                print(f"FAILED paged attention {model} B={b} ctx={ctx}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            xla = jax.jit(functools.partial(attention_paged_gather, window=window or 0, sinks=sinks, scale=hd**-0.5))
            t_xla = median_time_us(xla, q, kp, vp, lengths[:, None] - 1, layer, table)
            keys = ctx if window is None else min(ctx, window)
            gbps = 2 * b * keys * kv * hd * 2 / t / 1e3
            tflops = 4 * b * h * keys * hd / t / 1e6
            note = f"err {err:.1e}; kernel alone {t_kernel:.1f} us; contiguous kernel {t_contig:.1f} us"
            shape = f"B={b} ctx={ctx} P={page} H={h}/{kv} w={window}"
            pct = 100 * gbps / ceil["hbm_gbps"]
            rows.append(Row(f"paged decode attention hd{hd}", model, shape, t, gbps, tflops, pct, 0, t_xla, note))
            print(_fmt(rows[-1]), flush=True)
    return rows


def tune(ceil: dict) -> list[Row]:
    """Correctness and time of matmul tilings (M, N, K, format, config), to choose ``pick_config``'s rules."""
    rng = np.random.default_rng(5)
    C = pallas.MatmulConfig
    cases = {
        "prefill": [(256, 4096, 4096)],
        "decode": [(1, 12288, 4096), (1, 4096, 4096), (1, 4096, 12288)],
    }
    prefill_cfgs = [C(64, 128, 256), C(128, 8, 256, stages=3), C(128, 64, 256), C(128, 128, 256, stages=2),
                    C(64, 64, 256, stages=4), C(128, 128, 128), C(64, 256, 256, stages=2)]  # fmt: skip
    decode_cfgs = [C(64, 8, 512, splits=sp, stages=4) for sp in (1, 2, 4, 8)]
    decode_cfgs += [C(128, 8, 512, splits=sp, stages=4) for sp in (1, 2, 4)]
    decode_cfgs += [C(64, 8, 256, splits=sp, stages=6) for sp in (1, 2, 4)]
    decode_cfgs += [C(64, 8, 1024, splits=sp, stages=3) for sp in (1, 2)] + [C(128, 8, 1024, splits=2, stages=3)]
    for qname in ("q8_0", "mxfp4", "q4_k"):
        qtype = QTYPES[qname]
        for kind, shapes in cases.items():
            for m, n, k in shapes:
                if kind == "decode" and qname != "mxfp4":
                    continue
                w = random_qtensor(rng, qtype, n, k)
                pw = pallas.repack(w)
                copies = max(2, min(16, math.ceil(2 * L2_BYTES / pw.nbytes)))
                pws = [jax.tree.map(jnp.copy, pw) for _ in range(copies)]
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                ref = x.astype(jnp.float32) @ w.dequantize(jnp.float32).T
                best = (float("inf"), None)
                for cfg in prefill_cfgs if kind == "prefill" else decode_cfgs:
                    cfg = dataclasses.replace(cfg, tm=max(cfg.tm, -(-m // 8) * 8)) if kind == "decode" else cfg
                    f = jax.jit(lambda x, ws, cfg=cfg: [pallas.quantized_matmul(x, w, config=cfg) for w in ws])
                    try:
                        got = f(x, pws[:1])[0].astype(jnp.float32)
                        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                        t = median_time_us(f, x, pws, per_call=copies)
                    except Exception as e:
                        print(f"tune {qname} {kind} M={m} N={n} K={k} {cfg}: {type(e).__name__} {str(e)[:300]}")
                        continue
                    best = min(best, (t, cfg), key=lambda v: v[0]) if err < 1e-2 else best
                    rate = f"{pw.nbytes / t / 1e3:.0f} GB/s {2 * m * n * k / t / 1e6:.0f} TF/s err {err:.1e}"
                    print(f"tune {qname} {kind} M={m} N={n} K={k} {cfg}: {t:.1f} us {rate}", flush=True)
                print(f"BEST {qname} {kind} M={m} N={n} K={k}: {best}", flush=True)
    return []


HEADER = (
    "| kernel | model | shape | time (us) | GB/s | % HBM | TFLOP/s | % bf16 MMA | XLA path (us) | speedup | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(r: Row) -> str:
    return (
        f"| {r.kernel} | {r.model} | {r.shape} | {r.time_us:.1f} | {r.gbps:.0f} | {r.pct_hbm:.0f}% | "
        f"{r.tflops:.1f} | {r.pct_mma:.0f}% | {r.xla_us:.1f} | {r.xla_us / r.time_us:.2f}x | {r.note} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="bf16,matmul,attention")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--m", default="1,16,512", help="token counts for the matmul rows")
    p.add_argument("--formats", default=",".join(QTYPES))
    p.add_argument("--models", default=",".join(MATMUL_SHAPES))
    p.add_argument("--wall-clock", action="store_true", help="time by wall clock (to run under ncu), not CUPTI")
    args = p.parse_args(argv)
    global measure
    measure = MEASURE["wall-clock" if args.wall_clock else "cupti"]
    only = set(args.only.split(","))
    formats, models = set(args.formats.split(",")), set(args.models.split(","))
    ms = tuple(int(v) for v in args.m.split(","))
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}, {datetime.datetime.now().isoformat()}", flush=True)
    ceil = ceilings()
    print(f"ceilings: HBM copy {ceil['hbm_gbps']:.0f} GB/s, bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s", flush=True)
    rows: list[Row] = []
    sections = {
        "tune": lambda: tune(ceil),
        "matmul": lambda: bench_matmul(ceil, ms, formats, models),
        "bf16": lambda: bench_bf16(ceil, ms, models),
        "attention": lambda: bench_decode_attention(ceil, models) + bench_flash(ceil, models),
        "paged": lambda: bench_paged_attention(ceil, models),
    }
    for name, run in sections.items():
        if name in only:
            rows += run()
            _write(args.out, dev, ceil, rows)  # after every section: a run cut short keeps what it measured
    print("\n" + HEADER)
    for r in rows:
        print(_fmt(r))


def _write(out: str, dev, ceil: dict, rows: list[Row]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(
            {
                "device": dev.device_kind,
                "command": " ".join(sys.argv),
                "date": datetime.datetime.now().isoformat(),
                "ceilings": ceil,
                "rows": [dataclasses.asdict(r) for r in rows],
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
