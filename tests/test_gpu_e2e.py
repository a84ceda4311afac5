"""On a Hopper GPU: models with the Pallas kernels agree with the reference path and generate (device tool)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax import bench, ops
from imp_jax.models import moe
from imp_jax.runtime import sampling, steps

pytestmark = pytest.mark.gpu


def _policy(kernels: bool | str) -> ops.KernelPolicy:
    return ops.resolve_kernels({True: "auto", False: "off"}.get(kernels, kernels))


def _model(quant: str, kernels: bool, shape: str = "tiny"):
    return bench.synthetic_model(shape, quant, "bfloat16", kernels=_policy(kernels))[:2]


CASES = [("tiny", q, n) for q in ("mxfp4", "q8_0", "q4_k") for n in (1, 17, 300)] + [
    (shape, q, n)
    for shape in ("tiny-hybrid", "tiny-moe", "tiny-gpt-oss")
    for q, n in (("mxfp4", 1), ("mxfp4", 300), ("q8_0", 300))
]


def _logits(params, cfg, ids, dtype, kernels: bool) -> np.ndarray:
    out, _ = steps.run_prefill(params, cfg, ids, 512, dtype, all_logits=True, kernels=_policy(kernels))
    return np.asarray(out[0, : len(ids)], np.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    assert np.isfinite(a).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(("shape", "quant", "n"), CASES)
def test_kernel_path_matches_reference_path(shape, quant, n):
    """Every family (dense, hybrid, MoE with shared expert, gpt-oss with sinks and windows); n = 1 routes MoE rows
    by gather, 300 by grouped tiles. Both paths compute in bf16, and random models amplify rounding differently
    (GDN recurrences, routing near-ties), so the bound is the reference's own bf16-vs-f32 spread."""
    (fast, cfg), (ref, _) = _model(quant, True, shape), _model(quant, False, shape)
    packed = [leaf for leaf in jax.tree.leaves(fast, is_leaf=lambda x: hasattr(x, "fmt")) if hasattr(leaf, "fmt")]
    assert len(packed) == len([x for x in jax.tree.leaves(ref, is_leaf=lambda x: hasattr(x, "qtype"))
                               if hasattr(x, "qtype")]) - 1  # fmt: skip
    ids = [int(i) for i in np.random.default_rng(n).integers(0, cfg.vocab_size, n)]
    b = _logits(ref, cfg, ids, jnp.bfloat16, False)
    ref32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, ref)
    spread = _rel(b, _logits(ref32, cfg, ids, jnp.float32, False))
    assert _rel(_logits(fast, cfg, ids, jnp.bfloat16, True), b) < max(3e-2, 1.5 * spread)


@pytest.mark.parametrize("shape", ["tiny-moe", "tiny-gpt-oss"])
@pytest.mark.parametrize("quant", ["mxfp4", "q8_0"])
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_expert_kernels_match_reference_moe_layer(shape, quant, tokens):
    """One MoE layer on the same input: routing is f32 and identical, so the kernel path (expert ids into the
    packed stacks) must match the gather/dequantize reference tightly, on both expert paths."""
    (fast, cfg), (ref, _) = _model(quant, True, shape), _model(quant, False, shape)

    def layer0(params):
        return jax.tree.map(lambda a: a[0], params.segments[0][0].moe)

    x = jax.random.normal(jax.random.key(tokens), (1, tokens, cfg.n_embd), jnp.bfloat16)
    ffn = jax.jit(moe.moe_ffn, static_argnums=1, static_argnames="kernels")
    got = np.asarray(ffn(layer0(fast), cfg.moe, x, kernels=_policy(True)), np.float64)
    want = np.asarray(jax.jit(moe.moe_ffn, static_argnums=1)(layer0(ref), cfg.moe, x), np.float64)
    assert _rel(got, want) < 1e-2


@pytest.mark.parametrize("n", [1, 300])
def test_bf16_kernel_path_matches_xla_dot(n):
    """By default the bf16 weights run the Pallas kernel, read in place (ops.policy.BF16_KERNEL): it matches XLA's
    dot."""
    params, cfg = _model("bf16", True)
    ids = [int(i) for i in np.random.default_rng(n).integers(0, cfg.vocab_size, n)]
    default = _policy("auto")
    assert ops.matmul_path(params.output, default) == ops.PALLAS
    out, _ = steps.run_prefill(params, cfg, ids, 512, jnp.bfloat16, all_logits=True, kernels=default)
    ref, _ = steps.run_prefill(params, cfg, ids, 512, jnp.bfloat16, all_logits=True, kernels=_policy(False))
    assert _rel(np.asarray(out[0, :n], np.float64), np.asarray(ref[0, :n], np.float64)) < 3e-2


def test_generate_with_kernels():
    params, cfg = _model("mxfp4", True)
    timings: dict = {}
    sp = sampling.SamplingParams()
    out = list(steps.token_stream(params, cfg, [1, 2, 3], 64, jnp.bfloat16, sp, 20, timings, _policy(True)))
    assert len(out) == 20 and all(0 <= t < cfg.vocab_size for t in out)
