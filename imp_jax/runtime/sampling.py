"""Token sampling on the device, inside the jitted decode step.

Values (temperature, top-p, ...) are traced arrays, scalars or one per row [B], so changing them never
recompiles; only the structure (every row greedy or not) is static. Each row draws with its own PRNG key, so a
request's samples do not depend on which others share its batch. A greedy row (temperature 0) is a plain argmax:
bitwise deterministic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

RECENT = 64  # repeat-penalty window (llama.cpp's repeat_last_n default)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def arrays(self) -> dict[str, jax.Array]:
        return dict(
            temperature=jnp.float32(self.temperature),
            top_k=jnp.int32(self.top_k),
            top_p=jnp.float32(self.top_p),
            min_p=jnp.float32(self.min_p),
            repeat_penalty=jnp.float32(self.repeat_penalty),
        )


def apply_repeat_penalty(logits: jax.Array, recent: jax.Array, penalty: jax.Array) -> jax.Array:
    """llama.cpp's rule over the last RECENT tokens: positive logits divided by the penalty, negative multiplied.
    ``penalty`` is a scalar or one per row; a row with penalty 1 is unchanged."""
    b, v = logits.shape
    penalty = jnp.broadcast_to(penalty, (b,))[:, None]
    ids = jnp.where(recent >= 0, recent, v)
    seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def sample(logits: jax.Array, keys: jax.Array, p: dict[str, jax.Array], *, greedy: bool) -> jax.Array:
    """Next token ids [B] from f32 logits [B, V]; keys [B] (one PRNG key per row). With greedy (static) every row
    takes the argmax; otherwise rows whose temperature is 0 still do, the others sample after top-k, top-p and
    min-p (each a scalar or one value per row)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    b, v = logits.shape

    def per_row(name):
        return jnp.broadcast_to(p[name], (b,))[:, None]

    temperature = per_row("temperature")
    x = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(v)
    top_k = per_row("top_k")
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (before < per_row("top_p")) | (rank == 0)
    keep &= probs >= per_row("min_p") * probs[:, :1]
    choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, jnp.where(keep, xs, -jnp.inf))
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature[:, 0] > 0, drawn, best)


def logprobs(logits: jax.Array, tokens: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (before any sampling filter): the chosen tokens' [B], and the top ``n`` ids
    and values [B, n] (n static)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, n)
    return chosen, top_ids.astype(jnp.int32), top_lp


def push_recent(recent: jax.Array, tokens: jax.Array) -> jax.Array:
    """Shift the [B, RECENT] window left and append tokens [B]."""
    return jnp.concatenate([recent[:, 1:], tokens[:, None]], axis=1)
