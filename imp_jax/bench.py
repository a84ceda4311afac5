"""``imp-jax bench``: llama-bench-style prompt processing (pp) and token generation (tg) throughput.

pp N: one prefill of N tokens (``tokens[i] = i % vocab``) from an empty cache; tg N: N greedy decode steps after
a one-token prompt (llama-bench's ``-n`` starts from an empty context). Each test runs once to compile, then
``reps`` timed times; the device is synchronised around each. With batch B, tg decodes B sequences at once and
reports B x N / time.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.models.config import ModelConfig
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime import sampling, steps
from imp_jax.runtime.cache import init_cache


@dataclasses.dataclass(frozen=True)
class BenchRow:
    model: str
    quant: str
    size_gib: float
    params_b: float
    backend: str
    test: str
    tok_s: float
    stdev: float
    batch: int = 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def backend_name(kernels: KernelPolicy) -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}" + (f"+{kernels.label}" if kernels.enabled else "")


def _prompt(cfg: ModelConfig, batch: int, n: int) -> jax.Array:
    return jnp.asarray((np.arange(n)[None, :] % cfg.vocab_size).repeat(batch, 0), jnp.int32)


def time_prefill(params, cfg: ModelConfig, n: int, dtype, batch: int, kernels: KernelPolicy) -> float:
    """Seconds for one prefill of n tokens x batch (device synchronised), under the model's kernel policy
    (required: a loaded model's policy, not the reference path by default)."""
    cache = init_cache(cfg, batch, n, dtype)
    tokens, lengths = _prompt(cfg, batch, n), jnp.full((batch,), n, jnp.int32)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    logits, cache = steps.prefill_step(params, cfg, tokens, lengths, cache, kernels=kernels)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0


def primed_decode(params, cfg: ModelConfig, dtype, batch: int, context: int, n: int, kernels: KernelPolicy):
    """What a timed greedy decode loop of ``n`` steps starts from: the cache after a ``context``-token prompt of
    ``batch`` rows (room for the n steps), the state holding the first sampled token, and the sampling arrays."""
    cache = init_cache(cfg, batch, -(-(context + n + 1) // 8) * 8, dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    logits, cache = steps.prefill_step(params, cfg, _prompt(cfg, batch, context), lengths, cache, kernels=kernels)
    p = sampling.SamplingParams().arrays()
    state = steps.decode_state(np.full((batch,), context - 1, np.int32))
    state = steps.first_token(logits, state, p, greedy=True, penalty=False)
    jax.block_until_ready((state, cache))
    return cache, state, p


def time_decode(params, cfg: ModelConfig, n: int, dtype, batch: int, kernels: KernelPolicy) -> float:
    """Seconds for n greedy decode steps of batch sequences after a one-token prompt."""
    cache, state, p = primed_decode(params, cfg, dtype, batch, 1, n, kernels)
    t0 = time.perf_counter()
    for _ in range(n):
        state, cache = steps.decode_step(params, cfg, cache, state, p, greedy=True, penalty=False, kernels=kernels)
    jax.block_until_ready(state)
    return time.perf_counter() - t0


def run(
    params,
    cfg: ModelConfig,
    *,
    name: str,
    quant: str,
    size_bytes: int,
    n_params: int,
    dtype,
    pp: int,
    tg: int,
    reps: int,
    kernels: KernelPolicy,
    batch: int = 1,
) -> list[BenchRow]:
    """pp and tg rows for these params. ``kernels`` is required, the policy the params were loaded for
    (``Model.kernels``): a default would time the XLA reference path on a model loaded for the kernels."""
    rows = []
    for test, n, timer in (("pp", pp, time_prefill), ("tg", tg, time_decode)):
        if n <= 0:
            continue
        timer(params, cfg, n, dtype, batch, kernels)  # compile and warm up
        rates = [batch * n / timer(params, cfg, n, dtype, batch, kernels) for _ in range(reps)]
        rows.append(
            BenchRow(
                name,
                quant,
                size_bytes / 2**30,
                n_params / 1e9,
                backend_name(kernels),
                f"{test}{n}",
                statistics.mean(rates),
                statistics.stdev(rates) if len(rates) > 1 else 0.0,
                batch,
            )
        )
    return rows


def synthetic_model(shape: str, quant: str, dtype: str, seed: int = 0, *, kernels: KernelPolicy = REFERENCE):
    """Random weights of a real model's shape, built on the device (no file), in this backend's kernel layout.
    Returns (params, config, weight bytes, parameter count)."""
    from imp_jax.weights.synthetic import synthetic_params, synthetic_specs
    from imp_jax.weights.tensor_spec import ROPE, is_spec

    cfg, specs = synthetic_specs(shape, quant, dtype)
    leaves = [s for s in jax.tree.leaves(specs, is_leaf=is_spec) if s.names != (ROPE,)]
    n_params = sum(len(s.names) * int(np.prod(s.shape)) for s in leaves)
    params = synthetic_params(specs, jax.random.key(seed), config=cfg, kernels=kernels)
    return params, cfg, sum(s.nbytes for s in leaves), n_params


def decode_bytes_per_token(params, cfg: ModelConfig) -> int:
    """Bytes one batch-1 decode step must read: every weight leaf except the embedding table (gathered, not read
    whole), and of each expert stack only the ``top_k`` experts a token is routed to."""

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    total = nbytes(params) - (0 if params.output is None else nbytes(params.embed))
    if cfg.moe is not None:
        unused = 1 - cfg.moe.top_k / cfg.moe.n_experts
        for layer in (layer for segment in params.segments for layer in segment if layer.moe is not None):
            m = layer.moe
            experts = (m.gate_exps, m.up_exps, m.down_exps, m.gate_up_exps, m.gate_bias, m.up_bias, m.down_bias)
            total -= int(nbytes(experts) * unused)
    return total


def table(rows: list[BenchRow]) -> str:
    head = "| model | quant | size | params | backend | batch | test | t/s |\n|---|---|---|---|---|---|---|---|"
    body = [
        f"| {r.model} | {r.quant} | {r.size_gib:.2f} GiB | {r.params_b:.2f} B | {r.backend} | {r.batch} | {r.test} | "
        f"{r.tok_s:.2f} ± {r.stdev:.2f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def as_json(rows: list[BenchRow]) -> str:
    return json.dumps([r.as_dict() for r in rows], indent=2)
