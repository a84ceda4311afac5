"""The GGUF reader: metadata, tensor table, and validation that turns every defect into a GGUFError."""

from __future__ import annotations

import resource
import shutil
import time

import gguf
import numpy as np
import pytest

from imp_jax.errors import GGUFError
from imp_jax.gguf import open_gguf


def _write(path, tensors, kv=None, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for key, value in (kv or {}).items():
        w.add_uint32(key, value)
    w.add_token_list(["<s>", "a", "é"])
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(0)
    q = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return _write(
        tmp_path / "small.gguf",
        {
            "token_embd.weight": (rng.standard_normal((3, 32)).astype(np.float32), None),
            "blk.0.attn_q.weight": (q, gguf.GGMLQuantizationType.Q8_0),
        },
        kv={"llama.custom": 7},
    )


def test_metadata_and_tensor_table(small_file):
    mf = open_gguf(small_file)
    assert mf.arch == "llama"
    assert mf.metadata["llama.block_count"] == 1
    assert mf.metadata["llama.custom"] == 7
    assert mf.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "é"]
    q = mf.tensors["blk.0.attn_q.weight"]
    assert (q.qtype, q.shape, q.nbytes) == (gguf.GGMLQuantizationType.Q8_0, (8, 64), 8 * 2 * 34)
    assert mf.tensors["token_embd.weight"].shape == (3, 32)
    assert mf.raw("blk.0.attn_q.weight").shape == (q.nbytes,)
    ref = gguf.GGUFReader(small_file)
    assert bytes(mf.raw("blk.0.attn_q.weight")) == bytes(ref.get_tensor(1).data.reshape(-1))


def test_missing_tensor_names_it(small_file):
    with pytest.raises(GGUFError, match=r"blk\.9\.ffn_up\.weight"):
        open_gguf(small_file).raw("blk.9.ffn_up.weight")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"GGML" + bytes(40), "corrupt GGUF header"),
        (b"GGUF" + (99).to_bytes(4, "little") + bytes(40), "corrupt GGUF header"),
        (b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(16), "cannot fit"),
    ],
)
def test_bad_headers(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as e:
        open_gguf(path)
    assert str(path) in str(e.value)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "missing.gguf")


def _patch_tensor_info(path, name: str, field: str, value: int):
    """Rewrite one field of a tensor-info record in place (dims, type or offset)."""
    data = bytearray(path.read_bytes())
    key = name.encode()
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    offsets = {"ne0": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}
    size = 8 if field in ("ne0", "offset") else 4
    data[offsets[field] : offsets[field] + size] = value.to_bytes(size, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("type", 250, "unknown quant type id 250"),
        ("ne0", 48, "not a multiple of Q8_0's block of 32"),
        ("offset", 3, "not aligned"),
        ("offset", 2**30, "runs past the end of the file"),
    ],
)
def test_bad_tensor_table(small_file, field, value, message):
    _patch_tensor_info(small_file, "blk.0.attn_q.weight", field, value)
    with pytest.raises(GGUFError, match=message) as e:
        open_gguf(small_file)
    assert "blk.0.attn_q.weight" in str(e.value)


def test_duplicate_tensor_names(tmp_path):
    rng = np.random.default_rng(1)
    path = _write(
        tmp_path / "dup.gguf",
        {
            "a.weight": (rng.standard_normal((2, 32)).astype(np.float32), None),
            "b.weight": (rng.standard_normal((2, 32)).astype(np.float32), None),
        },
    )
    data = path.read_bytes().replace(b"b.weight", b"a.weight")
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="appears twice") as e:
        open_gguf(path)
    assert "a.weight" in str(e.value)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_truncated_real_file_only_raises_gguf_error(real_model, tmp_path):
    """Truncate a real model at many offsets (header, vocabulary, tensor table, data): GGUFError every time."""
    src = real_model("smollm2-135m")
    data_offset = open_gguf(src).data_offset
    size = src.stat().st_size
    rng = np.random.default_rng(7)
    cuts = np.concatenate(
        [
            np.arange(0, 64),
            rng.integers(64, data_offset, 150),
            rng.integers(data_offset, size, 40),
            [data_offset - 1, data_offset, size - 1],
        ]
    )
    path = tmp_path / "cut.gguf"
    shutil.copyfile(src, path)
    rss0 = _max_rss_mib()
    for cut in sorted({int(c) for c in cuts}, reverse=True):  # shrinking one copy: no rewrite per case
        with open(path, "r+b") as f:
            f.truncate(cut)
        t0 = time.perf_counter()
        with pytest.raises(GGUFError):
            open_gguf(path)
        assert time.perf_counter() - t0 < 1.0, f"cut at {cut} took too long"
    assert _max_rss_mib() - rss0 < 300


@pytest.mark.slow
def test_byte_flips_in_header_only_raise_gguf_error(real_model, tmp_path):
    """Random byte flips in the metadata and tensor table of a real file: it opens, or raises GGUFError."""
    src = real_model("tinycoder")
    original = src.read_bytes()
    data_offset = open_gguf(src).data_offset
    rng = np.random.default_rng(11)
    path = tmp_path / "flip.gguf"
    rss0 = _max_rss_mib()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(original[: data_offset + 4096])
        for at in rng.integers(0, data_offset, rng.integers(1, 4)):
            data[at] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data) + original[data_offset + 4096 :])
        t0 = time.perf_counter()
        try:
            open_gguf(path)
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
        assert time.perf_counter() - t0 < 1.0
    assert outcomes["error"] > 0
    assert _max_rss_mib() - rss0 < 300
