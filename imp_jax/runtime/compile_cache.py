"""JAX's persistent compilation cache, on by default, in the imp-jax cache directory.

A new process pays for every XLA compile of the model's steps (seconds to tens of seconds for an 8B model on a
GPU, most of a cold CLI run). JAX can keep compiled executables on disk keyed by everything that changes the
program: the HLO (so kernel choices, dtypes and bucket shapes), the compile options, the jaxlib version, the
backend and the device kind. ``enable`` points it at ``<cache>/xla`` (``registry.cache_dir``) and caches every
program, however quickly it compiled: the loader's small programs add up too.

JAX writes an entry with one ``write_bytes``; a process killed in the middle of it leaves a truncated entry that
every later run fails to read and never replaces. ``AtomicCache`` writes each entry under a temporary name and
renames it into place, so the directory only ever holds whole entries.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
from jax._src import compilation_cache as _jax_cache
from jax._src import lru_cache as _jax_lru

from imp_jax import registry

_SUFFIX = "-cache"  # the name suffix of JAX's cache entries (jax._src.lru_cache)


class AtomicCache(_jax_lru.LRUCache):
    """JAX's file cache with whole-entry writes: a temporary file in the same folder, then an atomic rename."""

    def put(self, key: str, value: bytes) -> None:
        if not key:
            raise ValueError("cache key cannot be empty")
        path = Path(self.path) / f"{key}{_SUFFIX}"
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _file_cache(path: str):
    return AtomicCache(path, max_size=jax.config.jax_compilation_cache_max_size), path


def default_dir() -> Path:
    return registry.cache_dir() / "xla"


def enable(directory: str | os.PathLike[str] | None = None) -> Path:
    """Turn the persistent cache on in ``directory`` (default ``<imp-jax cache>/xla``) for this process.

    Safe to call again: a process that compiled before the cache was configured gets it from then on.
    """
    path = Path(directory) if directory is not None else default_dir()
    path.mkdir(parents=True, exist_ok=True)
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


def configure(setting: bool | str | os.PathLike[str]) -> Path | None:
    """The one place a load's ``compile_cache`` setting is applied: True (the default folder), False (off), or a
    folder. Returns the folder in use."""
    if setting is False:
        disable()
        return None
    return enable(None if setting is True else setting)


def entries(directory: str | os.PathLike[str]) -> set[str]:
    """The names of the whole entries in a cache folder (what a test compares between two runs)."""
    return {p.name for p in Path(directory).glob(f"*{_SUFFIX}")}
