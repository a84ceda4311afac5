"""Which kernels run on this backend: the one place that reads ``IMP_JAX_KERNELS``.

``kernel_mode`` says which world applies: ``IMP_JAX_KERNELS=0`` turns the kernels off (debugging: compare against
the reference path), ``IMP_JAX_KERNELS=all`` also runs the ones measured slower than XLA (benchmarks, debugging).
"""

from __future__ import annotations

import os

import jax

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


def resolve_dtype(dtype: str) -> str:
    """The compute dtype "auto" stands for on this backend: bfloat16 where the dot has fast bf16 (GPUs), float32
    where it has none (XLA:CPU runs a bf16 GEMV about 15x slower than an f32 one: docs/BENCHMARKS.md, CPU)."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
