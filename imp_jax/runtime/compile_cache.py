"""Compiled programs kept on disk, on by default, in the imp-jax cache directory: JAX's persistent compilation
cache, and imp-jax's own store of whole executables and plan statistics.

A new process pays for every XLA compile of the model's steps (seconds to tens of seconds for an 8B model on a
GPU, most of a cold CLI run). JAX can keep compiled executables on disk keyed by everything that changes the
program: the HLO (so kernel choices, dtypes and bucket shapes), the compile options, the jaxlib version, the
backend and the device kind. ``configure`` points it at ``<cache root>/xla`` and caches every
program, however quickly it compiled: the loader's small programs add up too.

JAX writes an entry with one ``write_bytes``; a process killed in the middle of it leaves a truncated entry that
every later run fails to read and never replaces. ``AtomicCache`` writes each entry under a temporary name and
renames it into place, so the directory only ever holds whole entries.

JAX's cache is keyed by the lowered program, so a hit still pays for tracing and lowering it: for a Qwen3-8B
Q4_K_M step that is seconds (its Mosaic GPU kernels lower in Python), paid again in every process, for the memory
plan's two programs and the engine's first two. ``Store`` keeps what a repeated load would otherwise redo: the
engine's compiled steps (``jax.experimental.serialize_executable``) and the plan's measured step memory, keyed by
what they are compiled from (the function, its static arguments, the argument tree, every leaf's shape and dtype)
and by a fingerprint of everything else that could change them: the source of imp_jax and pallas (the native CPU
kernel's C++ included), the jax and jaxlib versions, the devices, ``XLA_FLAGS`` and the jax settings that change a
program. A changed kernel policy, dtype, bucket or device kind is a different key. Entries are written whole
(temporary file, then rename) and an entry that does not read back is ignored and replaced.

Only an executable XLA compiled in the process is stored: one JAX read back from its own cache serializes again
into bytes that load but fail to run on XLA:CPU ("Function ... not found"), and so does one JAX still holds in
memory from such a read, so ``compile_new`` says which it was, from JAX's compile and cache-hit events in the
compiling thread. A store's programs are therefore compiled with ``Store.compile_options``, which tie JAX's key
to the store's fingerprint: after an upgrade of imp-jax that leaves a step's HLO as it was, JAX's entry from the
old version would otherwise be a hit every time, the store would never get the step, and every process would
trace it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax._src import cache_key as _jax_cache_key
from jax._src import compilation_cache as _jax_cache
from jax._src import lru_cache as _jax_lru
from jax.experimental import serialize_executable

from imp_jax import registry

_SUFFIX = "-cache"  # the name suffix of JAX's cache entries (jax._src.lru_cache)


def _write_whole(path: Path, value: bytes) -> None:
    """Write ``value`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCache(_jax_lru.LRUCache):
    """JAX's file cache with whole-entry writes: a temporary file in the same folder, then an atomic rename."""

    def put(self, key: str, value: bytes) -> None:
        if not key:
            raise ValueError("cache key cannot be empty")
        path = Path(self.path) / f"{key}{_SUFFIX}"
        if not path.exists():
            _write_whole(path, value)


def _file_cache(path: str):
    return AtomicCache(path, max_size=jax.config.jax_compilation_cache_max_size), path


def enable(directory: str | os.PathLike[str]) -> Path:
    """Turn the persistent cache on in ``directory`` for this process.

    Safe to call again: a process that compiled before the cache was configured gets it from then on.
    """
    path = registry.cache_folder(Path(directory), "the compile cache folder")
    if jax.config.jax_compilation_cache_dir == str(path) and _jax_cache._cache is not None:
        return path
    _jax_cache.get_file_cache = _file_cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_enable_compilation_cache", True)
    _jax_cache.reset_cache()
    return path


def disable() -> None:
    """Turn the persistent cache off for this process (``load(compile_cache=False)``, ``--no-compile-cache``)."""
    jax.config.update("jax_enable_compilation_cache", False)
    _jax_cache.reset_cache()


_compiling = threading.local()  # what this thread's compiles did: XLA compiles, JAX cache hits


def _count(name: str) -> None:
    setattr(_compiling, name, getattr(_compiling, name, 0) + 1)


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _count("hits")


def _on_duration(event: str, secs: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _count("compiles")


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_new(lowered, options: dict | None = None) -> tuple[Any, bool]:
    """``lowered.compile(options)``, and whether XLA compiled it in this call: False when JAX read it back from its
    persistent cache (a cache-hit event) or handed back an executable it already held in memory (no compile event
    at all: JAX keeps each program it compiled or read back, per process)."""
    before = (getattr(_compiling, "compiles", 0), getattr(_compiling, "hits", 0))
    compiled = lowered.compile(options)
    compiles, hits = getattr(_compiling, "compiles", 0) - before[0], getattr(_compiling, "hits", 0) - before[1]
    return compiled, compiles > 0 and hits == 0


def configure(setting: bool | str | os.PathLike[str], root: Path) -> Store | None:
    """The one place a load's ``compile_cache`` setting is applied: True (``<root>/xla``, the imp-jax cache
    root), False (off), or a folder. Returns the store of executables and plans in that folder (None when off)."""
    if setting is False:
        disable()
        return None
    return Store(enable(root / "xla" if setting is True else setting), fingerprint())


def entries(directory: str | os.PathLike[str]) -> set[str]:
    """The names of the whole entries in a cache folder, JAX's and the store's (what a test compares between two
    runs)."""
    root = Path(directory)
    return {p.name for p in root.glob(f"*{_SUFFIX}")} | {
        f"{kind}/{p.name}" for kind in Store.KINDS for p in (root / kind).glob("*") if not p.name.startswith(".")
    }


# jax settings that change what a traced program computes (the rest change how it is run or logged)
_JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
)


def fingerprint() -> str:
    """What, besides a program's own arguments, decides what it compiles to on this machine: the imp-jax source,
    the versions, the devices, the jax settings, and the XLA flags the backend runs with, hashed as JAX's own
    compilation cache hashes them (it is JAX that reads them from the process)."""
    h = hashlib.sha256()
    _jax_cache_key._hash_xla_flags(h, _jax_cache_key.get_flag_prefixes())
    for package in ("imp_jax", "pallas"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for f in sorted(p for pattern in ("*.py", "*.cc") for p in root.rglob(pattern)):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    devices = jax.devices()
    h.update(
        repr(
            (
                jax.__version__,
                jaxlib.__version__,
                [(d.platform, d.device_kind) for d in devices],
                [(name, str(getattr(jax.config, name, None))) for name in _JAX_SETTINGS],
            )
        ).encode()
    )
    return h.hexdigest()


def program_key(fn: Callable, args: tuple, statics: dict[str, Hashable]) -> str:
    """A readable description of one program: the function, its static arguments, the argument tree and each
    leaf's shape, dtype and weak type, or its repr for a static value passed by position such as a config (the
    store hashes it with the fingerprint)."""
    leaves, tree = jax.tree.flatten(args)
    avals = [
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) if hasattr(x, "shape") else repr(x)
        for x in leaves
    ]
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return repr((name, sorted(statics.items(), key=lambda kv: kv[0]), str(tree), avals))


def _on(description: str, device: jax.Device) -> str:
    """A one-device program's description with its device: a stored executable names the device it runs on."""
    return f"{description} on device {device.id}"


@dataclasses.dataclass(frozen=True)
class Store:
    """Whole executables (``steps/``) and plan statistics (``plans/``) in ``directory``, under ``fingerprint``."""

    directory: Path
    fingerprint: str
    KINDS = ("steps", "plans")

    def _path(self, kind: str, description: str) -> Path:
        digest = hashlib.sha256((self.fingerprint + "\n" + description).encode()).hexdigest()
        folder = self.directory / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / digest

    @property
    def compile_options(self) -> dict[str, int]:
        """What the store's programs are compiled with: a debug setting that changes no program (how many buffers
        XLA's buffer-assignment dumps list) set from the fingerprint, so JAX's key of a program differs between
        two fingerprints and a new version compiles (and stores) what an old one left in JAX's cache."""
        salt = int(hashlib.sha256(self.fingerprint.encode()).hexdigest()[:7], 16)
        return {"xla_debug_buffer_assignment_show_max": 16 + salt}

    def executable(self, description: str, device: jax.Device) -> Any | None:
        """The executable stored under ``description`` for ``device``, loaded onto it; None when there is none or
        it does not read back (it is then removed). Without the device, JAX would load it onto every device of
        the backend, and on a machine of several it would then ask for an argument on each."""
        path = self._path("steps", _on(description, device))
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return serialize_executable.deserialize_and_load(*pickle.loads(blob), execution_devices=[device])
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def put_executable(self, description: str, device: jax.Device, compiled) -> None:
        """Keep ``compiled`` (a program of ``device``) for the next process; an executable the backend cannot
        serialize is not kept (the next process compiles it again, as without a store)."""
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception:
            return
        _write_whole(self._path("steps", _on(description, device)), blob)

    def record(self, description: str) -> dict | None:
        """The JSON record stored under ``description`` (plan statistics), or None."""
        path = self._path("plans", description)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            path.unlink(missing_ok=True)
            return None

    def put_record(self, description: str, record: dict) -> None:
        _write_whole(self._path("plans", description), json.dumps(record).encode())
