"""The one dispatch point per op.

``matmul(x, w)`` picks its implementation from the weight leaf: a ``pallas.PackedWeight`` (made at load on a
Hopper GPU, ``prepare_weight``) runs the Mosaic-GPU kernel; a ``QTensor`` runs the reference path (dequantize to
the compute dtype, then a dot accumulating in f32), the named fallback every kernel is checked against; a dense
array is a plain dot (XLA's, cuBLAS on a GPU), or the same Pallas kernel reading the bf16 weight in place where
``BF16_KERNEL`` says it wins; ``expert_matmul`` is the same choice for a stack of MoE experts.
``attention_prefill`` / ``attention_decode`` pick the Pallas attention kernels on Hopper for what they support and
the jnp reference otherwise. ``kernel_mode`` says which world applies: ``IMP_JAX_KERNELS=0`` turns the kernels off
(debugging: compare against the reference path), ``IMP_JAX_KERNELS=all`` also runs the ones measured slower than
XLA (benchmarks, debugging). A kernel that cannot run raises KernelError naming op, shapes and dtypes: nothing
silently falls back inside a step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType

from imp_jax.errors import KernelError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import dequantize_rows

Weight = QTensor | jax.Array

REFERENCE = "reference"  # dequantize to the compute dtype, then jnp.dot with f32 accumulation
PALLAS = "pallas"  # Mosaic-GPU kernel on the packed blocks
DENSE = "dense"  # a float weight: jnp.dot

# Whether a plain bf16 weight runs the Pallas kernel (BF16 format, read in place) by default. XLA's dot already
# streams a bf16 GEMV near HBM speed and runs prefill on cuBLAS; docs/BENCHMARKS.md has the measured comparison.
BF16_KERNEL = False


def kernel_mode() -> str:
    """Which kernels run: "off" (IMP_JAX_KERNELS=0, or not a Hopper GPU: compute capability 9.x), "all"
    (IMP_JAX_KERNELS=all) or "auto" (the default: every kernel that beats the XLA path)."""
    env = os.environ.get("IMP_JAX_KERNELS", "1")
    dev = jax.devices()[0]
    if env == "0" or not (dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")):
        return "off"
    return "all" if env == "all" else "auto"


def kernels_enabled() -> bool:
    """Pallas kernels run (Hopper GPU, not IMP_JAX_KERNELS=0)."""
    return kernel_mode() != "off"


def prepare_weight(w: Weight) -> Weight:
    """The leaf ``matmul`` should hold for this weight on this backend: on Hopper, QTensors of a format the
    kernels read are repacked (once, at load) into the kernel layout; everything else is kept as is."""
    if not (kernels_enabled() and isinstance(w, QTensor) and w.scale is None):
        return w
    import pallas

    if not pallas.can_repack(w.qtype, w.shape):
        return w
    if w.qtype == GGMLQuantizationType.MXFP4 and not isinstance(w.data, jax.core.Tracer):  # (planning traces)
        # the kernel's bf16 decode bounds the block scale
        top = int(jnp.max(w.data.reshape(-1, 17)[:, 0]))
        if top > pallas.qformats.MXFP4_MAX_SCALE_BYTE:
            raise KernelError(
                f"MXFP4 weight {w.full_shape} has a block scale 2**{top - 127}, beyond the kernel's decode "
                f"(2**{pallas.qformats.MXFP4_MAX_SCALE_BYTE - 127}); run with IMP_JAX_KERNELS=0"
            )
    return _repack(w)


@jax.jit
def _repack(w: QTensor):
    """Repack one matrix at a time inside one program: beside the stored blocks only the output and one matrix's
    scratch exist (eager repacking held every intermediate of a whole matrix, or every part of a stack and their
    stacked copy: +1.4 GiB over the plan for Qwen3-8B's MXFP4 output head on the H100)."""
    import pallas

    stack = w.stack_shape
    flat = w.data.reshape(-1, *w.data.shape[len(stack) :])
    out = jax.lax.map(lambda one: pallas.repack(QTensor(one, None, w.qtype, w.shape)), flat)
    return jax.tree.map(lambda a: a.reshape(*stack, *a.shape[1:]), out)


def matmul_path(w) -> str:
    """The implementation ``matmul`` uses for this leaf (or abstract leaf) of one layer."""
    if isinstance(w, QTensor):
        return REFERENCE
    return PALLAS if hasattr(w, "fmt") or _bf16_kernel(w) else DENSE


def _bf16_kernel(w) -> bool:
    """A dense bf16 matrix runs the kernel under IMP_JAX_KERNELS=all, or by default where BF16_KERNEL says so."""
    mode = kernel_mode()
    if not (mode == "all" or (mode == "auto" and BF16_KERNEL)):
        return False
    import pallas

    return pallas.can_view_dense(w)


def matmul(x: jax.Array, w, out_dtype=None) -> jax.Array:
    """``x @ W.T`` for W of logical shape [N, K] (GGUF/numpy order), accumulating in f32.

    The result is in ``out_dtype`` (default x.dtype); the output head asks for f32 logits.
    """
    if matmul_path(w) == PALLAS:
        import pallas

        pw = w if hasattr(w, "fmt") else pallas.dense_weight(w)
        return pallas.quantized_matmul(x, pw).astype(out_dtype or x.dtype)
    wd = w.dequantize(x.dtype) if isinstance(w, QTensor) else w.astype(x.dtype)
    y = jnp.einsum("...k,nk->...n", x, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def expert_matmul(x: jax.Array, w, expert_ids: jax.Array, out_dtype=None) -> jax.Array:
    """``x[g] @ W[expert_ids[g]].T`` for groups of rows x [G, R, K] and a stack of experts W [E, N, K] -> [G, R, N].

    A stack repacked for the kernel runs it (reading only the named experts' tiles); otherwise the named experts'
    packed blocks are gathered and dequantized, then one batched dot with f32 accumulation.
    """
    if matmul_path(w) == PALLAS:
        import pallas

        return pallas.quantized_matmul(x, w, expert_ids=expert_ids).astype(out_dtype or x.dtype)
    if isinstance(w, QTensor):
        scale = None if w.scale is None else jnp.take(w.scale, expert_ids, axis=0)
        wd = QTensor(jnp.take(w.data, expert_ids, axis=0), scale, w.qtype, w.shape).dequantize(x.dtype)
    else:
        wd = jnp.take(w, expert_ids, axis=0).astype(x.dtype)
    y = jnp.einsum("grk,gnk->grn", x, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def embed(table: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table for ``ids``, dequantizing only the rows gathered."""
    if isinstance(table, QTensor):
        rows = jnp.take(table.data, ids, axis=0)
        out = dequantize_rows(rows, table.qtype)
        if table.scale is not None:
            out = out * table.scale
        return out.astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def _kernel_attention_ok(q: jax.Array, softcap: float) -> bool:
    return kernels_enabled() and not softcap and q.shape[-1] in (64, 128, 256)


def attention_prefill(q, k, v, *, scale: float, window: int = 0, softcap: float = 0.0, sinks=None) -> jax.Array:
    """Causal self-attention of a chunk that starts at position 0: q [B, T, H, D], k/v [B, T, Hkv, D]."""
    if _kernel_attention_ok(q, softcap):
        import pallas

        return pallas.flash_attention(q, k, v, causal=True, window=window or None, sinks=sinks, scale=scale)
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return attention(q, k, v, pos, pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


def attention_decode(
    q, k_cache, v_cache, q_pos, layer, *, scale: float, window: int = 0, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """New tokens q [B, T, H, D] at positions q_pos [B, T] against layer ``layer`` of the caches
    [L, B, S, Hkv, D], which already hold them. The kernel reads the layer in place."""
    if _kernel_attention_ok(q, softcap) and k_cache.shape[2] % 8 == 0:
        import pallas

        lengths = (q_pos[:, -1] + 1).astype(jnp.int32)
        return pallas.decode_attention(
            q, k_cache, v_cache, lengths, layer=layer, window=window or None, sinks=sinks, scale=scale
        )
    k_cache, v_cache = k_cache[layer], v_cache[layer]
    b, s = k_cache.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    return attention(q, k_cache, v_cache, q_pos, k_pos, scale=scale, window=window, softcap=softcap, sinks=sinks)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    scale: float,
    window: jax.Array | int = 0,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA attention with f32 scores and softmax (DESIGN rule 2).

    q [B, T, H, D]; k, v [B, S, Hkv, D]; q_pos [B, T] and k_pos [B, S] absolute positions. A key is visible when
    ``k_pos <= q_pos`` and, with a window w > 0, ``q_pos - k_pos < w``. ``sinks`` [H] adds a learned logit to
    each head's softmax denominator (gpt-oss).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    rel = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    visible = (rel >= 0) & ((window <= 0) | (rel < window))
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, h // hkv, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)
