"""Cold start: loading's host memory, the persistent compile cache (reuse, keys, atomic entries), compile counts,
and the segmentation of irregular quant mixes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

import imp_jax
from imp_jax.runtime import compile_cache
from imp_jax.runtime.compiled_steps import CompiledSteps
from imp_jax.weights.specs import segment_plan
from imp_jax.weights.synthetic import more_bits, synthetic_specs

ROOT = Path(__file__).resolve().parent.parent


_RSS_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import jax
    import imp_jax
    from imp_jax.weights.files import open_model_file

    def anon_rss():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    path, cache = sys.argv[1], sys.argv[2]
    largest = max(t.nbytes for t in open_model_file(path).tensors.values())
    # Compile everything once into a fresh cache: programs are not the point (the second load's compile-ahead
    # worker then reads them back instead of compiling beside the transfers).
    imp_jax.load(path, max_context=64, compile_cache=cache)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon_rss())
            time.sleep(0.002)

    base = anon_rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    model = imp_jax.load(path, max_context=64, compile_cache=cache)
    jax.block_until_ready(model.params)
    stop.set()
    sampler.join()
    weights = sum(a.nbytes for a in jax.tree.leaves(model.params))
    print(json.dumps(dict(growth=peak[0] - base, weights=weights, largest=largest)))
    """
)


def test_load_holds_one_tensor_and_a_bounded_chunk_beyond_the_weights(real_model, tmp_path):
    """Anonymous memory (the memmap's file pages excluded) peaks at the weights plus the largest tensor plus the
    loader's bytes in flight, not at twice the model as a host-side stack of every layer would. Measured in a
    new process, as a user's load runs: in this one, earlier tests' heap would blur the peak."""
    from imp_jax.weights.loading import _Loader

    path = real_model("qwen2.5-0.5b")
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(path), str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    bound = r["weights"] + r["largest"] + _Loader.IN_FLIGHT + 64 * 2**20
    assert r["growth"] <= bound, r


_CHILD = textwrap.dedent(
    """
    import json, sys, jax
    hits, compiles, lowered = [], [], []
    jax.monitoring.register_event_listener(lambda n, **_: hits.append(n) if n.endswith("cache_hits") else None)
    jax.monitoring.register_event_listener(lambda n, **_: compiles.append(n) if n.endswith("cache_misses") else None)
    jax.monitoring.register_event_duration_secs_listener(
        lambda n, s, fun_name="", **_: lowered.append(fun_name) if n.endswith("jaxpr_to_mlir_module_duration") else None
    )
    import imp_jax
    model = imp_jax.load(sys.argv[1], max_context=256, dtype=sys.argv[3], compile_cache=sys.argv[2])
    text = imp_jax.generate(model, sys.argv[4], max_tokens=3).text
    print(json.dumps(dict(hits=len(hits), compiles=len(compiles), lowered=lowered, text=text)))
    """
)


def _child(path: Path, cache: Path, dtype: str = "float32", prompt: str = "Hello") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(cache), dtype, prompt],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


_STEPS = {"jit(engine_step)", "jit(prefill_step)", "jit(decode_step)"}


def test_a_second_process_reuses_the_compile_cache(real_model, tmp_path):
    """The second process compiles nothing, writes nothing, and does not even trace and lower the model's steps:
    the plan's statistics and the engine's executables are read back whole (compile_cache.Store); the loader's
    small programs hit JAX's cache."""
    path = real_model("tinycoder")
    first = _child(path, tmp_path)
    written = compile_cache.entries(tmp_path)
    assert written and first["compiles"] > 0
    assert set(first["lowered"]) >= _STEPS
    assert any(e.startswith("steps/") for e in written) and any(e.startswith("plans/") for e in written)
    second = _child(path, tmp_path)
    assert compile_cache.entries(tmp_path) == written, "the second run wrote new entries"
    assert second["hits"] > 0 and second["compiles"] == 0
    assert not _STEPS & set(second["lowered"]), second["lowered"]
    assert second["text"] == first["text"]


def test_the_store_keeps_only_executables_compiled_here(real_model, tmp_path):
    """A store that misses where JAX's own cache hits (the store emptied, or a new imp-jax version over an old JAX
    cache) keeps nothing of those executables: one read back from JAX's cache, serialized again, would load in
    the next process and fail there ("Function ... not found" on XLA:CPU)."""
    import shutil

    path = real_model("tinycoder")
    first = _child(path, tmp_path)
    for kind in compile_cache.Store.KINDS:
        shutil.rmtree(tmp_path / kind)
    second = _child(path, tmp_path)
    assert not list((tmp_path / "steps").glob("*"))
    assert _child(path, tmp_path)["text"] == second["text"] == first["text"]


def test_a_changed_dtype_or_bucket_misses_the_cache(real_model, tmp_path):
    path = real_model("tinycoder")
    _child(path, tmp_path)
    base = compile_cache.entries(tmp_path)
    _child(path, tmp_path, prompt="Hello there")  # same prefill bucket
    assert compile_cache.entries(tmp_path) == base
    _child(path, tmp_path, prompt=" ".join(["word"] * 24))  # a longer bucket (not the plan's 256): a new prefill
    longer = compile_cache.entries(tmp_path)
    assert len(longer) > len(base)
    _child(path, tmp_path, dtype="bfloat16")
    assert len(compile_cache.entries(tmp_path)) > len(longer)


def test_an_interrupted_run_leaves_only_whole_entries(real_model, tmp_path):
    """Kill the process at several points while it compiles and writes; every entry left must read back."""
    from jax._src.compilation_cache import decompress_executable

    path = real_model("tinycoder")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay in (1.0, 2.0, 3.0, 4.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(tmp_path), "float32", "Hi"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for entry in compile_cache.entries(tmp_path):
        blob = (tmp_path / entry).read_bytes()
        if entry.startswith("steps/"):
            pickle.loads(blob)
        elif entry.startswith("plans/"):
            json.loads(blob)
        else:
            decompress_executable(blob)
    assert _child(path, tmp_path)["text"]


def test_atomic_put_never_leaves_a_partial_entry(tmp_path, monkeypatch):
    cache = compile_cache.AtomicCache(str(tmp_path), max_size=-1)

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        cache.put("key", b"x" * 1000)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    cache.put("key", b"y" * 10)
    assert cache.get("key") == b"y" * 10


def test_nothing_compiles_twice_and_the_first_generation_runs_what_load_compiled(real_model):
    """load compiles the engine's first prefill bucket and decode step ahead (from the abstract params, while the
    weights stream); the first generation runs those executables and two prompts of different lengths in that
    bucket compile nothing more: no XLA compile at all once load's have finished."""
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda n, s, fun_name="", **_: compiles.append(fun_name) if n.endswith("backend_compile_duration") else None
    )
    model = imp_jax.load(real_model("tinycoder"), max_context=64, dtype="float32", compile_cache=False)
    assert [dict(key[1])["decode"] for key in model.programs.compiled] == [False, True]  # prefill, decode
    loaded = len(compiles)
    first = imp_jax.generate(model, [1, 2, 3], max_tokens=4)
    imp_jax.generate(model, [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=6)
    assert len(model.programs.compiled) == 2
    during = compiles[loaded:]
    assert set(during) <= {"jit(engine_step)"} and compiles.count("jit(engine_step)") == 2, during
    model.programs = CompiledSteps()  # nothing compiled ahead: each step compiles on its first call, the same way
    assert imp_jax.generate(model, [1, 2, 3], max_tokens=4).token_ids == first.token_ids
    assert len(model.programs.compiled) == 2


def test_k_quant_medium_mixes_scan_in_few_segments():
    """A 36-layer Q4_K_M file (Q6_K attn_v / ffn_down by llama.cpp's use_more_bits) is 19 runs of equal
    neighbouring layers; the segment plan makes it 3 scans: (Q6_K) x 3, (Q6_K, Q4_K, Q4_K) x 9, (Q6_K) x 6."""
    pattern = ["6" if more_bits(i, 36) else "4" for i in range(36)]
    assert segment_plan(pattern) == [(0, 3, 1), (3, 30, 3), (30, 36, 1)]
    assert segment_plan(list("aaaa")) == [(0, 4, 1)]
    assert segment_plan(list("abababa")) == [(0, 1, 1), (1, 7, 2)]
    _, specs = synthetic_specs("qwen3-8b", "q4_k_m")
    assert [len(unit) for unit in specs.segments] == [1, 3, 1]
    assert [len(jax.tree.leaves(unit[0])[0].names) for unit in specs.segments] == [3, 9, 6]


def test_a_multi_layer_scan_unit_computes_what_one_layer_at_a_time_does():
    """The segment plan's units of several layers (a Q4_K_M mix of 8 layers: Q6_K, (Q4_K, Q4_K, Q6_K) x 2, Q6_K)
    give the same logits as the same weights run one layer per segment."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from imp_jax.models.decoder import forward
    from imp_jax.runtime.cache import init_cache
    from imp_jax.weights.synthetic import SHAPES, SyntheticShape, synthetic_params

    tiny = SHAPES["tiny"]
    keys = tuple((k, 8 if k == "block_count" else v) for k, v in tiny.keys)
    shape = SyntheticShape("tiny-8", tiny.arch, keys)
    cfg, specs = synthetic_specs(shape, "q4_k_m", "float32")
    assert max(len(unit) for unit in specs.segments) == 3
    params = synthetic_params(specs, jax.random.key(0), config=cfg)
    layered = []
    for unit in params.segments:
        for r in range(jax.tree.leaves(unit)[0].shape[0]):
            layered.extend((jax.tree.map(lambda a, r=r: a[r : r + 1], layer),) for layer in unit)
    one_by_one = dataclasses.replace(params, segments=tuple(layered))
    tokens = jnp.asarray([[3, 17, 99, 5, 42, 7]], jnp.int32)
    pos = jnp.arange(6)[None]

    def logits(p):
        out, _ = forward(p, cfg, tokens, pos, init_cache(cfg, 1, 8, jnp.float32), decode=False)
        return np.asarray(out)

    np.testing.assert_allclose(logits(params), logits(one_by_one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv", [["--help"], ["plan", "--help"], ["pull", "--help"], ["generate"], ["bench", "--pp", "x"]]
)
def test_the_cli_imports_no_jax_before_it_needs_it(argv):
    """Help and argument errors answer at once: no JAX import, no device query."""
    code = (
        "import sys\nfrom imp_jax.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('JAX' if 'jax' in sys.modules else 'NOJAX')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert out.stdout.strip().splitlines()[-1] == "NOJAX", out.stderr[-500:]


def test_load_says_where_its_time_went(real_model):
    """``Model.load_timings``: every phase of load() in order, adding up to no more than the whole call."""
    t0 = time.perf_counter()
    model = imp_jax.load(real_model("tinycoder"), max_context=64, progress=False, compile_cache=False)
    total = time.perf_counter() - t0
    timings = model.load_timings
    assert list(timings) == ["open_s", "tokenizer_s", "plan_s", "engine_s", "weights_s"]
    assert all(v >= 0 for v in timings.values()) and sum(timings.values()) <= total


def test_store_keys_change_with_what_changes_a_program(tmp_path, monkeypatch):
    """A store entry is found only for the same program: another kernel policy, dtype or bucket is another
    description, and another machine (device kind, XLA flags, jax version, imp-jax source) another fingerprint."""
    from imp_jax.ops.policy import REFERENCE, KernelPolicy

    def square(x, *, kernels):
        return x * x

    x16, x32 = jax.ShapeDtypeStruct((16,), "float32"), jax.ShapeDtypeStruct((32,), "float32")
    base = compile_cache.program_key(square, (x16,), dict(kernels=REFERENCE))
    assert base == compile_cache.program_key(square, (x16,), dict(kernels=REFERENCE))
    others = {
        compile_cache.program_key(square, (x16,), dict(kernels=KernelPolicy(matmul=True))),
        compile_cache.program_key(square, (x32,), dict(kernels=REFERENCE)),
        compile_cache.program_key(square, (jax.ShapeDtypeStruct((16,), "bfloat16"),), dict(kernels=REFERENCE)),
    }
    assert base not in others and len(others) == 3
    here = compile_cache.fingerprint()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert compile_cache.fingerprint() != here
    a, b = compile_cache.Store(tmp_path, here), compile_cache.Store(tmp_path, "another machine")
    a.put_record(base, {"steps": [[1, 2]]})
    assert a.record(base) == {"steps": [[1, 2]]} and b.record(base) is None
    (tmp_path / "plans" / next(p.name for p in (tmp_path / "plans").iterdir())).write_bytes(b"\xff torn")
    assert a.record(base) is None and not list((tmp_path / "plans").iterdir())  # a damaged entry is dropped


def test_only_what_xla_compiles_here_counts_as_new(_private_compile_cache):
    """compile_new's answer decides what the store keeps: a program XLA compiles is new; the same program again
    is not (JAX hands back the executable it holds, which may itself have come from its persistent cache)."""
    import jax.numpy as jnp

    compile_cache.enable(_private_compile_cache)
    unique = float(time.time_ns() % 10**6)  # a program no earlier run compiled
    f = jax.jit(lambda x: x * unique + 1)
    x = jnp.arange(7.0)
    assert compile_cache.compile_new(f.lower(x))[1]
    assert not compile_cache.compile_new(f.lower(x))[1]


def test_a_new_version_stores_the_steps_jax_already_cached(_private_compile_cache, tmp_path):
    """After an upgrade (a new fingerprint) that leaves a step's program as it was, JAX's cache still holds the old
    version's executable. Were that a hit, the store would never get the step and every later process would trace
    it again; the store's compile options make it a miss, so the new version compiles the step once and keeps it."""
    import jax.numpy as jnp

    compile_cache.enable(_private_compile_cache)
    unique = float(time.time_ns() % 10**6)
    f = jax.jit(lambda x: x * unique + 2)
    x = jnp.arange(5.0)
    for version in ("imp-jax 1", "imp-jax 2"):
        CompiledSteps(compile_cache.Store(tmp_path, version)).call(f, (x,), {})
    assert len(list((tmp_path / "steps").iterdir())) == 2
    fresh = CompiledSteps(compile_cache.Store(tmp_path, "imp-jax 2"))
    assert float(fresh.call(f, (x,), {})[1]) == unique + 2  # read back from the store, and it runs


def test_stopping_the_compiles_ahead_waits_for_the_one_in_flight_and_drops_the_rest():
    """What a failed load does (``CompiledSteps.stop``): the compile in flight finishes, the ones not begun are
    forgotten (a later call of their signature compiles afresh), and no worker is left running."""
    import threading

    import numpy as np

    tracing, release = threading.Event(), threading.Event()

    @jax.jit
    def slow(x):
        tracing.set()
        release.wait()
        return x + 1

    steps = CompiledSteps()
    sds = jax.ShapeDtypeStruct
    steps.ahead(slow, [((sds((2,), np.float32),), {}), ((sds((3,), np.float32),), {})])
    assert tracing.wait(30)
    stopper = threading.Thread(target=steps.stop)
    stopper.start()
    while not steps._stopped.is_set():
        stopper.join(0.01)
    release.set()
    stopper.join(30)
    assert not stopper.is_alive() and not any(w.is_alive() for w in steps._workers)
    assert len(steps.compiled) == 1
    np.testing.assert_array_equal(steps.call(slow, (np.zeros(3, np.float32),), {}), np.ones(3, np.float32))
    assert len(steps.compiled) == 2
