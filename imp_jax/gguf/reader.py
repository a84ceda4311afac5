"""GGUF files: validated metadata and tensor table over a memmap.

Built on ``gguf.GGUFReader``. The base reader trusts the file: a flipped count can make it loop for hours, a short
file makes it read empty slices, and its errors are bare ValueErrors. ``_CheckedReader`` bounds every read by the
file size and every count by the bytes left, and ``open_gguf`` validates the tensor table (byte ranges, alignment,
qtypes, block sizes, duplicates, overlaps) before anything uses it, so every failure is a ``GGUFError`` naming the
file and the tensor. Nothing here reads tensor data: that stays in the memmap until a loader asks for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from imp_jax.errors import GGUFError

GGML_MAX_DIMS = 4
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class _Corrupt(Exception):
    """Internal: raised inside the reader, turned into GGUFError with the path at the boundary."""


class _CheckedReader(GGUFReader):
    """GGUFReader whose reads never run past the end of the file and whose counts are bounded."""

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if count < 0 or end > len(self.data):
            raise _Corrupt(
                f"header ends early: a read of {end - offset} bytes at offset {offset} runs past the "
                f"end of the file ({len(self.data)} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _check_count(self, count: int, offset: int, min_bytes: int, what: str) -> None:
        if int(count) * min_bytes > len(self.data) - offset:
            raise _Corrupt(f"{what} count {int(count)} at offset {offset} cannot fit in the file")

    def _build_fields(self, offs, count):
        self._check_count(count, offs, _MIN_KV_BYTES, "metadata key/value")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        self._check_count(count, offs, _MIN_TENSOR_INFO_BYTES, "tensor")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        n = int(length[0])
        item = GGUFValueType(item_type[0])
        if item == GGUFValueType.STRING:
            strings, end = self._string_array(orig_offs + 12, n)
            return end - orig_offs, [item_type, length, strings], [2], [GGUFValueType.ARRAY, item]
        scalar = self.gguf_scalar_to_np.get(item)
        if scalar is None:  # nested arrays: element by element, each read bounded
            self._check_count(n, orig_offs + 12, 8, "array element")
            return super()._get_field_parts(orig_offs, raw_type)
        # Scalar arrays in one vectorised read instead of one Python iteration per element.
        values = self._get(orig_offs + 12, scalar, n)
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type[0])]
        return 12 + int(values.nbytes), [item_type, length, values], [2], types

    def _string_array(self, offs: int, n: int) -> tuple[np.ndarray, int]:
        """n length-prefixed strings from offs (vocabularies: 10^5 entries, so a tight loop, not numpy views)."""
        self._check_count(n, offs, 8, "string array")
        buf = memoryview(self.data)
        size = len(buf)
        unpack = struct.Struct("<Q" if self.byte_order == "I" else ">Q").unpack_from
        out = []
        for _ in range(n):
            if offs + 8 > size:
                raise _Corrupt(f"string array runs past the end of the file at offset {offs}")
            (length,) = unpack(buf, offs)
            offs += 8
            if offs + length > size:
                raise _Corrupt(f"a string of {length} bytes at offset {offs} runs past the end of the file")
            out.append(str(buf[offs : offs + length], "utf-8", "surrogateescape"))  # invalid bytes stay visible
            offs += length
        return np.array(out, dtype=object), offs

    def _get_tensor_info_field(self, orig_offs):
        field = super()._get_tensor_info_field(orig_offs)
        n_dims = int(field.parts[2][0])
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _Corrupt(f"tensor '{field.name}' has {n_dims} dimensions (1 to {GGML_MAX_DIMS} allowed)")
        return field

    def _build_tensors(self, start_offs, fields):
        # The table is validated by open_gguf, which needs the path for its messages; here only record it.
        self.tensor_fields = fields


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is numpy order (the reverse of GGUF's ne order)."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def qtype_name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A validated GGUF file: typed metadata, tensor table, and the memmap the tensor bytes live in."""

    path: Path
    version: int
    metadata: Mapping[str, Any]
    metadata_types: Mapping[str, tuple[GGUFValueType, ...]]  # value type (and array item type) per key
    tensors: Mapping[str, TensorInfo]
    alignment: int
    data_offset: int
    _mmap: np.memmap = dataclasses.field(repr=False)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored (a uint8 memmap view: no copy until used)."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(self.path, "no such tensor in the file", tensor=name)
        return self._mmap[info.offset : info.offset + info.nbytes]

    def nbytes_by_qtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.qtype_name] = out.get(t.qtype_name, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def open_gguf(path: str | os.PathLike[str]) -> ModelFile:
    """Open and validate a GGUF file; raise GGUFError naming the file (and tensor) on any defect."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    if path.stat().st_size < 24:
        raise GGUFError(path, f"file is {path.stat().st_size} bytes, too short for a GGUF header")
    try:
        reader = _CheckedReader(path, "r")
    except _Corrupt as e:
        raise GGUFError(path, str(e)) from None
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise GGUFError(path, f"corrupt GGUF header: {_reason(e)}") from None
    except OSError as e:
        raise GGUFError(path, f"cannot read the file: {e.strerror or e}") from None
    metadata = {name: _field_value(path, f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = _tensor_table(path, reader)
    return ModelFile(
        path=path,
        version=int(reader.fields["GGUF.version"].parts[0][0]),
        metadata=metadata,
        metadata_types={name: tuple(f.types) for name, f in reader.fields.items() if not name.startswith("GGUF.")},
        tensors=tensors,
        alignment=int(reader.alignment),
        data_offset=int(reader.data_offset),
        _mmap=reader.data,
    )


def _reason(e: Exception) -> str:
    text = str(e).strip("'\"") or type(e).__name__
    return text[:200]


def _field_value(path: Path, field) -> Any:
    kind = field.types[0] if field.types else None
    try:
        if kind == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        if kind == GGUFValueType.ARRAY:
            item = field.types[1] if len(field.types) > 1 else None
            if item == GGUFValueType.STRING:
                return list(field.parts[field.data[0]])
            if item == GGUFValueType.ARRAY:
                raise GGUFError(path, f"metadata key '{field.name}' is a nested array, which is not supported")
            if not field.data:
                return []
            return np.array(field.parts[field.data[0]])
        value = field.parts[field.data[0]][0]
        return bool(value) if kind == GGUFValueType.BOOL else value.item()
    except UnicodeDecodeError:
        raise GGUFError(path, f"metadata key '{field.name}' is not valid UTF-8") from None


def _tensor_table(path: Path, reader: _CheckedReader) -> dict[str, TensorInfo]:
    size = len(reader.data)
    alignment = int(reader.alignment)
    tensors: dict[str, TensorInfo] = {}
    for field in reader.tensor_fields:
        _, _, n_dims, dims, raw_type, rel_offset = field.parts
        name = field.name
        if name in tensors:
            raise GGUFError(path, "the name appears twice in the tensor table", tensor=name)
        ne = [int(d) for d in dims[: int(n_dims[0])]]
        try:
            qtype = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise GGUFError(path, f"unknown quant type id {int(raw_type[0])}", tensor=name) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in ne) or any(d >= 2**40 for d in ne):
            raise GGUFError(path, f"invalid dimensions {ne}", tensor=name)
        if ne[0] % block:
            raise GGUFError(
                path, f"row length {ne[0]} is not a multiple of {qtype.name}'s block of {block}", tensor=name
            )
        n_elements = int(np.prod(ne, dtype=object))
        nbytes = n_elements // block * type_size
        start = int(reader.data_offset) + int(rel_offset[0])
        if int(rel_offset[0]) % alignment:
            raise GGUFError(path, f"data offset {int(rel_offset[0])} is not aligned to {alignment} bytes", tensor=name)
        if start + nbytes > size:
            raise GGUFError(
                path,
                f"data [{start}, {start + nbytes}) runs past the end of the file ({size} bytes):"
                " the file is truncated or corrupt",
                tensor=name,
            )
        tensors[name] = TensorInfo(name, int(qtype), tuple(reversed(ne)), start, nbytes)
    _check_disjoint(path, tensors)
    return tensors


def _check_disjoint(path: Path, tensors: Mapping[str, TensorInfo]) -> None:
    """No two tensors' bytes overlap: a writer lays them out one after another, so an overlap is a rewritten
    offset (the tensor would silently read its neighbour's bytes)."""
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
    for before, after in itertools.pairwise(ordered):
        if after.offset < before.offset + before.nbytes:
            raise GGUFError(
                path,
                f"data [{after.offset}, {after.offset + after.nbytes}) overlaps tensor '{before.name}' "
                f"[{before.offset}, {before.offset + before.nbytes}): the file is corrupt",
                tensor=after.name,
            )
