"""Jitted prefill and decode steps, and the generation loop around them.

Shapes are fixed so nothing recompiles per prompt: prompts are padded to a power-of-two bucket, the cache has
max_context slots, and the cache and sampling state are donated so XLA updates them in place. The only host
sync per token is reading the sampled id, and even that overlaps the next step: step n+1 is dispatched before
token n is read.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax import user_input
from imp_jax.errors import ContextOverflow, ImpError
from imp_jax.models.config import ModelConfig
from imp_jax.models.decoder import Decoder, forward
from imp_jax.runtime import sampling
from imp_jax.runtime.cache import Cache, init_cache

MIN_BUCKET = 16


def bucket(n: int, limit: int) -> int:
    """The padded length for a prompt of n tokens: the next power of two (at least MIN_BUCKET), capped."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits"), donate_argnames=("cache",))
def prefill_step(params: Decoder, cfg: ModelConfig, tokens, lengths, cache: Cache, *, all_logits=False):
    """Tokens [B, T] (padded) from position 0. Returns logits at each row's last valid token [B, V]
    (or at every position [B, T, V] with all_logits) and the filled cache."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    at = None if all_logits else lengths - 1
    logits, cache = forward(params, cfg, tokens, pos, cache, decode=False, valid_len=lengths, logits_at=at)
    return (logits if all_logits else logits[:, 0]), cache


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the decode loop carries on the device besides the cache."""

    token: jax.Array  # [B] last sampled token, not yet fed to the model
    pos: jax.Array  # [B] the position it will be fed at
    recent: jax.Array  # [B, RECENT] repeat-penalty window
    key: jax.Array


jax.tree_util.register_dataclass(DecodeState, data_fields=["token", "pos", "recent", "key"], meta_fields=[])


@functools.partial(jax.jit, static_argnames=("greedy", "penalty"))
def first_token(logits, state: DecodeState, p, *, greedy: bool, penalty: bool) -> DecodeState:
    """Sample the token after the prompt from the prefill logits."""
    return _sample_into(logits, state, p, greedy, penalty)


def _sample_into(logits, state: DecodeState, p, greedy: bool, penalty: bool) -> DecodeState:
    if penalty:
        logits = sampling.apply_repeat_penalty(logits, state.recent, p["repeat_penalty"])
    key, sub = jax.random.split(state.key)
    tok = sampling.sample(logits, jax.random.split(sub, logits.shape[0]), p, greedy=greedy)
    return DecodeState(tok, state.pos + 1, sampling.push_recent(state.recent, tok), key)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy", "penalty"), donate_argnames=("cache", "state"))
def decode_step(params: Decoder, cfg: ModelConfig, cache: Cache, state: DecodeState, p, *, greedy, penalty):
    """Feed the last sampled token at its position; sample the next one. Returns (state, cache)."""
    logits, cache = forward(
        params,
        cfg,
        state.token[:, None],
        state.pos[:, None],
        cache,
        decode=True,
        logits_at=jnp.zeros_like(state.token),
    )
    return _sample_into(logits[:, 0], state, p, greedy, penalty), cache


@dataclasses.dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


def run_prefill(params, cfg: ModelConfig, ids: Sequence[int], max_len: int, dtype, *, all_logits=False):
    """Prefill one prompt into a fresh cache of max_len slots; returns (logits, cache)."""
    n = len(ids)
    if n == 0:
        raise ImpError("the prompt is empty: give at least one token")
    if n > max_len:
        raise ContextOverflow(
            f"the prompt has {n} tokens but the context holds {max_len}; "
            f"shorten it or load the model with a larger max_context"
        )
    t = bucket(n, max_len)
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :n] = ids
    cache = init_cache(cfg, 1, max_len, dtype)
    return prefill_step(params, cfg, jnp.asarray(tokens), jnp.asarray([n], jnp.int32), cache, all_logits=all_logits)


def token_stream(
    params,
    cfg: ModelConfig,
    ids: Sequence[int],
    max_len: int,
    dtype,
    sp: sampling.SamplingParams,
    max_new: int,
    timings: dict,
) -> Iterator[int]:
    """Yield generated token ids one by one (the caller stops iterating at EOS or a stop string).

    Records prefill and decode wall times into ``timings``.
    """
    user_input.check_sampling(sp)
    p = sp.arrays()
    greedy, penalty = sp.greedy, sp.repeat_penalty != 1.0
    t0 = time.perf_counter()
    logits, cache = run_prefill(params, cfg, ids, max_len, dtype)
    recent = np.full((1, sampling.RECENT), -1, np.int32)
    tail = list(ids)[-sampling.RECENT :]
    if tail:
        recent[0, -len(tail) :] = tail
    seed = sp.seed if sp.seed is not None else int.from_bytes(np.random.default_rng().bytes(4), "little")
    state = DecodeState(
        jnp.zeros((1,), jnp.int32),
        jnp.asarray([len(ids) - 1], jnp.int32),
        jnp.asarray(recent),
        jax.random.key(seed),
    )
    state = first_token(logits, state, p, greedy=greedy, penalty=penalty)
    token = int(state.token[0])
    timings["prefill_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    timings["decode_s"] = 0.0
    budget = min(max_new, max_len - len(ids))
    for i in range(budget):
        pending = None
        if i + 1 < budget:  # dispatch the next step before reading this token: the device never waits on us
            state, cache = decode_step(params, cfg, cache, state, p, greedy=greedy, penalty=penalty)
            pending = state
        timings["decode_s"] = time.perf_counter() - t1
        yield token
        if pending is None:
            return
        token = int(pending.token[0])
