"""On a Hopper GPU: models with the Pallas kernels agree with the reference path and generate (device tool)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax import bench, engine, ops, sampling

pytestmark = pytest.mark.gpu


def _model(quant: str, kernels: bool):
    os.environ["IMP_JAX_KERNELS"] = "1" if kernels else "0"
    try:
        return bench.synthetic_model("tiny", quant, "bfloat16")[:2]
    finally:
        os.environ.pop("IMP_JAX_KERNELS")


@pytest.mark.parametrize("quant", ["mxfp4", "q8_0", "q4_k"])
@pytest.mark.parametrize("n", [1, 3, 17, 300])
def test_kernel_path_matches_reference_path(quant, n):
    (fast, cfg), (ref, _) = _model(quant, True), _model(quant, False)
    assert ops.matmul_path(fast.segments[0][0].w_up) == ops.PALLAS
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
