"""``imp-jax quantize``: rewrite a GGUF with its weight matrices in another block format, through gguf.quants.

Follows llama-quantize's rules: 1-D tensors (norms, biases), routers, the conv filter and tensors whose rows do not
split into blocks keep their type. Under a 4-bit target the matrices llama.cpp's mixes give more bits stay Q8_0:
the token embedding and output head (llama.cpp's MXFP4 files keep them 8-bit too) and, as in its Q4_K_M-style
mixes, every layer's ``attn_v`` and ``ffn_down`` (dense ones: MoE experts take the target). ``pure=True`` is
llama-quantize's ``--pure``: every matrix in the target type. The output is written to a temporary file next to
OUT and renamed into place only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)
from gguf import quants as gguf_quants

from imp_jax.errors import ImpError
from imp_jax.gguf.qtensor import row_bytes
from imp_jax.gguf.quant import dequantize
from imp_jax.gguf.reader import ModelFile, TensorInfo

_T = GGMLQuantizationType
TARGETS = {"mxfp4": _T.MXFP4, "q8_0": _T.Q8_0, "q4_0": _T.Q4_0}
_FILE_TYPES = {
    _T.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE,
    _T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    _T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}
_KEEP = {MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP, MODEL_TENSOR.SSM_CONV1D, MODEL_TENSOR.ROPE_FREQS}
_HEADS = {TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD], TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}
_MORE_BITS = {TENSOR_NAMES[k].split(".")[-1] for k in (MODEL_TENSOR.ATTN_V, MODEL_TENSOR.FFN_DOWN)}
_FOUR_BIT = {_T.MXFP4, _T.Q4_0}


def target_type(info: TensorInfo, target: GGMLQuantizationType, *, pure: bool = False) -> GGMLQuantizationType:
    """The type a tensor gets in the output file."""
    base = info.name.removesuffix(".weight")
    if len(info.shape) < 2 or not info.name.endswith(".weight"):
        return _T(info.qtype)
    if any(f".{TENSOR_NAMES[k].split('.')[-1]}." in f".{info.name}" for k in _KEEP):
        return _T(info.qtype)
    sensitive = base in _HEADS or (not pure and base.split(".")[-1] in _MORE_BITS)
    want = _T.Q8_0 if sensitive and target in _FOUR_BIT else target
    if info.shape[-1] % GGML_QUANT_SIZES[want][0]:
        return _T(info.qtype)
    return want


def quantize_file(
    mf: ModelFile,
    out: str | os.PathLike[str],
    target: str | Callable[[TensorInfo], GGMLQuantizationType],
    *,
    pure: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write ``mf`` to ``out`` with its weight matrices in ``target`` (mxfp4, q8_0 or q4_0; ``pure``: no
    more-bits mix), or with the type a function picks per tensor (any type gguf.quants can write: mixed-format
    files for tests)."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ImpError(f"quant type '{target}' is not one imp-jax can write; choose one of {', '.join(TARGETS)}")
        qtype = TARGETS[target]
        choose = lambda info: target_type(info, qtype, pure=pure)  # noqa: E731
    else:
        qtype, choose = None, target
    out = Path(out)
    if out.resolve() == mf.path.resolve():
        raise ImpError(f"{out}: the output would overwrite the input file")
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(tmp, mf.arch)
    try:
        _copy_metadata(mf, writer, qtype)
        for info in mf.tensors.values():
            writer.add_tensor(info.name, *_convert(mf, info, choose(info)))
            if on_tensor is not None:
                on_tensor(info.name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _copy_metadata(mf: ModelFile, writer: GGUFWriter, qtype: GGMLQuantizationType | None) -> None:
    for key, value in mf.metadata.items():
        if key == "general.architecture" or (key == "general.file_type" and qtype is not None):
            continue
        types = mf.metadata_types[key]
        sub = types[1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, list(value) if sub is not None else value, types[0], sub_type=sub)
    if qtype is not None:
        writer.add_file_type(int(_FILE_TYPES[qtype]))


def _convert(mf: ModelFile, info: TensorInfo, qtype: GGMLQuantizationType):
    """(array, raw_shape, raw_dtype) for GGUFWriter.add_tensor: float arrays, or packed rows of bytes."""
    raw = np.asarray(mf.raw(info.name))
    if qtype == info.qtype:
        if info.qtype in (_T.F32, _T.F16):
            return raw.view(np.float32 if info.qtype == _T.F32 else np.float16).reshape(info.shape), None, None
        return raw.reshape(*info.shape[:-1], row_bytes(info.qtype, info.shape[-1])), None, _T(info.qtype)
    values = np.asarray(dequantize(raw, info.qtype, info.shape), np.float32)
    if qtype in (_T.F32, _T.F16):
        return values.astype(np.float32 if qtype == _T.F32 else np.float16), None, None
    if qtype == _T.MXFP4:
        return quantize_mxfp4(values), None, qtype
    return gguf_quants.quantize(values, qtype), None, qtype


# E2M1 magnitudes in code order (codes 8-15 are the negatives).
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def quantize_mxfp4(values: np.ndarray) -> np.ndarray:
    """MXFP4 blocks (GGUF layout) choosing each block's power-of-two scale by least squared error.

    gguf-py (like llama.cpp) takes the scale from the block maximum alone; trying that exponent and the next one
    down, with every element rounded to the nearest E2M1 value (the largest clipped to 6), keeps small weights that
    the maximum's scale would round to zero. It decodes with the standard dequantizer (bit-exact tests hold).
    """
    rows = values.reshape(-1, values.shape[-1])
    blocks = rows.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=1)
    base = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / 6.0)), -127).astype(np.int32)
    best_err = np.full(len(blocks), np.inf, np.float32)
    best_e = base.copy()
    best_idx = np.zeros(blocks.shape, np.uint8)
    mids = (_E2M1[1:] + _E2M1[:-1]) / 2
    for shift in (0, -1):
        e = np.clip(base + shift, -127, 127)
        scale = np.ldexp(np.float32(1), e)[:, None].astype(np.float32)
        mag = np.abs(blocks) / scale
        idx = np.searchsorted(mids, mag).astype(np.uint8)  # nearest E2M1 magnitude, clipped to 6
        err = ((_E2M1[idx] * scale * np.sign(blocks) - blocks) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_e = np.where(better, e, best_e)
        best_idx[better] = idx[better]
    codes = best_idx | np.where(blocks < 0, 8, 0).astype(np.uint8)
    codes = np.where(best_idx == 0, 0, codes).astype(np.uint8)  # no negative zero
    # GGUF: value = kvalues[code] * 2**(byte - 128) with kvalues doubled, so byte = e + 127 for scale 2**e.
    exp_byte = (best_e + 127).clip(0, 255).astype(np.uint8)[:, None]
    packed = codes[:, :16] | (codes[:, 16:] << 4)
    out = np.concatenate([exp_byte, packed], axis=1)
    return out.reshape(*values.shape[:-1], values.shape[-1] // 32 * 17)
