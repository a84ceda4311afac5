"""On a Hopper GPU: the tensor-parallel program (``ops.sharded``: the Pallas kernels per shard inside
``shard_map``, attention per kv-head shard) compiled and run for real, on a mesh of the one GPU the device tool
lends. tests/test_tensor_parallel.py checks the sharding itself on simulated CPU devices in the interpreter; this
checks that the same program builds and gives the unsharded kernels' logits on the hardware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from imp_jax import ops
from imp_jax.ops.sharded import ShardedWeight
from imp_jax.runtime import steps
from imp_jax.weights import sharding
from imp_jax.weights.synthetic import synthetic_params, synthetic_specs

pytestmark = pytest.mark.gpu

IDS = [1, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10]
KERNELS = ops.KernelPolicy(matmul=True, attention=True)


def _logits(params, cfg, kernels: ops.KernelPolicy) -> np.ndarray:
    out, _ = steps.run_prefill(params, cfg, IDS, 64, jnp.bfloat16, all_logits=True, kernels=kernels)
    return np.asarray(out[0, : len(IDS)], np.float64)


@pytest.mark.parametrize(("shape", "quant"), [("tiny", "q8_0"), ("tiny-moe", "q4_k"), ("tiny-gpt-oss", "mxfp4")])
def test_kernels_per_shard_on_a_one_gpu_mesh(shape, quant):
    cfg, specs = synthetic_specs(shape, quant, "bfloat16")
    base = synthetic_params(specs, jax.random.key(0), config=cfg)
    unsharded = _logits(synthetic_params(specs, jax.random.key(0), config=cfg, kernels=KERNELS), cfg, KERNELS)
    mesh = Mesh(np.array(jax.devices()[:1]), (sharding.TP,))
    placed = sharding.shard_params(base, specs, mesh, KERNELS)
    leaves = jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, ShardedWeight))
    assert any(isinstance(w, ShardedWeight) for w in leaves)
    got = _logits(placed, sharding.on_mesh(cfg, mesh), KERNELS)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - unsharded) / np.linalg.norm(unsharded) < 1e-2
