"""The process environment, read once where a public call starts (``load``, ``plan_memory``, the registry's
functions, the CLI) and passed down as a value: nothing below those entry points reads ``os.environ``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Environment:
    """What the environment decides for imp-jax: where its cache lives and the XLA flags the backend runs with."""

    cache_dir: Path  # IMP_JAX_CACHE, else $XDG_CACHE_HOME/imp-jax, else ~/.cache/imp-jax
    xla_flags: str  # XLA_FLAGS, as XLA reads them itself when its backend starts

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> Environment:
        if root := environ.get("IMP_JAX_CACHE"):
            cache = Path(root).expanduser()
        elif xdg := environ.get("XDG_CACHE_HOME"):
            cache = Path(xdg).expanduser() / "imp-jax"
        else:
            cache = Path.home() / ".cache" / "imp-jax"
        return cls(cache_dir=cache, xla_flags=environ.get("XLA_FLAGS", ""))
