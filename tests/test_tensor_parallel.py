"""Tensor parallelism on four simulated CPU devices (tests/tp_worker.py, in a child process: the device count is
fixed when JAX starts, and this process keeps one device). tp 1, 2 and 4 give the same f32 logits for a dense
model, the GDN hybrid, an MoE and gpt-oss, with quantized and dense leaves, synthetic and loaded from a file; no
device holds whole a matrix the rules split; the per-device plan adds up; batched serving works at tp 2; the CLI's --tp
gives what tp 1 gives.

The same through the Pallas kernels per shard (``ops.sharded``, run in Mosaic GPU's interpreter): each device's
repacked leaf is exactly ``pallas.repack`` of its own sub-matrix, the logits at tp 2 and 4 are tp 1's, the plan
of a load with the kernels is what each device then holds, and the sharded kernels lower for CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # of the logits' scale
# The kernels' own tolerance against the reference (relative error in the norm, tests/test_pallas_qmatmul.py): they
# read bf16 operands, and a row-parallel shard rounds its partial product to bf16 before the all-reduce.
KERNEL_TOL = 1e-2


# The checks whose Pallas kernels run in the interpreter take most of the time: they run in a second worker
# beside the first, one per core (the rest of tp_worker.py's checks go to the first).
SLOW_CHECKS = ("kernel-moe-q4_k", "kernel-gpt-oss-mxfp4")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, str(ROOT / "tests" / "tp_worker.py")]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = [
        subprocess.Popen([*worker, str(tmp_path_factory.mktemp("tp")), *checks], **pipes)
        for checks in ((f"--except={','.join(SLOW_CHECKS)}",), SLOW_CHECKS)
    ]
    merged = {}
    for worker in workers:
        out, err = worker.communicate(timeout=2400)
        assert worker.returncode == 0, err[-4000:]
        merged |= json.loads(out.strip().splitlines()[-1])
    return merged


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
    assert r["texts"]["2"] == r["texts"]["1-stored"] == r["texts"]["1"]
    assert r["stored_steps"] > 0
    assert r["texts"]["1"][0] == 0 and r["texts"]["1"][1].strip()
    assert r["serve_tp"] == 2


@pytest.mark.parametrize(
    ("name", "layouts"),
    [
        ("kernel-dense-q8_0", ["k", "n"]),
        ("kernel-moe-q4_k", ["experts", "n", "whole"]),  # 256-element Q4_K blocks: K of 256 does not split
        ("kernel-gpt-oss-mxfp4", ["experts", "k", "n"]),
        ("kernel-hybrid-q8_0", ["k", "n"]),
    ],
)
def test_kernels_per_shard_give_the_logits_of_one_device(results, name, layouts):
    """tp 2 and 4 through the matmul kernels per shard are as near the f32 reference path as tp 1's kernels
    are, and as near tp 1's kernel logits as the kernels' tolerance allows (for the GDN hybrid, whose recurrence
    amplifies the kernels' bf16 operands, as near as tp 1's kernels are to the reference)."""
    r = _ok(results, name)
    tps = {"2"} if name == "kernel-moe-q4_k" else {"2", "4"}  # (tests/tp_worker.py: the interpreter's time)
    one = r["to_reference"]["1"]
    assert all(err < 1.25 * one for err in r["to_reference"].values()), r["to_reference"]
    assert set(r["to_tp1"]) == tps
    for tp, err in r["to_tp1"].items():
        assert err < max(KERNEL_TOL, one), f"tp {tp}: {err} from tp 1's kernel logits"
    assert r["whole"] == {tp: [] for tp in tps}, "a device holds whole a matrix the rules split"
    assert r["layouts"] == {tp: layouts for tp in tps}


def test_each_device_holds_the_repack_of_its_own_blocks(results):
    r = _ok(results, "kernel-per-shard")
    for tp in ("2", "4"):
        assert r[tp]["checked"] > 0 and r[tp]["wrong"] == []
        assert r[tp]["layouts"] == ["experts", "k", "n"]


def test_loaded_with_kernels_per_shard_the_plan_is_what_each_device_holds(results):
    r = _ok(results, "kernel-load")
    assert all(err < KERNEL_TOL for err in r["to_tp1"].values()), r["to_tp1"]
    assert r["whole"] == {"2": [], "4": []}
    assert r["plan"] == r["held"] and r["same_tree"] == {"2": True, "4": True}
    assert "rows split over tp" in r["report"] and "K split over tp" in r["report"]
    assert "whole on every device" in r["report"]  # tp 4: the file's 2 kv heads do not split


def test_attention_kernels_per_kv_head_shard(results):
    r = _ok(results, "kernel-attention")
    for tp in ("2", "4"):
        assert r[tp]["prefill"] < KERNEL_TOL and r[tp]["decode"] < KERNEL_TOL
        assert r[tp]["split_by_head"]


def test_sharded_kernels_lower_for_cuda(results):
    """jax.export for CUDA of each layout's matmul and of flash attention inside their shard_map: the Mosaic GPU
    kernels lower, and only the row-parallel and expert products all-reduce."""
    r = _ok(results, "kernel-cuda")
    assert all(v["mosaic"] and v["devices"] == 2 for v in r.values())
    assert {k: v["all_reduce"] for k, v in r.items()} == {"n": 0, "k": 1, "experts": 1, "whole": 0, "flash": 0}
