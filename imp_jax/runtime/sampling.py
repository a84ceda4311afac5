"""Token sampling on the device, inside the jitted decode step.

Values (temperature, top-p, ...) are traced arrays, so changing them never recompiles; only the structure
(greedy or not) is static. Greedy is a plain argmax: bitwise deterministic.
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

    def validate(self) -> None:
        from imp_jax.errors import ImpError

        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ImpError(f"invalid sampling parameter: {message}")

    def arrays(self) -> dict[str, jax.Array]:
        return dict(
            temperature=jnp.float32(max(self.temperature, 1e-6)),
            top_k=jnp.int32(self.top_k),
            top_p=jnp.float32(self.top_p),
            min_p=jnp.float32(self.min_p),
            repeat_penalty=jnp.float32(self.repeat_penalty),
        )


def apply_repeat_penalty(logits: jax.Array, recent: jax.Array, penalty: jax.Array) -> jax.Array:
    """llama.cpp's rule over the last RECENT tokens: positive logits divided by the penalty, negative multiplied."""
    b, v = logits.shape
    ids = jnp.where(recent >= 0, recent, v)
    seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def sample(logits: jax.Array, key: jax.Array, p: dict[str, jax.Array], *, greedy: bool) -> jax.Array:
    """Next token ids [B] from f32 logits [B, V]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    x = logits / p["temperature"]
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(v)
    keep = (p["top_k"] <= 0) | (rank < p["top_k"])
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (before < p["top_p"]) | (rank == 0)
    keep &= probs >= p["min_p"] * probs[:, :1]
    choice = jax.random.categorical(key, jnp.where(keep, xs, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def push_recent(recent: jax.Array, tokens: jax.Array) -> jax.Array:
    """Shift the [B, RECENT] window left and append tokens [B]."""
    return jnp.concatenate([recent[:, 1:], tokens[:, None]], axis=1)
