"""Shared fixtures: real registry models (fetched once, cached) and small synthetic GGUF files."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def real_model():
    """Path of a registry model by name, fetched into the cache on first use."""
    return lambda name: registry.fetch(name, progress=False)
