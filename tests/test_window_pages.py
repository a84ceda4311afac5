"""Sliding-window layers keep only the KV pages their window sees (vLLM's hybrid KV allocator): the window group's
pages behind the window go back to its pool, and greedy outputs still equal the single-sequence contiguous path;
the window masks the pages a table still names; preemption, prefix reuse, no leak, the plan's sizing."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas
from imp_jax.ops.attention import attention_paged_gather
from imp_jax.planning.pool import plan_pool
from imp_jax.runtime import sampling, steps
from imp_jax.runtime.engine import Engine
from imp_jax.runtime.pages import window_pages, window_pool_pages
from tests.test_serving import ENGINE, _drive, _model, _prompts

WINDOWED = ["gemma3", "gpt-oss"]  # 5 of 6 layers windowed; sinks and alternating windows (both windows 8)


@functools.cache
def _reference(arch: str, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """Greedy tokens of the prompt alone on the unpaged single-sequence path (a contiguous cache of the context),
    up to an EOS id (which the engine does not return)."""
    model = _model(arch)
    stream = steps.token_stream(model.params, model.config, list(prompt), model.max_context, jnp.float32,
                                sampling.SamplingParams(), max_tokens, {})  # fmt: skip
    out = []
    for token in stream:
        if token in model.tokenizer.eos_ids:
            break
        out.append(token)
    return out


def _kv_bytes(engine: Engine) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(engine.cache.kv_arrays()))


@pytest.mark.parametrize("arch", WINDOWED)
def test_mixed_prompts_longer_than_the_window_equal_the_single_reference(arch):
    model = _model(arch)
    cfg = model.config
    assert 0 < cfg.n_window_layers < cfg.n_attention_layers and cfg.kv_window == 8
    prompts = _prompts(cfg.vocab_size, lengths=(3, 29, 11, 40))  # chunks of up to 32 tokens span 4 windows
    engine = Engine(model, **ENGINE)
    assert engine.window_pool.n_pages == window_pool_pages(8, 8, 4, 32) == 16 < engine.n_pages == 40
    assert engine.cache.wk.shape[:2] == (cfg.n_window_layers, 16) and engine.cache.k.shape[:2] == (
        cfg.n_attention_layers - cfg.n_window_layers,
        40,
    )
    ids = [engine.add_request(p, max_tokens=10) for p in prompts]
    out = _drive(engine)
    for rid, p in zip(ids, prompts, strict=True):
        assert out[rid][0] == _reference(arch, tuple(p), 10), (arch, len(p))
    assert engine.pool.n_used == 0 and engine.window_pool.n_used == 0


def test_window_pages_stay_bounded_while_a_long_sequence_decodes(monkeypatch):
    model = _model("gemma3")
    engine = Engine(model, **ENGINE)
    prompt = _prompts(model.config.vocab_size, lengths=(20,))[0]
    held: list[tuple[int, int, int]] = []  # (tokens fed, window pages, full pages) while each step runs
    run = engine._run

    def counting(batch, is_decode, *steps):
        held.append((batch[0][1], engine.window_pool.n_used, engine.pool.n_used))
        return run(batch, is_decode, *steps)

    monkeypatch.setattr(engine, "_run", counting)
    rid = engine.add_request(prompt, max_tokens=44)  # to the end of the 64-token context
    assert _drive(engine)[rid][0] == _reference("gemma3", tuple(prompt), 44)
    decode = [(w, f) for n, w, f in held if n == 1]
    assert len(decode) == 43
    assert max(w for w, _ in decode) == window_pages(8, 8, 1) == 2  # ceil(window / P) + 1, whatever the length
    assert decode[-1][1] == 8  # the full layers hold the whole context
    assert held[0] == (20, 3, 3)  # the prompt's chunk holds all its pages while it runs
    assert engine.window_pool.n_used == 0 and engine.pool.n_used == 0


def test_thousand_requests_leave_no_window_pages_behind():
    model = _model("gemma3")
    engine = Engine(model, page_size=8, n_pages=32, max_seqs=32, token_budget=256)
    rng = np.random.default_rng(4)
    for _ in range(1000):  # prompts up to three windows long: their early pages are given back mid-request
        engine.add_request([int(t) for t in rng.integers(3, 300, int(rng.integers(1, 25)))], max_tokens=2)
    done = 0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
    assert done == 1000
    assert engine.pool.n_used == 0 and engine.window_pool.n_used == 0
    assert len(engine.free_slots) == 32 and not engine.requests


@pytest.mark.parametrize("arch", WINDOWED)
def test_prefix_reuse_with_window_layers_gives_the_same_logprobs(arch):
    model = _model(arch)
    system = _prompts(model.config.vocab_size, lengths=(35,))[0]
    runs = {}
    for reuse in (True, False):
        engine = Engine(model, **ENGINE, prefix_caching=reuse)
        first = _drive(engine, {0: [dict(prompt=system, max_tokens=4)]})[0]
        rid = engine.add_request(system + first[0] + [5, 6, 7, 8, 9], max_tokens=6, logprobs=3)
        runs[reuse] = _drive(engine)[rid], engine.pool.lookups_hit, engine.window_pool.lookups_hit
    (with_reuse, hits, window_hits), (without, _, _) = runs[True], runs[False]
    assert hits == (len(system) + 4) // 8 == 4  # every full page of turn 1
    assert window_hits == 1  # the window group only needs the last page (window 8 back from position 32)
    assert with_reuse[0] == without[0]
    for (lp_a, top_a), (lp_b, top_b) in zip(with_reuse[2], without[2], strict=True):
        assert abs(lp_a - lp_b) < 1e-4
        assert [i for i, _ in top_a] == [i for i, _ in top_b]


def test_a_prefix_whose_window_pages_were_evicted_is_reused_only_as_far_as_the_window_group_holds_it():
    model = _model("gemma3")
    system = _prompts(model.config.vocab_size, lengths=(35,))[0]
    engine = Engine(model, **ENGINE)
    first = _drive(engine, {0: [dict(prompt=system, max_tokens=4)]})[0]
    engine.window_pool.allocate(engine.window_pool.n_free)  # evict every cached window page
    engine.window_pool.release(list(range(engine.window_pool.n_pages)))
    rid = engine.add_request(system + first[0], max_tokens=3)
    out = _drive(engine)[rid]
    assert engine.pool.lookups_hit == 0 and out[0] == _reference("gemma3", tuple(system + first[0]), 3)


def test_plan_sizes_both_groups_and_matches_the_allocation():
    """The full group's page holds only the full layers, so the budget holds more sequences; the window group
    is sized for max_seqs rows; the engine allocates exactly the plan's KV bytes."""
    model = _model("gemma3")
    engine = Engine(model, page_size=8, max_seqs=4, token_budget=32)
    pool = engine.pool_plan
    assert pool.window == 8 and pool.n_window_pages == min(pool.n_pages, window_pool_pages(8, 8, 4, 32))
    assert _kv_bytes(engine) == pool.pool_bytes
    assert pool.page_bytes * 5 == pool.window_page_bytes  # 1 full layer, 5 window layers
    probe = plan_pool(model.plan, page_size=8, max_seqs=2, token_budget=16, utilization=1.0)
    fixed = probe.weights_bytes + probe.slot_bytes + probe.workspace_bytes + probe.budget.headroom_bytes
    one_group = pool.page_bytes + pool.window_page_bytes  # a page of every layer, as before the split
    budget = dataclasses.replace(pool.budget, available_bytes=fixed + 12 * one_group + 100, source="test")
    sized = plan_pool(dataclasses.replace(model.plan, budget=budget), page_size=8, max_seqs=2, token_budget=16,
                      utilization=1.0)  # fmt: skip
    assert sized.n_window_pages == window_pool_pages(8, 8, 2, 16) == 8
    assert sized.n_pages == 16  # 8 + 4 x 6 fit, capped at max_seqs full contexts
    assert sized.needed_bytes <= budget.available_bytes
    assert sized.sequences(64) == 2 and 12 // sized.pages_for(64) == 1  # one group would hold one context
    assert "KV window pages  (8 x 8 tokens" in sized.report()
    assert "window layers (window 8) hold 2 pages of a 64-token sequence, the full layers 8" in sized.report()


def _released_case(t: int, page: int):
    """A row whose table columns before its window name a page of large finite garbage: its window hides them."""
    rng = np.random.default_rng(t)
    b, h, kv, hd, n_pg, window = 2, 4, 2, 64, 12, 40
    lengths = jnp.asarray([150, 190], jnp.int32)
    pool = (rng.standard_normal((2, 2, b * n_pg + 1, page, kv, hd)) * 0.5).astype(np.float32)
    pool[:, :, 0] = 300.0  # page 0: what the engine names in a released column
    k, v = (jnp.asarray(a, jnp.bfloat16) for a in pool)
    table = np.arange(1, b * n_pg + 1).reshape(b, n_pg)
    stale = table.copy()
    for row, n in enumerate(np.asarray(lengths)):
        stale[row, : (n - t + 1 - window) // page] = 0
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.bfloat16)
    sinks = jnp.asarray(rng.standard_normal((h,)), jnp.float32)
    return q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(stale, jnp.int32), lengths, window, sinks


@pytest.mark.parametrize("t", [1, 3])
def test_the_window_masks_released_columns_on_the_jnp_path(t):
    q, k, v, table, stale, lengths, window, sinks = _released_case(t, 8)
    q_pos = lengths[:, None] - t + jnp.arange(t)[None]
    kw = dict(window=window, sinks=sinks, scale=0.125)
    want = attention_paged_gather(q, k, v, q_pos, 1, table, **kw)
    np.testing.assert_array_equal(np.asarray(attention_paged_gather(q, k, v, q_pos, 1, stale, **kw)), want)


@pytest.mark.parametrize("t", [1, 3])
def test_the_window_masks_released_columns_in_the_paged_decode_kernel(t):
    """The kernel starts reading at the window's first 64-key block, which may begin in a released page."""
    q, k, v, table, stale, lengths, window, sinks = _released_case(t, 16)
    kernel = jax.jit(
        lambda tab: pallas.paged_decode_attention(
            q, k, v, tab, lengths, layer=1, window=window, sinks=sinks, scale=0.125, splits=2, interpret=True
        )
    )
    got, want = kernel(stale), kernel(table)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
