"""From what a user types (a path or a registry name) to a validated GGUF file."""

from __future__ import annotations

import os

from imp_jax import registry
from imp_jax.gguf.reader import ModelFile, open_gguf


def open_model_file(path_or_name: str | os.PathLike[str], *, progress: bool = True) -> ModelFile:
    return open_gguf(registry.resolve(path_or_name, progress=progress))
