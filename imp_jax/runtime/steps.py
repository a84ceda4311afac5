"""Jitted prefill and decode steps (the single-sequence loop's and the serving engine's ``engine_step``), and the
generation loop around them.

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
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime import sampling
from imp_jax.runtime.cache import Cache, Rows, init_cache

MIN_BUCKET = 16


MIN_READ_TOKENS = 256  # the narrowest page-table bucket: below it a wider gather costs less than a recompile
MAX_LOGPROBS = 20  # top-N logprobs engine_step computes when any row asks (static: one compiled variant)
# engine_step's static flags that serve every request (a cover program's, runtime.engine.Variant.covers): a chunked
# prefill, the non-greedy sampler, the repeat penalty and logprobs.
COVER_FLAGS = (("chunked", True), ("greedy", False), ("penalty", True), ("n_logprobs", MAX_LOGPROBS))


def pow2(n: int, least: int = 1) -> int:
    """The bucket of n: the next power of two, at least ``least``."""
    b = least
    while b < n:
        b *= 2
    return b


def table_width(n_pages: int, page_size: int, pages_per_seq: int) -> int:
    """The page-table bucket for rows holding up to n_pages pages: a power of two, at least MIN_READ_TOKENS of
    pages, at most the bucket of a full context."""
    return min(pow2(n_pages, -(-MIN_READ_TOKENS // page_size)), pow2(pages_per_seq))


def cover_buckets(max_seqs: int, token_budget: int, max_context: int, decode_steps: int) -> list[tuple]:
    """(rows, tokens per row, decode, steps per dispatch) of the engine_step programs that together run every step
    the serving engine can schedule (runtime.engine.Engine.cover_variants): a decode of every slot, one step and
    ``decode_steps`` per dispatch, and for each power-of-two row count of a prefill the longest chunk the token
    budget lets those rows take (the engine keeps a padded prefill within pow2(token_budget) tokens)."""
    rows = pow2(max_seqs)
    out = [(rows, 1, True, k) for k in sorted({decode_steps, 1})]
    total, longest = pow2(token_budget, MIN_BUCKET), pow2(min(token_budget, max_context), MIN_BUCKET)
    r = 1
    while r <= rows and total // r >= MIN_BUCKET:
        out.append((r, min(total // r, longest), False, 1))
        r *= 2
    return out


def bucket(n: int, limit: int) -> int:
    """The padded length for a prompt of n tokens: the next power of two (at least MIN_BUCKET), capped."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits", "kernels"), donate_argnames=("cache",))
def prefill_step(
    params: Decoder,
    cfg: ModelConfig,
    tokens,
    lengths,
    cache: Cache,
    *,
    all_logits=False,
    kernels: KernelPolicy = REFERENCE,
):
    """Tokens [B, T] (padded) from position 0. Returns logits at each row's last valid token [B, V]
    (or at every position [B, T, V] with all_logits) and the filled cache."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    at = None if all_logits else lengths - 1
    logits, cache = forward(
        params, cfg, tokens, pos, cache, decode=False, valid_len=lengths, logits_at=at, kernels=kernels
    )
    return (logits if all_logits else logits[:, 0]), cache


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the decode loop carries on the device besides the cache."""

    token: jax.Array  # [B] last sampled token, not yet fed to the model
    pos: jax.Array  # [B] the position it will be fed at
    recent: jax.Array  # [B, RECENT] repeat-penalty window
    key: jax.Array


jax.tree_util.register_dataclass(DecodeState, data_fields=["token", "pos", "recent", "key"], meta_fields=[])


def decode_state(pos: Sequence[int] | jax.Array, seed: int = 0, tails: Sequence[Sequence[int]] = ()) -> DecodeState:
    """The decode loop's state before its first sample, the one place it is built: row b's next token goes in
    at pos[b], its repeat-penalty window starts from ``tails[b]`` (the prompt's last tokens; empty without), and
    the rows draw from the stream of ``seed``."""
    pos = jnp.asarray(pos, jnp.int32)
    recent = np.full((pos.shape[0], sampling.RECENT), -1, np.int32)
    for row, tail in enumerate(tails):
        tail = list(tail)[-sampling.RECENT :]
        if tail:
            recent[row, -len(tail) :] = tail
    return DecodeState(jnp.zeros_like(pos), pos, jnp.asarray(recent), jax.random.key(seed))


def abstract_decode_state(batch: int) -> DecodeState:
    """The ShapeDtypeStruct twin of ``decode_state`` for ``batch`` rows (the memory planner's)."""
    return jax.eval_shape(lambda: decode_state(jnp.zeros((batch,), jnp.int32)))


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


@functools.partial(jax.jit, static_argnames=("cfg", "greedy", "penalty", "kernels"), donate_argnames=("cache", "state"))
def decode_step(
    params: Decoder,
    cfg: ModelConfig,
    cache: Cache,
    state: DecodeState,
    p,
    *,
    greedy,
    penalty,
    kernels: KernelPolicy = REFERENCE,
):
    """Feed the last sampled token at its position; sample the next one. Returns (state, cache)."""
    logits, cache = forward(
        params,
        cfg,
        state.token[:, None],
        state.pos[:, None],
        cache,
        decode=True,
        logits_at=jnp.zeros_like(state.token),
        kernels=kernels,
    )
    return _sample_into(logits[:, 0], state, p, greedy, penalty), cache


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "decode", "chunked", "greedy", "penalty", "n_logprobs", "kernels", "n_steps"),
    donate_argnames=("cache",),
)
def engine_step(
    params: Decoder,
    cache: Cache,
    tokens: jax.Array,
    pos: jax.Array,
    valid_len: jax.Array,
    rows: Rows,
    samp: dict[str, jax.Array],
    recent: jax.Array,
    seeds: jax.Array,
    counts: jax.Array,
    *,
    cfg: ModelConfig,
    decode: bool,
    chunked: bool,
    greedy: bool,
    penalty: bool,
    n_logprobs: int,
    kernels: KernelPolicy,
    n_steps: int = 1,
):
    """Feed tokens [B, T] at positions pos [B, T] (valid_len [B] real tokens per row) into each row's pages and
    slot, and sample one token per row after its last real token: row b draws with key fold_in(key(seeds[b]),
    counts[b]), its own stream whatever shares the batch. Returns ({token, [logprob, top_ids, top_logprobs]},
    cache), each output with a leading axis of ``n_steps``.

    A decode step with ``n_steps`` > 1 runs that many decode steps in one dispatch (a device loop): each feeds
    the token the previous one sampled at the next position, with the next count of the row's stream and the
    window of recent tokens advanced, so its tokens are exactly those of as many single steps. The rows' page
    tables must already hold the positions it reaches; the host keeps each row's tokens up to the one that ends
    it (EOS, a stop string, max_tokens) and drops the rest."""

    def one(cache, tokens, pos, recent, counts):
        logits, cache = forward(
            params,
            cfg,
            tokens,
            pos,
            cache,
            decode=decode,
            valid_len=valid_len,
            logits_at=jnp.maximum(valid_len - 1, 0),
            rows=rows,
            chunked=chunked,
            kernels=kernels,
        )
        logits = logits[:, 0]
        scored = sampling.apply_repeat_penalty(logits, recent, samp["repeat_penalty"]) if penalty else logits
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        token = sampling.sample(scored, keys, samp, greedy=greedy)
        out = dict(token=token)
        if n_logprobs:
            out["logprob"], out["top_ids"], out["top_logprobs"] = sampling.logprobs(logits, token, n_logprobs)
        return out, cache

    if n_steps == 1:
        out, cache = one(cache, tokens, pos, recent, counts)
        return jax.tree.map(lambda a: a[None], out), cache

    def body(carry, _):
        cache, tokens, pos, recent, counts = carry
        out, cache = one(cache, tokens, pos, recent, counts)
        token = out["token"]
        return (cache, token[:, None], pos + 1, sampling.push_recent(recent, token), counts + 1), out

    (cache, *_), outs = jax.lax.scan(body, (cache, tokens, pos, recent, counts), None, length=n_steps)
    return outs, cache


def engine_step_args(cfg: ModelConfig, cache: Cache, rows: int, tokens: int, n_pg: int) -> dict:
    """ShapeDtypeStructs of ``engine_step``'s per-step arguments for ``rows`` x ``tokens`` fed through page tables
    of ``n_pg`` columns (what the planner compiles it with)."""
    i32 = jnp.int32
    vec = jax.ShapeDtypeStruct((rows,), i32)
    grid = jax.ShapeDtypeStruct((rows, tokens), i32)
    scalars = jax.eval_shape(sampling.SamplingParams().arrays)
    samp = {k: jax.ShapeDtypeStruct((rows,), v.dtype) for k, v in scalars.items()}
    return dict(
        cfg=cfg,
        cache=cache,
        tokens=grid,
        pos=grid,
        valid_len=vec,
        rows=Rows(jax.ShapeDtypeStruct((rows, n_pg), i32), vec, jax.ShapeDtypeStruct((rows, n_pg), i32)),
        samp=samp,
        recent=jax.ShapeDtypeStruct((rows, sampling.RECENT), i32),
        seeds=vec,
        counts=vec,
    )


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


def run_prefill(
    params,
    cfg: ModelConfig,
    ids: Sequence[int],
    max_len: int,
    dtype,
    *,
    all_logits=False,
    kernels: KernelPolicy = REFERENCE,
):
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
    tokens, lengths = jnp.asarray(tokens), jnp.asarray([n], jnp.int32)
    return prefill_step(params, cfg, tokens, lengths, cache, all_logits=all_logits, kernels=kernels)


def token_stream(
    params,
    cfg: ModelConfig,
    ids: Sequence[int],
    max_len: int,
    dtype,
    sp: sampling.SamplingParams,
    max_new: int,
    timings: dict,
    kernels: KernelPolicy = REFERENCE,
) -> Iterator[int]:
    """Yield generated token ids one by one (the caller stops iterating at EOS or a stop string).

    Records prefill and decode wall times into ``timings``.
    """
    user_input.check_sampling(sp)
    p = sp.arrays()
    greedy, penalty = sp.greedy, sp.repeat_penalty != 1.0
    t0 = time.perf_counter()
    logits, cache = run_prefill(params, cfg, ids, max_len, dtype, kernels=kernels)
    seed = sp.seed if sp.seed is not None else int.from_bytes(np.random.default_rng().bytes(4), "little")
    state = decode_state([len(ids) - 1], seed, [ids])
    state = first_token(logits, state, p, greedy=greedy, penalty=penalty)
    token = int(state.token[0])
    timings["prefill_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    timings["decode_s"] = 0.0
    budget = min(max_new, max_len - len(ids))
    for i in range(budget):
        pending = None
        if i + 1 < budget:  # dispatch the next step before reading this token: the device never waits on us
            state, cache = decode_step(params, cfg, cache, state, p, greedy=greedy, penalty=penalty, kernels=kernels)
            pending = state
        timings["decode_s"] = time.perf_counter() - t1
        yield token
        if pending is None:
            return
        token = int(pending.token[0])
