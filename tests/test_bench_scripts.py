"""The benchmark scripts in benchmarks/ (not a package, so loaded from their paths): the decode profiler's trace
parser on a hand-made trace and end to end on CPU, and the roofline plot on a fake e2e.py result."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
import sys
import time
from types import ModuleType

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def meta(pid: int, name: str, tid: int | None = None) -> dict:
    e = dict(ph="M", pid=pid, name="thread_name" if tid is not None else "process_name", args=dict(name=name))
    return e if tid is None else dict(e, tid=tid)


def kernel(pid: int, name: str, dur: float, module: str = "jit_decode_step") -> dict:
    return dict(ph="X", pid=pid, tid=14, ts=0.0, dur=dur, name=name, args=dict(hlo_module=module, hlo_op="op"))


def gpu_trace() -> dict:
    """Two decode steps on a GPU, plus a prefill kernel and host events that must not count."""
    step = [
        kernel(1, "pallas_qmatmul_mxfp4", 10.0),
        kernel(1, "pallas_qmatmul_mxfp4", 20.0),
        kernel(1, "loop_add_fusion", 3.0),
        kernel(1, "input_reduce_fusion_3", 5.0),
        kernel(1, "loop_dynamic_update_slice_fusion", 2.0),
    ]
    return dict(
        traceEvents=[
            meta(1, "/device:GPU:0"),
            meta(1, "Stream #14(MemcpyD2D,Compute)", tid=14),
            meta(701, "/host:CPU"),
            *step,
            *step,
            kernel(1, "pallas_qmatmul_mxfp4", 1000.0, module="jit_prefill_step"),
            dict(ph="X", pid=701, tid=3, ts=0.0, dur=500.0, name="loop_add_fusion", args=dict(hlo_op="x")),
            dict(ph="X", pid=701, tid=3, ts=0.0, dur=500.0, name="$builtins isinstance"),
            {},
        ]
    )


def test_profile_parser_gpu_trace(tmp_path):
    prof = load_script("profile_decode")
    nested = tmp_path / "plugins" / "profile" / "run1"
    nested.mkdir(parents=True)
    with gzip.open(nested / "perfetto_trace.json.gz", "wt") as f:
        json.dump(gpu_trace(), f)
    path = prof.find_trace(tmp_path)
    assert path == nested / "perfetto_trace.json.gz"
    events = prof.device_events(prof.load_trace(path))
    assert len(events) == 10  # host events and the prefill kernel dropped
    r = prof.breakdown(events, steps=2)
    assert r["device_us_per_step"] == pytest.approx(40.0)
    cats = {c["label"]: c for c in r["categories"]}
    assert cats["quantized matmul (Pallas)"]["us_per_step"] == pytest.approx(30.0)
    assert cats["quantized matmul (Pallas)"]["kernels_per_step"] == 2
    assert cats["quantized matmul (Pallas)"]["pct"] == pytest.approx(75.0)
    assert cats["reductions (norms, split-K sums, softmax)"]["us_per_step"] == pytest.approx(5.0)
    assert cats["copies / cache updates"]["us_per_step"] == pytest.approx(2.0)
    assert cats[prof.OTHER]["us_per_step"] == pytest.approx(3.0)
    assert sum(c["pct"] for c in r["categories"]) == pytest.approx(100.0)
    top = r["kernels"][0]
    assert (top["name"], top["us_per_step"], top["calls_per_step"]) == ("pallas_qmatmul_mxfp4", 30.0, 2)
    table = prof.tables(r)
    assert "| quantized matmul (Pallas) | 30.0 | 75.0% | 2.0 |" in table
    assert "| `input_reduce_fusion_3` | 5.0 | 1.0 |" in table
    assert "dense matmul" not in table  # empty categories are left out


def test_profile_categories():
    prof = load_script("profile_decode")
    assert prof.category("pallas_decode_attention_mosaic_gpu_kernel") == "decode attention (Pallas)"
    assert prof.category("pallas_flash_attention_mosaic_gpu_kernel") == "flash attention (Pallas)"
    assert prof.category("nvjet_hsh_128x64_64x4_1x2_v_bz_coopB_TNN") == "dense matmul (cuBLAS/XLA dot)"
    assert prof.category("select_dynamic-update-slice_fusion") == "copies / cache updates"
    assert prof.category("MemcpyD2D") == "copies / cache updates"
    assert prof.category("loop_convert_fusion") == prof.OTHER


def test_profile_parser_cpu_fallback():
    """No GPU process: the host events naming an HLO op, of the decode module only."""
    prof = load_script("profile_decode")
    events = [
        meta(701, "/host:CPU"),
        dict(ph="X", pid=701, tid=1, dur=4.0, name="dot.3", args=dict(hlo_module="jit_decode_step", hlo_op="dot.3")),
        dict(ph="X", pid=701, tid=1, dur=9.0, name="dot.3", args=dict(hlo_module="jit_prefill_step", hlo_op="dot.3")),
        dict(ph="X", pid=701, tid=1, dur=9.0, name="ThunkExecutor::Execute"),
    ]
    kept = prof.device_events(events)
    assert [e["dur"] for e in kept] == [4.0]
    assert len(prof.device_events(events, module=None)) == 2


def test_profile_decode_cpu_end_to_end(tmp_path, capsys):
    """The whole script on CPU (the fallback parser): a table comes out and the JSON is written."""
    prof = load_script("profile_decode")
    out = tmp_path / "p.json"
    t0 = time.perf_counter()
    rc = prof.main(
        ["--shape", "tiny", "--quant", "q8_0", "--steps", "2", "--trace-dir", str(tmp_path / "tr"), "--json", str(out)]
    )
    assert time.perf_counter() - t0 < 60
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| category | us/step | % of device time | kernels/step |" in text
    assert "| kernel | us/step | calls/step |" in text
    r = json.loads(out.read_text())
    assert r["steps"] == 2 and r["wall_ms_per_step"] > 0 and r["device_busy_ms_per_step"] > 0
    assert r["kernels"] and all(k["calls_per_step"] > 0 for k in r["kernels"])


def test_plot_decode(tmp_path):
    plot = load_script("plot_decode")
    roof = dict(test="tg128", batch=1, gb_per_token=4.3, roofline=680.0)
    rows = [
        dict(roof, engine="imp-jax pallas", shape="qwen3-8b", quant="mxfp4", tok_s=150.0, pct=22.0),
        dict(roof, engine="imp-jax xla", shape="qwen3-8b", quant="mxfp4", tok_s=30.0, pct=4.4),
        dict(engine="imp-jax pallas", shape="qwen3-8b", quant="mxfp4", test="tg128", batch=8, tok_s=900.0),
        dict(engine="imp-jax pallas", shape="qwen3-8b", quant="mxfp4", test="pp512", batch=1, tok_s=9000.0),
        dict(roof, engine="torch bf16", shape="qwen3-8b", quant="bf16", tok_s=40.0, roofline=194.0, pct=20.6),
    ]
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps(dict(copy_gb_s=2930.0, rows=rows)))
    rerun = tmp_path / "rerun.json"
    rerun.write_text(json.dumps(dict(copy_gb_s=2950.0, rows=[dict(rows[0], tok_s=170.0, pct=25.0)])))
    bws, kept = plot.load([str(src), str(rerun)])
    assert bws == [2930.0, 2950.0] and len(kept) == 4
    assert [r["series"] for r in plot.groups(kept)["qwen3-8b"]] == [
        "imp-jax pallas MXFP4", "imp-jax xla MXFP4", "torch bf16", "imp-jax pallas MXFP4 [rerun]",
    ]  # fmt: skip
    mixed = [dict(kept[0], shape="a"), dict(kept[1], shape="b"), dict(kept[0], shape="b")]  # pallas seen first
    assert [r["series"] for r in plot.groups(mixed)["b"]] == ["imp-jax pallas MXFP4", "imp-jax xla MXFP4"]
    png = tmp_path / "roof.png"
    plot.main([str(src), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (500, 1200)


LLAMA_BENCH_JSON = """[
  {"build_commit": "abc", "model_type": "qwen3 8B F16", "n_prompt": 512, "n_gen": 0, "n_batch": 2048,
   "avg_ns": 1, "stddev_ns": 1, "avg_ts": 9000.5, "stddev_ts": 40.0,
   "samples_ns": [1, 1, 1, 1, 1], "samples_ts": [8900.0, 9100.0, 9000.0, 8950.0, 9300.0]},
  {"build_commit": "abc", "model_type": "qwen3 8B F16", "n_prompt": 0, "n_gen": 128, "n_batch": 2048,
   "avg_ns": 1, "stddev_ns": 1, "avg_ts": 180.2, "stddev_ts": 0.5,
   "samples_ns": [1, 1, 1], "samples_ts": [180.0, 181.0, 179.0]}
]"""


def test_vs_llamacpp_parsing():
    """llama-bench -o json and llama-completion's perf printout, as 0.3.36's llama.cpp writes them."""
    vs = load_script("vs_llamacpp")
    r = vs.parse_llama_bench(LLAMA_BENCH_JSON)
    assert r["pp512"]["tok_s"] == 9000.0 and r["pp512"]["n"] == 5 and r["tg128"]["tok_s"] == 180.0
    log = (
        "llama_perf_context_print:        load time =    1234.56 ms\n"
        "llama_perf_context_print:       total time =    2000.00 ms /    34 tokens\n"
    )
    assert vs.parse_load_time(log) == dict(load_ms=1234.56, total_ms=2000.0)
    results = dict(
        f16=dict(gib=15.3, roofline_tok_s=300.0, **{"llama.cpp": r, "imp-jax": {"tg128": dict(tok_s=150.0)}})
    )
    table = vs.table(results)
    assert "| f16 | 15.30 | tg128 | 180.0 | 150.0 | 0.83 | 60% | 50% |" in table
    assert "| f16 | 15.30 | pp512 | 9000.0 | - | - | - | - |" in table
    assert vs.model_files(("q8_0",))["q8_0"].name == "qwen3-8b-q8_0.gguf"


def test_random_gguf_tiny(tmp_path):
    """The random F16 writer at the tiny shape with a byte-level BPE vocabulary: imp-jax loads the file, its
    tokenizer round-trips, and the tokenizer extraction keeps every tokenizer key."""
    import gguf

    import imp_jax
    from tests.test_tokenizer import gpt2_metadata

    rg = load_script("random_gguf")
    vocab = gpt2_metadata({"<|endoftext|>": 3}, ["h e", "l l"])
    src = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(src, "qwen2")
    w.add_tokenizer_model(vocab["tokenizer.ggml.model"])
    w.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
    w.add_token_list(vocab["tokenizer.ggml.tokens"])
    w.add_token_types(vocab["tokenizer.ggml.token_type"].tolist())
    w.add_token_merges(vocab["tokenizer.ggml.merges"])
    w.add_eos_token_id(len(vocab["tokenizer.ggml.tokens"]) - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = tmp_path / "tok.gguf"
    rg.write_tokenizer(src, tok)
    assert set(rg.tokenizer_fields(tok)) == {k for k in gguf.GGUFReader(src).fields if k.startswith("tokenizer.")}
    path = tmp_path / "tiny-f16.gguf"
    size = rg.write_model(rg.SHAPES["tiny"], tok, path)
    assert size == path.stat().st_size
    model = imp_jax.load(path, max_context=64, progress=False)
    assert model.config.n_layers == 2 and model.config.vocab_size == len(vocab["tokenizer.ggml.tokens"])
    ids = model.tokenizer.encode("hello")
    assert model.tokenizer.decode(ids) == "hello"


def test_serving_benchmark_tiny_on_cpu(tmp_path, capsys):
    """The serving table on a tiny shape: every concurrency and decode-steps setting gets a positive decode rate
    and a row, no step compiles inside a timed window, and several steps per dispatch decode every token a single
    step does. ``--profile`` adds a traced
    round's per-step breakdown (here XLA:CPU's thunks, as profile_decode.py falls back to)."""
    serving = load_script("serving")
    out = tmp_path / "s.json"
    argv = ["--models", "tiny:q8_0", "--concurrency", "1,4", "--prompt", "20", "--output", "6", "--json", str(out)]
    assert serving.main([*argv, "--decode-steps", "1,2", "--profile", "4"]) == 0
    assert "| tiny | q8_0 | 2 | 4 | 20+6 |" in capsys.readouterr().out
    assert all(r["compiles"] == 0 for r in json.loads(out.read_text()))  # the warm-up compiled every step timed
    rows = json.loads(out.read_text())
    assert [(r["decode_steps"], r["concurrency"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all(r["tok_s"] > 0 for r in rows)
    assert rows[1]["decode_tokens"] == rows[3]["decode_tokens"] == 4 * 5  # after each first token, the rest
    assert "profile" not in rows[0] and rows[1]["profile"]["steps"] == 5 and rows[1]["profile"]["kernels"]


def test_serving_benchmark_compiles_nothing_in_its_timed_window(tmp_path):
    """Prompts prefilled one per step (a small token budget) stagger the rows: the first ones decode while the
    last prefill, and a warm-up shorter than the round never ran every row's multi-step decode, which the timed
    round then compiled inside its window (the H100's 64-row figure, 2227 tok/s)."""
    serving = load_script("serving")
    out = tmp_path / "s.json"
    argv = ["--models", "tiny:q8_0", "--concurrency", "8", "--prompt", "64", "--output", "12", "--token-budget", "64",
            "--decode-steps", "2", "--json", str(out)]  # fmt: skip
    assert serving.main(argv) == 0
    assert [r["compiles"] for r in json.loads(out.read_text())] == [0]


def test_command_buffer_benchmark_tiny_on_cpu(tmp_path):
    """Each setting compiles the step and the looped step with its XLA options (the option strings parse on any
    backend) and times them; a row per (program, setting)."""
    script = load_script("command_buffers")
    out = tmp_path / "cb.json"
    argv = ["--shape", "tiny", "--quant", "q8_0", "--tokens", "8", "--loop", "4", "--reps", "1",
            "--settings", "xla-default,with-loops", "--json", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["program"], r["setting"]) for r in rows] == [
        ("decode step", "xla-default"), ("decode step", "with-loops"),
        ("4-step loop", "xla-default"), ("4-step loop", "with-loops"),
    ]  # fmt: skip
    assert all("error" not in r and r["tok_s"] > 0 for r in rows)


def test_native_gemv_benchmark_runs_or_says_why_not(capsys):
    """The native-vs-XLA table checks its two products agree before it times them (smallest shapes); where the
    kernel does not build it says so and exits 1."""
    script = load_script("cpu_native_gemv")
    script.SHAPES["tiny"] = (64, 16, 96, 2, 512)
    code = script.main(["--model", "tiny"])
    out = capsys.readouterr().out
    assert (code, "| output head |" in out) == (0, True) or (code, "does not build" in out) == (1, True)
