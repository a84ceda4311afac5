"""From what a user types (a path or a registry name) to a validated GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

from imp_jax import registry
from imp_jax.gguf.reader import ModelFile, open_gguf


def open_model_file(
    path_or_name: str | os.PathLike[str], *, progress: bool = True, root: Path | None = None
) -> ModelFile:
    """The GGUF at a path, or the registry model of that name (fetched into the cache at ``root``)."""
    return open_gguf(registry.resolve(path_or_name, progress=progress, root=root))
