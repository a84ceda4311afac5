"""Which kernels the steps run: a ``KernelPolicy`` resolved once, at load, and passed down as static config.

Nothing below the CLI reads the environment: the CLI turns ``IMP_JAX_KERNELS`` into ``load(kernels=...)``, which
resolves it against the backend here (``resolve_kernels``); the policy then travels with the model into every
jitted step as a static argument, so a trace never depends on state it cannot see.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import jax

from imp_jax.errors import ImpError, KernelError

# Whether a plain bf16 weight runs the Pallas kernel (BF16 format, read in place) by default. Inside the scanned
# layer stack XLA copies every layer's slice out of the stacked weights before cuBLAS reads it (29% of copy
# bandwidth for Qwen3-8B's matrices on the H200), while the kernel reads the slice where it lies (78%):
# benchmarks/layer_weights.py, docs/BENCHMARKS.md "bf16 weights in place".
BF16_KERNEL = True

# The user's settings: "auto" every kernel that beats the XLA path, "off" the reference path everywhere
# (debugging: compare against it), "all" also the ones measured slower than XLA (benchmarks, debugging).
# "1" and "0" are IMP_JAX_KERNELS's spellings of "auto" and "off".
KERNEL_SETTINGS = ("auto", "off", "all")
_ALIASES = {"1": "auto", "0": "off"}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which Pallas kernels run. The default (all False) is the XLA reference path, what every kernel is checked
    against and what XLA:CPU always runs."""

    matmul: bool = False  # quantized weights are repacked at load for the Mosaic-GPU matmul
    bf16_matmul: bool = False  # dense bf16 matrices run that kernel too, reading the weight in place
    attention: bool = False  # flash prefill and decode attention
    # the kernels run in Mosaic GPU's CPU interpreter: tests drive a model's steps through them on a CPU
    interpret: bool = False
    # A layer stack's matrices are held one array per unit (ops.UnitArrays), picked by the layer loop: XLA:CPU
    # copies a stacked layer's slice out of the stack before each dot, every step (docs/BENCHMARKS.md, CPU).
    unit_arrays: bool = False
    # Matrices of the scale-and-offset block formats are held as int8 codes and multiplied by imp-jax's native CPU
    # kernel (ops.native_cpu): XLA:CPU has no product for a weight narrower than f32 that beats its f32 GEMV.
    native_matmul: bool = False

    @property
    def enabled(self) -> bool:
        return self.matmul or self.bf16_matmul or self.attention

    @property
    def label(self) -> str:
        """The setting in words, as a backend name shows it ("" for the reference path)."""
        return "pallas" if self.enabled else "native" if self.native_matmul else ""


REFERENCE = KernelPolicy()


def resolve_kernels(
    setting: str | KernelPolicy = "auto",
    device: jax.Device | None = None,
    *,
    devices: int = 1,
    native: Callable[[], bool] | None = None,
) -> KernelPolicy:
    """The policy for ``setting`` on ``device`` (default: the first JAX device). Kernels need a Hopper GPU
    (compute capability 9.x); anywhere else every setting resolves to the reference path. Over ``devices`` > 1
    (tensor parallelism) the kernels run per shard (``ops.sharded``), except the bf16 kernel: a dense matrix
    carries no shard layout of its own, so XLA's dot runs it on each shard. On the CPU, "auto" and "all" on one
    device hold the layer matrices one array per unit (``unit_arrays``), and multiply the quantized ones through
    imp-jax's native CPU kernel where ``native`` (``ops.native_cpu.in_cache``: builds and registers it, asked
    only where the kernel would run) says it is there; "off" keeps the stacked reference."""
    if isinstance(setting, KernelPolicy):
        if setting.native_matmul and not (native is not None and native()):
            raise ImpError(
                "the native CPU kernel cannot be built or loaded here (it needs g++ and AVX-512); "
                "use kernels='auto', which falls back to XLA's f32 product"
            )
        return setting
    mode = _ALIASES.get(str(setting).lower(), str(setting).lower())
    if mode not in KERNEL_SETTINGS:
        raise ImpError(f"kernels={setting!r} is not a kernel setting; use one of {', '.join(KERNEL_SETTINGS)}")
    dev = device or jax.devices()[0]
    hopper = dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
    if dev.platform == "cpu" and mode != "off" and devices == 1:
        return KernelPolicy(unit_arrays=True, native_matmul=native is not None and native())
    if mode == "off" or not hopper:
        return REFERENCE
    return KernelPolicy(matmul=True, bf16_matmul=devices == 1 and (mode == "all" or BF16_KERNEL), attention=True)


@contextlib.contextmanager
def kernel_errors() -> Iterator[None]:
    """Raise a kernel's own ``pallas.KernelError`` as ``imp_jax.errors.KernelError``: ``pallas`` imports nothing
    from imp_jax, and everything imp-jax raises on purpose is an ImpError that the CLI reports in one line."""
    import pallas

    try:
        yield
    except pallas.KernelError as e:
        raise KernelError(str(e)) from e


def resolve_dtype(dtype: str) -> str:
    """The compute dtype "auto" stands for on this backend: bfloat16 where the dot has fast bf16 (GPUs), float32
    where it has none (XLA:CPU runs a bf16 GEMV about 15x slower than an f32 one: docs/BENCHMARKS.md, CPU)."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
