"""The CPU's layer layout (``ops.UnitArrays``: each unit's matrices their own arrays, picked by the layer loop)
gives what the stacked reference gives: prefill logits, decode logprobs and greedy tokens, f32, for a dense model,
gemma3 (sliding window), a GDN hybrid, an MoE and gpt-oss; the plan counts and compiles that layout."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

import imp_jax
from imp_jax import ops
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime.engine import Engine
from tests.test_serving import ENGINE, FAMILIES, FIXTURES, _drive, _prompts

SETTINGS = ("off", "auto")  # the stacked reference, the CPU default


@functools.cache
def _load(arch: str, kernels: str):
    return imp_jax.load(FIXTURES / arch / "model-f32.gguf", dtype="float32", max_context=64, kernels=kernels)


def _held_apart(params) -> list:
    return [leaf for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, ops.UnitArrays))
            if isinstance(leaf, ops.UnitArrays)]  # fmt: skip


@pytest.mark.parametrize("arch", FAMILIES)
def test_units_held_apart_equal_the_stacked_reference(arch):
    stacked, apart = (_load(arch, k) for k in SETTINGS)
    assert stacked.kernels == REFERENCE
    assert dataclasses.replace(apart.kernels, native_matmul=False) == KernelPolicy(unit_arrays=True)
    assert not _held_apart(stacked.params)
    assert _held_apart(apart.params)
    assert sum(a.nbytes for a in jax.tree.leaves(apart.params)) == sum(
        a.nbytes for a in jax.tree.leaves(stacked.params)
    )

    ids = _prompts(stacked.config.vocab_size, lengths=(23,))[0]
    np.testing.assert_allclose(apart.logits(ids), stacked.logits(ids), rtol=1e-5, atol=1e-5)

    prompts = _prompts(stacked.config.vocab_size, lengths=(3, 29, 11))
    runs = []
    for model in (stacked, apart):
        engine = Engine(model, **ENGINE)
        rids = [engine.add_request(p, max_tokens=12, logprobs=3) for p in prompts]
        out = _drive(engine)
        runs.append([out[r] for r in rids])
    assert sum(len(ids) for ids, _, _ in runs[0]) >= 12
    for (ids_ref, reason_ref, lps_ref), (ids_new, reason_new, lps_new) in zip(*runs, strict=True):
        assert ids_new == ids_ref and reason_new == reason_ref
        for (lp_ref, top_ref), (lp_new, top_new) in zip(lps_ref or [], lps_new or [], strict=True):
            assert lp_new == pytest.approx(lp_ref, abs=1e-5)
            assert [i for i, _ in top_new] == [i for i, _ in top_ref]
            np.testing.assert_allclose([v for _, v in top_new], [v for _, v in top_ref], atol=1e-5)


def test_the_plan_counts_units_held_apart_and_drops_the_slice_copies():
    path = FIXTURES / "qwen3moe" / "model-f32.gguf"
    stacked, apart = (imp_jax.plan_memory(path, max_context=64, kernels=k) for k in SETTINGS)
    assert _held_apart(apart.abstract_params) and not _held_apart(stacked.abstract_params)
    assert apart.weights_bytes == stacked.weights_bytes
    decode = {p.kernels.unit_arrays: next(s for s in p.steps if s.name == "decode") for p in (stacked, apart)}
    assert decode[True].temp_bytes < decode[False].temp_bytes  # no copy of a layer's slice of the stack


def test_a_per_unit_weight_outside_the_layer_loop_is_an_error():
    w = ops.UnitArrays((np.ones((2, 3), np.float32),) * 2)
    with pytest.raises(imp_jax.errors.KernelError, match="outside the layer loop"):
        ops.matmul(np.ones((1, 3), np.float32), w)
