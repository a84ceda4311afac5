"""The tensor-parallel checks, run in a child process of tests/test_tensor_parallel.py with four simulated CPU
devices (the flag must be set before JAX starts, and the rest of the suite keeps one device). Prints one JSON
object: check name -> its measurements (and its seconds), or the error it raised. Arguments: a folder for its
fixture files, then the checks to run (all by default) or ``--except=NAME,...`` (the test runs two workers side
by side, one per core).

The Pallas kernels run here in Mosaic GPU's CPU interpreter (``KERNELS``), per shard inside ``shard_map``. The
interpreter of JAX 0.11 checks, when one simulated device's kernel ends, that no barrier of *any* device is still
allocated; the other devices run the same kernel concurrently, so that internal check fails at random with more
than one device. It checks the interpreter itself, not the kernel, so this process turns it off
(``_interpret_on_several_devices``); every other check of the interpreter stays on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + os.environ.get("XLA_FLAGS", "")
os.environ["JAX_PLATFORMS"] = "cpu"

import gguf
import jax
import jax.numpy as jnp
import numpy as np

import imp_jax
import pallas
from imp_jax import ops
from imp_jax.errors import ModelTooLarge
from imp_jax.gguf.qtensor import QTensor
from imp_jax.ops import sharded as sharded_ops
from imp_jax.ops.sharded import ShardedWeight
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
KERNELS = ops.KernelPolicy(matmul=True, attention=True, interpret=True)  # as on a Hopper GPU, interpreted


def _interpret_on_several_devices() -> None:
    """Drop the interpreter's end-of-kernel check that no barrier of any device is allocated (see the module
    docstring): with several simulated devices it races with the others' kernels."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    gpu_callbacks._assert_no_barriers_allocated = lambda token: token


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


def kernel_logits(shape: str, quant: str, ids: list[int] = IDS, tps: tuple[int, ...] = TPS) -> dict:
    """The f32 logits of ``ids`` with the matmul kernels per shard (interpreted) at each of ``tps``, beside tp 1
    on the reference path; which layouts the repacked leaves took, and whether a device holds a split matrix
    whole."""
    cfg, specs = synthetic_specs(shape, quant, "float32")
    params = synthetic_params(specs, jax.random.key(0), config=cfg)
    matmul_only = ops.KernelPolicy(matmul=True, interpret=True)  # (the attention kernels read bf16 only)
    reference, _ = steps.run_prefill(params, cfg, ids, 32, jnp.float32, all_logits=True)
    ref = np.asarray(reference[0, : len(ids)])
    out, whole, layouts = {}, {}, {}
    for tp in tps:
        mesh = sharding.make_mesh(tp)
        placed = sharding.shard_params(params, specs, mesh, matmul_only)
        if mesh is None:
            placed = synthetic_params(specs, jax.random.key(0), config=cfg, kernels=matmul_only)
        logits, _ = steps.run_prefill(
            placed, sharding.on_mesh(cfg, mesh), ids, 32, jnp.float32, all_logits=True, kernels=matmul_only
        )
        out[tp] = np.asarray(logits[0, : len(ids)])
        if mesh is not None:
            whole[tp] = whole_where_split(specs, placed, mesh)
            leaves = jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, ShardedWeight))
            layouts[tp] = sorted({w.layout.split or "whole" for w in leaves if isinstance(w, ShardedWeight)})
    return {
        "to_reference": {tp: _rel(y, ref) for tp, y in out.items()},
        "to_tp1": {tp: _rel(y, out[1]) for tp, y in out.items() if tp != 1},
        "whole": whole,
        "layouts": layouts,
    }


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """Relative error in the norm, as the kernel tests measure it (tests/test_pallas_qmatmul.py::rel_err)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _on(array: jax.Array, device) -> np.ndarray:
    return np.asarray(next(s.data for s in array.addressable_shards if s.device == device))


def per_shard_repack(shape: str, quant: str) -> dict:
    """Every device's part of every repacked leaf is exactly ``pallas.repack`` of that device's blocks (its
    sub-matrix, or its experts), layer by layer."""
    cfg, specs = synthetic_specs(shape, quant, "float32")
    params = synthetic_params(specs, jax.random.key(1), config=cfg)
    tree = jax.tree.structure(specs, is_leaf=is_spec)
    out = {}
    for tp in (2, 4):
        mesh = sharding.make_mesh(tp)
        blocks = tree.flatten_up_to(sharding.shard_params(params, specs, mesh))  # QTensors, split by the rules
        packed = tree.flatten_up_to(sharding.shard_params(params, specs, mesh, KERNELS))
        pairs = [(spec, q, w) for spec, q, w in zip(_specs(specs), blocks, packed, strict=True)]
        repacked = [(spec, q, w) for spec, q, w in pairs if isinstance(w, ShardedWeight)]
        wrong = [m for spec, q, w in repacked for m in _shard_mismatches(spec, q, w, mesh)]
        layouts = sorted({w.layout.split or "whole" for _, _, w in repacked})
        out[tp] = {"checked": len(repacked), "wrong": wrong, "layouts": layouts}
    return out


def _shard_mismatches(spec: TensorSpec, q: QTensor, w: ShardedWeight, mesh) -> list[str]:
    """Where the shards of ``w`` differ from ``pallas.repack`` of the same device's blocks of ``q``."""
    wrong = []
    for device in mesh.devices.flat:
        mine = _on(q.data, device)
        units = mine.reshape(-1, *mine.shape[-2:])
        local = w.layout.shard_shape(w.shape)
        want = [pallas.repack(QTensor(jnp.asarray(u), None, q.qtype, local)) for u in units]
        got = [_on(a, device) for a in (w.qs, *w.scales)]
        for i, one in enumerate(want):
            for g, a in zip(got, (one.qs, *one.scales), strict=True):
                if not np.array_equal(g.reshape(len(want), *a.shape)[i], np.asarray(a)):
                    wrong.append(f"{spec.labels[0]} on {device}, unit {i}")
    return wrong


def kernel_load(path: Path) -> dict:
    """A file loaded with the kernels at tp 1, 2 and 4: the logits beside tp 1 on the reference path, no matrix
    whole on a device, and the per-device plan equal to the bytes each device holds after the load (the plan's
    abstract leaves, shardings included, are what the loader made)."""
    policy = ops.KernelPolicy(matmul=True, interpret=True)
    args = dict(dtype="float32", max_context=64, progress=False, compile_cache=False)
    ref = imp_jax.load(path, devices=1, kernels=ops.KernelPolicy(), **args).logits(IDS)
    logits, whole, plans, held, same_tree = {}, {}, {}, {}, {}
    for tp in TPS:
        model = imp_jax.load(path, devices=tp, kernels=policy, **args)
        logits[tp] = model.logits(IDS)
        if tp > 1:
            mesh = model.config.mesh
            whole[tp] = whole_where_split(model.plan.specs, model.params, mesh)
            plans[tp] = list(model.plan.device_weights)
            held[tp] = list(sharding.device_bytes(model.params, mesh))
            same_tree[tp] = jax.tree.all(
                jax.tree.map(
                    lambda a, r: a.shape == r.shape and a.dtype == r.dtype and a.sharding == r.sharding,
                    model.plan.abstract_params,
                    model.params,
                )
            )
            report = model.plan.report()
    return {
        "to_reference": {tp: _rel(y, ref) for tp, y in logits.items()},
        "to_tp1": {tp: _rel(y, logits[1]) for tp, y in logits.items() if tp != 1},
        "whole": whole,
        "plan": plans,
        "held": held,
        "same_tree": same_tree,
        "report": report,
    }


def kernel_attention() -> dict:
    """The attention kernels per kv-head shard (interpreted, bf16): flash prefill and paged decode through
    ``ops`` over a mesh, beside the jnp reference on the whole heads."""
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(0)
    b, t, h, kv, hd, page, n_pg, layers = 2, 3, 8, 4, 64, 16, 4, 2

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)

    q, k, v = arr(b, 70, h, hd), arr(b, 70, kv, hd), arr(b, 70, kv, hd)
    qd, k_pages, v_pages = arr(b, t, h, hd), arr(layers, b * n_pg, page, kv, hd), arr(layers, b * n_pg, page, kv, hd)
    sinks = jnp.asarray(rng.standard_normal(h), jnp.float32)
    table = jnp.arange(b * n_pg, dtype=jnp.int32).reshape(b, n_pg)
    q_pos = jnp.asarray([[40, 41, 42], [7, 8, 9]], jnp.int32)
    opts = dict(scale=0.125, sinks=sinks)
    want_prefill = ops.attention_prefill(q, k, v, window=16, **opts)
    want_decode = ops.attention_paged(qd, k_pages, v_pages, q_pos, 1, table, **opts)
    out = {}
    for tp in (2, 4):
        mesh = sharding.make_mesh(tp)

        def split(a, axis, mesh=mesh):
            spec = [None] * a.ndim
            spec[axis] = sharding.TP
            return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))

        kw = dict(opts, sinks=split(sinks, 0), kernels=KERNELS, mesh=mesh)
        prefill = jax.jit(lambda q, k, v, kw=kw: ops.attention_prefill(q, k, v, window=16, **kw))
        decode = jax.jit(lambda q, kp, vp, kw=kw: ops.attention_paged(q, kp, vp, q_pos, 1, table, **kw))
        got_prefill = prefill(split(q, 2), split(k, 2), split(v, 2))
        got_decode = decode(split(qd, 2), split(k_pages, 3), split(v_pages, 3))
        out[tp] = {
            "prefill": _rel(np.asarray(got_prefill, np.float32), np.asarray(want_prefill, np.float32)),
            "decode": _rel(np.asarray(got_decode, np.float32), np.asarray(want_decode, np.float32)),
            "split_by_head": got_decode.sharding.spec == PartitionSpec(None, None, sharding.TP, None),
        }
    return out


def cuda_lowering() -> dict:
    """The sharded step's kernels through the whole Mosaic GPU lowering for CUDA on this CPU box
    (``jax.export``): the matmul of each layout and the attention kernels, inside their shard_map."""
    from jax.sharding import NamedSharding, PartitionSpec

    sds = jax.ShapeDtypeStruct
    mesh = sharding.make_mesh(2)
    policy = ops.KernelPolicy(matmul=True, attention=True)
    lowered = {}
    for split in (sharded_ops.N, sharded_ops.K, sharded_ops.EXPERTS, sharded_ops.WHOLE):
        layout = sharded_ops.ShardLayout(mesh, split)
        stack = (4,) if split == sharded_ops.EXPERTS else ()
        stored = QTensor(
            sds((*stack, 512, 512 // 32 * 34), jnp.uint8), None, int(gguf.GGMLQuantizationType.Q8_0), (512, 512)
        )
        w = jax.eval_shape(lambda q, layout=layout: ops.prepare_weight(q, policy, check=False, layout=layout), stored)
        w = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, sharding=s), w, w.shardings())
        if stack:
            x, ids = sds((5, 1, 512), jnp.bfloat16), sds((5,), jnp.int32)
            fn = jax.jit(lambda x, w, ids: ops.expert_matmul(x, w, ids, kernels=policy))
            exported = jax.export.export(fn, platforms=["cuda"])(x, w, ids)
        else:
            x = sds((3, 512), jnp.bfloat16, sharding=NamedSharding(mesh, layout.x_spec(2)))
            fn = jax.jit(lambda x, w: ops.matmul(x, w, kernels=policy))
            exported = jax.export.export(fn, platforms=["cuda"])(x, w)
        text = exported.mlir_module()
        lowered[split or "whole"] = {
            "mosaic": "mosaic_gpu" in text,
            "all_reduce": text.count("all_reduce"),
            "devices": exported.nr_devices,
        }
    heads = NamedSharding(mesh, PartitionSpec(None, None, sharding.TP, None))
    q, k = sds((1, 128, 8, 64), jnp.bfloat16, sharding=heads), sds((1, 128, 4, 64), jnp.bfloat16, sharding=heads)
    fn = jax.jit(lambda q, k, v: ops.attention_prefill(q, k, v, scale=0.125, kernels=policy, mesh=mesh))
    text = jax.export.export(fn, platforms=["cuda"])(q, k, k).mlir_module()
    lowered["flash"] = {"mosaic": "mosaic_gpu" in text, "all_reduce": text.count("all_reduce"), "devices": 2}
    return lowered


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
    # one layout for both (one CPU device would otherwise hold its matrices for the native kernel, tp 2 stacked)
    args = dict(max_context=64, dtype="float32", device_memory="4GiB", kernels="off")
    plans = {tp: plan_memory(path, devices=tp, **args) for tp in (1, 2)}
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


def command_line(path: Path, cache: Path) -> dict:
    """``imp-jax generate --tp N`` as a user runs it (stdout: the continuation), and ``serve`` taking ``--tp``.
    Its compile cache is a new folder: the first run at tp 1 stores the loader's programs and the second reads
    them back, on one device of the four (a stored executable loaded onto all four asked for four arguments)."""
    from imp_jax import cli

    os.environ["IMP_JAX_CACHE"] = str(cache)
    texts = {}
    for run, tp in (("1", 1), ("1-stored", 1), ("2", 2)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["generate", "--model", str(path), "--tp", str(tp), "-n", "6", "--quiet", "hello"])
        texts[run] = (code, out.getvalue())
    serve_tp = cli.build_parser().parse_args(["serve", "--model", str(path), "--tp", "2"]).tp
    steps = sum(1 for _ in (cache / "xla" / "steps").iterdir())
    return {"texts": texts, "serve_tp": serve_tp, "stored_steps": steps}


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
        "cli": lambda: command_line(q8, folder_path / "cli-cache"),
        "kernel-dense-q8_0": lambda: kernel_logits("tiny", "q8_0"),
        "kernel-gpt-oss-mxfp4": lambda: kernel_logits("tiny-gpt-oss", "mxfp4"),
        "kernel-hybrid-q8_0": lambda: kernel_logits("tiny-hybrid", "q8_0"),
        # 4 tokens: the gather path of the experts (gpt-oss's 11 take the grouped one); tp 1 and 2 only, which
        # show all three layouts: the interpreter's Q4_K experts took 6 minutes at tp 1, 2 and 4
        "kernel-moe-q4_k": lambda: kernel_logits("tiny-moe", "q4_k", IDS[:4], tps=(1, 2)),
        "kernel-per-shard": lambda: per_shard_repack("tiny-gpt-oss", "mxfp4"),
        "kernel-load": lambda: kernel_load(q8),
        "kernel-attention": kernel_attention,
        "kernel-cuda": cuda_lowering,
    }
    _interpret_on_several_devices()
    args = sys.argv[2:]
    skip = {name for arg in args if arg.startswith("--except=") for name in arg.removeprefix("--except=").split(",")}
    only = [a for a in args if not a.startswith("--except=")] or [name for name in checks if name not in skip]
    results = {}
    for name in only:
        start = time.perf_counter()
        try:
            results[name] = {"ok": checks[name]()}
        except Exception:  # reported to the parent test, which fails with the traceback
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
