"""The serving engine: batched equals alone, join/leave, abort, prefix reuse, preemption, no recompilation, no
page leaks, per-row sampling streams, stop strings, threads."""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path

import numpy as np
import pytest

import imp_jax
from imp_jax.errors import ModelTooLarge, RequestTooLarge
from imp_jax.planning.pool import plan_pool
from imp_jax.runtime.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["llama", "gemma3", "qwen35", "qwen3moe", "gpt-oss"]  # dense, sliding window, GDN hybrid, MoE, sinks
ENGINE = dict(page_size=8, n_pages=40, max_seqs=4, token_budget=32)


@functools.cache
def _model(arch: str, dtype: str = "float32"):
    return imp_jax.load(FIXTURES / arch / "model-f32.gguf", dtype=dtype, max_context=64)


def _prompts(n_vocab: int, lengths=(3, 29, 11, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, n_vocab, n)] for n in lengths]


def _drive(engine: Engine, joins: dict[int, list] | None = None, max_steps=500):
    """Step until idle; ``joins`` maps a step index to add_request kwargs to submit before it. Returns
    {request id: (token ids, finish reason, logprobs)}."""
    joins = joins or {}
    got: dict[int, list] = {}
    ends: dict[int, tuple] = {}
    for i in range(max_steps):
        for kw in joins.get(i, []):
            got[engine.add_request(**kw)] = []
        if not engine.has_unfinished() and i > max(joins, default=-1):
            break
        for out in engine.step():
            got.setdefault(out.request_id, [])
            got[out.request_id] += out.token_ids
            if out.logprobs:
                ends.setdefault(("lp", out.request_id), []).extend(out.logprobs)
            if out.finished:
                ends[out.request_id] = out.finish_reason
    return {r: (ids, ends.get(r), ends.get(("lp", r))) for r, ids in got.items()}


def _alone(model, prompt, **kw):
    engine = Engine(model, **ENGINE)
    rid = engine.add_request(prompt, **kw)
    return _drive(engine)[rid]


@pytest.mark.parametrize("arch", FAMILIES)
def test_batch_of_mixed_prompts_equals_each_alone_f32(arch):
    model = _model(arch)
    prompts = _prompts(model.config.vocab_size)
    engine = Engine(model, **ENGINE)
    ids = [engine.add_request(p, max_tokens=10) for p in prompts]
    batched = _drive(engine)
    for rid, p in zip(ids, prompts, strict=True):
        alone = _alone(model, p, max_tokens=10)
        assert batched[rid][0] == alone[0], (arch, len(p))
        assert batched[rid][1] == alone[1]
    assert engine.pool.n_used == 0 and sorted(engine.free_slots) == list(range(engine.max_seqs))


@pytest.mark.parametrize("arch", FAMILIES)
def test_batch_equals_alone_bf16_where_the_margin_is_clear(arch):
    model = _model(arch, "bfloat16")
    prompts = _prompts(model.config.vocab_size, lengths=(5, 33, 17))
    engine = Engine(model, **ENGINE)
    ids = [engine.add_request(p, max_tokens=8) for p in prompts]
    batched = _drive(engine)
    for rid, p in zip(ids, prompts, strict=True):
        alone_ids, _, lps = _alone(model, p, max_tokens=8, logprobs=2)
        for i, (a, b) in enumerate(zip(alone_ids, batched[rid][0], strict=True)):
            top = lps[i][1]
            if top[0][1] - top[1][1] <= 0.5:  # a near tie: bf16 rounding may pick either, and all after differ
                break
            assert a == b, (arch, len(p), i)


def test_requests_join_and_leave_mid_run():
    model = _model("gemma3")
    p = _prompts(model.config.vocab_size, lengths=(7, 30, 12, 21))
    engine = Engine(model, **ENGINE)
    joins = {
        0: [dict(prompt=p[0], max_tokens=12)],
        2: [dict(prompt=p[1], max_tokens=3)],  # leaves early
        4: [dict(prompt=p[2], max_tokens=9), dict(prompt=p[3], max_tokens=5)],
    }
    out = _drive(engine, joins)
    for rid, kw in enumerate(kw for step in sorted(joins) for kw in joins[step]):
        assert out[rid][0] == _alone(model, kw["prompt"], max_tokens=kw["max_tokens"])[0]
    assert engine.pool.n_used == 0


def test_a_step_padded_to_its_bucket_stays_within_the_token_budget():
    """Prefill rows run padded to their bucket (rows and tokens to powers of two): a chunk joins a step only while
    that padded size stays within the token budget, so four 20-token prompts under a budget of 64 run as two steps
    of 2 rows (2 x 32 padded), not 4 rows padded to 4 x 32 for 64 real tokens, and each still gets its own tokens."""
    model = _model("llama")
    engine = Engine(model, page_size=8, n_pages=40, max_seqs=8, token_budget=64)
    shapes = []
    run = engine._run

    def recording(batch, is_decode, n_steps=1):
        if not is_decode:
            shapes.append((len(batch), max(n for _, n in batch)))
        return run(batch, is_decode, n_steps)

    engine._run = recording
    prompts = _prompts(model.config.vocab_size, lengths=(20,) * 4)
    ids = [engine.add_request(p, max_tokens=3) for p in prompts]
    batched = _drive(engine)
    assert shapes == [(2, 20), (2, 20)]
    for rid, p in zip(ids, prompts, strict=True):
        assert batched[rid][0] == _alone(model, p, max_tokens=3)[0]


def test_abort_frees_pages_and_ends_with_abort():
    model = _model("llama")
    p = _prompts(model.config.vocab_size, lengths=(30, 9))
    engine = Engine(model, **ENGINE, prefix_caching=False)
    a = engine.add_request(p[0], max_tokens=50)
    b = engine.add_request(p[1], max_tokens=6)
    engine.step()
    engine.step()
    used = engine.pool.n_used
    engine.abort(a)
    assert engine.pool.n_used == used - 4  # 30 + 1 tokens fed: 4 pages of 8
    outs = engine.step()
    assert any(o.request_id == a and o.finished and o.finish_reason == "abort" for o in outs)
    rest = _drive(engine)
    assert rest[b][1] == "length"
    assert engine.pool.n_used == 0 and not engine.has_unfinished()


def test_prefix_reuse_gives_the_same_logprobs_as_no_reuse():
    model = _model("llama")
    system = _prompts(model.config.vocab_size, lengths=(35,))[0]
    turn2 = [*system, 5, 6, 7, 8, 9]
    runs = {}
    for reuse in (True, False):
        engine = Engine(model, **ENGINE, prefix_caching=reuse)
        first = _drive(engine, {0: [dict(prompt=system, max_tokens=4)]})[0]
        second_prompt = system + first[0] + turn2[len(system) :]  # the second chat turn extends the first
        rid = engine.add_request(second_prompt, max_tokens=6, logprobs=3)
        runs[reuse] = _drive(engine)[rid], engine.pool.lookups_hit
    (with_reuse, hits), (without, _) = runs[True], runs[False]
    assert hits == (len(system) + 4) // 8  # every full page of turn 1 (prompt + fed reply) came from the cache
    assert with_reuse[0] == without[0]
    for (lp_a, top_a), (lp_b, top_b) in zip(with_reuse[2], without[2], strict=True):
        assert abs(lp_a - lp_b) < 1e-4
        assert [i for i, _ in top_a] == [i for i, _ in top_b]
        np.testing.assert_allclose([v for _, v in top_a], [v for _, v in top_b], atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen35", "gemma3", "gpt-oss"])  # recurrent slots; the window KV group
def test_preemption_under_a_small_pool_recomputes_and_matches(arch):
    model = _model(arch)
    prompts = _prompts(model.config.vocab_size, lengths=(20, 26, 14))
    engine = Engine(model, page_size=8, n_pages=9, max_seqs=3, token_budget=24)
    ids = [engine.add_request(p, max_tokens=12) for p in prompts]
    out = _drive(engine)
    assert engine.preemptions > 0
    for rid, p in zip(ids, prompts, strict=True):
        assert out[rid][0] == _alone(model, p, max_tokens=12)[0]
    assert engine.pool.n_used == 0 and engine.window_pages_in_use() == 0


def test_a_request_that_can_never_fit_is_refused():
    model = _model("llama")
    engine = Engine(model, page_size=8, n_pages=3, max_seqs=2)
    with pytest.raises(RequestTooLarge, match="needs 4 KV pages of 8 tokens but the engine's pool has 3") as e:
        engine.add_request(list(range(3, 30)), max_tokens=1)
    assert e.value.needed == 4 and e.value.available == 3
    with pytest.raises(RequestTooLarge, match="20 prompt tokens and up to 44 more needs 8 KV pages"):
        engine.add_request(list(range(3, 23)))  # the prompt fits, its output (capped by the context, 64) would not


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: the sliding-window KV group's tables too
def test_warm_engine_does_not_recompile(arch):
    model = _model(arch)
    engine = Engine(model, **ENGINE)
    warm = _prompts(model.config.vocab_size, lengths=(5, 20, 9, 40), seed=1)
    _drive(engine, {0: [dict(prompt=p, max_tokens=14) for p in warm]})
    before = len(model.programs.compiled)
    other = _prompts(model.config.vocab_size, lengths=(6, 18, 12, 37), seed=2)
    _drive(engine, {0: [dict(prompt=p, max_tokens=13) for p in other]})
    assert len(model.programs.compiled) == before


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_warmed_up_engine_never_waits_for_a_compile_and_gives_the_same_tokens(arch):
    """After warm_up, steps whose own programs are not compiled run padded to a covering one (non-greedy,
    penalty, logprobs, chunked, the largest buckets) while theirs compile on a worker: no step waits, and every
    request gets the tokens an engine that compiled each exact program gives."""
    prompts = _prompts(_model(arch).config.vocab_size, lengths=(3, 29, 11, 40), seed=4)
    kinds = [dict(), dict(temperature=0.8, seed=5), dict(logprobs=2), dict(repeat_penalty=1.3)]
    requests = {0: [dict(prompt=p, max_tokens=9, **kw) for p, kw in zip(prompts, kinds, strict=True)]}
    requests[3] = [dict(prompt=prompts[1][:5], max_tokens=6)]  # joins a running batch
    model = imp_jax.load(FIXTURES / arch / "model-f32.gguf", dtype="float32", max_context=64)  # nothing compiled
    engine = Engine(model, **ENGINE)
    engine.warm_up()
    assert {(v.decode, v.rows, v.tokens) for v in engine.cover_variants()} == {(True, 4, 1), (False, 1, 32),
                                                                            (False, 2, 16)}  # fmt: skip
    warmed = _drive(engine, requests)
    assert engine.compile_waits == 0 and engine.covered_steps > 0
    exact = _drive(Engine(model, **ENGINE), requests)
    assert [ids for ids, *_ in warmed.values()] == [ids for ids, *_ in exact.values()]
    for (_, _, lp_w), (_, _, lp_e) in zip(warmed.values(), exact.values(), strict=True):
        assert (lp_w is None) == (lp_e is None)
        if lp_w:
            np.testing.assert_allclose([c for c, _ in lp_w], [c for c, _ in lp_e], atol=1e-4)


def test_warm_up_shrinks_a_pool_whose_compiled_steps_outgrow_the_plan(monkeypatch):
    """The pool plan measures engine_step on a small probe pool. Where the programs compiled for the real pool
    need more (XLA keeping a copy of the pages: here a workspace inflated by the cache's size), warm_up shrinks
    the pool until pages and workspace fit the plan's room, instead of running out of memory mid-step; the
    requests still get their tokens."""
    import imp_jax.runtime.engine as engine_mod
    from imp_jax.planning.memory import StepMemory, step_memory

    model = imp_jax.load(FIXTURES / "llama" / "model-f32.gguf", dtype="float32", max_context=64)
    probe = plan_pool(model.plan, page_size=8, max_seqs=4, token_budget=32, utilization=1.0)
    fixed = probe.weights_bytes + probe.slot_bytes + probe.workspace_bytes + probe.budget.headroom_bytes
    budget = dataclasses.replace(probe.budget, available_bytes=fixed + 24 * probe.page_bytes, source="test")
    model.plan = dataclasses.replace(model.plan, budget=budget)

    def copies_the_pages(name, compiled, persistent):  # as if each step held one more copy of the whole pool
        real = step_memory(name, compiled, persistent)
        return StepMemory(real.name, real.temp_bytes + persistent - probe.weights_bytes, real.io_bytes)

    monkeypatch.setattr(engine_mod, "step_memory", copies_the_pages)
    engine = Engine(model, page_size=8, max_seqs=4, token_budget=32, memory_utilization=1.0)
    assert engine.n_pages == 24
    engine.warm_up()
    assert engine.shrunk_from == 24 and 9 <= engine.n_pages <= 12  # pages + their copy fit 24 pages' room
    assert engine.cache.k.shape[1] == engine.n_pages == engine.pool.n_pages == engine.pool_plan.n_pages
    prompts = _prompts(model.config.vocab_size, lengths=(5, 20))
    got = _drive(engine, {0: [dict(prompt=p, max_tokens=6) for p in prompts]})
    assert engine.compile_waits == 0
    assert [ids for ids, *_ in got.values()] == [_alone(_model("llama"), p, max_tokens=6)[0] for p in prompts]


def test_thousand_requests_leave_no_pages_behind():
    model = _model("llama")
    engine = Engine(model, page_size=8, n_pages=32, max_seqs=32, token_budget=256)
    rng = np.random.default_rng(3)
    for _ in range(1000):
        engine.add_request([int(t) for t in rng.integers(3, 300, int(rng.integers(1, 7)))], max_tokens=1)
    done = 0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
    assert done == 1000
    assert engine.pool.n_used == 0 and len(engine.free_slots) == 32 and not engine.requests
    planned = engine.n_pages * engine.page_size
    assert engine.cache.k.shape[1:3] == (32, 8) and planned == 256


def test_seeded_rows_keep_their_own_stream_in_a_batch():
    model = _model("llama")
    prompts = _prompts(model.config.vocab_size, lengths=(4, 13))
    kw = dict(max_tokens=10, temperature=1.2, top_k=40, top_p=0.95, min_p=0.02, repeat_penalty=1.1, seed=11)
    engine = Engine(model, **ENGINE)
    a = engine.add_request(prompts[0], **kw)
    b = engine.add_request(prompts[1], max_tokens=10)  # greedy row beside a sampled one
    batched = _drive(engine)
    assert batched[a][0] == _alone(model, prompts[0], **kw)[0]
    assert batched[b][0] == _alone(model, prompts[1], max_tokens=10)[0]
    assert batched[a][0] != _alone(model, prompts[0], **{**kw, "seed": 12})[0]


def test_generate_list_equals_each_prompt_alone_and_stop_strings_apply():
    model = _model("llama")
    prompts = _prompts(model.config.vocab_size, lengths=(3, 25, 10))
    gens = imp_jax.generate(model, prompts, max_tokens=8)
    for g, p in zip(gens, prompts, strict=True):
        alone = imp_jax.generate(model, p, max_tokens=8)
        assert g.token_ids == alone.token_ids and g.text == alone.text and g.finish_reason == alone.finish_reason
    text = gens[1].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = imp_jax.generate(model, prompts[1], max_tokens=8, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
        assert "".join(imp_jax.generate(model, prompts[1], max_tokens=8, stop=[stop], stream=True)) == cut.text
    assert model._engine.pool.n_used == 0


def test_submit_streams_from_another_thread():
    model = _model("llama")
    engine = Engine(model, **ENGINE)
    stop = threading.Event()
    driver = threading.Thread(target=engine.run, args=(stop,))
    driver.start()
    try:
        prompts = _prompts(model.config.vocab_size, lengths=(6, 14))
        streams = [engine.submit(p, max_tokens=5) for p in prompts]
        outs = [[tok for o in s for tok in o.token_ids] for s in streams]
    finally:
        stop.set()
        driver.join()
    for got, p in zip(outs, prompts, strict=True):
        assert got == _alone(model, p, max_tokens=5)[0]


def test_engine_takes_its_pool_from_the_plan_and_a_budget_sizes_it():
    """Default: the batch x max_context load() planned; with a budget, what is left beside the weights, the slots
    and engine_step's compiled workspace (vLLM's gpu_memory_utilization); none left is refused."""
    model = _model("llama")
    engine = Engine(model, page_size=8, max_seqs=4, token_budget=32)
    pool = engine.pool_plan
    assert engine.n_pages == pool.n_pages == 8 and engine.cache.k.shape[1] == 8  # 1 x 64 tokens in pages of 8
    assert pool.sequences(16) == 4 and pool.sequences(64) == 1 and "sequences that fit" in pool.report()
    probe = plan_pool(model.plan, page_size=8, max_seqs=4, token_budget=32, utilization=1.0)
    fixed = probe.weights_bytes + probe.slot_bytes + probe.workspace_bytes + probe.budget.headroom_bytes
    budget = dataclasses.replace(pool.budget, available_bytes=fixed + 13 * pool.page_bytes + 100, source="test")
    plan = dataclasses.replace(model.plan, budget=budget)
    sized = plan_pool(plan, page_size=8, max_seqs=4, token_budget=32, utilization=1.0)
    assert sized.n_pages == 13 and sized.needed_bytes <= budget.available_bytes
    assert [s.name for s in sized.steps] == [
        "engine_step decode [4 x 1]",
        "engine_step prefill [1 x 32]",
        "engine_step prefill [2 x 16]",
    ]  # the warmed-up programs
    assert all(s.workspace_bytes > 0 for s in sized.steps)
    capped = plan_pool(dataclasses.replace(plan, budget=dataclasses.replace(budget, available_bytes=2**40)),
                       page_size=8, max_seqs=4, token_budget=32, utilization=0.5)  # fmt: skip
    assert capped.n_pages == 4 * 8  # no more than max_seqs full contexts can reference
    with pytest.raises(ModelTooLarge, match="no KV page of 8 tokens fits"):
        plan_pool(dataclasses.replace(plan, budget=dataclasses.replace(budget, available_bytes=fixed)),
                  page_size=8, max_seqs=4, token_budget=32, utilization=1.0)  # fmt: skip


@pytest.mark.parametrize("arch", FAMILIES)
def test_several_decode_steps_per_dispatch_give_what_single_steps_give(arch):
    """decode_steps=4 runs four decode steps in one device loop: the tokens, finish reasons and logprobs of a
    batch (greedy, seeded sampling with a repeat penalty, one max_tokens that ends inside a dispatch) are those
    of single steps, and every page comes back."""
    model = _model(arch)
    prompts = _prompts(model.config.vocab_size, lengths=(3, 29, 11))
    kws = [
        dict(max_tokens=11, logprobs=2),
        dict(max_tokens=9, temperature=0.9, top_k=20, seed=7, repeat_penalty=1.3),
        dict(max_tokens=6, temperature=0.7, seed=3),
    ]
    runs = {}
    for steps in (1, 4):
        engine = Engine(model, **ENGINE, decode_steps=steps)
        ids = [engine.add_request(p, **kw) for p, kw in zip(prompts, kws, strict=True)]
        out = _drive(engine)
        runs[steps] = [out[i] for i in ids]
        assert engine.pool.n_used == 0 and sorted(engine.free_slots) == list(range(engine.max_seqs))
    for single, multi in zip(runs[1], runs[4], strict=True):
        assert multi[0] == single[0] and multi[1] == single[1]
        if single[2] is not None:
            np.testing.assert_allclose([lp for lp, _ in multi[2]], [lp for lp, _ in single[2]], rtol=1e-5, atol=1e-5)


def test_several_decode_steps_end_at_a_stop_string_and_stream_whole_outputs():
    """A stop string met inside a dispatch ends the request there (the tokens sampled after it are dropped), and
    a dispatch's tokens arrive as one output per request."""
    model = _model("llama")
    prompt = _prompts(model.config.vocab_size, lengths=(9,))[0]
    single = Engine(model, **ENGINE, decode_steps=1)
    rid = single.add_request(prompt, max_tokens=20)
    texts = []
    while single.has_unfinished():
        texts += [o.text for o in single.step() if o.request_id == rid]
    full = "".join(texts)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = _alone(model, prompt, max_tokens=20, stop=[stop])
    engine = Engine(model, **ENGINE, decode_steps=4)
    rid = engine.add_request(prompt, max_tokens=20, stop=[stop])
    sizes = []
    got = []
    while engine.has_unfinished():
        for o in engine.step():
            sizes.append(len(o.token_ids))
            got += o.token_ids
    assert got == expected[0] and max(sizes) > 1
    assert engine.pool.n_used == 0
