"""Helpers shared by test modules: load a model without its tokenizer, run prefill then token-by-token decode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.gguf import open_gguf
from imp_jax.models.config import config_from_gguf
from imp_jax.models.decoder import forward
from imp_jax.runtime import steps
from imp_jax.weights.loading import load_params
from imp_jax.weights.specs import param_specs

_decode = jax.jit(functools.partial(forward, decode=True), static_argnames=("cfg",))


def load_raw(path, dtype):
    mf = open_gguf(path)
    cfg = config_from_gguf(mf.metadata, set(mf.tensors))
    return cfg, load_params(mf, cfg, param_specs(mf, cfg, dtype))


def incremental_logits(params, cfg, ids, split, max_len, dtype):
    """Prefill ids[:split], then feed the rest one token at a time through the decode path."""
    logits, cache = steps.run_prefill(params, cfg, ids[:split], max_len, dtype, all_logits=True)
    out = [np.asarray(logits[0, :split])]
    for i in range(split, len(ids)):
        tok = jnp.asarray([[ids[i]]], jnp.int32)
        pos = jnp.asarray([[i]], jnp.int32)
        step, cache = _decode(params, cfg, tok, pos, cache)
        out.append(np.asarray(step[0]))
    return np.concatenate(out)
