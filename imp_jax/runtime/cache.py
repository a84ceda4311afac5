"""Per-sequence state carried between steps: the attention KV cache and the recurrent (GDN) state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """k, v [L_attn, B, S_max, n_kv, head_dim] in the compute dtype for the attention layers; conv
    [L_rec, B, K-1, C] and ssm [L_rec, B, Hv, dk, dv] (f32) for the recurrent layers (empty when absent).

    KV slots past a sequence's length hold stale or padding entries; attention masks them by position, and decode
    overwrites slot p before any query at position >= p reads it. The recurrent state is exact after every step.
    """

    k: jax.Array
    v: jax.Array
    conv: jax.Array
    ssm: jax.Array

    @property
    def dtype(self):
        return self.k.dtype

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    def kv_arrays(self) -> tuple[jax.Array, jax.Array]:
        return self.k, self.v

    def recurrent_arrays(self) -> tuple[jax.Array, jax.Array]:
        return self.conv, self.ssm

    def replace(self, kv: tuple[jax.Array, jax.Array], rec: tuple[jax.Array, jax.Array]) -> Cache:
        return Cache(kv[0], kv[1], rec[0], rec[1])


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every cache array: the single source for allocation and for the memory plan."""
    dtype = jnp.dtype(dtype)
    kv = (cfg.n_attention_layers, batch, max_len, cfg.n_head_kv, cfg.head_dim)
    g = cfg.gdn
    n_rec = cfg.n_recurrent_layers
    conv = (n_rec, batch, g.conv_kernel - 1, g.conv_channels) if g else (0, batch, 0, 0)
    ssm = (n_rec, batch, g.n_v_heads, g.head_k_dim, g.head_v_dim) if g else (0, batch, 0, 0, 0)
    return dict(
        k=jax.ShapeDtypeStruct(kv, dtype),
        v=jax.ShapeDtypeStruct(kv, dtype),
        conv=jax.ShapeDtypeStruct(conv, jnp.float32),
        ssm=jax.ShapeDtypeStruct(ssm, jnp.float32),
    )


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> Cache:
    return Cache(**{k: jnp.zeros(s.shape, s.dtype) for k, s in cache_shapes(cfg, batch, max_len, dtype).items()})


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> Cache:
    return Cache(**cache_shapes(cfg, batch, max_len, dtype))
