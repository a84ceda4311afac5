"""Only the command line reads the process environment: it resolves each setting once (the cache root here) and
passes it down, and the library takes it as an argument."""

from __future__ import annotations

import ast
from pathlib import Path

import imp_jax
from imp_jax import registry

ROOT = Path(imp_jax.__file__).parent.parent


def test_the_cache_root_is_what_the_mapping_given_names(tmp_path):
    assert registry.cache_dir({"IMP_JAX_CACHE": str(tmp_path / "mine")}) == tmp_path / "mine"
    assert registry.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "imp-jax"
    assert registry.cache_dir({}) == registry.cache_root() == Path.home() / ".cache" / "imp-jax"
    assert registry.cache_root(tmp_path / "x") == tmp_path / "x"


def test_only_the_command_line_reads_the_environment():
    """No module but ``imp_jax/cli.py`` touches ``os.environ`` or ``os.getenv``: a setting read deep in the code
    (as ``IMP_JAX_KERNELS`` once was, at trace time) is a policy nobody resolved or passed."""
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
    assert readers <= {"imp_jax/cli.py"}, sorted(readers - {"imp_jax/cli.py"})
