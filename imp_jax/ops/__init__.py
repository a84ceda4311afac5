"""The one dispatch point per op: matrix products (``matmul``), attention (``attention``), and the kernel policy
that decides between the Pallas kernels and the XLA reference (``policy``)."""

from imp_jax.ops import native_cpu
from imp_jax.ops.attention import attention, attention_paged, attention_prefill, write_pages
from imp_jax.ops.matmul import (
    DENSE,
    NATIVE,
    PALLAS,
    REFERENCE,
    UnitArrays,
    Weight,
    check_scale_bound,
    embed,
    expert_matmul,
    matmul,
    matmul_path,
    prepare_weight,
    read_format,
    repack_weight,
    repacker,
    repacks,
    scale_bound,
)
from imp_jax.ops.policy import KernelPolicy, resolve_kernels

__all__ = [
    "DENSE",
    "NATIVE",
    "PALLAS",
    "REFERENCE",
    "KernelPolicy",
    "UnitArrays",
    "Weight",
    "attention",
    "attention_paged",
    "attention_prefill",
    "check_scale_bound",
    "embed",
    "expert_matmul",
    "matmul",
    "matmul_path",
    "native_cpu",
    "prepare_weight",
    "read_format",
    "repack_weight",
    "repacker",
    "repacks",
    "resolve_kernels",
    "scale_bound",
    "write_pages",
]
