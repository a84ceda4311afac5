"""Pallas Mosaic-GPU kernels for Hopper: quantized matmul and attention.

The surface ``imp_jax.ops`` dispatches to. Every entry point takes ``interpret=True`` to run its kernel in
Mosaic GPU's CPU interpreter (tests), raises ``KernelError`` (``pallas.errors``) naming op, shapes and dtypes
when it cannot run, and has a jnp reference beside its kernel. It imports nothing from ``imp_jax``.

- ``repack(qtensor) -> PackedWeight`` once at load (``can_repack`` says which QTensors qualify), or
  ``dense_weight(w)`` for a bf16 matrix read in place (``can_view_dense``), then ``quantized_matmul(x, w)`` for
  ``x @ W.T`` (``supports(w, x)`` checks first).
- ``flash_attention(q, k, v, *, causal, window, sinks, scale)`` for prefill,
  ``decode_attention(q, k_cache, v_cache, lengths, *, window, sinks, scale)`` over a contiguous KV cache,
  ``paged_decode_attention(q, k_pages, v_pages, page_table, lengths, ...)`` over a paged one
  (``supports_paged`` checks the page size first).
"""

from pallas import kernel_identity
from pallas.attention_decode import decode_attention, paged_decode_attention, supports_paged
from pallas.attention_prefill import flash_attention
from pallas.errors import KernelError
from pallas.qformats import Fmt, PackedWeight, can_repack, can_view_dense, dense_weight, repack
from pallas.qmatmul import MatmulConfig, quantized_matmul, supports

kernel_identity.install()  # before any kernel lowers: identical kernels compile once per process

__all__ = [
    "Fmt",
    "KernelError",
    "MatmulConfig",
    "PackedWeight",
    "can_repack",
    "can_view_dense",
    "decode_attention",
    "dense_weight",
    "flash_attention",
    "paged_decode_attention",
    "quantized_matmul",
    "repack",
    "supports",
    "supports_paged",
]
