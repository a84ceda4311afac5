"""The memory planner: its parts against the arrays really loaded, refusal before any allocation, path choice,
fitting contexts, synthetic models and the ``plan`` command."""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from imp_jax import ops
from imp_jax.errors import ImpError, ModelTooLarge
from imp_jax.gguf.qtensor import QTensor
from imp_jax.ops.policy import KernelPolicy
from imp_jax.planning.command import add_plan_parser
from imp_jax.planning.memory import (
    Budget,
    MemoryWarning,
    check_fits,
    cmd_plan,
    context_candidates,
    fit_context,
    parse_bytes,
    plan_memory,
    replan,
)
from imp_jax.runtime import steps
from imp_jax.runtime.cache import init_cache
from imp_jax.weights.files import open_model_file
from imp_jax.weights.loading import abstract_params, load_params
from imp_jax.weights.synthetic import SHAPES, _random_blocks, synthetic_params, synthetic_specs
from tests.tiny_gguf import write_tiny_llama

CTX = 256
MiB = 2**20


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _budget(available: int, headroom: int = 0) -> Budget:
    return Budget(available, "test budget", headroom, "cpu")


@pytest.fixture(scope="module")
def tinycoder(real_model):
    path = real_model("tinycoder")
    return path, plan_memory(path, max_context=CTX, dtype="bfloat16")


@pytest.mark.parametrize(
    "text, n",
    [(1234, 1234), ("8GiB", 8 * 2**30), ("512 MiB", 512 * MiB), ("1.5G", 3 * 2**29), ("16GB", 16 * 10**9)],
)
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["8 parsecs", "", "-1GiB", 0, True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ImpError):
        parse_bytes(bad)


def test_plan_parts_match_what_is_loaded(tinycoder):
    path, plan = tinycoder
    mf = open_model_file(path)
    params = load_params(mf, plan.config, plan.specs)
    assert _bytes(params) == plan.weights_bytes
    cache = init_cache(plan.config, 1, CTX, jnp.bfloat16)
    assert _bytes(cache.kv_arrays()) == plan.kv_cache_bytes
    assert plan.kv_cache_bytes == 2 * plan.config.n_layers * CTX * plan.config.n_head_kv * plan.config.head_dim * 2
    assert [s.name for s in plan.steps] == [f"prefill[{CTX}]", "decode"]
    assert plan.workspace_bytes == max(s.temp_bytes + s.io_bytes for s in plan.steps) > 0
    run = plan.kv_cache_bytes + plan.state_bytes + plan.workspace_bytes
    assert plan.peak_bytes == plan.weights_bytes + max(run, plan.load_transient_bytes)
    assert plan.fits and plan.available_bytes > 0 and plan.budget.source == "host MemAvailable"
    report = plan.report()
    for line in ("weights total", "KV cache", "workspace  prefill[256]", "peak", "verdict: fits"):
        assert line in report
    tokens = jnp.zeros((1, CTX), jnp.int32)
    logits, _ = steps.prefill_step(params, plan.config, tokens, jnp.asarray([3], jnp.int32), cache)
    assert bool(jnp.isfinite(logits).all())


def test_refusal_before_any_allocation(tinycoder):
    path, _ = tinycoder
    before = len(jax.live_arrays())
    plan = plan_memory(path, max_context=CTX, device_memory="1MiB")
    assert not plan.fits
    with pytest.raises(ModelTooLarge) as e:
        check_fits(plan)
    assert len(jax.live_arrays()) == before
    err = e.value
    assert (err.needed, err.available) == (plan.needed_bytes, MiB)
    text = str(err)
    assert f"needs {plan.peak_bytes / MiB:.1f} MiB" in text and "1.0 MiB available" in text
    assert "the weights alone need" in text and "a 4-bit quant (weights about" in text


def test_refusal_suggests_the_largest_context_that_fits(tinycoder):
    _, small = tinycoder
    big = replan(small, max_context=2 * CTX)
    budget = (small.needed_bytes + big.needed_bytes) // 2
    refused = replan(big, budget=_budget(budget, small.headroom_bytes))
    suggested = fit_context(refused)
    assert suggested is not None and suggested.max_context == CTX and suggested.fits
    with pytest.raises(ModelTooLarge, match=rf"Try max_context={CTX} \(needs {suggested.needed_bytes / MiB:.1f} MiB"):
        check_fits(refused)


def test_fitted_context_is_the_largest_that_fits_in_few_plans(tinycoder, monkeypatch):
    """Against every candidate planned one by one, for budgets across the range: the same context, from at most
    three re-plans each (the bisection this replaced took 3-4 here, 14 for the four budgets), with or without
    the plan at the smallest context at hand (as auto_context has it)."""
    from imp_jax.planning import memory

    _, small = tinycoder
    top = replan(small, max_context=1024)
    floor = replan(top, max_context=16)
    exact = {c: replan(top, max_context=c) for c in context_candidates(1024)}
    calls = []
    real = memory.replan
    monkeypatch.setattr(memory, "replan", lambda plan, **kw: calls.append(kw) or real(plan, **kw))
    counts = {False: 0, True: 0}
    for frac in (0.05, 0.3, 0.6, 0.9):
        budget = _budget(int(floor.needed_bytes + frac * (top.needed_bytes - floor.needed_bytes)), top.headroom_bytes)
        fitting = [c for c, p in exact.items() if p.needed_bytes <= budget.available_bytes]
        for known in (False, True):
            calls.clear()
            smallest = dataclasses.replace(floor, budget=budget) if known else None
            got = fit_context(dataclasses.replace(top, budget=budget), smallest=smallest)  # the plans, re-budgeted
            assert got is not None and got.max_context == max(fitting), (frac, known)
            assert len(calls) <= 3, (frac, known, calls)
            counts[known] += len(calls)
    assert counts[True] <= counts[False] <= 8


def test_a_missed_curve_is_drawn_again_through_the_nearest_plans(tinycoder, monkeypatch):
    """A workspace with a large linear term beside its quadratic one (sliding windows bend real curves so: gemma3's
    did) makes the curve through the smallest and the full context predict too short a context. The second round,
    through the two plans nearest the boundary, finds the answer in fewer plans than halving after the miss."""
    from imp_jax.planning import memory

    _, small = tinycoder
    top = replan(small, max_context=1024)
    config = dataclasses.replace(top.config, context_length=32768)
    per_token = top.kv_cache_bytes // top.max_context

    def plan_at(plan, max_context):
        workspace = 60_000 * max_context + 2 * max_context**2
        steps = (memory.StepMemory("prefill", workspace, 0),)
        return dataclasses.replace(plan, max_context=max_context, kv_cache_bytes=per_token * max_context, steps=steps)

    calls = []
    monkeypatch.setattr(memory, "replan", lambda plan, **kw: calls.append(kw) or plan_at(plan, **kw))
    full = plan_at(dataclasses.replace(top, config=config, load_transient_bytes=0), 32768)
    floor = plan_at(full, 16)
    for frac in (0.15, 0.4):
        budget = _budget(int(floor.needed_bytes + frac * (full.needed_bytes - floor.needed_bytes)), top.headroom_bytes)
        want = max(c for c in context_candidates(32768) if plan_at(full, c).needed_bytes <= budget.available_bytes)
        plans = {}
        for rounds in (1, memory._MODEL_ROUNDS):
            monkeypatch.setattr(memory, "_MODEL_ROUNDS", rounds)
            calls.clear()
            smallest = dataclasses.replace(floor, budget=budget)
            got = fit_context(dataclasses.replace(full, budget=budget), smallest=smallest)
            assert got.max_context == want, (frac, rounds)
            plans[rounds] = len(calls)
        assert plans[memory._MODEL_ROUNDS] <= 4 and plans[memory._MODEL_ROUNDS] < plans[1], (frac, plans)


def test_a_repeated_plan_reads_its_statistics_back(tinycoder, tmp_path, monkeypatch):
    """``plan_memory`` keeps each step's statistics in the compile-cache folder, as ``load`` does: the same plan
    again (a ``--context auto`` search's candidates, or ``imp-jax plan`` before ``load``) compiles nothing; with
    the cache off it compiles every time."""
    from imp_jax.planning import memory

    path, _ = tinycoder
    compiles = []
    real = memory._compile_all
    monkeypatch.setattr(memory, "_compile_all", lambda *lowered: compiles.append(len(lowered)) or real(*lowered))
    plans = [plan_memory(path, max_context=CTX, device_memory="1GiB", compile_cache=tmp_path) for _ in range(2)]
    assert compiles == [2] and plans[0].steps == plans[1].steps
    plan_memory(path, max_context=CTX, device_memory="1GiB", compile_cache=False)
    assert compiles == [2, 2]


def test_context_candidates():
    assert context_candidates(1000) == [16, 32, 64, 128, 256, 512, 768]
    assert context_candidates(40) == [16, 32]


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    """A Q8_0 file and its plans on both paths (the fallback dequantizes every matrix at load), under the CPU's
    policy where the native kernel does not build (with it, a Q8_0 matrix has a kernel: no fallback)."""
    path = write_tiny_llama(tmp_path_factory.mktemp("mem") / "tiny-q8.gguf")
    # the file's own context: auto reuses it
    packed = plan_memory(path, max_context=128, dtype="bfloat16", path="packed", kernels=KernelPolicy(unit_arrays=True))
    return path, packed, replan(packed, path="fallback")


def test_fallback_path_loads_dense_and_matches_its_plan(tiny_q8):
    path, packed, fallback = tiny_q8
    mf = open_model_file(path)
    dense = load_params(mf, fallback.config, fallback.specs)
    assert _bytes(dense) == fallback.weights_bytes > packed.weights_bytes
    assert fallback.path_label == "bf16-fallback path" and packed.path_label == "packed Q8_0 path"
    assert {w.path for w in fallback.weights} == {"fallback", "dense"}
    assert fallback.load_transient_bytes > 0 == packed.load_transient_bytes
    packed_params = load_params(mf, packed.config, packed.specs)
    w_packed, w_dense = packed_params.segments[0][0].w_down, dense.segments[0][0].w_down
    assert isinstance(w_packed, ops.UnitArrays) and isinstance(w_dense, ops.UnitArrays)  # the CPU's layout
    for one_packed, one_dense in zip(w_packed.arrays, w_dense.arrays, strict=True):
        assert isinstance(one_packed, QTensor) and not isinstance(one_dense, QTensor)
        np.testing.assert_array_equal(np.asarray(one_dense), np.asarray(one_packed.dequantize(jnp.bfloat16)))


def test_auto_path_takes_the_fallback_only_when_it_fits(tiny_q8):
    _, packed, fallback = tiny_q8
    roomy = replan(packed, path="auto", budget=_budget(10 * fallback.peak_bytes))
    assert roomy.path == "fallback"
    # Without kernels (CPU) the fallback dequantizes every packed weight, as the forced dense path does.
    assert replan(packed, path="dense").weights_bytes == fallback.weights_bytes
    tight = replan(packed, path="auto", budget=_budget((packed.peak_bytes + fallback.peak_bytes) // 2))
    assert tight.path == "packed" and tight.fits


def test_auto_context_on_the_auto_path_is_the_longest_either_path_fits(tiny_q8):
    """``max_context="auto"`` with ``path="auto"``: the longest context at which the path ``auto`` would pick
    fits, the fallback where both paths fit it (a CPU runs it faster), for budgets across the range."""
    _, packed, fallback = tiny_q8
    cands = context_candidates(packed.config.context_length)
    need = {(p.path, c): replan(p, max_context=c).needed_bytes for p in (packed, fallback) for c in cands}
    low, high = min(need.values()), max(need.values())
    for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
        budget = _budget(int(low + frac * (high - low)), packed.headroom_bytes)
        fits = {key for key, n in need.items() if n <= budget.available_bytes}
        got = replan(packed, max_context="auto", path="auto", budget=budget)
        longest = max(c for _, c in fits)
        assert got.fits and got.max_context == longest, (frac, got.max_context, fits)
        assert got.path == ("fallback" if ("fallback", longest) in fits else "packed"), frac


def test_forced_fallback_warns_with_the_numbers(tiny_q8):
    _, _, fallback = tiny_q8
    forced = replan(fallback, budget=_budget(fallback.weights_bytes // 2))
    with pytest.warns(MemoryWarning, match=r"forced past the memory budget: .* needs .*the packed Q8_0 path \(needs"):
        check_fits(forced, force=True)
    with pytest.raises(ModelTooLarge, match="bf16-fallback path"):
        check_fits(forced)


def test_auto_context_takes_the_model_context_when_it_fits(tiny_q8):
    _, packed, _ = tiny_q8
    auto = replan(packed, max_context="auto")
    assert auto.max_context == packed.config.context_length and auto.fits


@pytest.mark.parametrize("quant", ["mxfp4", "q8_0", "q4_k"])
def test_synthetic_blocks_are_valid_and_scaled(quant):
    qtype = GGMLQuantizationType[quant.upper()]
    std = 1 / math.sqrt(1024)
    make = jax.jit(_random_blocks, static_argnums=(1, 2, 3))
    blocks = np.asarray(make(jax.random.key(3), (64, 32), qtype, std))
    values = quants.dequantize(blocks.reshape(64, -1), qtype)
    assert np.isfinite(values).all()
    assert abs(values.std() / std - 1) < 0.25 and abs(values.mean()) < 0.1 * std


def test_synthetic_model_matches_the_loader_tree_and_runs():
    assert SHAPES["qwen3-8b"].config.n_layers == 36 and SHAPES["llama-70b"].config.n_embd == 8192
    config, specs = synthetic_specs("tiny", "q8_0")
    params = synthetic_params(specs, jax.random.key(0), config=config)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), abstract_params(specs), params)
    assert all(jax.tree.leaves(same))
    cache = init_cache(config, 1, 16, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, config.vocab_size, jnp.int32)
    logits, _ = steps.prefill_step(params, config, tokens, jnp.asarray([16], jnp.int32), cache)
    assert bool(jnp.isfinite(logits).all()) and 0.3 < float(logits.std()) < 3


def test_plan_command_prints_table_and_refusal(tinycoder, capsys):
    path, _ = tinycoder
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", str(path), "--context", str(CTX), "--device-memory", "1MiB"])
    with pytest.raises(ModelTooLarge, match="Try"):  # the CLI's exit status 1
        args.run(args)
    out = capsys.readouterr().out
    assert "memory plan: tinycoder-tiny.gguf" in out and "does NOT fit" in out
    with pytest.raises(ImpError, match="--context"):
        cmd_plan(parser.parse_args(["plan", "--model", str(path), "--context", "lots"]))


def test_bf16_matrices_name_the_kernel_when_it_runs_them():
    """The plan's weight lines say which bf16 matrices the Pallas kernel reads in place (IMP_JAX_KERNELS=all on a
    Hopper GPU) and which stay on XLA's dot (the embedding, read by row; norms)."""
    from imp_jax import ops
    from imp_jax.planning import memory
    from imp_jax.weights.loading import abstract_leaf

    _, specs = synthetic_specs("tiny", "bf16")
    leaves = memory._leaves(specs)
    auto, every = ops.KernelPolicy(matmul=True, attention=True), ops.KernelPolicy(True, True, True)
    for kernels, expect in ((auto, set()), (every, {("BF16", "kernel:pallas", "bfloat16")})):
        lines = memory._weight_lines({s: abstract_leaf(s, kernels) for s in leaves}, kernels)
        assert {(w.qtype, w.path, w.stored) for w in lines if w.path.startswith("kernel:")} == expect
        assert any(w.path == "dense" and w.qtype == "BF16" for w in lines)  # the embedding table


def test_q4_k_m_mix_takes_a_kernel_for_every_matrix():
    """A Q4_K_M-style file (Q4_K, with Q6_K for attn_v, ffn_down and the output head) on a Hopper GPU: every
    packed matrix is repacked for a kernel (none left to dequantize inside a step), and the plan names the
    kernel format of each stored qtype."""
    from gguf import GGMLQuantizationType as T

    from imp_jax import ops
    from imp_jax.planning import memory
    from imp_jax.weights.loading import abstract_leaf

    _, specs = synthetic_specs("tiny", "q4_k_m")  # llama.cpp's Q4_K_M rule: layer 1's attn_v/ffn_down, output Q6_K
    leaves = memory._leaves(specs)
    assert {s.qtype for s in leaves if s.dtype is None} >= {int(T.Q4_K), int(T.Q6_K)}
    hopper = ops.KernelPolicy(matmul=True, attention=True)
    lines = memory._weight_lines({s: abstract_leaf(s, hopper) for s in leaves if not s.gathered}, hopper)
    packed = {(w.qtype, w.path) for w in lines if w.stored == "packed"}
    assert packed == {("Q4_K", "kernel:pallas Q4_K"), ("Q6_K", "kernel:pallas Q6_K")}
