"""Gated DeltaNet math against independent float64 numpy loops written from gdn_spec.md §3."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax.models import gdn

B, HK, DK, DV = 2, 2, 16, 8  # dk != dv catches transposed states
FIXTURE = Path(__file__).parent / "fixtures" / "gdn" / "hf_gated_delta_rule.npz"


def _inputs(rng, b, t, hk, hv, *, decay=(0.3, 1.0)):
    """Post-conv q, k, v, gates in the ranges a real layer produces, and a non-zero initial state."""
    return dict(
        q=rng.normal(size=(b, t, hk, DK)).astype(np.float32),
        k=rng.normal(size=(b, t, hk, DK)).astype(np.float32),
        v=rng.normal(size=(b, t, hv, DV)).astype(np.float32),
        g=np.log(rng.uniform(*decay, size=(b, t, hv))).astype(np.float32),
        beta=rng.uniform(0.05, 0.95, size=(b, t, hv)).astype(np.float32),
        state=(0.5 * rng.normal(size=(b, hv, DK, DV))).astype(np.float32),
    )


def _reference(q, k, v, g, beta, state, *, tiled):
    """Spec §3.5 in float64, one head and one token at a time; key head of value head j per spec §3.4."""
    q, k, v, g, beta, s = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, state))
    s = s.copy()
    b_, t_, hk, dk = q.shape
    hv = v.shape[2]
    o = np.zeros(v.shape)
    for b in range(b_):
        for j in range(hv):
            kh = j % hk if tiled else j // (hv // hk)
            for t in range(t_):
                qn = q[b, t, kh] / np.sqrt(np.sum(q[b, t, kh] ** 2) + 1e-6) / np.sqrt(dk)
                kn = k[b, t, kh] / np.sqrt(np.sum(k[b, t, kh] ** 2) + 1e-6)
                s[b, j] *= np.exp(g[b, t, j])
                u = beta[b, t, j] * (v[b, t, j] - s[b, j].T @ kn)
                s[b, j] += np.outer(kn, u)
                o[b, t, j] = s[b, j].T @ qn
    return o, s


SEQ = ("q", "k", "v", "g", "beta")


def _part(x, rows, times):
    """The inputs of some batch rows and time steps, with those rows' initial state."""
    return {name: x[name][rows, times] for name in SEQ} | {"state": x["state"][rows]}


_JIT = {
    gdn.gdn_chunked: jax.jit(gdn.gdn_chunked, static_argnames=("tiled", "chunk")),
    gdn.gdn_recurrent: jax.jit(gdn.gdn_recurrent, static_argnames="tiled"),
}


def _run(fn, x, *, tiled=False, **kw):
    return _JIT[fn](x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"], tiled=tiled, **kw)


def _close(actual, expected, tol=1e-5):
    """Absolute error relative to the largest magnitude: the outputs grow with T, so a fixed atol is unfair."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * max(1.0, np.abs(expected).max(initial=0.0)))


@pytest.mark.parametrize("t", [1, 3, 63, 64, 65, 150])
def test_chunked_matches_recurrent_and_f64_reference(t):
    x = _inputs(np.random.default_rng(t), B, t, HK, 2 * HK)
    o_ref, s_ref = _reference(**x, tiled=False)
    o_rec, s_rec = _run(gdn.gdn_recurrent, x)
    o_chk, s_chk = _run(gdn.gdn_chunked, x)
    assert o_chk.dtype == s_chk.dtype == jnp.float32
    assert o_chk.shape == (B, t, 2 * HK, DV) and s_chk.shape == (B, 2 * HK, DK, DV)
    _close(o_chk, o_rec)
    _close(s_chk, s_rec)
    _close(o_rec, o_ref)
    _close(s_rec, s_ref)
    _close(o_chk, o_ref)
    _close(s_chk, s_ref)


def test_chunked_small_chunks_span_many_scan_steps():
    x = _inputs(np.random.default_rng(7), B, 50, HK, 2 * HK)
    o_ref, s_ref = _reference(**x, tiled=False)
    o, s = _run(gdn.gdn_chunked, x, chunk=8)  # 7 chunks, the last one padded
    _close(o, o_ref)
    _close(s, s_ref)


@pytest.mark.parametrize("tiled", [False, True])
def test_head_pairing_rf3(tiled):
    """Hv = 3 Hk: value head j reads key head j // 3 (grouped, qwen3next) or j % Hk (tiled, qwen35)."""
    x = _inputs(np.random.default_rng(3), 1, 70, HK, 3 * HK)
    o_ref, s_ref = _reference(**x, tiled=tiled)
    for fn in (gdn.gdn_recurrent, gdn.gdn_chunked):
        o, s = _run(fn, x, tiled=tiled)
        _close(o, o_ref)
        _close(s, s_ref)


def test_tiled_equals_grouped_after_converter_reorder():
    """llama.cpp's qwen35 converter moves V head g*rf + r to r*Hk + g (spec §6.3.6); the math must not change."""
    rf = 3
    x = _inputs(np.random.default_rng(4), B, 20, HK, rf * HK)
    perm = np.array([g * rf + r for r in range(rf) for g in range(HK)])  # new head i holds old head perm[i]
    tiled = dict(x, v=x["v"][:, :, perm], g=x["g"][:, :, perm], beta=x["beta"][:, :, perm], state=x["state"][:, perm])
    o_grouped, s_grouped = _run(gdn.gdn_chunked, x, tiled=False)
    o_tiled, s_tiled = _run(gdn.gdn_chunked, tiled, tiled=True)
    _close(o_tiled, np.asarray(o_grouped)[:, :, perm])
    _close(s_tiled, np.asarray(s_grouped)[:, perm])


def test_strong_decay_stays_finite():
    """Decays of e^-60 per step would overflow any formulation that exponentiates a positive cumsum."""
    x = _inputs(np.random.default_rng(5), 1, 130, HK, HK, decay=(1e-26, 1.0))
    o_ref, s_ref = _reference(**x, tiled=False)
    for fn in (gdn.gdn_recurrent, gdn.gdn_chunked):
        o, s = _run(fn, x)
        assert np.isfinite(o).all() and np.isfinite(s).all()
        _close(o, o_ref)
        _close(s, s_ref)


def test_correlated_keys_stay_accurate():
    """Near-identical keys with beta ~ 1 and no decay make (I + A) far from I: the case where the nilpotent
    product form of the inverse loses everything in f32."""
    x = _inputs(np.random.default_rng(9), 1, 64, 1, 2, decay=(0.999, 1.0))
    x["k"] = x["k"][:, :1] + 1e-3 * x["k"]
    x["beta"] = np.full_like(x["beta"], 0.99)
    o_ref, s_ref = _reference(**x, tiled=False)
    o, s = _run(gdn.gdn_chunked, x)
    _close(o, o_ref)
    _close(s, s_ref)


@pytest.mark.parametrize("fn", [gdn.gdn_chunked, gdn.gdn_recurrent])
def test_right_padding_is_inert(fn):
    t, valid = 70, [70, 37, 0]
    x = _inputs(np.random.default_rng(6), len(valid), t, HK, 2 * HK)
    pad_garbage = dict(x, v=x["v"].copy())
    pad_garbage["v"][1, 37:] = np.nan  # padded rows must not be read at all
    o, s = _run(fn, pad_garbage, valid_len=jnp.array(valid))
    for row, n in enumerate(valid):
        o_alone, s_alone = _reference(**_part(x, slice(row, row + 1), slice(0, n)), tiled=False)
        _close(o[row, :n], o_alone[0])
        _close(s[row], s_alone[0])
        np.testing.assert_array_equal(o[row, n:], 0.0)


def test_chunked_prefill_then_recurrent_decode_equals_one_pass():
    x = _inputs(np.random.default_rng(8), B, 80, HK, 2 * HK)
    o_full, s_full = _reference(**x, tiled=False)
    _, s = _run(gdn.gdn_chunked, _part(x, slice(None), slice(0, 67)))
    for t in range(67, 80):
        o_t, s = _run(gdn.gdn_recurrent, _part(x, slice(None), slice(t, t + 1)) | {"state": s})
        _close(o_t[:, 0], o_full[:, t])
    _close(s, s_full)


def test_jit_compiles_once_per_shape():
    traces = 0

    def counted(q, k, v, g, beta, state, valid_len):
        nonlocal traces
        traces += 1
        return gdn.gdn_chunked(q, k, v, g, beta, state, tiled=True, valid_len=valid_len)

    f = jax.jit(counted)
    for seed, n in [(0, 40), (1, 17), (2, 1)]:
        x = _inputs(np.random.default_rng(seed), B, 40, HK, 2 * HK)
        jax.block_until_ready(f(*x.values(), jnp.full((B,), n)))
    assert traces == 1


def _conv_reference(x, weight, state):
    """Spec §3.2: y_t[c] = silu(sum_i w[c, i] x_{t-K+1+i}[c]) over [state; x], in float64."""
    xp = np.concatenate([state, x], axis=1).astype(np.float64)
    k = weight.shape[1]
    y = np.zeros(x.shape)
    for t in range(x.shape[1]):
        y[:, t] = np.einsum("bic,ci->bc", xp[:, t : t + k], weight)
    return y / (1 + np.exp(-y)), xp[:, -(k - 1) :]


@pytest.mark.parametrize("t", [1, 2, 9])
def test_conv_prefill_then_decode_equals_whole_sequence(t):
    rng = np.random.default_rng(t)
    c, k, extra = 12, 4, 5
    x = rng.normal(size=(B, t + extra, c)).astype(np.float32)
    weight = rng.normal(size=(c, k)).astype(np.float32)
    state0 = rng.normal(size=(B, k - 1, c)).astype(np.float32)
    y_ref, s_ref = _conv_reference(x, weight, state0)
    y, state = gdn.causal_conv1d(x[:, :t], weight, state0)
    ys = [y]
    for i in range(t, t + extra):
        y_i, state = gdn.causal_conv1d(x[:, i : i + 1], weight, state)
        ys.append(y_i)
    _close(np.concatenate(ys, axis=1), y_ref)
    np.testing.assert_array_equal(state, s_ref.astype(np.float32))


def test_conv_from_zero_state_keeps_zero_fill_for_short_prompts():
    weight = np.ones((3, 4), np.float32)
    x = np.full((1, 1, 3), 2.0, np.float32)
    _, state = gdn.causal_conv1d(x, weight, np.zeros((1, 3, 3), np.float32))
    np.testing.assert_array_equal(state[0], [[0, 0, 0], [0, 0, 0], [2, 2, 2]])


def test_conv_padding_keeps_last_valid_inputs():
    rng = np.random.default_rng(11)
    c, k, t = 6, 4, 10
    valid = [10, 6, 2, 0]
    x = rng.normal(size=(len(valid), t, c)).astype(np.float32)
    weight = rng.normal(size=(c, k)).astype(np.float32)
    state0 = rng.normal(size=(len(valid), k - 1, c)).astype(np.float32)
    y, state = gdn.causal_conv1d(x, weight, state0, valid_len=jnp.array(valid))
    for row, n in enumerate(valid):
        y_ref, s_ref = _conv_reference(x[row : row + 1, :n], weight, state0[row : row + 1])
        if n:
            _close(y[row, :n], y_ref[0])
        np.testing.assert_array_equal(state[row], s_ref[0].astype(np.float32))


def test_gates_follow_torch_softplus_and_sigmoid():
    a = np.array([[-30.0, -1.0, 0.0, 3.0, 19.0, 25.0]], np.float32)
    b = np.array([[-4.0, -1.0, 0.0, 0.5, 2.0, 9.0]], np.float32)
    a_log = np.log(np.linspace(1, 16, 6)).astype(np.float32)
    dt_bias = np.array([0.5, -0.5, 0.1, 0.0, 1.0, -2.0], np.float32)
    g, beta = gdn.gdn_gates(a, b, -np.exp(a_log), dt_bias)
    x = (a + dt_bias).astype(np.float64)
    softplus = np.where(x > 20, x, np.log1p(np.exp(x)))
    _close(g, -np.exp(a_log.astype(np.float64)) * softplus, 1e-6)
    _close(beta, 1 / (1 + np.exp(-b.astype(np.float64))), 1e-6)
    assert (np.asarray(g) <= 0).all() and g.dtype == beta.dtype == jnp.float32


def test_gated_rms_norm_uses_weight_as_stored():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 3, 4, DV)).astype(np.float32)
    z = rng.normal(size=(2, 3, 4, DV)).astype(np.float32)
    w = (1 + 0.1 * rng.normal(size=DV)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * w * z / (1 + np.exp(-z.astype(np.float64)))
    _close(gdn.gated_rms_norm(jnp.asarray(x, jnp.bfloat16), z, w, 1e-6), ref, 1e-2)
    _close(gdn.gated_rms_norm(x, z, w, 1e-6), ref, 1e-6)


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not generated (scripts/make_gdn_fixture.py)")
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_matches_transformers_fixture(kind):
    """transformers' torch_{chunk,recurrent}_gated_delta_rule (grouped heads), outputs stored by the script."""
    f = np.load(FIXTURE)
    x = {name: f[name] for name in ("q", "k", "v", "g", "beta", "state")}
    fn = gdn.gdn_chunked if kind == "chunk" else gdn.gdn_recurrent
    o, s = _run(fn, x)
    _close(o, f[f"o_{kind}"])
    _close(s, f[f"s_{kind}"])


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not generated (scripts/make_gdn_fixture.py)")
def test_gated_rms_norm_matches_transformers_fixture():
    f = np.load(FIXTURE)
    _close(gdn.gated_rms_norm(f["norm_x"], f["norm_z"], f["norm_w"], 1e-6), f["norm_out"], 1e-6)
