"""Every value a user hands the package, checked at one boundary before anything runs on it.

``load`` (dtype, max_context, batch), ``generate`` and ``Engine.add_request`` (and so the HTTP server, which maps
``InvalidRequest`` to a 4xx) all come through here. Left unchecked, a lone surrogate in a prompt surfaces as a
bare exception from the ``tokenizers`` library, a NaN temperature samples garbage on the device, a token id past
the vocabulary reads another row of the embedding, and a top_k of 2**40 overflows an int32 array. Each check
raises ``InvalidRequest`` (``ContextOverflow`` for a prompt longer than the context) with a message that names the
value and the limit.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from imp_jax.errors import ContextOverflow, InvalidRequest
from imp_jax.planning.options import DTYPES
from imp_jax.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from imp_jax.text.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16  # llama.cpp's server has no cap, OpenAI's API takes 4
MAX_STOP_CHARS = 1024  # a stop string holds back that much streamed text
INT32_MAX = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # any int64 or uint64 (the engine keeps its low 31 bits)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """One generation request as the engine runs it: prompt token ids, sampling values, stop strings."""

    token_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    n_logprobs: int


# ---- load()


def dtype(name: Any) -> str:
    """The compute dtype's canonical name ("bfloat16" or "float32"); aliases such as "bf16" or np.float32 too."""
    if isinstance(name, str) and name in DTYPES:
        return name
    try:
        canonical = str(np.dtype("bfloat16" if name in ("bf16", "bfloat16") else name))
    except (TypeError, ValueError):
        canonical = None
    if canonical not in DTYPES:
        raise InvalidRequest(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return canonical


def load_options(*, max_context: Any, batch: Any) -> None:
    """``max_context`` a positive integer or "auto", ``batch`` a positive integer (before any file is opened)."""
    if not (isinstance(max_context, str) and max_context == "auto"):
        integer(max_context, "max_context", 1, None, hint=" or 'auto'")
    integer(batch, "batch", 1, None)


# ---- prompts


def text(value: Any, what: str) -> str:
    """A str that encodes to UTF-8 (no lone surrogates), or bytes that decode from it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(
                f"{what} is not valid UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})"
            ) from None
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"{what} has a lone surrogate U+{ord(value[e.start]):04X} at character {e.start}: "
            "text must be valid Unicode"
        ) from None
    return value


def token_ids(ids: Any, *, vocab_size: int, max_context: int) -> list[int]:
    """A non-empty sequence of integer ids in 0..vocab_size-1, no longer than ``max_context``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise InvalidRequest(f"token ids must be a list of integers, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise InvalidRequest(f"token ids must be one-dimensional, got an array of shape {ids.shape}")
    _fits_context(len(ids), max_context)
    out = []
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise InvalidRequest(f"token id {i} is {type(t).__name__} {t!r}, not an integer")
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"token id {int(t)} (position {i}) is outside the vocabulary (0..{vocab_size - 1})")
        out.append(int(t))
    if not out:
        raise InvalidRequest("the prompt is empty: give at least one token")
    return out


def prompt_ids(prompt: Any, tokenizer: Tokenizer, *, vocab_size: int, max_context: int) -> list[int]:
    """The prompt's token ids: a str (or UTF-8 bytes) is tokenized, a list of ids checked."""
    if isinstance(prompt, (str, bytes, bytearray, memoryview)):
        prompt = tokenizer.encode(text(prompt, "the prompt"))
    elif not isinstance(prompt, (Sequence, np.ndarray)):
        raise InvalidRequest(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    return token_ids(prompt, vocab_size=vocab_size, max_context=max_context)


def _fits_context(n: int, max_context: int) -> None:
    if n > max_context:
        raise ContextOverflow(
            f"a prompt of {n} tokens does not fit the context of {max_context}; shorten it or load the model "
            "with a larger max_context"
        )


# ---- sampling and stop strings


def stop_strings(stop: Any) -> tuple[str, ...]:
    """None, one string or a list of up to ``MAX_STOP_STRINGS`` non-empty strings of at most ``MAX_STOP_CHARS``."""
    if stop is None:
        return ()
    if isinstance(stop, (str, bytes)):
        stop = (stop,)
    if not isinstance(stop, Sequence):
        raise InvalidRequest(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"{len(stop)} stop strings given; at most {MAX_STOP_STRINGS} are accepted")
    out = tuple(text(s, f"stop string {i}") for i, s in enumerate(stop))
    for i, s in enumerate(out):
        if not s:
            raise InvalidRequest(f"stop string {i} is empty; a stop string needs at least one character")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop string {i} has {len(s)} characters; at most {MAX_STOP_CHARS} are accepted")
    return out


def sampling_params(
    temperature: Any = 0.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    repeat_penalty: Any = 1.0,
    seed: Any = None,
) -> SamplingParams:
    """SamplingParams whose every value is in range (see ``check_sampling``)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    check_sampling(params)
    return dataclasses.replace(
        params,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        min_p=float(min_p),
        repeat_penalty=float(repeat_penalty),
        seed=None if seed is None else int(seed),
    )


def check_sampling(p: SamplingParams) -> None:
    """temperature >= 0, 0 < top_p <= 1, 0 <= min_p < 1, repeat_penalty > 0 (all finite in float32), top_k an
    integer in 0..2**31-1, seed None or an int64/uint64."""
    real(p.temperature, "temperature", 0.0, _F32_MAX, "in [0, 3.4e38]")
    integer(p.top_k, "top_k", 0, INT32_MAX)
    real(p.top_p, "top_p", 0.0, 1.0, "in (0, 1]", open_low=True)
    real(p.min_p, "min_p", 0.0, 1.0, "in [0, 1)", open_high=True)
    real(p.repeat_penalty, "repeat_penalty", 0.0, _F32_MAX, "in (0, 3.4e38]", open_low=True)
    if p.seed is not None:
        integer(p.seed, "seed", *SEED_RANGE)


def request(
    prompt: Any,
    tokenizer: Tokenizer,
    *,
    vocab_size: int,
    max_context: int,
    max_tokens: Any = 256,
    temperature: Any = 0.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    repeat_penalty: Any = 1.0,
    seed: Any = None,
    stop: Any = (),
    logprobs: Any = 0,
    max_logprobs: int = 0,
) -> CheckedRequest:
    """Every argument of ``Engine.add_request`` checked; the prompt tokenized."""
    return CheckedRequest(
        token_ids=prompt_ids(prompt, tokenizer, vocab_size=vocab_size, max_context=max_context),
        max_tokens=integer(max_tokens, "max_tokens", 0, None),
        params=sampling_params(temperature, top_k, top_p, min_p, repeat_penalty, seed),
        stop=stop_strings(stop),
        n_logprobs=integer(logprobs, "logprobs", 0, max_logprobs),
    )


# ---- numbers


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(value: Any, name: str, low: int, high: int | None, *, hint: str = "") -> int:
    """An int (numpy ints too, bool not) in [low, high]."""
    limit = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise InvalidRequest(f"{name} must be {limit}{hint}, got {value!r}"[:300])
    return operator.index(value)


def real(
    value: Any, name: str, low: float, high: float, limit: str, *, open_low: bool = False, open_high: bool = False
) -> float:
    """A finite real number (ints too, bool not) within [low, high], either end open."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    try:
        x = float(value) if ok else math.nan
    except OverflowError:  # an int past float range
        x = math.inf
    if not (math.isfinite(x) and (low < x if open_low else low <= x) and (x < high if open_high else x <= high)):
        raise InvalidRequest(f"{name} must be a finite number {limit}, got {value!r}"[:300])
    return x
