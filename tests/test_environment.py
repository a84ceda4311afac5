"""The process environment is read at the entry points only (the CLI, and ``Environment.read`` where a public call
starts), then passed down as a value."""

from __future__ import annotations

import ast
from pathlib import Path

import imp_jax
from imp_jax.environment import Environment

ROOT = Path(imp_jax.__file__).parent.parent
READERS = {"imp_jax/cli.py", "imp_jax/environment.py"}


def test_environment_is_read_from_the_mapping_given(tmp_path):
    env = Environment.read({"IMP_JAX_CACHE": str(tmp_path / "mine"), "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"})
    assert env == Environment(cache_dir=tmp_path / "mine", xla_flags="--xla_cpu_enable_fast_math=true")
    assert Environment.read({"XDG_CACHE_HOME": str(tmp_path)}).cache_dir == tmp_path / "imp-jax"
    assert Environment.read({}).xla_flags == ""


def test_only_the_entry_points_read_the_environment():
    """No module below the CLI and ``Environment`` touches ``os.environ`` or ``os.getenv``: a setting read deep in
    the code (as ``IMP_JAX_KERNELS`` once was, at trace time) is a policy nobody resolved or passed."""
    readers = set()
    for package in ("imp_jax", "pallas"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "os"
                ):
                    readers.add(str(path.relative_to(ROOT)))
    assert readers <= READERS, sorted(readers - READERS)
