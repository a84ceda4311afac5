"""Deterministic GGUF mutants, shared by tests/test_fuzz_load.py and benchmarks/fuzz.py (imports no imp_jax).

A ``Base`` maps one good file's layout once (with gguf-py's reader): the fixed header, every metadata field's
key length, type tag, string / array lengths and values, the tokenizer arrays, the chat template, and every
tensor-table entry. ``mutant(base, i, seed)`` is case ``i``: one of ``KINDS`` (``i`` cycles through them, so any
run of ``len(KINDS)`` cases covers all), drawn from a generator seeded by (seed, i) alone, so a case can be
rebuilt from its number. Only the header region (everything before the tensor data) is ever rewritten: a
mutant is that region, edited, then the data, which ``Mutant.write`` copies for a small file and leaves as a
sparse hole of the right length for a big one, so a case of a 500 MB model writes a few MB, not 500.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

U32 = (0, 1, 2, 3, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
U64 = (0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1)
F32 = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e38, -1e38)
BYTES = (0x00, 0x01, 0x20, 0x7F, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF)
HOSTILE_TEMPLATES = (
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}{% endfor %}",
    "{% set s = namespace(x='ab') %}{% for i in range(80) %}{% set s.x = s.x ~ s.x %}{% endfor %}{{ s.x }}",
    "{{ 'x' * 10**10 }}",
    "{{ ('%0999999999d' % 1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception('this template refuses') }}",
    "{% for m in messages %}{{ m.content | tojson(indent=10**9) }}{% endfor %}",
    "{{ 9**9**9 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for %}",
    "{{ messages[0].content",
    "{% if %}{% endif %}{% endif %}",
    "{{ (messages | list) * 10**8 }}",
    "{{ strftime_now('%Y' * 10**7) }}",
    "",
    "\x00\xff",
)


@dataclasses.dataclass(frozen=True)
class Span:
    """Bytes [start, start + size) of the header region, and what they hold."""

    start: int
    size: int
    what: str


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type_tag: Span
    key_length: Span
    lengths: tuple[Span, ...]  # the string's or the array's length
    values: tuple[Span, ...]  # the scalar, the string's bytes, or a numeric array's values (none: string arrays)
    item_type: int | None  # gguf value type of the value (arrays: of the items)
    entries: np.ndarray | None = None  # string arrays: [n, 2] int64 (offset of each entry's length, its bytes)

    def entry(self, i: int) -> tuple[Span, Span]:
        """A string array's entry ``i``: the span of its length and of its bytes."""
        at, size = (int(v) for v in self.entries[i])
        return Span(at, 8, f"length of entry {i}"), Span(at + 8, size, f"entry {i}")


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    name_span: Span
    n_dims: Span
    dims: Span
    qtype: Span
    offset: Span


@dataclasses.dataclass
class Base:
    """A good GGUF file and its layout; ``data`` is kept in memory only for small files (``small``)."""

    label: str
    path: Path
    header: bytes  # bytes [0, data_offset)
    data_offset: int
    size: int
    alignment: int
    fields: dict[str, Field]
    tensors: list[Tensor]
    small: bool

    @classmethod
    def open(cls, path: str | os.PathLike[str], label: str | None = None, *, small_bytes: int = 16 * 2**20) -> Base:
        """Map the layout of a good (little-endian) GGUF file in one pass over its header region."""
        path = Path(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            fields, tensors, end = _layout(buf)
            alignment = _alignment(fields, buf)
            data_offset = end + (-end % alignment)
            header = bytes(buf[:data_offset])
        size = path.stat().st_size
        return cls(label or path.stem, path, header, data_offset, size, alignment, fields, tensors, size <= small_bytes)


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)


def _layout(buf) -> tuple[dict[str, Field], list[Tensor], int]:
    """Fields and tensor-table entries with the spans of their parts, and where the tensor table ends."""
    u32, u64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
    (n_tensors,), (n_kv,) = u64(buf, 8), u64(buf, 16)
    off = 24
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        key_length = Span(off, 8, "key length")
        (n,) = u64(buf, off)
        name = bytes(buf[off + 8 : off + 8 + n]).decode()
        off += 8 + n
        type_tag = Span(off, 4, "type tag")
        (tag,) = u32(buf, off)
        off += 4
        lengths: list[Span] = []
        values: list[Span] = []
        item, entries = tag, None
        if tag == _ARRAY:
            (item,) = u32(buf, off)
            lengths.append(Span(off + 4, 8, "array length"))
            (count,) = u64(buf, off + 4)
            off += 12
            if item == _STRING:
                table = []
                for _ in range(count):
                    (n,) = u64(buf, off)
                    table.append((off, n))
                    off += 8 + n
                entries = np.array(table, np.int64).reshape(-1, 2)
            else:
                values.append(Span(off, _SCALAR_SIZES[item] * count, "values"))
                off += values[-1].size
        elif tag == _STRING:
            (n,) = u64(buf, off)
            lengths.append(Span(off, 8, "string length"))
            values.append(Span(off + 8, n, "string"))
            off += 8 + n
        else:
            values.append(Span(off, _SCALAR_SIZES[tag], "value"))
            off += _SCALAR_SIZES[tag]
        fields[name] = Field(name, type_tag, key_length, tuple(lengths), tuple(values), item, entries)
    tensors = []
    for _ in range(n_tensors):
        (n,) = u64(buf, off)
        name_span = Span(off + 8, n, "name")
        off += 8 + n
        (n_dims,) = u32(buf, off)
        n_dims_span, dims = Span(off, 4, "n_dims"), Span(off + 4, 8 * n_dims, "dims")
        off += 4 + 8 * n_dims
        tensors.append(Tensor(bytes(buf[name_span.start : off - 4 - 8 * n_dims]).decode(), name_span, n_dims_span,
                              dims, Span(off, 4, "type"), Span(off + 4, 8, "offset")))  # fmt: skip
        off += 12
    return fields, tensors, off


def _alignment(fields: dict[str, Field], header) -> int:
    f = fields.get("general.alignment")
    if f is None:
        return 32
    v = f.values[0]
    return int.from_bytes(header[v.start : v.start + v.size], "little") or 32


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One case: ``header`` replaces the base's header region; the file is cut at ``truncate`` bytes if set."""

    base: Base
    index: int
    kind: str
    what: str
    header: bytes
    truncate: int | None = None

    @property
    def label(self) -> str:
        return f"{self.base.label}#{self.index} [{self.kind}] {self.what}"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the mutant: the edited header, padding to the alignment, then the data (a copy for a small
        base, a sparse hole of the same length for a big one: the cases of big models never read tensor data)."""
        path = Path(path)
        head = self.header
        if len(head) != self.base.data_offset:  # a splice changed the header's length: realign the data
            head += bytes(-len(head) % self.base.alignment)
        end = len(head) + self.base.size - self.base.data_offset
        cut = end if self.truncate is None else min(self.truncate, end)
        with open(path, "wb") as f:
            f.write(head[:cut])
            if cut > len(head):
                if self.base.small:
                    with open(self.base.path, "rb") as src:
                        src.seek(self.base.data_offset)
                        f.write(src.read(cut - len(head)))
                else:
                    f.truncate(cut)
        return path


# ---------------------------------------------------------------------------------------------------------------
# Mutation kinds: each takes (base, rng) and returns (what, header, truncate)
# ---------------------------------------------------------------------------------------------------------------


def _put(header: bytes, span: Span, value: bytes) -> bytes:
    return header[: span.start] + value[: span.size].ljust(span.size, b"\0") + header[span.start + span.size :]


def _splice(header: bytes, span: Span, value: bytes) -> bytes:
    return header[: span.start] + value + header[span.start + span.size :]


def _int_bytes(value: int, size: int) -> bytes:
    return int(value % 2 ** (8 * size)).to_bytes(size, "little")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _special_int(rng: np.random.Generator, size: int, near: int | None = None) -> int:
    pool = list(U64 if size == 8 else U32 if size == 4 else (0, 1, 2, 127, 128, 255))
    if near is not None:
        pool += [near - 1, near + 1, near * 2, max(near // 2, 0)]
    return int(_pick(rng, pool))


def _read_int(header: bytes, span: Span) -> int:
    return int.from_bytes(header[span.start : span.start + span.size], "little")


def _header(base: Base, rng: np.random.Generator):
    at, size, what = _pick(rng, [(0, 4, "magic"), (4, 4, "version"), (8, 8, "tensor count"), (16, 8, "kv count")])
    if what == "magic":
        value = _pick(rng, [b"GGUG", b"FUGG", b"\0\0\0\0", b"GGML"])
    else:
        value = _int_bytes(_special_int(rng, size, _read_int(base.header, Span(at, size, what))), size)
    return f"{what} set to {value.hex()}", _put(base.header, Span(at, size, what), value), None


def _type_tag(base: Base, rng: np.random.Generator):
    f = _pick(rng, list(base.fields.values()))
    tag = int(_pick(rng, [*range(14), 14, 99, 2**31, 2**32 - 1]))
    return f"'{f.name}' type tag set to {tag}", _put(base.header, f.type_tag, _int_bytes(tag, 4)), None


def _key_length(base: Base, rng: np.random.Generator):
    f = _pick(rng, list(base.fields.values()))
    n = _special_int(rng, 8, _read_int(base.header, f.key_length))
    return f"'{f.name}' key length set to {n}", _put(base.header, f.key_length, _int_bytes(n, 8)), None


def _length(base: Base, rng: np.random.Generator):
    fields = [f for f in base.fields.values() if f.lengths]
    f = _pick(rng, fields)
    span = f.lengths[0]
    if f.entries is not None and len(f.entries) and rng.random() < 0.4:
        span = f.entry(int(rng.integers(len(f.entries))))[0]
    n = _special_int(rng, 8, _read_int(base.header, span))
    return f"'{f.name}' {span.what} set to {n}", _put(base.header, span, _int_bytes(n, 8)), None


def _scalar(base: Base, rng: np.random.Generator):
    fields = [f for f in base.fields.values() if f.values and f.item_type not in (_STRING, _ARRAY)]
    f = _pick(rng, fields)
    span = _pick(rng, f.values)
    kind = gguf.GGUFValueType(f.item_type)
    width = {gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.FLOAT64: 8}.get(kind)
    if width is None:
        item = span.size if not f.lengths else np.dtype(_NP[kind]).itemsize
        at = span.start + item * int(rng.integers(max(span.size // item, 1)))
        n = _special_int(rng, item)
        value, target = _int_bytes(n, item), Span(at, item, "value")
        shown = str(n)
    else:
        at = span.start + width * int(rng.integers(max(span.size // width, 1)))
        x = float(_pick(rng, F32))
        value, target, shown = np.array(x, "<f4" if width == 4 else "<f8").tobytes(), Span(at, width, "value"), x
    return f"'{f.name}' value at byte {at} set to {shown}", _put(base.header, target, value), None


_NP = {
    gguf.GGUFValueType.UINT8: np.uint8, gguf.GGUFValueType.INT8: np.int8, gguf.GGUFValueType.UINT16: np.uint16,
    gguf.GGUFValueType.INT16: np.int16, gguf.GGUFValueType.UINT32: np.uint32, gguf.GGUFValueType.INT32: np.int32,
    gguf.GGUFValueType.UINT64: np.uint64, gguf.GGUFValueType.INT64: np.int64, gguf.GGUFValueType.BOOL: np.uint8,
}  # fmt: skip


def _string_field(base: Base, rng: np.random.Generator, names: tuple[str, ...]):
    present = [base.fields[n] for n in names if n in base.fields]
    return _pick(rng, present) if present else None


def _tokenizer_arrays(base: Base, rng: np.random.Generator):
    """A token or merge string edited (invalid UTF-8, another letter, a duplicate, its length), or a token type /
    score entry set to a value out of range."""
    names = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    f = _string_field(base, rng, names)
    if f is None:
        return _scalar(base, rng)
    if f.item_type != gguf.GGUFValueType.STRING:
        return _scalar_in(base, rng, f)
    if not len(f.entries):
        return _length(base, rng)
    i = int(rng.integers(len(f.entries)))
    length, entry = f.entry(i)
    choice = int(rng.integers(4))
    if choice == 0 and entry.size:  # one byte of the entry
        at = entry.start + int(rng.integers(entry.size))
        b = int(_pick(rng, (*BYTES, ord("a"), ord("z"), ord(" "))))
        return f"'{f.name}' entry {i} byte {at} set to 0x{b:02x}", _put(base.header, Span(at, 1, ""), bytes([b])), None
    if choice == 1 and entry.size:  # a duplicate of another entry of the same length
        same = np.flatnonzero(f.entries[:, 1] == entry.size)
        same = same[same != i]
        if len(same):
            other = f.entry(int(_pick(rng, same)))[1]
            text = base.header[other.start : other.start + other.size]
            return f"'{f.name}' entry {i} made a copy of another", _put(base.header, entry, text), None
    if choice == 2:  # the entry emptied (its length 0 and its bytes gone)
        head = _splice(base.header, entry, b"")
        return f"'{f.name}' entry {i} emptied", _put(head, length, _int_bytes(0, 8)), None
    n = _special_int(rng, 8, entry.size)
    return f"'{f.name}' entry {i} length set to {n}", _put(base.header, length, _int_bytes(n, 8)), None


def _scalar_in(base: Base, rng: np.random.Generator, f: Field):
    span = f.values[0]
    if f.item_type == gguf.GGUFValueType.FLOAT32:
        at = span.start + 4 * int(rng.integers(span.size // 4))
        x = float(_pick(rng, F32))
        return (
            f"'{f.name}' entry at byte {at} set to {x}",
            _put(base.header, Span(at, 4, ""), np.float32(x).tobytes()),
            None,
        )
    item = np.dtype(_NP.get(gguf.GGUFValueType(f.item_type), np.uint8)).itemsize
    at = span.start + item * int(rng.integers(span.size // item))
    n = int(_pick(rng, (-1, 6, 7, 99, 2**31 - 1, 2**32 - 1)))
    return f"'{f.name}' entry at byte {at} set to {n}", _put(base.header, Span(at, item, ""), _int_bytes(n, item)), None


def _chat_template(base: Base, rng: np.random.Generator):
    """The template replaced by a hostile one, cut short, or given an invalid byte."""
    f = base.fields.get("tokenizer.chat_template")
    if f is None:
        return _tokenizer_arrays(base, rng)
    text, length = f.values[0], f.lengths[0]
    choice = int(rng.integers(3))
    if choice == 0:
        new = _pick(rng, HOSTILE_TEMPLATES).encode("utf-8", "surrogateescape")
        what = f"chat template replaced by {new[:60]!r}"
    elif choice == 1:
        cut = int(rng.integers(text.size + 1))
        new = base.header[text.start : text.start + cut]
        what = f"chat template cut to {cut} bytes"
    else:
        new = bytearray(base.header[text.start : text.start + text.size])
        at = int(rng.integers(max(len(new), 1)))
        if new:
            new[at] = int(_pick(rng, (*BYTES, ord("{"), ord("}"), ord("%"))))
        new = bytes(new)
        what = f"chat template byte {at} set to 0x{new[at]:02x}" if new else "chat template empty"
    head = _splice(base.header, text, new)
    return what, _put(head, length, _int_bytes(len(new), 8)), None


def _tensor_table(base: Base, rng: np.random.Generator):
    t = _pick(rng, base.tensors)
    choice = _pick(rng, ["n_dims", "dim", "qtype", "name", "duplicate"])
    if choice == "n_dims":
        n = int(_pick(rng, (0, 1, 3, 5, 255, 2**32 - 1)))
        return f"tensor '{t.name}' n_dims set to {n}", _put(base.header, t.n_dims, _int_bytes(n, 4)), None
    if choice == "dim":
        k = int(rng.integers(max(t.dims.size // 8, 1)))
        old = _read_int(base.header, Span(t.dims.start + 8 * k, 8, ""))
        n = _special_int(rng, 8, old)
        span = Span(t.dims.start + 8 * k, 8, "")
        return f"tensor '{t.name}' dim {k} set to {n}", _put(base.header, span, _int_bytes(n, 8)), None
    if choice == "qtype":
        q = int(_pick(rng, (*range(0, 42), 99, 2**31, 2**32 - 1)))
        return f"tensor '{t.name}' type set to {q}", _put(base.header, t.qtype, _int_bytes(q, 4)), None
    if choice == "name":
        at = t.name_span.start + int(rng.integers(max(t.name_span.size, 1)))
        b = int(_pick(rng, (*BYTES, ord("x"))))
        return (
            f"tensor '{t.name}' name byte {at} set to 0x{b:02x}",
            _put(base.header, Span(at, 1, ""), bytes([b])),
            None,
        )
    same = [o for o in base.tensors if o.name_span.size == t.name_span.size and o is not t]
    if not same:
        return _tensor_table(base, rng)
    other = _pick(rng, same)
    text = base.header[other.name_span.start : other.name_span.start + other.name_span.size]
    return f"tensor '{t.name}' renamed to '{other.name}'", _put(base.header, t.name_span, text), None


def _tensor_offset(base: Base, rng: np.random.Generator):
    """A tensor's data offset moved: off the alignment, onto another tensor, past the end, or huge."""
    t = _pick(rng, base.tensors)
    old = _read_int(base.header, t.offset)
    other = _read_int(base.header, _pick(rng, [o for o in base.tensors if o is not t] or [t]).offset)
    n = int(_pick(rng, [old + 1, old + base.alignment, old - base.alignment, other, base.size, *U64[:7]]))
    return f"tensor '{t.name}' offset set to {n}", _put(base.header, t.offset, _int_bytes(n, 8)), None


def _flip(base: Base, rng: np.random.Generator):
    """1-4 random bytes of the header region (the first 64 KiB when the region is bigger) changed."""
    limit = min(len(base.header), 64 * 2**10)
    head = bytearray(base.header)
    at = sorted(int(a) for a in rng.integers(0, limit, size=int(rng.integers(1, 5))))
    for a in at:
        value = int(_pick(rng, BYTES)) if rng.random() < 0.5 else int(rng.integers(256))
        head[a] = value if value != head[a] else value ^ 0xFF  # always a change
    return f"bytes {at} set to {[head[a] for a in at]}", bytes(head), None


def _truncate(base: Base, rng: np.random.Generator):
    end = int(rng.integers(0, base.data_offset if rng.random() < 0.6 else base.size))
    return f"truncated to {end} bytes", base.header, end


Kind = Callable[[Base, np.random.Generator], tuple[str, bytes, "int | None"]]
KINDS: dict[str, Kind] = {
    "header": _header,
    "type_tag": _type_tag,
    "key_length": _key_length,
    "length": _length,
    "value": _scalar,
    "tokenizer": _tokenizer_arrays,
    "template": _chat_template,
    "tensor_table": _tensor_table,
    "tensor_offset": _tensor_offset,
    "flip": _flip,
    "truncate": _truncate,
}


CORRUPTION = ("truncate", "tensor_offset", "flip")  # issue 20's 300-case run: a damaged download


def mutant(base: Base, index: int, seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS)) -> Mutant:
    """Case ``index`` of ``base``: kind ``kinds[index % len(kinds)]``, drawn from a generator seeded by (seed,
    index) alone."""
    name = kinds[index % len(kinds)]
    rng = np.random.default_rng([seed, index])
    what, header, truncate = KINDS[name](base, rng)
    return Mutant(base, index, name, what, header, truncate)
