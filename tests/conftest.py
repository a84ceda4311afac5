"""Shared fixtures: real registry models (fetched once, cached) and small synthetic GGUF files."""

from __future__ import annotations

import gc
import os

import jax
import pytest

from imp_jax import registry

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=2")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA:CPU maps each compiled program's code and data as separate memory mappings, released only when the
    program is freed, and the jit caches keep every program the suite compiles: past ~400 tests the process nears
    the kernel's limit of 65530 mappings (vm.max_map_count), the next compile fails, and jaxlib 0.11.2 crashes
    (SIGSEGV) unwinding that error. Dropping the caches after each module keeps one module's programs alive."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _private_compile_cache(tmp_path_factory):
    """The suite's compiled programs go to a cache folder of its own, not the user's ``<cache>/xla``."""
    from imp_jax.runtime import compile_cache

    folder = tmp_path_factory.mktemp("xla")
    original = compile_cache.configure
    compile_cache.configure = lambda setting, root: original(folder if setting is True else setting, root)
    yield folder
    compile_cache.configure = original


@pytest.fixture(scope="session")
def real_model():
    """Path of a registry model by name, fetched into the cache on first use."""
    return lambda name: registry.fetch(name, progress=False)
