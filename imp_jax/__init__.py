"""imp-jax: GGUF language models on JAX/XLA, with Pallas Mosaic-GPU kernels for Hopper.

The public names are imported on first use, so ``imp-jax --help`` and ``import imp_jax.errors`` stay instant.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load": "imp_jax.model",
    "generate": "imp_jax.model",
    "Model": "imp_jax.model",
    "Generation": "imp_jax.model",
    "plan_memory": "imp_jax.planning.memory",
    "MemoryPlan": "imp_jax.planning.memory",
    "Engine": "imp_jax.runtime.engine",
    "StepOutput": "imp_jax.runtime.engine",
}
__all__ = [*_PUBLIC, "errors", "gguf"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in ("errors", "gguf"):
        return importlib.import_module(f"imp_jax.{name}")
    raise AttributeError(f"module 'imp_jax' has no attribute '{name}'")
