"""Per-sequence state carried between steps: the attention KV cache (and, for hybrids, recurrent state)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every attention layer: k, v [L, B, S_max, n_kv, head_dim] in the compute dtype.

    Slots past a sequence's length hold stale or padding entries; attention masks them by position, and decode
    overwrites slot p before any query at position >= p reads it.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])


def kv_cache_shape(n_layers: int, batch: int, max_len: int, n_kv: int, head_dim: int) -> tuple[int, ...]:
    return (n_layers, batch, max_len, n_kv, head_dim)


def init_kv_cache(n_layers: int, batch: int, max_len: int, n_kv: int, head_dim: int, dtype) -> KVCache:
    shape = kv_cache_shape(n_layers, batch, max_len, n_kv, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def abstract_kv_cache(n_layers: int, batch: int, max_len: int, n_kv: int, head_dim: int, dtype) -> KVCache:
    spec = jax.ShapeDtypeStruct(kv_cache_shape(n_layers, batch, max_len, n_kv, head_dim), jnp.dtype(dtype))
    return KVCache(spec, spec)
