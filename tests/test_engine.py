"""The jitted steps: prefill then decode equals the full forward; buckets; sampling; determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax.runtime import sampling, steps
from imp_jax.runtime.cache import init_cache
from tests.helpers import incremental_logits, load_raw


@pytest.mark.parametrize("name", ["tinycoder", "smollm2-135m"])
def test_prefill_then_decode_equals_full_forward(real_model, name):
    cfg, params = load_raw(real_model(name), "float32")
    ids = [int(i) for i in np.random.default_rng(0).integers(3, cfg.vocab_size, 21)]
    full, _ = steps.run_prefill(params, cfg, ids, 32, jnp.float32, all_logits=True)
    full = np.asarray(full[0, : len(ids)])
    inc = incremental_logits(params, cfg, ids, 5, 32, jnp.float32)
    np.testing.assert_allclose(inc, full, atol=2e-4, rtol=2e-4)
    assert (inc.argmax(-1) == full.argmax(-1)).all()


def test_padding_bucket_does_not_change_logits(real_model):
    cfg, params = load_raw(real_model("tinycoder"), "float32")
    ids = [5, 17, 300, 12, 9]
    a, _ = steps.run_prefill(params, cfg, ids, 16, jnp.float32, all_logits=True)
    b, _ = steps.run_prefill(params, cfg, ids, 64, jnp.float32, all_logits=True)
    np.testing.assert_allclose(np.asarray(a[0, :5]), np.asarray(b[0, :5]), atol=1e-5)


def test_bucket_sizes():
    assert [steps.bucket(n, 4096) for n in (1, 16, 17, 100, 4000)] == [16, 16, 32, 128, 4096]
    assert steps.bucket(5000, 4096) == 4096


def test_new_prompt_length_in_same_bucket_does_not_recompile(real_model):
    cfg, params = load_raw(real_model("tinycoder"), "float32")
    steps.run_prefill(params, cfg, [1, 2, 3], 64, jnp.float32)
    before = steps.prefill_step._cache_size()
    steps.run_prefill(params, cfg, [1, 2, 3, 4, 5, 6, 7], 64, jnp.float32)
    assert steps.prefill_step._cache_size() == before


def _stream(params, cfg, ids, sp, n):
    timings: dict = {}
    return list(steps.token_stream(params, cfg, ids, 64, jnp.float32, sp, n, timings)), timings


def test_greedy_stream_matches_argmax_of_full_forward(real_model):
    cfg, params = load_raw(real_model("tinycoder"), "float32")
    ids = [1, 450, 4996, 310]
    out, timings = _stream(params, cfg, ids, sampling.SamplingParams(), 6)
    assert len(out) == 6 and timings["prefill_s"] > 0
    seq = list(ids)
    for tok in out:
        full, _ = steps.run_prefill(params, cfg, seq, 64, jnp.float32, all_logits=True)
        assert tok == int(np.argmax(np.asarray(full[0, len(seq) - 1])))
        seq.append(tok)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(real_model):
    cfg, params = load_raw(real_model("tinycoder"), "float32")
    sp = sampling.SamplingParams(temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, repeat_penalty=1.1, seed=3)
    a, _ = _stream(params, cfg, [1, 2, 3], sp, 12)
    b, _ = _stream(params, cfg, [1, 2, 3], sp, 12)
    c, _ = _stream(params, cfg, [1, 2, 3], sampling.SamplingParams(temperature=1.5, seed=4), 12)
    assert a == b
    assert a != c


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 200)

    def draws(**kw):
        p = sampling.SamplingParams(temperature=1.0, **kw).arrays()
        return {int(sampling.sample(logits, k[None], p, greedy=False)[0]) for k in keys}

    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}
    assert draws(min_p=0.4) == {0, 1}
    assert draws() == {0, 1, 2, 3}
    assert int(sampling.sample(logits, keys[:1], {}, greedy=True)[0]) == 0


def test_repeat_penalty_follows_llama_cpp_rule():
    logits = jnp.asarray([[2.0, -2.0, 1.0]])
    out = sampling.apply_repeat_penalty(logits, jnp.asarray([[-1, 0, 1]]), jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(out), [[1.0, -4.0, 1.0]])


def test_bf16_cache_and_compute_stay_close_to_f32(real_model):
    path = real_model("smollm2-135m")
    ids = [504, 3575, 282, 4649, 314]
    cfg, p32 = load_raw(path, "float32")
    f32, _ = steps.run_prefill(p32, cfg, ids, 16, jnp.float32, all_logits=True)
    _, p16 = load_raw(path, "bfloat16")
    b16, _ = steps.run_prefill(p16, cfg, ids, 16, jnp.bfloat16, all_logits=True)
    f32, b16 = np.asarray(f32[0, :5]), np.asarray(b16[0, :5])
    assert b16.dtype == np.float32
    assert np.abs(b16 - f32).max() < 0.35 * np.abs(f32).max() / 10
    assert (b16.argmax(-1) == f32.argmax(-1)).mean() >= 0.8


def test_empty_prompt_and_overflow_raise_imp_errors(real_model):
    from imp_jax.errors import ContextOverflow, ImpError

    cfg, params = load_raw(real_model("tinycoder"), "float32")
    with pytest.raises(ImpError, match="empty"):
        steps.run_prefill(params, cfg, [], 16, jnp.float32)
    with pytest.raises(ContextOverflow, match="20 tokens but the context holds 16"):
        steps.run_prefill(params, cfg, list(range(20)), 16, jnp.float32)


def test_cache_init_is_zero_and_sized_from_config(real_model):
    cfg, _ = load_raw(real_model("tinycoder"), "float32")
    c = init_cache(cfg, 1, 8, jnp.bfloat16)
    assert c.k.shape == (cfg.n_layers, 1, 8, cfg.n_head_kv, cfg.head_dim) and not np.asarray(c.k, np.float32).any()
    assert c.ssm.shape[0] == 0
