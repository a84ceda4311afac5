"""Memory planning from XLA's own accounting, before any weight moves (DESIGN rule 3).

A plan adds parts that are each measured, not guessed:

- weights: the bytes of the very spec tree the loader materializes, per stored qtype and execution path
  (packed with a kernel, packed with the reference dequantization inside the step, or dequantized once at load:
  the fallback);
- KV cache and state: the abstract cache for max_context x batch, and the decode loop's state;
- workspace: XLA's temp and I/O bytes of the engine's real ``prefill_step`` (a full max_context prompt) and
  ``decode_step``, lowered and compiled with ShapeDtypeStruct inputs (``compiled.memory_analysis()``). JAX
  caches those executables, so the engine's first real call reuses them: planning costs no extra compile;
- load transient: what exists beside the weights while one leaf is converted on the device (a fallback leaf's
  packed copy and its decode scratch, or a float leaf stored in another dtype).

``peak = weights + max(kv + state + workspace, load transient)``, and it must fit what the device has free minus
an explicit headroom for what XLA cannot see (allocator fragmentation, small arrays, other step variants).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from imp_jax import ops, registry, user_input
from imp_jax.errors import ImpError, ModelTooLarge, gib
from imp_jax.gguf.qtensor import QTensor
from imp_jax.models.config import ModelConfig, config_from_gguf
from imp_jax.ops.policy import REFERENCE, KernelPolicy, resolve_dtype, resolve_kernels
from imp_jax.ops.sharded import ShardedWeight, splits_kv_heads
from imp_jax.planning import devices as per_device
from imp_jax.planning.options import PATHS
from imp_jax.runtime import compile_cache as compile_cache_mod
from imp_jax.runtime import steps
from imp_jax.runtime.cache import abstract_cache
from imp_jax.runtime.compile_cache import Store, program_key
from imp_jax.runtime.sampling import SamplingParams
from imp_jax.weights import sharding
from imp_jax.weights.fallback import fallback_specs, is_fallback, packed_spec, to_dense
from imp_jax.weights.files import open_model_file
from imp_jax.weights.loading import abstract_leaf, abstract_stored
from imp_jax.weights.specs import param_specs
from imp_jax.weights.tensor_spec import TensorSpec, is_spec, map_specs, per_unit_matrices

KiB, MiB, GiB = 2**10, 2**20, 2**30

# What XLA's numbers cannot see: BFC allocator rounding and fragmentation, the token/key/sampling arrays, the
# greedy and shorter-prompt variants of the steps (each smaller than the planned worst case, but compiled and
# resident as code). Measured error on an H100 is in docs/MEMORY.md; a CPU process shares the host with
# everything else, so it only keeps a small margin.
DEFAULT_HEADROOM = {"gpu": 1 * GiB, "cpu": 256 * MiB}
# packed: every quantized weight stays packed (a kernel where one exists, else dequantized inside each step);
# fallback: those without a kernel are dequantized once at load; dense: all of them are (debugging, comparisons);
# auto: packed when every weight has a kernel, else the fallback when it fits, else packed.
_SUGGEST_BITS = 4.5  # a 4-bit K-quant / MXFP4 model, scales included


class MemoryWarning(UserWarning):
    """A plan that does not fit was forced through (debugging)."""


@dataclasses.dataclass(frozen=True)
class WeightLine:
    """The weights of one stored qtype that take one execution path."""

    qtype: str  # as stored in the file
    path: str  # "kernel:<name>" | "reference" | "fallback" | "dense"
    stored: str  # on the device: "packed" or a dtype
    tensors: int
    nbytes: int
    layout: str = ""  # a kernel's weights over a mesh: how they split (ops.sharded.ShardLayout.words)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's accounting of one compiled step, beyond the weights and the cache it is given."""

    name: str
    temp_bytes: int
    io_bytes: int  # inputs and outputs that are neither weights nor cache (tokens, logits, sampling values)

    @property
    def workspace_bytes(self) -> int:
        return self.temp_bytes + self.io_bytes


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the plan is checked against."""

    available_bytes: int
    source: str  # where the number came from
    headroom_bytes: int
    device: str


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The memory a model needs on one device for max_context x batch (API contract names are properties)."""

    label: str
    config: ModelConfig
    path: str  # "packed" | "fallback"
    dtype: str
    max_context: int
    batch: int
    weights: tuple[WeightLine, ...]
    kv_cache_bytes: int
    state_bytes: int
    steps: tuple[StepMemory, ...]
    load_transient_bytes: int
    budget: Budget
    specs: Any = dataclasses.field(repr=False, compare=False)  # the planned tree: what load_params gets
    source_specs: Any = dataclasses.field(repr=False, compare=False)  # the tree as stored, for replanning
    abstract_params: Any = dataclasses.field(repr=False, compare=False)  # specs' ShapeDtypeStruct twins (compile ahead)
    kernels: KernelPolicy = REFERENCE  # the kernel policy the steps were planned (and will run) with
    device_weights: tuple[int, ...] = ()  # over a mesh (config.mesh): the weight bytes on each of its devices
    store: Store | None = dataclasses.field(default=None, repr=False, compare=False)  # re-plans read it too

    @property
    def device_peaks(self) -> tuple[tuple[str, int], ...]:
        """Over a mesh: each device's name and peak (its weights, the cache shard and the sharded programs'
        workspace, which XLA reports per device); every number of the plan itself is the first device's."""
        run = max(self.kv_cache_bytes + self.state_bytes + self.workspace_bytes, self.load_transient_bytes)
        names = per_device.device_names(self.config)
        return tuple((name, w + run) for name, w in zip(names, self.device_weights, strict=True))

    @property
    def weights_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def workspace_bytes(self) -> int:
        return max((s.workspace_bytes for s in self.steps), default=0)

    @property
    def peak_bytes(self) -> int:
        run = self.kv_cache_bytes + self.state_bytes + self.workspace_bytes
        return self.weights_bytes + max(run, self.load_transient_bytes)

    @property
    def headroom_bytes(self) -> int:
        return self.budget.headroom_bytes

    @property
    def needed_bytes(self) -> int:
        return self.peak_bytes + self.headroom_bytes

    @property
    def available_bytes(self) -> int:
        return self.budget.available_bytes

    @property
    def fits(self) -> bool:
        peaks = [p for _, p in self.device_peaks] or [self.peak_bytes]
        return max(peaks) + self.headroom_bytes <= self.available_bytes

    @property
    def path_label(self) -> str:
        """How the weights run, in words: "bf16-fallback path", "packed Q4_K path"."""
        if any(w.path == "fallback" for w in self.weights):
            return f"{_short_dtype(self.dtype)}-fallback path"
        packed = [w.qtype for w in self.weights if w.stored == "packed"]
        if packed:
            return f"packed {'/'.join(dict.fromkeys(packed))} path"
        return f"dense {self.weights[0].qtype} path" if self.weights else "dense path"

    def report(self) -> str:
        """A readable table: parts, peak, budget and verdict."""
        c = self.config
        rows: list[tuple[str, str]] = [("weights  (qtype, path, tensors)", "")]
        for w in self.weights:
            rows.append((f"  {w.qtype:<6} {_path_words(w):<30} {w.tensors:>5}", _size(w.nbytes)))
        if c.mesh is not None and self.kernels.attention:
            rows.append((f"attention  {_attention_words(c)}", ""))
        rows += [
            ("weights total", _size(self.weights_bytes)),
            (
                f"KV cache  ({c.n_attention_layers} layers x {self.max_context} x {self.batch}, k+v)",
                _size(self.kv_cache_bytes),
            ),
            ("state  (recurrent + decode loop)", _size(self.state_bytes)),
        ]
        for s in self.steps:
            rows.append((f"workspace  {s.name} (temp {_size(s.temp_bytes)}, io {_size(s.io_bytes)})", ""))
        rows += [
            ("workspace  (largest step)", _size(self.workspace_bytes)),
            ("load transient  (one leaf converting)", _size(self.load_transient_bytes)),
            ("peak", _size(self.peak_bytes)),
            ("runtime headroom", _size(self.headroom_bytes)),
            ("needed", _size(self.needed_bytes)),
            (f"available  ({self.budget.source})", _size(self.available_bytes)),
        ]
        width = max(len(label) for label, _ in rows) + 2
        head = [
            f"memory plan: {self.label}",
            f"  {c.arch}, {c.n_layers} layers, n_embd {c.n_embd}, {self.dtype}, max_context {self.max_context}, "
            f"batch {self.batch}, on {self.budget.device}, {self.path_label}",
        ]
        body = [f"  {label:<{width}}{value:>12}" for label, value in rows]
        if self.device_peaks:
            body.append(f"  per device (tp {self.config.tp}: weights, peak, needed of {_size(self.available_bytes)})")
            for (name, peak), w in zip(self.device_peaks, self.device_weights, strict=True):
                needed = _size(peak + self.headroom_bytes)
                body.append(f"    {name:<{width - 2}}{_size(w):>12}{_size(peak):>12}{needed:>12}")
        spare = self.available_bytes - self.needed_bytes
        verdict = (
            f"  verdict: fits, {_size(spare)} to spare"
            if self.fits
            else f"  verdict: does NOT fit, {_size(-spare)} short"
        )
        return "\n".join([*head, *body, verdict])


# --- budget -------------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 10**3,
    "m": MiB,
    "mib": MiB,
    "mb": 10**6,
    "g": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string like "8GiB", "512 MiB", "1.5G" (binary) or "16GB" (decimal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ImpError(f"cannot read the memory size {value!r}: use bytes or a size like '8GiB' or '512MiB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ImpError(f"a memory size must be positive, got {value!r}")
    return n


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_budget(
    device_memory: int | str | None = None, headroom: int | str | None = None, device=None, mesh=None
) -> Budget:
    """Free bytes on ``device`` (default: the first JAX device; over a ``mesh``, its device with the least), or
    the user's ``device_memory`` (per device).

    A GPU reports its allocator's ``bytes_limit - bytes_in_use``; the CPU backend reports nothing, so the host's
    available memory stands in.
    """
    if mesh is not None:  # the tightest of the mesh's devices, named
        budgets = [resolve_budget(device_memory, headroom, d) for d in mesh.devices.flat]
        return min(budgets, key=lambda b: b.available_bytes)
    device = device or jax.devices()[0]
    kind = "gpu" if device.platform in ("gpu", "cuda", "rocm") else "cpu"
    room = DEFAULT_HEADROOM[kind] if headroom is None else parse_bytes(headroom)
    name = f"{device.platform}:{device.id} {getattr(device, 'device_kind', '')}".strip()
    if device_memory is not None:
        return Budget(parse_bytes(device_memory), "device_memory given", room, name)
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return Budget(free, f"{device.platform} allocator free", room, name)
    return Budget(host_available_bytes(), "host MemAvailable", room, name)


# --- planning -----------------------------------------------------------------------------------------------


def plan_memory(
    path_or_name: str | os.PathLike[str],
    *,
    max_context: int | str = 4096,
    batch: int = 1,
    dtype: str = "auto",
    device_memory: int | str | None = None,
    path: str = "auto",
    headroom: int | str | None = None,
    kernels: str | KernelPolicy = "auto",
    devices: int = 1,
    mesh=None,
    compile_cache: bool | str | os.PathLike[str] = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MemoryPlan:
    """Plan a GGUF model (path or registry name) without moving any weight to the device.

    ``max_context`` is capped at the model's own context; ``"auto"`` picks the largest that fits (a power of two
    or a multiple of 256). ``path``: "packed", "fallback", or "auto" (packed where a kernel exists, the
    dequantized fallback for the rest only when it fits). ``devices`` / ``mesh`` plan the model split over that
    many devices (tensor parallelism, as ``load``): per device, from the compiled sharded programs.
    ``compile_cache`` (as ``load``'s) keeps each step's statistics in the imp-jax cache folder: a later plan of
    the same programs, by ``load`` or this function, reads them back instead of compiling (a ``--context auto``
    search of gemma3-270m: seven candidate plans).
    """
    dtype = _check_dtype(dtype)
    root = registry.cache_root(cache_dir)
    store = compile_cache_mod.configure(compile_cache, root)
    mf = open_model_file(path_or_name, root=root)
    on = sharding.make_mesh(devices, mesh)
    policy = resolve_kernels(kernels, devices=sharding.tp_size(on), native=ops.native_cpu.in_cache(root))
    config = sharding.on_mesh(config_from_gguf(mf.metadata, mf.tensors), on)
    specs = param_specs(mf, config, dtype)
    return plan_specs(
        specs,
        config,
        label=Path(mf.path).name,
        max_context=max_context,
        batch=batch,
        dtype=dtype,
        budget=resolve_budget(device_memory, headroom, mesh=config.mesh),
        path=path,
        kernels=policy,
        store=store,
    )


def plan_specs(
    specs,
    config: ModelConfig,
    *,
    label: str,
    max_context: int | str,
    batch: int,
    dtype: str,
    budget: Budget,
    path: str = "auto",
    kernels: KernelPolicy = REFERENCE,
    store: Store | None = None,
) -> MemoryPlan:
    """The plan for a spec tree as stored (``params.param_specs`` or ``synthetic.synthetic_specs``), its steps
    compiled under ``kernels`` (the policy the model will be loaded with). With a ``store`` the steps' statistics
    of an earlier plan of the same programs are read back instead of compiling them again."""
    dtype = _check_dtype(dtype)
    if path not in PATHS:
        raise ImpError(f"unknown weight path {path!r}; use one of {', '.join(PATHS)}")
    user_input.load_options(max_context=max_context, batch=batch)
    if max_context == "auto":
        return auto_context(
            specs, config, label=label, batch=batch, dtype=dtype, budget=budget, path=path, kernels=kernels,
            store=store,
        )  # fmt: skip
    if config.context_length < 1:
        raise ImpError(f"{label}: the model's context_length is {config.context_length}")
    max_context = min(max_context, config.context_length)
    args = dict(
        label=label, max_context=max_context, batch=batch, dtype=dtype, budget=budget, kernels=kernels, store=store
    )
    if path != "auto":
        return _plan(specs, config, path=path, **args)
    if not any(_without_kernel(s, kernels) for s in _leaves(specs)):
        return _plan(specs, config, path="packed", **args)
    if (
        _weights_bytes(_apply_path(specs, "fallback", dtype, kernels), kernels) + budget.headroom_bytes
        > budget.available_bytes
    ):
        return _plan(specs, config, path="packed", **args)  # the dense weights alone cannot fit: skip compiling
    fallback = _plan(specs, config, path="fallback", **args)
    return fallback if fallback.fits else _plan(specs, config, path="packed", **args)


def _weights_bytes(planned, kernels: KernelPolicy) -> int:
    """The device bytes of a planned spec tree's weights, from the abstract leaves alone (no compile)."""
    return sum(_nbytes(abstract_leaf(s, kernels)) for s in _leaves(planned))


def replan(plan: MemoryPlan, **changes) -> MemoryPlan:
    """The same model under other settings (max_context, batch, path, budget)."""
    args = dict(
        label=plan.label,
        max_context=plan.max_context,
        batch=plan.batch,
        dtype=plan.dtype,
        budget=plan.budget,
        path=plan.path,
        kernels=plan.kernels,
        store=plan.store,
    )
    args.update(changes)
    return plan_specs(plan.source_specs, plan.config, **args)


def _plan(
    specs, config: ModelConfig, *, path: str, label, max_context, batch, dtype, budget, kernels, store
) -> MemoryPlan:
    planned = _apply_path(specs, path, dtype, kernels)
    # repacking traced once per leaf
    abstract = {s: _placed(s, abstract_leaf(s, kernels, config.mesh), config) for s in _leaves(planned)}
    weights = _weight_lines(abstract, kernels)
    weights_bytes = sum(w.nbytes for w in weights)
    cache = abstract_cache(config, batch, max_context, dtype)
    kv_bytes = _nbytes(cache.kv_arrays())
    state = steps.abstract_decode_state(batch)
    recurrent_bytes = _nbytes(cache.recurrent_arrays())
    state_bytes = recurrent_bytes + _nbytes(state)
    params = map_specs(abstract.__getitem__, planned)
    scratch: dict = {}  # to_dense's scratch per stored shape: layers of one shape compile it once
    tokens = jax.ShapeDtypeStruct((batch, max_context), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    sampling = jax.eval_shape(SamplingParams().arrays)
    # decode: the sampling variant with the most workspace (sort over the vocabulary, repeat-penalty mask)
    decode_flags = dict(greedy=False, penalty=True, kernels=kernels)
    programs = (
        (steps.prefill_step, (params, config, tokens, lengths, cache), dict(kernels=kernels)),
        (steps.decode_step, (params, config, cache, state, sampling), decode_flags),
    )
    persistent = (weights_bytes + kv_bytes + recurrent_bytes, weights_bytes + kv_bytes + state_bytes)
    names = (f"prefill[{max_context}]", "decode")
    measured = _measured_steps(programs, persistent, names, store if config.mesh is None else None)
    return MemoryPlan(
        label=label,
        config=config,
        path=path,
        dtype=dtype,
        max_context=max_context,
        batch=batch,
        weights=weights,
        kv_cache_bytes=kv_bytes,
        state_bytes=state_bytes,
        steps=measured,
        load_transient_bytes=max(
            (_load_transient(s, a, scratch, store, config) for s, a in abstract.items()), default=0
        ),
        budget=budget,
        specs=planned,
        source_specs=specs,
        abstract_params=params,
        kernels=kernels,
        device_weights=per_device.device_weights(abstract, config),
        store=store,
    )


def _measured_steps(programs, persistent: tuple[int, ...], names: tuple[str, ...], store: Store | None):
    """XLA's accounting of each (function, arguments, statics) program: read back from ``store`` when an earlier
    plan measured the same programs, else compiled (statistics only, side by side) and recorded there. (Plans over
    a mesh get no store: their programs hold a device assignment.)"""
    key = repr([program_key(fn, args, statics) for fn, args, statics in programs] + [_STATISTICS_ONLY])
    record = store.record(key) if store is not None else None
    if record is not None:
        return tuple(StepMemory(n, t, io) for n, (t, io) in zip(names, record["steps"], strict=True))
    compiled = _compile_all(*(fn.lower(*args, **statics) for fn, args, statics in programs))
    measured = tuple(step_memory(n, c, p) for n, c, p in zip(names, compiled, persistent, strict=True))
    if store is not None:
        store.put_record(key, {"steps": [[m.temp_bytes, m.io_bytes] for m in measured]})
    return measured


def _placed(spec: TensorSpec, leaf, config: ModelConfig):
    """The abstract leaf with the shardings it will have over ``config.mesh`` (as is on one device)."""
    return leaf if config.mesh is None else sharding.abstract_sharded(spec, config.mesh, leaf)


def _apply_path(specs, path: str, dtype: str, kernels: KernelPolicy):
    """The spec tree the loader should materialize on this path (and in the layout ``kernels`` reads)."""
    if path == "dense":
        specs = fallback_specs(specs, dtype)
    elif path == "fallback":
        specs = fallback_specs(specs, dtype, keep=lambda s: not _without_kernel(s, kernels))
    return per_unit_matrices(specs) if kernels.unit_arrays else specs


# The plan compiles only to read XLA's buffer assignment, which comes before code generation: the backend's
# optimisation passes change no buffer and cost most of a CPU compile (the programs are never run).
_STATISTICS_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile_all(*lowered):
    """Compile the programs side by side: XLA compiles outside the GIL, so the steps' compiles overlap."""
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        return list(pool.map(lambda program: program.compile(_STATISTICS_ONLY), lowered))


def step_memory(name: str, compiled, persistent: int) -> StepMemory:
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without statistics: the headroom has to cover the workspace
        return StepMemory(name + " (no XLA statistics)", 0, 0)
    io = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes - persistent
    return StepMemory(name, int(stats.temp_size_in_bytes), max(int(io), 0))


def _nbytes(tree) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (PRNG keys counted as their raw key data); of a sharded
    one, its shard on one device."""
    total = 0
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        shape = x.shape if getattr(x, "sharding", None) is None else x.sharding.shard_shape(tuple(x.shape))
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _leaves(specs) -> list[TensorSpec]:
    return [s for s in jax.tree.leaves(specs, is_leaf=is_spec) if isinstance(s, TensorSpec)]


def _without_kernel(spec: TensorSpec, kernels: KernelPolicy) -> bool:
    """A packed leaf that the reference path would dequantize inside every step (ops names no kernel for one
    layer's slice of it, as the scanned step sees it)."""
    leaf = abstract_leaf(spec.unit(0), kernels)
    return spec.dtype is None and ops.matmul_path(leaf, kernels) == ops.REFERENCE


def _weight_lines(abstract: dict, kernels: KernelPolicy) -> tuple[WeightLine, ...]:
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for spec, leaf in abstract.items():
        layout = leaf.layout.words if isinstance(leaf, ShardedWeight) else ""
        if spec.dtype is None:
            mp = ops.matmul_path(leaf, kernels)  # a kernel names the format it reads (a transcoded type says into what)
            key = (mp if mp == ops.REFERENCE else f"kernel:{mp} {ops.read_format(leaf)}", "packed")
        elif is_fallback(spec):
            key = ("fallback", spec.dtype)
        else:  # a float weight: XLA's dot, or the Pallas kernel reading a bf16 matrix in place
            matrix = len(spec.shape) == 2 and not spec.gathered
            mp = ops.matmul_path(abstract_leaf(spec.unit(0), kernels), kernels) if matrix else ops.DENSE
            key = ("dense" if mp == ops.DENSE else f"kernel:{mp}", spec.dtype)
        entry = groups.setdefault((GGMLQuantizationType(spec.qtype).name, *key, layout), [0, 0])
        entry[0] += len(spec.names) * len(spec.parts)
        entry[1] += _nbytes(leaf)
    lines = [WeightLine(q, p, s, n, b, layout) for (q, p, s, layout), (n, b) in groups.items()]
    return tuple(sorted(lines, key=lambda w: -w.nbytes))


_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: "float32",
    GGMLQuantizationType.F16: "float16",
    GGMLQuantizationType.BF16: "bfloat16",
}


def _load_transient(spec: TensorSpec, leaf, scratch: dict, store: Store | None, config: ModelConfig) -> int:
    """Bytes beside the final weights while this leaf is put on the device (see params.materialize), on one
    device of ``config.mesh``; ``scratch`` keeps to_dense's temp bytes per distinct matrix across the leaves of
    one plan (a model has a handful)."""
    if is_fallback(spec):  # the stored blocks, and to_dense's scratch (one stacked slice at a time)
        one = abstract_stored(packed_spec(spec.unit(0)))
        key = (one.data.shape, one.data.dtype, None if one.scale is None else one.scale.shape, one.qtype, spec.dtype)
        if key not in scratch:
            scratch[key] = _dense_scratch(one, spec.dtype, store)
        return _nbytes(abstract_stored(packed_spec(spec))) + scratch[key]
    if spec.dtype is None:  # repacked for a kernel (ops.repack_weight): the stored blocks and one matrix's scratch
        stored = _nbytes(_placed(spec, abstract_stored(spec), config))
        one = leaf.first if isinstance(leaf, ops.UnitArrays) else leaf
        return 0 if isinstance(one, QTensor) else stored + 2 * _nbytes(leaf) // len(spec.names)  # scratch ~2x
    stored = _FLOAT_DTYPES.get(spec.qtype)
    if spec.dtype == "float32" or stored is None or stored == spec.dtype:
        return 0  # transferred as is, or converted on the host
    return len(spec.names) * math.prod(spec.shape) * jnp.dtype(stored).itemsize


def _dense_scratch(one: QTensor, dtype: str, store: Store | None) -> int:
    """to_dense's scratch for one matrix (every stacked leaf converts one slice at a time, so its scratch is its
    slice's), read back from ``store`` when an earlier plan measured it."""
    key = repr([program_key(to_dense, (one,), dict(dtype=dtype)), _STATISTICS_ONLY])
    record = store.record(key) if store is not None else None
    if record is None:
        stats = to_dense.lower(one, dtype=dtype).compile(_STATISTICS_ONLY).memory_analysis()
        record = {"temp": int(stats.temp_size_in_bytes) if stats is not None else 0}
        if store is not None:
            store.put_record(key, record)
    return record["temp"]


# --- fitting ------------------------------------------------------------------------------------------------


def context_candidates(limit: int) -> list[int]:
    """Contexts worth suggesting up to ``limit``: powers of two below 256, then multiples of 256."""
    return [c for c in (16, 32, 64, 128) if c <= limit] + list(range(256, limit + 1, 256))


def fit_context(plan: MemoryPlan, limit: int | None = None, smallest: MemoryPlan | None = None) -> MemoryPlan | None:
    """The plan at the largest candidate context up to ``limit`` (default: the plan's) that fits, or None.

    Each re-plan compiles two steps, so the probes are chosen by a model of the plans already made, not by
    halving. The KV cache is linear in the context; each step's workspace grows like the prefill's activations
    and attention scores, ``a + d*c**2`` to a good approximation (XLA's buffers for T x T scores dominate long
    contexts). Through the two plans nearest the answer (the largest known to fit, the smallest known not to;
    at first only the plan itself, with ``a = 0``), that curve predicts the largest candidate that fits, and
    that candidate is planned next, then its neighbour on the other side of the predicted boundary: when the
    model is right, as it is for the quadratic workspaces of real models, those two plans are the answer. When
    the neighbour says the model was wrong, the curve is drawn again through the two plans now nearest the
    boundary, which the workspace's linear terms (sliding windows, per-token buffers) bend least, and a second
    probe and neighbour follow (gemma3-270m at 2 GiB: 10 plans by halving after the first miss, 5 this way). A
    model wrong twice hands the rest to halving, so a poor model costs a few probes more than a bisection.
    ``smallest`` (``auto_context`` has it) is one more known plan. The answer is always a real plan.
    """
    limit = min(limit or plan.max_context, plan.config.context_length)
    per_token = plan.kv_cache_bytes / plan.max_context
    room = plan.available_bytes - plan.headroom_bytes

    def need(c: int, workspace: float) -> float:
        return plan.weights_bytes + max(per_token * c + plan.state_bytes + workspace, plan.load_transient_bytes)

    cands = [c for c in context_candidates(limit) if need(c, 0) <= room]
    known = {p.max_context: p for p in (plan, smallest) if p is not None and p.path == plan.path}

    def planned(i: int) -> MemoryPlan:
        if cands[i] not in known:
            known[cands[i]] = replan(plan, max_context=cands[i])
        return known[cands[i]]

    def index_of(fits: bool, pick) -> int | None:
        found = [i for i, c in enumerate(cands) if c in known and known[c].fits == fits]
        return pick(found) if found else None

    lo, hi = index_of(True, max), index_of(False, min)
    lo, hi = -1 if lo is None else lo, len(cands) if hi is None else hi
    for _ in range(_MODEL_ROUNDS):  # the model's answer, then its neighbour across the boundary it predicts
        if hi - lo <= 1:
            break
        probe = _predicted_probe(known, cands, lo, hi, need, room)
        if planned(probe).fits:
            lo, neighbour = probe, probe + 1
        else:
            hi, neighbour = probe, probe - 1
        if lo < neighbour < hi:
            if planned(neighbour).fits:
                lo = neighbour
            else:
                hi = neighbour
    while hi - lo > 1:  # the model missed every round: halve what is left
        probe = (lo + hi) // 2
        if planned(probe).fits:
            lo = probe
        else:
            hi = probe
    return planned(lo) if lo >= 0 else None


_MODEL_ROUNDS = 2  # rounds of (predicted probe, neighbour) before fit_context halves instead


def _predicted_probe(known: dict, cands: list[int], lo: int, hi: int, need, room: int) -> int:
    """The candidate in (lo, hi) that the workspace curve through the known plans says is the largest that fits
    (clamped into the interval). With three plans or more, each step's curve is ``a + b*c + d*c**2`` through the
    three nearest the boundary: the largest that fits, the next above it, and the closest other (the linear term
    is what sliding windows and per-token buffers add). With two, ``a + d*c**2`` through them; with one, through
    it and the origin (a lower bound of the truth)."""
    points = sorted(known.items())
    fitting = [cp for cp in points if cp[1].fits]
    start = points.index(fitting[-1]) if fitting else 0  # the largest that fits, else the smallest that does not
    pair = points[start : start + 2]
    rest = sorted((cp for cp in points if cp not in pair), key=lambda cp: min(abs(cp[0] - c) for c, _ in pair))
    near = sorted(pair + rest[: 3 - len(pair)])
    xs = np.array([c for c, _ in near], dtype=np.float64)

    def workspace(c: int) -> float:
        curves = []
        for i in range(len(near[0][1].steps)):
            ys = np.array([p.steps[i].workspace_bytes for _, p in near], dtype=np.float64)
            if len(near) == 3:
                curves.append(float(np.polyval(np.polyfit(xs, ys, 2), c)))
            elif len(near) == 2:
                d = (ys[1] - ys[0]) / (xs[1] ** 2 - xs[0] ** 2)
                curves.append(ys[0] + d * (c**2 - xs[0] ** 2))
            else:
                curves.append(ys[0] * (c / xs[0]) ** 2)
        return max(curves)

    fit = [i for i in range(lo + 1, hi) if need(cands[i], workspace(cands[i])) <= room]
    return max(fit) if fit else lo + 1


def auto_context(
    specs,
    config: ModelConfig,
    *,
    label,
    batch,
    dtype,
    budget,
    path="auto",
    kernels: KernelPolicy = REFERENCE,
    store: Store | None = None,
) -> MemoryPlan:
    """The plan at the largest context that fits; if none does, the plan at the smallest candidate context (it
    says how far even that is from fitting). The smallest is planned first: when it does not fit, nothing does,
    and that answer costs one plan instead of a bisection from the full context down.

    With ``path="auto"`` the search runs on the path the smallest context takes (the dequantized fallback where it
    fits, the faster one on a CPU), as ``plan_specs`` would choose at any context. The packed path's smaller
    weights can leave room for a longer context than the fallback's: it is searched only when it fits the next
    candidate above the fallback's answer, so the answer is the longest context either path fits (the fallback's
    on a tie) for one extra plan in the usual case."""
    args = dict(label=label, batch=batch, dtype=dtype, budget=budget, kernels=kernels, store=store)
    smallest = plan_specs(specs, config, max_context=context_candidates(config.context_length)[0], path=path, **args)
    if not smallest.fits:
        return smallest
    best = _largest_fitting(specs, config, smallest, args)
    above = [c for c in context_candidates(config.context_length) if c > best.max_context]
    if path != "auto" or smallest.path != "fallback" or not above:
        return best
    packed = plan_specs(specs, config, max_context=above[0], path="packed", **args)
    return _largest_fitting(specs, config, packed, args) if packed.fits else best


def _largest_fitting(specs, config: ModelConfig, known: MemoryPlan, args: dict) -> MemoryPlan:
    """The plan at the largest context that fits on ``known``'s path, given ``known``, a plan on it that fits."""
    full = plan_specs(specs, config, max_context=config.context_length, path=known.path, **args)
    if full.fits:
        return full
    return fit_context(full, smallest=known) or known


def check_fits(plan: MemoryPlan, *, path_label: str | None = None, force: bool = False) -> None:
    """Raise ModelTooLarge (needed and available bytes, a computed suggestion) unless the plan fits.

    Called before the first transfer. ``force`` (debugging) warns with the same numbers and goes on.
    """
    if plan.fits:
        return
    message = refusal_message(plan, path_label=path_label)
    if force:
        warnings.warn(MemoryWarning(f"forced past the memory budget: {message}"), stacklevel=2)
        return
    raise ModelTooLarge(message, needed=plan.needed_bytes, available=plan.available_bytes)


def refusal_message(plan: MemoryPlan, *, path_label: str | None = None) -> str:
    """ "model needs X + Y headroom, Z available: too large ... Try max_context=N (needs W), ..." from re-plans."""
    label = path_label or plan.path_label
    alone = plan.weights_bytes + plan.headroom_bytes > plan.available_bytes
    tries: list[str] = []
    smaller = None if alone else fit_context(plan)
    if smaller is not None:
        tries.append(f"max_context={smaller.max_context} (needs {_gib(smaller.needed_bytes)})")
    if plan.batch > 1:
        single = replan(plan, batch=1)
        if single.fits:
            tries.append(f"batch=1 (needs {_gib(single.needed_bytes)})")
    if any(w.path == "fallback" for w in plan.weights):
        packed = replan(plan, path="packed")
        tries.append(f"the {packed.path_label} (needs {_gib(packed.needed_bytes)})")
    more = per_device.devices_needed(plan)
    if more is not None:
        tries.append(f"devices={more[0]} (about {_gib(more[1])} per device)")
    quant = _four_bit_weights(plan)
    if quant is not None:
        tries.append(f"a 4-bit quant (weights about {_gib(quant)})")
    tries.append("a smaller model")
    why = f" (the weights alone need {_gib(plan.weights_bytes)})" if alone else ""
    return (
        f"{plan.label} needs {_gib(plan.peak_bytes)} + {_gib(plan.headroom_bytes)} runtime headroom, "
        f"{_gib(plan.available_bytes)} available ({plan.budget.source}): too large for {_device_words(plan)} on the "
        f"{label}{why}. Try {', '.join(tries[:-1])}{' or ' if len(tries) > 1 else ''}{tries[-1]}."
    )


def _four_bit_weights(plan: MemoryPlan) -> int | None:
    """Weight bytes if every matrix were stored at ~4.5 bits, when that is clearly smaller than now."""
    total = 0
    for spec in _leaves(plan.specs):
        n = len(spec.names) * math.prod(spec.shape)
        total += int(n * _SUGGEST_BITS / 8) if len(spec.shape) >= 2 else n * jnp.dtype(spec.dtype).itemsize
    return total if total < 0.8 * plan.weights_bytes else None


# --- words --------------------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> str:
    return user_input.dtype(resolve_dtype(dtype))


def _device_words(plan: MemoryPlan) -> str:
    if plan.config.mesh is None:
        return f"this device ({plan.budget.device})"
    return f"device {plan.budget.device} (the tightest of {plan.config.tp}, tensor parallel)"


def _short_dtype(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(dtype, dtype)


def _path_words(w: WeightLine) -> str:
    if w.path == "reference":
        return "packed, dequantized in the step"
    if w.path.startswith("kernel:"):
        layout = f", {w.layout}" if w.layout else ""
        return f"{'packed' if w.stored == 'packed' else _short_dtype(w.stored)}, {w.path[7:]} kernel{layout}"
    if w.path == "fallback":
        return f"dequantized at load to {_short_dtype(w.stored)}"
    return f"dense {_short_dtype(w.stored)}"


def _attention_words(config: ModelConfig) -> str:
    """Where attention runs over a mesh with the attention kernels on: per kv-head shard, or on XLA where the kv
    heads do not split (``ops.sharded.splits_kv_heads``)."""
    if splits_kv_heads(config.mesh, config.n_head_kv):
        return "Pallas kernels, per kv-head shard"
    return f"XLA: {config.n_head_kv} kv heads do not split over tp {config.tp}"


def _gib(n: int) -> str:
    """GiB with one decimal (errors.gib), or MiB below 1 GiB where "0.0 GiB" would say nothing."""
    return gib(n) if n >= GiB else f"{n / MiB:.1f} MiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# --- command line -------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> None:
    """Print the plan's table and verdict; when it does not fit, raise the refusal load() would give (exit 1)."""
    context: int | str = args.context if args.context == "auto" else _int_arg("--context", args.context)
    plan = plan_memory(
        args.model,
        max_context=context,
        batch=args.batch,
        dtype=args.dtype,
        device_memory=args.device_memory,
        path=args.path,
        headroom=args.headroom,
        kernels=args.kernels,
        devices=args.tp,
        compile_cache=args.compile_cache,
        cache_dir=args.cache_dir,
    )
    print(plan.report())
    if context != "auto" and plan.max_context < context:
        print(f"imp-jax: --context {context} is more than the model's {plan.max_context} tokens", file=sys.stderr)
    if plan.fits:
        return
    if context == "auto":
        raise ModelTooLarge(
            f"no context fits: even {plan.max_context} tokens need {_gib(plan.needed_bytes)}, "
            f"{_gib(plan.available_bytes)} available ({plan.budget.source}); try a smaller model or a 4-bit quant",
            needed=plan.needed_bytes,
            available=plan.available_bytes,
        )
    raise ModelTooLarge(refusal_message(plan), needed=plan.needed_bytes, available=plan.available_bytes)


def _int_arg(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ImpError(f"{flag} takes a number of tokens or 'auto', got {value!r}") from None
