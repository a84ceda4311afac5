"""GGUF metadata checked before anything is built from it: the vocabulary before the ``tokenizers`` objects, the
model keys before the config, planning or allocation.

The reader guarantees only that a file parses: a flipped byte still gives well-formed metadata whose values can be
the wrong type (a type tag rewritten), the wrong length (an array that lost entries), out of range (a head count
of 0, a NaN epsilon) or inconsistent (a merge naming a token that is no longer in the vocabulary). Left alone,
each surfaces later as a ``ValueError`` from numpy, a ``ZeroDivisionError`` in a shape, or a bare ``Exception``
from the ``tokenizers`` library. These checks are pure functions of the metadata; each failure names the key.
Vocabulary defects are ``GGUFError`` (the file is corrupt: a real converter never writes them); model keys that
parse but describe no model that can run are ``UnsupportedModel``, as the config readers already raise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import Keys, TokenType

from imp_jax.errors import GGUFError, UnsupportedModel

if TYPE_CHECKING:
    from imp_jax.config import ModelConfig

_K = Keys.Tokenizer
_TOKEN_TYPES = range(0, max(int(t) for t in TokenType) + 1)
_SPECIAL_ID_KEYS = (
    _K.BOS_ID, _K.EOS_ID, _K.EOT_ID, _K.EOM_ID, _K.UNK_ID, _K.SEP_ID, _K.PAD_ID, _K.MASK_ID,
    _K.FIM_PRE_ID, _K.FIM_SUF_ID, _K.FIM_MID_ID, _K.FIM_PAD_ID, _K.FIM_REP_ID, _K.FIM_SEP_ID,
)  # fmt: skip
_FLAG_KEYS = (_K.ADD_BOS, _K.ADD_EOS, _K.ADD_PREFIX)
_STRING_KEYS = (_K.MODEL, _K.PRE)
MAX_LAYERS = 4096  # far above any published model; a flipped block_count past it is corruption, not a model
MAX_CONTEXT = 1 << 24


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)} {value.dtype}"
    if isinstance(value, list):
        return f"an array of {len(value)} values"
    return f"{type(value).__name__} {value!r}"[:80]


# ---------------------------------------------------------------------------------------------------------------
# The vocabulary (tokenizer.ggml.*)
# ---------------------------------------------------------------------------------------------------------------


def split_merge(merge: str) -> tuple[str, str] | None:
    """A BPE merge line as llama.cpp splits it: at the first space after the first character (so a merge may
    start with a space); None when there are not two non-empty halves."""
    at = merge.find(" ", 1)
    if at < 1 or at == len(merge) - 1:
        return None
    return merge[:at], merge[at + 1 :]


def check_vocabulary(metadata: Mapping[str, Any], source: object) -> None:
    """Raise ``GGUFError`` naming ``source`` (the file) and the key for a vocabulary no tokenizer can be built from.

    Checked: the token list (strings, valid UTF-8), token types and scores (numbers, one per token,
    types known to gguf), merges (strings; ``check_merges`` their halves), the model and
    pre-tokenizer names (strings), special-token ids (integers; an id past the vocabulary is ignored later, as
    llama.cpp does) and the add-BOS/EOS/space flags (booleans).
    """
    for key in _STRING_KEYS:
        if key in metadata and not isinstance(metadata[key], str):
            raise GGUFError(source, f"'{key}' is {_kind(metadata[key])}, not a string")
    if _K.LIST not in metadata:
        return  # the tokenizer names the missing key itself (UnsupportedModel)
    tokens = _strings(metadata, _K.LIST, source)
    n = len(tokens)
    if _K.TOKEN_TYPE in metadata:
        types = _numbers(metadata, _K.TOKEN_TYPE, n, source, integer=True)
        bad = np.flatnonzero((types < _TOKEN_TYPES.start) | (types >= _TOKEN_TYPES.stop))
        if len(bad):
            raise GGUFError(
                source, f"'{_K.TOKEN_TYPE}' entry {bad[0]} is {types[bad[0]]}, not a token type (0..{_TOKEN_TYPES[-1]})"
            )
    if _K.SCORES in metadata:
        _numbers(metadata, _K.SCORES, n, source, integer=False)
    if _K.MERGES in metadata:
        _strings(metadata, _K.MERGES, source)  # their content: check_merges, when the tokenizer build fails
    for key in _SPECIAL_ID_KEYS:
        if key in metadata and not _is_int(metadata[key]):
            raise GGUFError(source, f"'{key}' is {_kind(metadata[key])}, not a token id")
    for key in _FLAG_KEYS:
        if key in metadata and not isinstance(metadata[key], (bool, np.bool_)) and not _is_int(metadata[key]):
            raise GGUFError(source, f"'{key}' is {_kind(metadata[key])}, not a boolean")


def _strings(metadata: Mapping[str, Any], key: str, source: object) -> Sequence[str]:
    """A string array that encodes back to UTF-8 (the reader turns invalid bytes into lone surrogates)."""
    values = metadata[key]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GGUFError(source, f"'{key}' is {_kind(values)}, not an array of strings")
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        i = next(i for i, v in enumerate(values) if not v.isascii() and _not_utf8(v))
        raise GGUFError(source, f"'{key}' entry {i} ({values[i]!r}) is not valid UTF-8") from None
    return values


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _numbers(metadata: Mapping[str, Any], key: str, n: int, source: object, *, integer: bool) -> np.ndarray:
    values = metadata[key]
    wanted = np.integer if integer else np.number
    if not isinstance(values, np.ndarray) or values.ndim != 1 or not np.issubdtype(values.dtype, wanted):
        raise GGUFError(source, f"'{key}' is {_kind(values)}, not an array of {'integers' if integer else 'numbers'}")
    if len(values) != n:
        raise GGUFError(source, f"'{key}' has {len(values)} entries for {n} tokens ('{_K.LIST}')")
    return values


def check_merges(metadata: Mapping[str, Any], source: object) -> None:
    """Raise ``GGUFError`` naming the first merge that is not two tokens whose join is a token.

    The tokenizers library checks the same when it builds the BPE (a 150k-merge vocabulary: 0.35 s of Python
    here, at every load); the tokenizer calls this only when that build fails, to name the entry."""
    merges, vocab = metadata.get(_K.MERGES, ()), frozenset(metadata.get(_K.LIST, ()))
    for i, merge in enumerate(merges):
        pair = split_merge(merge)
        if pair is None:
            raise GGUFError(source, f"'{_K.MERGES}' entry {i} ({merge!r}) is not two tokens separated by a space")
        missing = next((t for t in (*pair, pair[0] + pair[1]) if t not in vocab), None)
        if missing is not None:
            raise GGUFError(
                source, f"'{_K.MERGES}' entry {i} ({merge!r}) names {missing!r}, which is not in '{_K.LIST}'"
            )


# ---------------------------------------------------------------------------------------------------------------
# Model keys ({arch}.*)
# ---------------------------------------------------------------------------------------------------------------

_L, _A, _R, _S = Keys.LLM, Keys.Attention, Keys.Rope, Keys.SSM
# Sizes and counts: positive integers (a per-layer array where files may store one value per layer).
_POSITIVE = (
    _L.EMBEDDING_LENGTH, _L.BLOCK_COUNT, _L.CONTEXT_LENGTH, _A.HEAD_COUNT, _A.HEAD_COUNT_KV, _A.KEY_LENGTH,
    _A.VALUE_LENGTH, _L.EXPERT_COUNT, _L.EXPERT_USED_COUNT, _L.EXPERT_FEED_FORWARD_LENGTH, _R.DIMENSION_COUNT,
    _S.CONV_KERNEL, _S.STATE_SIZE, _S.GROUP_COUNT, _S.TIME_STEP_RANK, _S.INNER_SIZE,
)  # fmt: skip
_PER_LAYER = (_A.HEAD_COUNT, _A.HEAD_COUNT_KV, _L.FEED_FORWARD_LENGTH)
_NON_NEGATIVE = (
    _L.FEED_FORWARD_LENGTH, _L.VOCAB_SIZE, _A.SLIDING_WINDOW, _L.FULL_ATTENTION_INTERVAL, _L.NEXTN_PREDICT_LAYERS,
    _R.SCALING_ORIG_CTX_LEN,
)  # fmt: skip
_POSITIVE_REAL = (_R.FREQ_BASE, _R.FREQ_BASE_SWA, _A.LAYERNORM_RMS_EPS)
_NON_NEGATIVE_REAL = (_R.SCALING_FACTOR, _A.SCALE, _L.FINAL_LOGIT_SOFTCAPPING, _L.ATTN_LOGIT_SOFTCAPPING)
_REAL = (_R.SCALING_YARN_BETA_FAST, _R.SCALING_YARN_BETA_SLOW)
_LAYER_ARRAYS = (_A.SLIDING_WINDOW_PATTERN, "{arch}.attention.recurrent_layers")  # one entry per layer


def check_model_metadata(meta: Mapping[str, Any], arch: str) -> None:
    """Raise ``UnsupportedModel`` naming the key for a model key of the wrong type or out of range: sizes that
    are not positive integers, block_count past ``MAX_LAYERS``, context_length past ``MAX_CONTEXT``, rope bases
    and epsilons that are not finite and positive, per-layer arrays whose length is not the block count."""
    blocks = meta.get(_L.BLOCK_COUNT.format(arch=arch))
    if _is_int(blocks) and not 0 < blocks <= MAX_LAYERS:
        raise UnsupportedModel(f"GGUF metadata '{_L.BLOCK_COUNT.format(arch=arch)}' is {blocks}: 1..{MAX_LAYERS}")
    n_layers = int(blocks) if _is_int(blocks) else None
    for key in {*_POSITIVE, *_NON_NEGATIVE}:
        name = key.format(arch=arch)
        if name in meta:
            _check_int(meta[name], name, 1 if key in _POSITIVE else 0, key in _PER_LAYER, n_layers)
    context = meta.get(_L.CONTEXT_LENGTH.format(arch=arch))
    if _is_int(context) and context > MAX_CONTEXT:
        raise UnsupportedModel(
            f"GGUF metadata '{_L.CONTEXT_LENGTH.format(arch=arch)}' is {context}: at most {MAX_CONTEXT}"
        )
    for keys, low, strict in ((_POSITIVE_REAL, 0.0, True), (_NON_NEGATIVE_REAL, 0.0, False), (_REAL, None, False)):
        for key in keys:
            name = key.format(arch=arch)
            if name in meta:
                _check_real(meta[name], name, low, strict)
    for key in _LAYER_ARRAYS:
        name = key.format(arch=arch)
        value = meta.get(name)
        if isinstance(value, (np.ndarray, list)) and n_layers is not None and len(value) != n_layers:
            raise UnsupportedModel(f"GGUF metadata '{name}' has {len(value)} entries for {n_layers} layers")
        if value is not None and not isinstance(value, (np.ndarray, list)) and not _is_int(value):
            raise UnsupportedModel(f"GGUF metadata '{name}' is {_kind(value)}, not an integer or per-layer array")
    _check_divides(meta, arch)


def _uniform(value: Any) -> int | None:
    """An integer key's one value (a uniform per-layer array counts), else None (checked elsewhere)."""
    if isinstance(value, np.ndarray) and len(value) and (value == value[0]).all():
        return int(value[0])
    return int(value) if _is_int(value) else None


def _check_divides(meta: Mapping[str, Any], arch: str) -> None:
    """Sizes derived by division (head_dim from n_embd / n_head, the GDN value head size) must come out whole."""
    embd, heads = (_uniform(meta.get(k.format(arch=arch))) for k in (_L.EMBEDDING_LENGTH, _A.HEAD_COUNT))
    if embd and heads and _A.KEY_LENGTH.format(arch=arch) not in meta and embd % heads:
        raise UnsupportedModel(
            f"GGUF metadata '{_L.EMBEDDING_LENGTH.format(arch=arch)}' ({embd}) is not a multiple of "
            f"'{_A.HEAD_COUNT.format(arch=arch)}' ({heads}) and '{_A.KEY_LENGTH.format(arch=arch)}' is not given"
        )
    inner, rank = (_uniform(meta.get(k.format(arch=arch))) for k in (_S.INNER_SIZE, _S.TIME_STEP_RANK))
    if inner and rank and inner % rank:
        raise UnsupportedModel(
            f"GGUF metadata '{_S.INNER_SIZE.format(arch=arch)}' ({inner}) is not a multiple of "
            f"'{_S.TIME_STEP_RANK.format(arch=arch)}' ({rank})"
        )


def check_config(config: ModelConfig, tensors: Mapping[str, Any] | frozenset[str]) -> None:
    """Raise ``UnsupportedModel`` for a config whose parts disagree: no layers left after the MTP blocks, a
    rope wider than the head, top-k past the experts, value heads that do not group over key heads, expert
    tensors (when ``tensors`` maps names to shapes) whose expert axis is not ``expert_count``."""
    c = config
    if c.n_layers < 1:
        raise UnsupportedModel(f"{c.arch}: no layers are left once the MTP (nextn) blocks are set aside")
    for rope in (r for r in (c.rope, c.rope_local) if r is not None):
        if not 0 < rope.dim <= c.head_dim or rope.dim % 2:
            raise UnsupportedModel(
                f"GGUF metadata '{_R.DIMENSION_COUNT.format(arch=c.arch)}' is {rope.dim}: "
                f"an even number of dims up to head_dim {c.head_dim}"
            )
    if not math.isfinite(c.attn_scale) or c.attn_scale <= 0:
        raise UnsupportedModel(f"{c.arch}: attention scale {c.attn_scale} is not a positive finite number")
    if c.gdn is not None and (c.gdn.n_v_heads % c.gdn.n_k_heads or c.gdn.head_v_dim < 1):
        raise UnsupportedModel(
            f"GGUF metadata '{_S.TIME_STEP_RANK.format(arch=c.arch)}' ({c.gdn.n_v_heads} value heads) is not a "
            f"multiple of '{_S.GROUP_COUNT.format(arch=c.arch)}' ({c.gdn.n_k_heads}), or leaves no value dims"
        )
    if c.moe is None:
        return
    if not 0 < c.moe.top_k <= c.moe.n_experts:
        raise UnsupportedModel(
            f"GGUF metadata '{_L.EXPERT_USED_COUNT.format(arch=c.arch)}' is {c.moe.top_k}: "
            f"1..{c.moe.n_experts} ('{_L.EXPERT_COUNT.format(arch=c.arch)}')"
        )
    if isinstance(tensors, Mapping):
        for name, info in tensors.items():
            is_expert = name.endswith(("_exps.weight", ".ffn_gate_inp.weight"))
            if is_expert and len(info.shape) >= 2 and info.shape[0] != c.moe.n_experts:
                raise UnsupportedModel(
                    f"tensor '{name}' holds {info.shape[0]} experts but GGUF metadata "
                    f"'{_L.EXPERT_COUNT.format(arch=c.arch)}' says {c.moe.n_experts}"
                )


def _check_int(value: Any, name: str, low: int, per_layer: bool, n_layers: int | None) -> None:
    if per_layer and isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer) or (value < low).any():
            raise UnsupportedModel(f"GGUF metadata '{name}' is {_kind(value)}: integers >= {low} per layer expected")
        if n_layers is not None and len(value) != n_layers:
            raise UnsupportedModel(f"GGUF metadata '{name}' has {len(value)} entries for {n_layers} layers")
        return
    if not _is_int(value):
        raise UnsupportedModel(f"GGUF metadata '{name}' is {_kind(value)}, not an integer")
    if value < low:
        raise UnsupportedModel(f"GGUF metadata '{name}' is {value}: it must be {'positive' if low else '>= 0'}")


def _check_real(value: Any, name: str, low: float | None, strict: bool) -> None:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise UnsupportedModel(f"GGUF metadata '{name}' is {_kind(value)}, not a finite number")
    if low is not None and (float(value) <= low if strict else float(value) < low):
        raise UnsupportedModel(f"GGUF metadata '{name}' is {value}: it must be {'>' if strict else '>='} {low}")
