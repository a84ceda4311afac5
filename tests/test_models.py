"""Model math against transformers (float32) on tiny random models written by llama.cpp's converter.

Fixtures: tests/fixtures/<arch>/ made by scripts/make_fixtures.py (see tests/fixtures/README.md). ``reference.npz``
holds one token sequence ``ids`` whose prefixes of ``lengths`` are each run as a separate prompt, and transformers'
logits over the whole sequence: ``logits_f32`` for the F32 file and ``logits_q8_0`` for transformers run on the
dequantized Q8_0 weights (causal, so a prefix's logits are the leading rows).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import imp_jax
from imp_jax.runtime import steps
from tests.helpers import incremental_logits, load_raw

FIXTURES = Path(__file__).parent / "fixtures"
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next", "gpt-oss"]
# bf16 compute (weights, activations and KV cache rounded to bf16; norms, softmax, the GDN state and logits in
# f32): on these random models logits move by at most this fraction of the largest reference logit. Observed
# (2026-11-25): dense models <= 0.05; the hybrids up to 0.082 (Qwen3.5-MoE) over 150 tokens, as bf16 rounding of
# the GDN inputs compounds through the recurrence.
BF16_REL_TOL = 0.1


def _sequences(ref):
    return [(ref["ids"][:n].tolist(), slice(0, n)) for n in ref["lengths"]]


def _logits(path: Path, dtype: str, ids: list[int]) -> np.ndarray:
    cfg, params = load_raw(path, dtype)
    out, _ = steps.run_prefill(params, cfg, ids, steps.bucket(len(ids), 256), jnp.dtype(dtype), all_logits=True)
    return np.asarray(out[0, : len(ids)])


def _fixture(arch: str):
    d = FIXTURES / arch
    if not (d / "reference.npz").exists():
        pytest.fail(f"fixture {d} is missing: run scripts/make_fixtures.py")
    return d, np.load(d / "reference.npz")


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_logits_match_transformers(arch):
    d, ref = _fixture(arch)
    for ids, rows in _sequences(ref):
        got = _logits(d / "model-f32.gguf", "float32", ids)
        want = ref["logits_f32"][rows]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{arch}, {len(ids)} tokens")
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_logits_match_transformers_on_dequantized_weights(arch):
    d, ref = _fixture(arch)
    for ids, rows in _sequences(ref):
        got = _logits(d / "model-q8_0.gguf", "float32", ids)
        np.testing.assert_allclose(got, ref["logits_q8_0"][rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_logits_within_documented_tolerance(arch):
    d, ref = _fixture(arch)
    ids, rows = _sequences(ref)[-1]
    got = _logits(d / "model-f32.gguf", "bfloat16", ids)
    want = ref["logits_f32"][rows]
    assert np.abs(got - want).max() <= BF16_REL_TOL * np.abs(want).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_full_forward(arch):
    d, ref = _fixture(arch)
    ids = ref["ids"][: min(40, len(ref["ids"]))].tolist()
    cfg, params = load_raw(d / "model-f32.gguf", "float32")
    full, _ = steps.run_prefill(params, cfg, ids, 64, jnp.float32, all_logits=True)
    inc = incremental_logits(params, cfg, ids, len(ids) // 2, 64, jnp.float32)
    np.testing.assert_allclose(inc, np.asarray(full[0, : len(ids)]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_runs_on_each_family(arch):
    """The public path end to end (plan, load, tokenizer, jit prefill/decode, sampling) on every fixture file."""
    model = imp_jax.load(FIXTURES / arch / "model-q8_0.gguf", max_context=64)
    greedy = imp_jax.generate(model, "hello world", max_tokens=6)
    assert greedy.token_ids == imp_jax.generate(model, "hello world", max_tokens=6).token_ids
    sampled = imp_jax.generate(model, "hello", max_tokens=6, temperature=0.9, top_k=20, seed=1)
    assert 0 < len(sampled.token_ids) <= 6 or sampled.finish_reason == "stop"
