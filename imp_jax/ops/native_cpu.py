"""The CPU's matmul over a quantized file's own codes: a small C++ kernel (``native_cpu.cc``) built with the system's
compiler on first use and called from the jitted steps through ``jax.ffi``.

XLA:CPU reads f32 weights at memory bandwidth, and has nothing faster for a narrower weight: a bf16 or int8 matrix
converted inside its dot is bound by the conversion (docs/BENCHMARKS.md, CPU). So the CPU path dequantized every
matrix to f32 at load, and a decode step read 4 bytes a weight where llama.cpp reads about half of one. Here a
matrix of a format that decodes as scale * code (+ offset) per sub-block (``quant.AFFINE_QTYPES``: Q4_0 to Q8_0, the
K-quants, IQ4) is held as int8 codes with an f32 scale and offset per sub-block (``AffineBlocks``, about 1.25
bytes a weight), and the kernel widens the codes in registers. The weights it reads are exactly the reference's
(``quant.affine_rows``); only the order of the f32 sums differs.

``enable`` builds the library once per source, jaxlib and CPU into a cache folder and registers it; where there is
no compiler or no AVX-512 it returns False and the policy keeps XLA's f32 path (the plan says which path each
format takes).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import AFFINE_QTYPES, Affine, affine_rows

TARGET = "imp_jax_native_cpu_matmul"
SOURCE = Path(__file__).with_name("native_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17", "-w")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AffineBlocks:
    """A matrix [N, K] as one int8 array [N, K + 8 * K / B]: each row's K codes, then its K / B f32 scales and its
    K / B f32 offsets (as bytes), one per sub-block of B: ``W[n, k] = scale[n, k // B] * codes[n, k] +
    offset[n, k // B]``. One buffer per matrix, its row's scales beside its codes. ``qtype`` is the file's format."""

    packed: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    qtype: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.packed.shape[0], self.k)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return _values(self.packed, self.k).astype(dtype)

    @classmethod
    def from_parts(cls, codes: jax.Array, scale: jax.Array, offset: jax.Array, qtype: int) -> AffineBlocks:
        """Codes int8 [N, K], scale and offset f32 [N, K / B] (``quant.affine_rows``) in the kernel's layout."""
        as_bytes = [jax.lax.bitcast_convert_type(a, jnp.int8).reshape(*a.shape[:-1], -1) for a in (scale, offset)]
        return cls(jnp.concatenate([codes, *as_bytes], axis=-1), codes.shape[-1], qtype)


def _values(packed: jax.Array, k: int) -> jax.Array:
    """The weights of packed rows [..., K + 8 * K / B], formed as the reference forms them (``quant.Affine``)."""
    nb = (packed.shape[-1] - k) // 8
    scale, offset = (
        jax.lax.bitcast_convert_type(packed[..., k + 4 * i * nb : k + 4 * (i + 1) * nb].reshape(-1, nb, 4), jnp.float32)
        for i in range(2)
    )
    codes = packed[..., :k].reshape(-1, k)
    return Affine(scale, codes, offset).values().reshape(*packed.shape[:-1], k)


def can_repack(w) -> bool:
    """Whether ``w`` is one unstacked matrix of a format the kernel reads (NVFP4's tensor scale excluded)."""
    return (
        isinstance(w, QTensor)
        and w.scale is None
        and w.qtype in AFFINE_QTYPES
        and len(w.shape) == 2
        and not w.stack_shape
    )


@jax.jit
def repack(w: QTensor) -> AffineBlocks:
    """The matrix's blocks as the kernel's rows of codes, scales and offsets (once, at load)."""
    return AffineBlocks.from_parts(*affine_rows(w.data, w.qtype), w.qtype)


# Up to this many rows of x (decode: one row a sequence) the kernel reads the codes once for all of them and wins;
# above it (prefill) XLA's f32 GEMM on the dequantized matrix does: its register-blocked micro-kernel runs 2-4x
# the kernel's multiply-adds a cycle, and a prefill step is compute-bound (the matrix dequantized in the step costs
# less than the product). Measured on 2 AVX-512 cores, 4864 x 896 and 896 x 4864: kernel 0.13 ms against 0.53 at
# 1 row, 0.74-0.86 against 0.94-1.20 at 8, 2.0 against 1.2-1.3 at 16, 25-32 against 5.6-7.0 at 256.
KERNEL_ROWS = 8


def takes(x: jax.Array) -> bool:
    """Whether the kernel runs the product for activations ``x`` [..., K] (``ops.matmul`` asks; a larger product
    takes XLA's dot of ``AffineBlocks.dequantize``, the same weights)."""
    return math.prod(x.shape[:-1]) <= KERNEL_ROWS


def matmul(x: jax.Array, w: AffineBlocks) -> jax.Array:
    """``x @ W.T`` in f32 for x [..., K] through the kernel (a row's result is the same in any batch)."""
    n, k = w.shape
    rows = x.reshape(-1, k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32)
    y = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(rows, w.packed)
    return y.reshape(*x.shape[:-1], n)


def rows(w: AffineBlocks, ids: jax.Array) -> jax.Array:
    """The f32 rows ``ids`` of the matrix (the embedding's lookup, when the table is held this way)."""
    return _values(jnp.take(w.packed, ids, axis=0), w.k)


def in_cache(cache_root: Path) -> Callable[[], bool]:
    """The probe ``ops.policy.resolve_kernels`` asks whether the kernel is there: ``enable`` on the cache folder's
    ``native`` subfolder."""
    return functools.partial(enable, cache_root / "native")


def enable(folder: Path) -> bool:
    """Build the kernel into ``folder`` (once: the library is named by the source, jaxlib and CPU it was built for)
    and register it with jax.ffi. False where it cannot be built or loaded here."""
    try:
        library = _build(folder)
    except (OSError, subprocess.SubprocessError):
        return False
    return library is not None and _register(str(library))


def _build(folder: Path) -> Path | None:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((jaxlib.__version__, _FLAGS, _cpu_flags())).encode())
    library = folder / f"native_cpu-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        if subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0:
            return None  # no AVX-512 (the source refuses), or a compiler that cannot build it
        os.replace(tmp, library)  # whole or absent: a concurrent build writes the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return library


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), or "" where /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


@functools.cache
def _register(library: str) -> bool:
    """Load the library and register its handler (JAX's FFI registry is per process; a second build of the same
    source in another folder finds the target registered by the first, which is the same code)."""
    try:
        lib = ctypes.cdll.LoadLibrary(library)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ImpJaxAffineMatmul), platform="cpu")
    except (OSError, AttributeError):
        return False
    except jax.errors.JaxRuntimeError as e:
        return "Duplicate FFI handler" in str(e)
    return True
