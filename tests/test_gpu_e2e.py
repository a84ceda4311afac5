"""On a Hopper GPU: models with the Pallas kernels agree with the reference path and generate (device tool)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax import bench, engine, sampling

pytestmark = pytest.mark.gpu


def _model(quant: str, kernels: bool, shape: str = "tiny"):
    os.environ["IMP_JAX_KERNELS"] = "1" if kernels else "0"
    try:
        return bench.synthetic_model(shape, quant, "bfloat16")[:2]
    finally:
        os.environ.pop("IMP_JAX_KERNELS")


CASES = [("tiny", q, n) for q in ("mxfp4", "q8_0", "q4_k") for n in (1, 3, 17, 300)] + [
    (shape, q, n) for shape in ("tiny-hybrid", "tiny-moe", "tiny-gpt-oss") for q in ("mxfp4", "q8_0") for n in (1, 300)
]


@pytest.mark.parametrize(("shape", "quant", "n"), CASES)
def test_kernel_path_matches_reference_path(shape, quant, n):
    """Every family (dense, hybrid, MoE with shared expert, gpt-oss with sinks and windows); n = 1 routes MoE rows
    by gather, 300 by grouped tiles."""
    (fast, cfg), (ref, _) = _model(quant, True, shape), _model(quant, False, shape)
    packed = [leaf for leaf in jax.tree.leaves(fast, is_leaf=lambda x: hasattr(x, "fmt")) if hasattr(leaf, "fmt")]
    assert len(packed) == len([x for x in jax.tree.leaves(ref, is_leaf=lambda x: hasattr(x, "qtype"))
                               if hasattr(x, "qtype")]) - 1  # fmt: skip
    ids = [int(i) for i in np.random.default_rng(n).integers(0, cfg.vocab_size, n)]
    a, _ = engine.run_prefill(fast, cfg, ids, 512, jnp.bfloat16, all_logits=True)
    os.environ["IMP_JAX_KERNELS"] = "0"
    try:
        b, _ = engine.run_prefill(ref, cfg, ids, 512, jnp.bfloat16, all_logits=True)
    finally:
        os.environ.pop("IMP_JAX_KERNELS")
    a, b = np.asarray(a[0, :n]), np.asarray(b[0, :n])
    assert np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2


def test_generate_with_kernels():
    params, cfg = _model("mxfp4", True)
    timings: dict = {}
    out = list(engine.token_stream(params, cfg, [1, 2, 3], 64, jnp.bfloat16, sampling.SamplingParams(), 20, timings))
    assert len(out) == 20 and all(0 <= t < cfg.vocab_size for t in out)
