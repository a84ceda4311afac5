"""The memory plan of a model spread over several devices (``weights.sharding``): what each device holds, and how
many devices a model that does not fit would take.

The plan's own numbers come from the compiled sharded programs (XLA's accounting is per device) and the abstract
leaves' shards on the first device. The shards are even, so every device holds the same, but the weights are
still counted device by device from the shardings themselves, replicated leaves on every device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from imp_jax.models.config import ModelConfig
from imp_jax.weights import sharding
from imp_jax.weights.loading import abstract_leaf
from imp_jax.weights.tensor_spec import TensorSpec, is_spec

CANDIDATES = (2, 4, 8, 16)  # device counts worth suggesting: the GPUs of one host


def device_names(cfg: ModelConfig) -> tuple[str, ...]:
    if cfg.mesh is None:
        return ()
    return tuple(f"{d.platform}:{d.id}" for d in cfg.mesh.devices.flat)


def device_weights(abstract: dict, cfg: ModelConfig) -> tuple[int, ...]:
    """Weight bytes on each device of ``cfg.mesh`` (``abstract``: spec -> its sharded abstract leaf)."""
    return sharding.device_bytes(list(abstract.values()), cfg.mesh) if cfg.mesh is not None else ()


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _weights_on(specs, shards: int) -> int:
    """Weight bytes per device with ``shards`` devices: a leaf that splits is divided, the rest replicated."""
    total = 0
    for spec in jax.tree.leaves(specs, is_leaf=is_spec):
        if isinstance(spec, TensorSpec):
            split = sharding.TP in sharding.dim_axes(spec, shards)
            total += _bytes(abstract_leaf(spec)) // (shards if split else 1)
    return total


def devices_needed(plan) -> tuple[int, int] | None:
    """(devices, bytes each would need) for the fewest devices in ``CANDIDATES`` the model would fit on, estimated
    from this plan: weights split by the rules, the KV cache by kv head, the workspace as planned; None when
    none would do."""
    cfg, tp = plan.config, plan.config.tp
    for n in CANDIDATES:
        if n <= tp:
            continue
        kv = plan.kv_cache_bytes * tp // (n if cfg.n_head_kv % n == 0 else 1)
        run = kv + plan.state_bytes + plan.workspace_bytes
        needed = _weights_on(plan.specs, n) + max(run, plan.load_transient_bytes) + plan.headroom_bytes
        if needed <= plan.available_bytes:
            return n, needed
    return None
