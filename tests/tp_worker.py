"""The tensor-parallel checks, run in a child process of tests/test_tensor_parallel.py with four simulated CPU
devices (the flag must be set before JAX starts, and the rest of the suite keeps one device). Prints one JSON
object: check name -> its measurements, or the error it raised."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + os.environ.get("XLA_FLAGS", "")
os.environ["JAX_PLATFORMS"] = "cpu"

import gguf
import jax
import jax.numpy as jnp
import numpy as np

import imp_jax
from imp_jax.errors import ModelTooLarge
from imp_jax.planning import devices as per_device
from imp_jax.planning.memory import check_fits, plan_memory
from imp_jax.runtime import steps
from imp_jax.weights import sharding
from imp_jax.weights.loading import abstract_leaf
from imp_jax.weights.synthetic import synthetic_params, synthetic_specs
from imp_jax.weights.tensor_spec import TensorSpec, is_spec
from tests.tiny_gguf import write_tiny_llama

TPS = (1, 2, 4)
IDS = [1, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10]


def whole_where_split(specs, params, mesh) -> list[str]:
    """Leaves the rules split over tp that some device nevertheless holds whole (from the arrays' shardings)."""
    bad = []

    def check(spec: TensorSpec, leaf) -> None:
        if sharding.TP not in sharding.dim_axes(spec, sharding.tp_size(mesh)):
            return
        for array in jax.tree.leaves(leaf):
            if any(s.data.shape == array.shape for s in array.addressable_shards):
                bad.append(spec.labels[0])

    jax.tree.map(check, specs, params, is_leaf=is_spec)
    return bad


def _specs(specs) -> list[TensorSpec]:
    return [s for s in jax.tree.leaves(specs, is_leaf=is_spec) if isinstance(s, TensorSpec)]


def synthetic_logits(shape: str, quant: str) -> dict:
    cfg, specs = synthetic_specs(shape, quant, "float32")
    params = synthetic_params(specs, jax.random.key(0), config=cfg)
    out, whole, split = {}, {}, {}
    for tp in TPS:
        mesh = sharding.make_mesh(tp)
        placed = sharding.shard_params(params, specs, mesh)
        logits, _ = steps.run_prefill(placed, sharding.on_mesh(cfg, mesh), IDS, 32, jnp.float32, all_logits=True)
        out[tp] = np.asarray(logits[0, : len(IDS)])
        if mesh is not None:
            whole[tp] = whole_where_split(specs, placed, mesh)
            split[tp] = sum(sharding.TP in sharding.dim_axes(s, tp) for s in _specs(specs))
    return _compare(out) | {"whole": whole, "split": split}


def _compare(out: dict) -> dict:
    scale = float(np.abs(out[1]).max())
    return {"scale": scale, "diff": {tp: float(np.abs(out[tp] - out[1]).max()) for tp in out if tp != 1}}


def loaded(path: Path) -> dict:
    out, whole = {}, {}
    for tp in TPS:
        model = imp_jax.load(path, dtype="float32", max_context=64, devices=tp, progress=False, compile_cache=False)
        out[tp] = model.logits(IDS)
        if tp > 1:
            whole[tp] = whole_where_split(model.plan.specs, model.params, model.config.mesh)
    return _compare(out) | {"whole": whole}


def planned(path: Path) -> dict:
    plans = {tp: plan_memory(path, devices=tp, max_context=64, dtype="float32", device_memory="4GiB") for tp in (1, 2)}
    two = plans[2]
    expected = []  # each device's weights from the rules alone: split leaves divided, the rest whole
    for spec in _specs(two.specs):
        nbytes = per_device._bytes(abstract_leaf(spec))
        expected.append(nbytes // (2 if sharding.TP in sharding.dim_axes(spec, 2) else 1))
    run = max(two.kv_cache_bytes + two.state_bytes + two.workspace_bytes, two.load_transient_bytes)
    return {
        "device_weights": {tp: list(p.device_weights) for tp, p in plans.items()},
        "weights": {tp: p.weights_bytes for tp, p in plans.items()},
        "kv": {tp: p.kv_cache_bytes for tp, p in plans.items()},
        "expected_weights": sum(expected),
        "peaks": [p for _, p in two.device_peaks],
        "expected_peak": two.device_weights[0] + run,
        "report": two.report(),
    }


def too_large(path: Path) -> dict:
    roomy = plan_memory(
        path, devices=1, max_context=64, dtype="float32", device_memory="4GiB", headroom=1, path="packed"
    )
    n, needed = per_device.devices_needed(roomy)
    budget = (needed + roomy.needed_bytes) // 2
    tight = plan_memory(
        path, devices=1, max_context=64, dtype="float32", device_memory=budget, headroom=1, path="packed"
    )
    try:
        check_fits(tight)
    except ModelTooLarge as e:
        return {"message": str(e), "devices": n}
    return {"message": "", "devices": n}


def batched(path: Path) -> dict:
    prompts = [IDS[:5], IDS[3:], IDS[:2]]
    out = {}
    for tp in (1, 2):
        model = imp_jax.load(
            path, dtype="float32", max_context=64, batch=4, devices=tp, progress=False, compile_cache=False
        )
        out[tp] = [g.token_ids for g in imp_jax.generate(model, prompts, max_tokens=6)]
    return out


def command_line(path: Path) -> dict:
    """``imp-jax generate --tp N`` as a user runs it (stdout: the continuation), and ``serve`` taking ``--tp``."""
    from imp_jax import cli

    texts = {}
    for tp in (1, 2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["generate", "--model", str(path), "--tp", str(tp), "-n", "6", "--quiet", "hello"])
        texts[tp] = (code, out.getvalue())
    serve_tp = cli.build_parser().parse_args(["serve", "--model", str(path), "--tp", "2"]).tp
    return {"texts": texts, "serve_tp": serve_tp}


def main(folder: str) -> None:
    folder_path = Path(folder)
    q8 = write_tiny_llama(folder_path / "tiny-q8.gguf")
    f16 = write_tiny_llama(folder_path / "tiny-f16.gguf", qtype=gguf.GGMLQuantizationType.F16)
    checks = {
        "devices": lambda: len(jax.devices()),
        "dense-q8_0": lambda: synthetic_logits("tiny", "q8_0"),
        "hybrid": lambda: synthetic_logits("tiny-hybrid", "q8_0"),
        "moe": lambda: synthetic_logits("tiny-moe", "q4_k"),
        "gpt-oss": lambda: synthetic_logits("tiny-gpt-oss", "mxfp4"),
        "load-q8_0": lambda: loaded(q8),
        "load-f16": lambda: loaded(f16),
        "plan": lambda: planned(q8),
        "too-large": lambda: too_large(q8),
        "batched": lambda: batched(q8),
        "cli": lambda: command_line(q8),
    }
    only = sys.argv[2:] or list(checks)
    results = {}
    for name in only:
        try:
            results[name] = {"ok": checks[name]()}
        except Exception:  # reported to the parent test, which fails with the traceback
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
