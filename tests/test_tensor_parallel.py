"""Tensor parallelism on four simulated CPU devices (tests/tp_worker.py, in a child process: the device count is
fixed when JAX starts, and this process keeps one device). tp 1, 2 and 4 give the same f32 logits for a dense
model, the GDN hybrid, an MoE and gpt-oss, with quantized and dense leaves, synthetic and loaded from a file; no
device holds whole a matrix the rules split; the per-device plan adds up; batched serving works at tp 2; the CLI's --tp
gives what tp 1 gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # of the logits' scale


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    folder = tmp_path_factory.mktemp("tp")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tp_worker.py"), str(folder)],
        capture_output=True, text=True, env=env, timeout=1200, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _ok(results: dict, name: str):
    entry = results[name]
    assert "error" not in entry, entry.get("error")
    return entry["ok"]


def test_four_simulated_devices(results):
    assert _ok(results, "devices") == 4


@pytest.mark.parametrize("name", ["dense-q8_0", "hybrid", "moe", "gpt-oss", "load-q8_0", "load-f16"])
def test_same_logits_at_tp_1_2_4(results, name):
    r = _ok(results, name)
    assert set(r["diff"]) == {"2", "4"}
    for tp, diff in r["diff"].items():
        assert diff <= TOL * r["scale"], f"tp {tp}: logits differ by {diff} (scale {r['scale']})"
    assert r["whole"] == {"2": [], "4": []}, "a device holds whole a matrix the rules split"
    if "split" in r:
        assert min(r["split"].values()) > 0


def test_per_device_plan_adds_up(results):
    r = _ok(results, "plan")
    assert r["device_weights"]["1"] == []
    assert len(r["device_weights"]["2"]) == 2
    assert all(w == r["weights"]["2"] == r["expected_weights"] for w in r["device_weights"]["2"])
    assert r["weights"]["2"] < r["weights"]["1"]
    assert r["kv"]["2"] * 2 == r["kv"]["1"]  # 2 kv heads: one per device
    assert r["peaks"] == [r["expected_peak"]] * 2
    assert "per device (tp 2" in r["report"] and "cpu:1" in r["report"]


def test_too_large_names_the_device_and_the_devices_it_would_take(results):
    r = _ok(results, "too-large")
    assert "cpu:0" in r["message"]
    assert f"devices={r['devices']}" in r["message"]


def test_batched_serving_at_tp_2(results):
    r = _ok(results, "batched")
    assert r["2"] == r["1"]
    assert all(len(ids) == 6 for ids in r["2"])


def test_command_line_takes_tp(results):
    r = _ok(results, "cli")
    assert r["texts"]["2"] == r["texts"]["1"]
    assert r["texts"]["1"][0] == 0 and r["texts"]["1"][1].strip()
    assert r["serve_tp"] == 2
