"""Mixture-of-experts feed-forward (Qwen3-MoE, Qwen3.5-MoE, Qwen3-Next, gpt-oss) as pure JAX.

Layout follows llama.cpp's GGUF files: router ``ffn_gate_inp`` [E, D] (+ bias for gpt-oss), expert stacks
``ffn_{gate,up}_exps`` [E, F, D] and ``ffn_down_exps`` [E, D, F] (+ per-expert biases for gpt-oss), or gate and
up fused as ``ffn_gate_up_exps`` [E, 2F, D] with the gate rows first (the converter's ``torch.cat([gate, up])``
and ``build_moe_ffn``'s views), and a shared expert ``ffn_*_shexp`` with a per-token sigmoid gate
``ffn_gate_inp_shexp`` [D]. A quantized stack is one ``QTensor`` whose data has a leading expert axis.

Router logits, routing weights, activations and the weighted sum of the experts are f32 (DESIGN rule 2).

Expert matmuls go through ``expert_matmul``, which has two paths picked from static shapes by ``expert_path``:

* ``gather``: each (token, slot) row gathers its expert's packed rows and dequantizes only those, so a decode
  step reads top_k experts per token and never the rest of the stack.
* ``grouped``: rows are sorted by expert and cut into tiles (``grouped_tiles``), each holding rows of one
  expert; each tile gathers and dequantizes its expert and batched matmuls run over a few tiles per step, so
  the dequantized weights held at once stay under ``TILE_WEIGHT_BYTES`` at any token count. The tile count is
  a static bound (tokens / tile + one partial tile per expert); experts without tokens are never read, and
  padding costs at most one tile per expert.

Gather dequantizes one expert matrix per row and grouped about one per tile, so gather is picked while the rows
(tokens x top_k) are no more than the experts. ``lax.ragged_dot`` was measured and not used: for one bf16 expert
matmul on an H100 (E=128, top-8, D=2048, F=768) it took 2.8 ms at 512 tokens and 10 ms at 2048 tokens, the tiles
0.8 / 1.1 ms; on CPU it lowers to a dense [E, M, K] expansion of the rows.

On Hopper the expert stacks are repacked at load like any matrix, and both paths hand their groups of rows
(one row each for gather, one tile each for grouped) to ``ops.expert_matmul``, which runs the Pallas kernel on
the named experts' packed tiles in place: nothing is gathered or dequantized, and grouped runs as one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax import ops
from imp_jax.errors import KernelError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.models.config import MoEConfig
from imp_jax.models.layers import gated_mlp, split_fused
from imp_jax.ops.policy import REFERENCE, KernelPolicy

Weight = QTensor | jax.Array

GATHER = "gather"
GROUPED = "grouped"
TILE_WEIGHT_BYTES = 256 * 2**20  # dequantized expert weights the grouped path holds at once


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoE:
    """One layer's MoE weights (inside a layer scan, so no layer axis). Either ``gate_exps`` and ``up_exps`` or
    the fused ``gate_up_exps`` is set; biases are f32, ``*_bias`` of the experts are per expert ([E, F] / [E, D])."""

    router: Weight  # ffn_gate_inp [E, D]
    down_exps: Weight  # [E, D, F]
    gate_exps: Weight | None = None  # [E, F, D]
    up_exps: Weight | None = None  # [E, F, D]
    gate_up_exps: Weight | None = None  # [E, 2F, D], gate rows first
    router_bias: jax.Array | None = None  # [E]
    gate_bias: jax.Array | None = None  # [E, F]
    up_bias: jax.Array | None = None  # [E, F]
    down_bias: jax.Array | None = None  # [E, D]
    shared_gate: Weight | None = None  # ffn_gate_shexp [Fs, D]
    shared_up: Weight | None = None  # ffn_up_shexp [Fs, D]
    shared_gate_up: Weight | None = None  # the two above fused where stored alike (weights.fusion.fuse): [2Fs, D]
    shared_down: Weight | None = None  # ffn_down_shexp [D, Fs]
    shared_router: Weight | None = None  # ffn_gate_inp_shexp [D] (or [1, D]): one gate logit per token


# --- the expert matmul --------------------------------------------------------------------------------------


def expert_path(n_rows: int, n_experts: int) -> str:
    """The path ``moe_ffn`` takes for ``n_rows`` = tokens x top_k rows (static, so visible to the memory plan)."""
    return GATHER if n_rows <= n_experts else GROUPED


def grouped_tiles(n_rows: int, n_experts: int, matrix_bytes: int) -> tuple[int, int, int]:
    """(rows per tile, tiles, tiles per step) of the grouped path for expert matrices of ``matrix_bytes``
    (dequantized, in the compute dtype).

    A tile is about twice the mean group (a power of two in [16, 128]). The tiles bound every sorted routing:
    whole tiles plus one partial tile per expert, rounded up to whole steps. Each step dequantizes one expert
    matrix per tile, at most ``TILE_WEIGHT_BYTES`` together (one matrix when a single one is larger), so the
    transient weights are ``tiles per step * matrix_bytes`` whatever the token count.
    """
    mean2 = max(1, 2 * n_rows // n_experts)
    rows = min(128, max(16, 1 << (mean2 - 1).bit_length()))
    tiles = -(-n_rows // rows) + min(n_experts, n_rows)
    steps = -(-tiles // max(1, TILE_WEIGHT_BYTES // matrix_bytes))
    per_step = -(-tiles // steps)
    return rows, steps * per_step, per_step


def _dense(w: Weight, dtype) -> jax.Array:
    return w.dequantize(dtype) if hasattr(w, "dequantize") else w.astype(dtype)


def _stack_shape(w: Weight) -> tuple[int, ...]:
    if isinstance(w, ops.UnitArrays):
        return _stack_shape(w.first)
    if isinstance(w, QTensor):
        return w.full_shape
    return (*w.stack_shape, *w.shape) if hasattr(w, "fmt") else tuple(w.shape)


def expert_matmul(
    x: jax.Array,
    w: Weight,
    expert_ids: jax.Array,
    group_sizes: jax.Array | None = None,
    out_dtype=None,
    *,
    kernels: KernelPolicy = REFERENCE,
) -> jax.Array:
    """Row m of ``x`` [M, K] times expert ``expert_ids[m]`` of the stack ``w`` [E, N, K]: ``x[m] @ W[e].T``.

    The expert counterpart of ``ops.matmul``: weights dequantized to x.dtype, f32 accumulation, result in
    ``out_dtype`` (default x.dtype). Without ``group_sizes`` every row gathers its own expert (gather path).
    With ``group_sizes`` [E] the rows are sorted by expert, ``group_sizes[e]`` rows for expert e, and run as
    tiles of one expert each (grouped path; ``expert_ids`` is then implied by the group sizes).
    """
    shape = _stack_shape(w)
    if len(shape) != 3 or x.ndim != 2 or shape[2] != x.shape[1] or expert_ids.shape != x.shape[:1]:
        raise KernelError(
            f"expert_matmul: x {x.shape} {x.dtype}, experts {expert_ids.shape} against a stack {shape} "
            "(want x [M, K], expert ids [M], stack [E, N, K])"
        )
    if group_sizes is None:
        y = ops.expert_matmul(x[:, None], w, expert_ids, jnp.float32, kernels=kernels)[:, 0]
    else:
        y = _grouped_matmul(x, w, group_sizes, kernels)
    return y.astype(out_dtype or x.dtype)


def _grouped_matmul(x: jax.Array, w: Weight, group_sizes: jax.Array, kernels: KernelPolicy) -> jax.Array:
    """Sorted rows x [M, K] in tiles of one expert each, a few tiles per step (see ``grouped_tiles``); f32 [M, N]."""
    (m, k), n_experts = x.shape, group_sizes.shape[0]
    n = _stack_shape(w)[1]
    # The kernel reads packed tiles in place, so all tiles go in one call; dequantized experts are transient.
    matrix_bytes = 1 if ops.matmul_path(w, kernels) == ops.PALLAS else n * k * x.dtype.itemsize
    rows, n_tiles, per_step = grouped_tiles(m, n_experts, matrix_bytes)
    tiles = (group_sizes + rows - 1) // rows
    tile_end = jnp.cumsum(tiles)
    row_end = jnp.cumsum(group_sizes)
    t = jnp.arange(n_tiles)
    # Tiles past the last used one repeat its expert (so no expert without rows is read) and hold only
    # invalid rows, whose outputs are dropped.
    expert = jnp.searchsorted(tile_end, jnp.minimum(t, tile_end[-1] - 1), side="right")
    first = (row_end - group_sizes)[expert] + (t - (tile_end - tiles)[expert]) * rows  # [T] first row of tile
    src = first[:, None] + jnp.arange(rows)  # [T, rows] row of x held by each tile slot
    valid = src < row_end[expert][:, None]
    xt = jnp.where(valid[..., None], x[jnp.clip(src, 0, m - 1)], 0)

    def step(tiles_and_experts):
        xs, ids = tiles_and_experts
        return ops.expert_matmul(xs, w, ids, jnp.float32, kernels=kernels)

    steps = (xt.reshape(-1, per_step, rows, k), expert.reshape(-1, per_step))
    yt = jax.lax.map(step, steps).reshape(n_tiles, rows, n)
    return jnp.zeros((m, n), jnp.float32).at[jnp.where(valid, src, m)].set(yt, mode="drop")


# --- routing ------------------------------------------------------------------------------------------------


def router_logits(p: MoE, x: jax.Array) -> jax.Array:
    """f32 logits [..., E] at full f32 precision: a TF32 or bf16 router would flip near-tied expert choices."""
    w = _dense(p.router, jnp.float32)
    logits = jnp.einsum("...d,ed->...e", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return logits if p.router_bias is None else logits + p.router_bias.astype(jnp.float32)


def route(logits: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Routing weights (f32) and expert ids (int32), both [..., top_k], best expert first."""
    logits = logits.astype(jnp.float32)
    if cfg.gating == "softmax":
        weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.top_k)
        if cfg.norm_topk:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        top, ids = jax.lax.top_k(logits, cfg.top_k)
        weights = jax.nn.softmax(top, axis=-1)
    return weights, ids.astype(jnp.int32)


def activate(gate: jax.Array, up: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The gated activation of the experts, in f32."""
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if cfg.activation == "silu":
        return jax.nn.silu(gate) * up
    gate = jnp.minimum(gate, cfg.swiglu_limit)
    up = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
    return gate * jax.nn.sigmoid(cfg.swiglu_alpha * gate) * (up + 1.0)


# --- the layer ----------------------------------------------------------------------------------------------


def _add_bias(y: jax.Array, bias: jax.Array | None, ids: jax.Array) -> jax.Array:
    return y if bias is None else y + jnp.take(bias, ids, axis=0).astype(jnp.float32)


def _experts(
    p: MoE, cfg: MoEConfig, x: jax.Array, ids: jax.Array, group_sizes: jax.Array | None, kernels: KernelPolicy, tp: int
) -> jax.Array:
    """Down-projected expert outputs [M, D] (f32, biases added) for rows x [M, D] routed to experts ids [M]."""
    run = dict(out_dtype=jnp.float32, kernels=kernels)
    if p.gate_up_exps is not None:
        gate_up = expert_matmul(x, p.gate_up_exps, ids, group_sizes, **run)
        gate, up = split_fused(gate_up, (cfg.n_ff_exp, cfg.n_ff_exp), tp)
    else:
        gate = expert_matmul(x, p.gate_exps, ids, group_sizes, **run)
        up = expert_matmul(x, p.up_exps, ids, group_sizes, **run)
    gate, up = _add_bias(gate, p.gate_bias, ids), _add_bias(up, p.up_bias, ids)
    h = activate(gate, up, cfg).astype(x.dtype)
    return _add_bias(expert_matmul(h, p.down_exps, ids, group_sizes, **run), p.down_bias, ids)


def _shared_expert(p: MoE, cfg: MoEConfig, x: jax.Array, kernels: KernelPolicy, tp: int) -> jax.Array:
    """The always-on expert (f32), scaled per token by ``sigmoid(x . w)`` when the file has that gate."""
    y = gated_mlp(x, p.shared_gate, p.shared_up, p.shared_down, "silu", p.shared_gate_up, tp=tp, kernels=kernels)
    y = y.astype(jnp.float32)
    if cfg.shared_gate:
        w = _dense(p.shared_router, jnp.float32).reshape(-1)
        logit = jnp.einsum("...d,d->...", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        y = y * jax.nn.sigmoid(logit)[..., None]
    return y


def moe_ffn(
    p: MoE, cfg: MoEConfig, x: jax.Array, *, path: str | None = None, kernels: KernelPolicy = REFERENCE, tp: int = 1
) -> jax.Array:
    """The MoE feed-forward of x [B, T, D] -> [B, T, D], reading only the routed experts' weights. ``path`` pins
    the expert path (tests, debugging); the default is ``expert_path`` of the static shapes."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    weights, ids = route(router_logits(p, xf), cfg)  # [N, k]
    rows = ids.reshape(-1)  # token-major: row n * k + j is token n's j-th expert
    token = jnp.arange(rows.size) // cfg.top_k
    path = path or expert_path(rows.size, cfg.n_experts)
    if path == GATHER:
        y = _experts(p, cfg, xf[token], rows, None, kernels, tp)
    elif path == GROUPED:
        order = jnp.argsort(rows, stable=True)
        group_sizes = jnp.bincount(rows, length=cfg.n_experts).astype(jnp.int32)
        y_sorted = _experts(p, cfg, xf[token[order]], rows[order], group_sizes, kernels, tp)
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    else:
        raise KernelError(f"moe_ffn: unknown expert path '{path}' (use '{GATHER}' or '{GROUPED}')")
    out = jnp.sum(y.reshape(b * t, cfg.top_k, d) * weights[..., None], axis=1)
    if cfg.has_shared:
        out = out + _shared_expert(p, cfg, xf, kernels, tp)
    return out.astype(x.dtype).reshape(b, t, d)


def moe_ffn_dense(p: MoE, cfg: MoEConfig, x: jax.Array, tp: int = 1) -> jax.Array:
    """Reference: every expert on every token, weighted by the routing weights scattered over all E experts
    (zero for the experts not chosen). Reads every weight; for tests only."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    weights, ids = route(router_logits(p, xf), cfg)
    n = xf.shape[0]
    mix = jnp.zeros((n, cfg.n_experts), jnp.float32).at[jnp.arange(n)[:, None], ids].set(weights)

    def project(w: Weight, h: jax.Array) -> jax.Array:  # h [N, K] through every expert -> [N, E, Nout]
        return jnp.einsum("nk,eok->neo", h, _dense(w, h.dtype), preferred_element_type=jnp.float32)

    def per_expert(y: jax.Array, bias: jax.Array | None) -> jax.Array:
        return y if bias is None else y + bias.astype(jnp.float32)[None]

    if p.gate_up_exps is not None:
        gate_up = project(p.gate_up_exps, xf)
        gate, up = split_fused(gate_up, (cfg.n_ff_exp, cfg.n_ff_exp), tp)
    else:
        gate, up = project(p.gate_exps, xf), project(p.up_exps, xf)
    h = activate(per_expert(gate, p.gate_bias), per_expert(up, p.up_bias), cfg).astype(x.dtype)
    down = _dense(p.down_exps, h.dtype)
    y = per_expert(jnp.einsum("nef,edf->ned", h, down, preferred_element_type=jnp.float32), p.down_bias)
    out = jnp.einsum("ne,ned->nd", mix, y)
    if cfg.has_shared:
        out = out + _shared_expert(p, cfg, xf, REFERENCE, tp)
    return out.astype(x.dtype).reshape(b, t, d)
