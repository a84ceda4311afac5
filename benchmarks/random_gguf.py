"""Random-weight F16 GGUF files of a synthetic shape that carry a real tokenizer, for llama.cpp side by side.

llama.cpp can only run a file, and a file with a real tokenizer, so the side-by-side benchmark (vs_llamacpp.py)
writes one: the shape's tensors (``imp_jax.synthetic.synthetic_tensors``: the converter's names and shapes) with
matrices in F16 and vectors (norms) in F32 at 1.0, and the tokenizer metadata (``tokenizer.ggml.*``, chat template)
of a real model. The 0.5B model the tokenizer comes from is too big to carry to the GPU machine, so ``tokenizer``
extracts its tokenizer keys into a small tensorless GGUF here; ``write`` builds the model file from that there.

Weights are N(0, 0.02) (a trained model's scale, so neither engine meets NaN) drawn once into a 128 MiB pool and
tiled into every tensor from a different offset: a 16 GB Qwen3-8B file is written at disk speed, not RNG speed.

Usage: python benchmarks/random_gguf.py tokenizer [--model qwen2.5-0.5b] [--out .llama/qwen2.5-tokenizer.gguf]
       python benchmarks/random_gguf.py write --tokenizer .llama/qwen2.5-tokenizer.gguf --out /tmp/q8b-f16.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from imp_jax.synthetic import SHAPES, SyntheticShape, synthetic_tensors

TOKENIZER_KEYS = ("tokenizer.",)
DEFAULT_TOKENIZER = Path(".llama/qwen2.5-tokenizer.gguf")
POOL = 1 << 26  # f16 values in the random pool (128 MiB)
STD = 0.02
RMS_EPS = 1e-6


def tokenizer_fields(path: Path) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The tokenizer keys of a GGUF file: key -> (value, type, array element type)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(TOKENIZER_KEYS):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            out[key] = (field.contents(), field.types[0], sub)
    return out


def write_tokenizer(src: Path, dest: Path) -> None:
    """A tensorless GGUF holding only src's tokenizer keys (a few MiB instead of the model's hundreds)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(dest, "tokenizer")
    for key, (value, vtype, sub) in tokenizer_fields(src).items():
        w.add_key_value(key, value, vtype, sub)
    _finish(w, {})


def _vtype(value: Any) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.STRING


def model_shape(shape: SyntheticShape, vocab_size: int) -> SyntheticShape:
    """The shape with the tokenizer's vocabulary size (the embedding rows must match the token list)."""
    keys = {**dict(shape.keys), "vocab_size": vocab_size}
    keys.setdefault("attention.layer_norm_rms_epsilon", RMS_EPS)  # llama.cpp requires it for Qwen3
    return dataclasses.replace(shape, keys=tuple(keys.items()))


def write_model(shape: SyntheticShape, tokenizer: Path, dest: Path, seed: int = 0) -> int:
    """Write the random F16 model file; returns its size in bytes."""
    fields = tokenizer_fields(tokenizer)
    shape = model_shape(shape, len(fields["tokenizer.ggml.tokens"][0]))
    w = gguf.GGUFWriter(dest, shape.arch)
    w.add_name(f"random {shape.name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value in shape.metadata.items():
        if key != "general.architecture":
            w.add_key_value(key, value, _vtype(value))
    for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub)
    tensors = synthetic_tensors(shape.config, shape.metadata)
    for name, (dims, matrix) in tensors.items():
        dtype, qtype = (np.float16, gguf.GGMLQuantizationType.F16) if matrix else (np.float32, None)
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize, qtype)
    rng = np.random.default_rng(seed)
    pool = (STD * rng.standard_normal(POOL, np.float32)).astype(np.float16)
    _finish(w, {name: _data(pool, rng, dims, matrix) for name, (dims, matrix) in tensors.items()})
    return dest.stat().st_size


def _data(pool: np.ndarray, rng: np.random.Generator, dims: tuple[int, ...], matrix: bool) -> Callable[[], np.ndarray]:
    """A thunk making one tensor's data when it is written (so only one tensor is in memory at a time): a view of
    the pool from a random offset, or the pool tiled where the tensor is larger than what is left of it."""
    if not matrix:
        return lambda: np.ones(dims, np.float32)
    n, start = int(np.prod(dims)), int(rng.integers(POOL))
    if start + n <= POOL:
        return lambda: pool[start : start + n].reshape(dims)
    return lambda: np.resize(pool, n).reshape(dims)


def _finish(w: gguf.GGUFWriter, data: dict) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for make in data.values():  # in add_tensor_info order, which write_tensor_data expects
        w.write_tensor_data(make())
    w.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="extract a registry model's tokenizer keys into a small GGUF")
    t.add_argument("--model", default="qwen2.5-0.5b")
    t.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER)
    m = sub.add_parser("write", help="write a random F16 model file of a synthetic shape")
    m.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    m.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    m.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "tokenizer":
        from imp_jax import registry

        write_tokenizer(registry.resolve(args.model), args.out)
    else:
        size = write_model(SHAPES[args.shape], args.tokenizer, args.out)
        print(f"{args.out}: {size / 2**30:.2f} GiB", end=" ")
    print(f"written in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
