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
