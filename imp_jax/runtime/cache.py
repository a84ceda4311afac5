"""Per-sequence state carried between steps: the paged attention KV cache and the recurrent (GDN) state slots.

One layout serves both the single-sequence steps and the serving engine. K/V live in pages of P tokens,
``[L, n_pages, P, n_kv, head_dim]``; a row of a batch reads and writes them through its page tables (``Rows``).
The attention layers form two KV groups, as in vLLM's hybrid allocator: the full-attention layers (``k``, ``v``)
and the sliding-window layers (``wk``, ``wv``), each with its own pages and page table, so the serving engine can
give back a window layer's pages once they fall behind its window while the full layers keep theirs (a model
whose layers are all alike has one group; the other is empty). The recurrent state lives in slots,
``[L_rec, n_slots, ...]``, one per running sequence. A contiguous cache (what ``init_cache`` builds for ``steps``,
the bench and the planner) is the special case of one page of ``max_len`` tokens per row in both groups, row b
owning page b and slot b; the paged decode kernel reads it as such (a one-page table).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax.models.config import ModelConfig
from imp_jax.weights.sharding import cache_sharding, cache_zeros


@dataclasses.dataclass(frozen=True)
class Cache:
    """k, v [L_full, n_pages, P, n_kv, head_dim] for the full-attention layers and wk, wv [L_window,
    n_window_pages, P, n_kv, head_dim] for the sliding-window ones, in the compute dtype; conv [L_rec, n_slots,
    K-1, C] and ssm [L_rec, n_slots, Hv, dk, dv] (f32) for the recurrent layers (each empty when absent).

    KV entries past a sequence's length hold stale or padding values; attention masks them by position (a key is
    visible only at a position <= the query's), and a chunk writes its own keys before it reads. They stay finite:
    caches start as zeros. The recurrent state is exact after every step.
    """

    k: jax.Array
    v: jax.Array
    conv: jax.Array
    ssm: jax.Array
    wk: jax.Array
    wv: jax.Array

    @property
    def dtype(self):
        return self.k.dtype

    @property
    def page_size(self) -> int:
        return int(self.k.shape[2])

    @property
    def n_pages(self) -> int:
        return int(self.k.shape[1])

    @property
    def max_len(self) -> int:
        """Tokens one row can hold in a contiguous cache (its one page)."""
        return self.page_size

    def kv_arrays(self) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """((k, v) of the full group, (k, v) of the window group)."""
        return (self.k, self.v), (self.wk, self.wv)

    def recurrent_arrays(self) -> tuple[jax.Array, jax.Array]:
        return self.conv, self.ssm

    def replace(self, kv, rec: tuple[jax.Array, jax.Array]) -> Cache:
        """The cache holding ``kv`` (as ``kv_arrays`` gives it) and ``rec``."""
        (k, v), (wk, wv) = kv
        return Cache(k, v, rec[0], rec[1], wk, wv)


jax.tree_util.register_dataclass(Cache, data_fields=["k", "v", "conv", "ssm", "wk", "wv"], meta_fields=[])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """Where each row of a batch keeps its state: ``pages`` [B, n_pg] int32, the full group's page ids holding
    positions ``c*P .. c*P+P-1`` in column c (columns past the row's length may hold any page id: causality masks
    them); ``slot`` [B] int32, its recurrent-state slot; ``window_pages`` [B, n_pg], the window group's table in
    the same columns, where also the columns wholly before the row's window may hold any page id (the window
    masks them: a key is visible only within ``window`` positions of the query). A padding row has slot =
    n_slots (out of range: its state writes are dropped) and valid length 0 (its KV writes are dropped)."""

    pages: jax.Array
    slot: jax.Array
    window_pages: jax.Array

    def table(self, windowed: bool) -> jax.Array:
        """The page table of the window group or of the full group."""
        return self.window_pages if windowed else self.pages


def contiguous_rows(batch: int) -> Rows:
    """Row b owns page b (in both groups) and slot b (the layout of ``init_cache``)."""
    ids = jnp.arange(batch, dtype=jnp.int32)
    return Rows(ids[:, None], ids, ids[:, None])


def paged_shapes(
    cfg: ModelConfig, n_pages: int, page_size: int, n_slots: int, dtype, n_window_pages: int | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every cache array: the single source for allocation and for the memory plan.
    ``n_window_pages``: the window group's pages (default n_pages, as in the contiguous layout)."""
    dtype = jnp.dtype(dtype)
    n_window_pages = n_pages if n_window_pages is None else n_window_pages
    n_win = cfg.n_window_layers
    kv = (cfg.n_attention_layers - n_win, n_pages, page_size, cfg.n_head_kv, cfg.head_dim)
    wkv = (n_win, n_window_pages if n_win else 0, page_size, cfg.n_head_kv, cfg.head_dim)
    g = cfg.gdn
    n_rec = cfg.n_recurrent_layers
    conv = (n_rec, n_slots, g.conv_kernel - 1, g.conv_channels) if g else (0, n_slots, 0, 0)
    ssm = (n_rec, n_slots, g.n_v_heads, g.head_k_dim, g.head_v_dim) if g else (0, n_slots, 0, 0, 0)
    return dict(
        k=jax.ShapeDtypeStruct(kv, dtype),
        v=jax.ShapeDtypeStruct(kv, dtype),
        conv=jax.ShapeDtypeStruct(conv, jnp.float32),
        ssm=jax.ShapeDtypeStruct(ssm, jnp.float32),
        wk=jax.ShapeDtypeStruct(wkv, dtype),
        wv=jax.ShapeDtypeStruct(wkv, dtype),
    )


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """The contiguous layout: one page of max_len tokens and one slot per row."""
    return paged_shapes(cfg, batch, max_len, batch, dtype)


def init_paged_cache(
    cfg: ModelConfig, n_pages: int, page_size: int, n_slots: int, dtype, n_window_pages: int | None = None
) -> Cache:
    """Zero pages and slots, split over ``cfg.mesh`` by kv head and value head (weights.sharding)."""
    shapes = paged_shapes(cfg, n_pages, page_size, n_slots, dtype, n_window_pages)
    return Cache(**{k: cache_zeros(cfg, k, s.shape, s.dtype) for k, s in shapes.items()})


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> Cache:
    """A contiguous cache: batch rows of max_len tokens (``contiguous_rows`` addresses it)."""
    shapes = cache_shapes(cfg, batch, max_len, dtype)
    return Cache(**{k: cache_zeros(cfg, k, s.shape, s.dtype) for k, s in shapes.items()})


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> Cache:
    shapes = cache_shapes(cfg, batch, max_len, dtype)
    return Cache(
        **{
            k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cache_sharding(cfg, k, s.shape))
            for k, s in shapes.items()
        }
    )
