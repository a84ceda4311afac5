"""Mixture-of-experts FFN: routing and activations against numpy, the selected-expert paths against the dense
reference and a float64 numpy loop, packed expert stacks in Q8_0 / MXFP4 / NVFP4, what decode reads, and
transformers' blocks (fixture recorded by scripts/make_moe_fixture.py)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from imp_jax.errors import KernelError, UnsupportedModel
from imp_jax.gguf.qtensor import QTensor
from imp_jax.gguf.quant import quantize
from imp_jax.models import moe
from imp_jax.models.config import MoEConfig
from imp_jax.models.moe import MoE

T_ = GGMLQuantizationType
E, K, D, F, FS = 8, 2, 64, 32, 96  # all different, so a dequantized stack is recognisable by its shape
FIXTURE = Path(__file__).parent / "fixtures" / "moe" / "hf_moe.npz"

FLAVORS = {
    # Qwen3-MoE: softmax top-k renormalised, SwiGLU
    "qwen3moe": MoEConfig(n_experts=E, top_k=K, n_ff_exp=F),
    # Qwen3-Next / Qwen3.5-MoE: plus a gated shared expert; gate and up fused as ffn_gate_up_exps
    "qwen3next": MoEConfig(n_experts=E, top_k=K, n_ff_exp=F, has_shared=True, shared_gate=True),
    # gpt-oss: top-k of the logits then softmax, biases everywhere, clamped SwiGLU
    "gpt-oss": MoEConfig(n_experts=E, top_k=K, n_ff_exp=F, gating="topk_softmax", activation="swiglu_oai"),
}


# --- independent numpy references (float64) -------------------------------------------------------------------


def _np_softmax(z):
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _np_route(logits, gating, k, norm):
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    if gating == "softmax":
        w = np.take_along_axis(_np_softmax(logits), order, axis=-1)
        return (w / w.sum(axis=-1, keepdims=True) if norm else w), order
    return _np_softmax(np.take_along_axis(logits, order, axis=-1)), order


def _np_swiglu_oai(gate, up, alpha=1.702, limit=7.0):
    out = np.empty_like(gate)
    for i, (g, u) in enumerate(zip(gate.ravel(), up.ravel(), strict=True)):
        g = min(g, limit)
        u = max(-limit, min(u, limit))
        out.flat[i] = g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)
    return out


def _np_silu_glu(gate, up):
    return gate / (1.0 + np.exp(-gate)) * up


def _np_moe(w: dict, cfg: MoEConfig, x: np.ndarray) -> np.ndarray:
    """One token and one chosen expert at a time, from float64 weights in GGUF order."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    act = _np_silu_glu if cfg.activation == "silu" else _np_swiglu_oai
    out = np.zeros_like(x)
    for n, xn in enumerate(x):
        logits = w["router"] @ xn + w.get("router_bias", 0.0)
        weights, ids = _np_route(logits, cfg.gating, cfg.top_k, cfg.norm_topk)
        for wt, e in zip(weights, ids, strict=True):
            g = w["gate_exps"][e] @ xn + (w["gate_bias"][e] if "gate_bias" in w else 0.0)
            u = w["up_exps"][e] @ xn + (w["up_bias"][e] if "up_bias" in w else 0.0)
            y = w["down_exps"][e] @ act(g, u) + (w["down_bias"][e] if "down_bias" in w else 0.0)
            out[n] += wt * y
        if cfg.has_shared:
            s = w["shared_down"] @ _np_silu_glu(w["shared_gate"] @ xn, w["shared_up"] @ xn)
            if cfg.shared_gate:
                s = s / (1.0 + np.exp(-(w["shared_router"].reshape(-1) @ xn)))
            out[n] += s
    return out


# --- building params ----------------------------------------------------------------------------------------


def _float_weights(rng, flavor: str) -> dict[str, np.ndarray]:
    """Random f32 weights in GGUF order; gpt-oss ones large enough that the clamp at 7 is reached."""
    s = 3.0 if flavor == "gpt-oss" else 1.0
    w = {
        "router": rng.normal(size=(E, D)),
        "gate_exps": rng.normal(size=(E, F, D)) * s / np.sqrt(D),
        "up_exps": rng.normal(size=(E, F, D)) * s / np.sqrt(D),
        "down_exps": rng.normal(size=(E, D, F)) / np.sqrt(F),
    }
    if flavor == "gpt-oss":
        w |= {
            "router_bias": rng.normal(size=E),
            "gate_bias": rng.normal(size=(E, F)),
            "up_bias": rng.normal(size=(E, F)),
            "down_bias": rng.normal(size=(E, D)),
        }
    if flavor == "qwen3next":
        w |= {
            "shared_gate": rng.normal(size=(FS, D)) / np.sqrt(D),
            "shared_up": rng.normal(size=(FS, D)) / np.sqrt(D),
            "shared_down": rng.normal(size=(D, FS)) / np.sqrt(FS),
            "shared_router": rng.normal(size=D) / np.sqrt(D),
        }
    return {k: v.astype(np.float32) for k, v in w.items()}


_MATRICES = ("gate_exps", "up_exps", "down_exps", "shared_gate", "shared_up", "shared_down")


def _params(w: dict, qtype: T_, *, fuse: bool = False) -> tuple[MoE, dict]:
    """MoE params with the matrices stored as ``qtype`` (F32: plain arrays), and the float64 weights they hold
    (dequantized by gguf-py, the reference) for the numpy loop."""
    leaves, exact = {}, {}
    for name, v in w.items():
        if name in _MATRICES and qtype != T_.F32:
            packed = quantize(v, qtype)
            leaves[name] = QTensor(jnp.asarray(packed), None, int(qtype), v.shape[-2:])
            exact[name] = gguf_quants.dequantize(packed, qtype).reshape(v.shape).astype(np.float64)
        else:
            leaves[name] = jnp.asarray(v)
            exact[name] = v.astype(np.float64)
    if fuse:
        gate, up = leaves.pop("gate_exps"), leaves.pop("up_exps")
        if isinstance(gate, QTensor):
            fused = QTensor(jnp.concatenate([gate.data, up.data], axis=1), None, gate.qtype, (2 * F, D))
        else:
            fused = jnp.concatenate([gate, up], axis=1)
        leaves["gate_up_exps"] = fused
    return MoE(**leaves), exact


def _x(rng, t, b=1):
    return jnp.asarray(rng.normal(size=(b, t, D)).astype(np.float32))


_moe_jit = jax.jit(moe.moe_ffn, static_argnums=1, static_argnames="path")
_dense_jit = jax.jit(moe.moe_ffn_dense, static_argnums=1)


# --- routing and activations --------------------------------------------------------------------------------


@pytest.mark.parametrize(("gating", "norm"), [("softmax", True), ("softmax", False), ("topk_softmax", True)])
def test_route_matches_numpy(gating, norm):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50, 16)).astype(np.float32) * 3
    cfg = MoEConfig(n_experts=16, top_k=4, n_ff_exp=F, gating=gating, norm_topk=norm)
    weights, ids = moe.route(jnp.asarray(logits), cfg)
    ref_w, ref_ids = _np_route(logits.astype(np.float64), gating, 4, norm)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6, atol=1e-7)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32


def test_router_logits_are_f32_with_bias():
    rng = np.random.default_rng(1)
    w = _float_weights(rng, "gpt-oss")
    p, _ = _params(w, T_.F32)
    x = rng.normal(size=(5, D)).astype(np.float32)
    logits = moe.router_logits(p, jnp.asarray(x, jnp.bfloat16))
    assert logits.dtype == jnp.float32
    x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    ref = x_bf16 @ w["router"].astype(np.float64).T + w["router_bias"]
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_swiglu_oai_matches_numpy():
    rng = np.random.default_rng(2)
    gate = rng.normal(size=(4, 64)).astype(np.float32) * 8  # reaches both clamps
    up = rng.normal(size=(4, 64)).astype(np.float32) * 8
    got = moe.activate(jnp.asarray(gate), jnp.asarray(up), FLAVORS["gpt-oss"])
    ref = _np_swiglu_oai(gate.astype(np.float64), up.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    assert (gate > 7).any() and (up < -7).any()


def test_silu_glu_matches_numpy():
    rng = np.random.default_rng(3)
    gate, up = rng.normal(size=(2, 4, 64)).astype(np.float32) * 4
    got = moe.activate(jnp.asarray(gate), jnp.asarray(up), FLAVORS["qwen3moe"])
    np.testing.assert_allclose(np.asarray(got), _np_silu_glu(gate.astype(float), up.astype(float)), rtol=1e-5)


def test_shared_expert_gate():
    """Zeroing the routed experts' down projection leaves sigmoid(x . w_sg) * shared_expert(x)."""
    rng = np.random.default_rng(4)
    w = _float_weights(rng, "qwen3next")
    w["down_exps"] = np.zeros_like(w["down_exps"])
    p, exact = _params(w, T_.F32)
    x = _x(rng, 5)
    got = np.asarray(_moe_jit(p, FLAVORS["qwen3next"], x))[0]
    xn = np.asarray(x, np.float64)[0]
    shared = _np_silu_glu(xn @ exact["shared_gate"].T, xn @ exact["shared_up"].T) @ exact["shared_down"].T
    gate = 1 / (1 + np.exp(-(xn @ exact["shared_router"])))
    np.testing.assert_allclose(got, gate[:, None] * shared, rtol=1e-5, atol=1e-5)
    ungated = dataclasses.replace(FLAVORS["qwen3next"], shared_gate=False)
    got_ungated = np.asarray(_moe_jit(p, ungated, x))[0]
    np.testing.assert_allclose(got_ungated, shared, rtol=1e-5, atol=1e-5)


# --- the layer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T_.F32, T_.Q8_0, T_.MXFP4], ids=lambda q: q.name)
@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_dense_reference_matches_numpy(flavor, qtype):
    rng = np.random.default_rng(5)
    p, exact = _params(_float_weights(rng, flavor), qtype, fuse=flavor == "qwen3next")
    cfg = FLAVORS[flavor]
    x = _x(rng, 9, b=2)
    got = _dense_jit(p, cfg, x)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, D), _np_moe(exact, cfg, np.asarray(x)), atol=2e-4)


# (flavor, qtype, fused gate_up): every flavor and every storage kind at least once
SPARSE_CASES = [
    ("qwen3moe", T_.F32, False),
    ("qwen3next", T_.Q8_0, True),
    ("gpt-oss", T_.MXFP4, False),
]


@pytest.mark.parametrize(("flavor", "qtype", "fuse"), SPARSE_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_selected_experts_match_dense(flavor, qtype, fuse):
    """Both expert paths, at every token count, agree with every-expert-on-every-token within f32 rounding.

    Tokens are routed independently, so one dense reference over 64 tokens serves every prefix of them."""
    rng = np.random.default_rng(12)
    p, _ = _params(_float_weights(rng, flavor), qtype, fuse=fuse)
    cfg = FLAVORS[flavor]
    x = _x(rng, 64)
    ref = np.asarray(_dense_jit(p, cfg, x))
    scale = np.abs(ref).max()
    for t in (1, 3, 17, 64):
        for path in (moe.GATHER, moe.GROUPED):
            got = np.asarray(_moe_jit(p, cfg, x[:, :t], path=path))
            np.testing.assert_allclose(got, ref[:, :t], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{path} T={t}")


def test_bf16_activations():
    rng = np.random.default_rng(7)
    p, _ = _params(_float_weights(rng, "qwen3next"), T_.Q8_0, fuse=True)
    cfg = FLAVORS["qwen3next"]
    x = _x(rng, 6).astype(jnp.bfloat16)
    ref = np.asarray(_dense_jit(p, cfg, x).astype(jnp.float32))
    for path in (moe.GATHER, moe.GROUPED):
        got = _moe_jit(p, cfg, x, path=path)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=2e-2, atol=2e-2)


def test_per_expert_nvfp4_scale_is_gathered():
    """NVFP4 stacks carry one f32 scale per expert; the gather path must take the chosen experts' scales."""
    rng = np.random.default_rng(8)
    w = _float_weights(rng, "qwen3moe")
    p, _ = _params(w, T_.F32)
    _, type_size = gguf_quants.GGML_QUANT_SIZES[T_.NVFP4]

    def nvfp4(shape):
        blocks = rng.integers(0, 256, size=(E, shape[0], shape[1] // 64, type_size), dtype=np.uint8)
        blocks[..., :4] = rng.integers(0x30, 0x3C, size=blocks[..., :4].shape)  # moderate UE4M3 scales
        data = jnp.asarray(blocks.reshape(E, shape[0], -1))
        return QTensor(data, jnp.asarray(rng.uniform(0.01, 0.1, size=E), jnp.float32), int(T_.NVFP4), shape)

    p = dataclasses.replace(p, gate_exps=nvfp4((F, D)), up_exps=nvfp4((F, D)))  # NVFP4 blocks are 64 wide
    cfg = FLAVORS["qwen3moe"]
    x = _x(rng, 3)
    ref = np.asarray(_dense_jit(p, cfg, x))
    for path in (moe.GATHER, moe.GROUPED):
        np.testing.assert_allclose(np.asarray(_moe_jit(p, cfg, x, path=path)), ref, rtol=1e-5, atol=1e-5)


def test_layer_scan_slices_stacked_experts():
    """Two layers stacked on a leading axis (QTensor data [L, E, N, row_bytes]) run under lax.scan."""
    rng = np.random.default_rng(9)
    cfg = FLAVORS["qwen3moe"]
    layers = [_params(_float_weights(rng, "qwen3moe"), T_.Q8_0)[0] for _ in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x = _x(rng, 1)

    @jax.jit
    def run(params, x):
        return jax.lax.scan(lambda h, p: (h + moe.moe_ffn(p, cfg, h), None), x, params)[0]

    want = x
    for p in layers:
        want = want + _moe_jit(p, cfg, want)
    np.testing.assert_allclose(np.asarray(run(stacked, x)), np.asarray(want), rtol=1e-5, atol=1e-5)


# --- what each path reads -----------------------------------------------------------------------------------


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _eqns(jaxpr):
    """Every primitive equation, looking inside nested jaxprs (jit, scan, ...) instead of at their callers."""
    for eqn in jaxpr.eqns:
        subs = list(_subjaxprs(eqn))
        if not subs:
            yield eqn
        for sub in subs:
            yield from _eqns(sub)


def _reads(fn, p: MoE, cfg: MoEConfig, t: int):
    """(primitive and output shape of every use of a packed expert stack, outputs shaped like a whole
    dequantized stack) in the jaxpr of ``fn(p, cfg, x)`` for x [1, t, D]."""
    x = jnp.zeros((1, t, D), jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(fn, cfg=cfg))(p, x=x).jaxpr
    stacks = {(w.data.shape, w.data.dtype) for w in (p.gate_exps, p.up_exps, p.down_exps)}
    dense_stacks = {(E, F, D), (E, D, F)}
    uses, whole = [], []
    for eqn in _eqns(jaxpr):
        if any((getattr(v, "aval", None) and (v.aval.shape, v.aval.dtype)) in stacks for v in eqn.invars):
            uses.append((eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)))
        whole += [o.aval.shape for o in eqn.outvars if tuple(o.aval.shape) in dense_stacks]
    return uses, whole


@pytest.mark.parametrize("qtype", [T_.Q8_0, T_.MXFP4], ids=lambda q: q.name)
def test_reads_only_gathered_experts(qtype):
    """Decode gathers the packed blocks of top_k experts per token; prefill one expert per tile; neither
    dequantizes a whole stack (the dense reference does, which shows the check can see it)."""
    rng = np.random.default_rng(10)
    p, _ = _params(_float_weights(rng, "qwen3moe"), qtype)
    cfg = FLAVORS["qwen3moe"]
    rb_in, rb_ff = p.gate_exps.data.shape[-1], p.down_exps.data.shape[-1]
    assert moe.expert_path(1 * K, E) == moe.GATHER
    assert moe.expert_path(4 * K, E) == moe.GATHER  # 8 rows, 8 experts: still no more than the stack
    assert moe.expert_path(5 * K, E) == moe.GROUPED
    for t in (1, 3, 5, 64):  # gathered or tiled row counts that differ from E, so shapes cannot be confused
        n = t * K if moe.expert_path(t * K, E) == moe.GATHER else moe.grouped_tiles(t * K, E, F * D * 4)[2]
        uses, whole = _reads(moe.moe_ffn, p, cfg, t)
        assert sorted(uses) == sorted([("gather", (n, F, rb_in))] * 2 + [("gather", (n, D, rb_ff))]), t
        assert whole == [], t
    _, whole_dense = _reads(moe.moe_ffn_dense, p, cfg, 1)
    assert len(whole_dense) >= 3


def test_grouped_tiles_bound_every_routing():
    rng = np.random.default_rng(13)
    for m, e, matrix in ((1, 8, 2**10), (7, 8, 2**10), (40, 8, 2**10), (4096, 128, 3 << 20), (20480, 512, 2 << 20)):
        rows, n_tiles, per_step = moe.grouped_tiles(m, e, matrix)
        assert 16 <= rows <= 128 and rows & (rows - 1) == 0
        assert n_tiles % per_step == 0 and per_step * matrix <= max(moe.TILE_WEIGHT_BYTES, matrix)
        for _ in range(20):
            sizes = np.bincount(rng.integers(0, rng.integers(1, e + 1), size=m), minlength=e)
            assert np.sum(-(-sizes // rows)) <= n_tiles


@pytest.mark.parametrize("qtype", [T_.F32, T_.Q8_0], ids=lambda q: q.name)
def test_expert_matmul_skewed_groups(qtype, monkeypatch):
    """Groups spanning several tiles, empty groups, one-row groups, in one step or in steps of three tiles;
    both paths against numpy per row."""
    rng = np.random.default_rng(14)
    sizes = np.array([37, 0, 1, 0, 16, 2, 0, 4])
    ids = np.repeat(np.arange(E), sizes)
    x = rng.normal(size=(ids.size, D)).astype(np.float32)
    w = rng.normal(size=(E, F, D)).astype(np.float32)
    stack = w
    if qtype != T_.F32:
        packed = quantize(w, qtype)
        stack = QTensor(jnp.asarray(packed), None, int(qtype), (F, D))
        w = gguf_quants.dequantize(packed, qtype).reshape(w.shape)
    ref = np.einsum("mk,mnk->mn", x.astype(np.float64), w[ids].astype(np.float64))
    args = (jnp.asarray(x), stack, jnp.asarray(ids))
    gathered = moe.expert_matmul(*args, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(gathered), ref, rtol=1e-5, atol=1e-4)
    assert moe.grouped_tiles(ids.size, E, F * D * 4)[0] < sizes.max()
    for budget in (moe.TILE_WEIGHT_BYTES, 3 * F * D * 4):
        monkeypatch.setattr(moe, "TILE_WEIGHT_BYTES", budget)
        grouped = moe.expert_matmul(*args, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(grouped), ref, rtol=1e-5, atol=1e-4, err_msg=str(budget))


# --- errors -------------------------------------------------------------------------------------------------


def test_bad_config_raises():
    with pytest.raises(UnsupportedModel, match="gating"):
        MoEConfig(n_experts=E, top_k=K, n_ff_exp=F, gating="sigmoid")
    with pytest.raises(UnsupportedModel, match="activation"):
        MoEConfig(n_experts=E, top_k=K, n_ff_exp=F, activation="relu")
    with pytest.raises(UnsupportedModel, match="9 experts"):
        MoEConfig(n_experts=E, top_k=9, n_ff_exp=F)


def test_expert_matmul_shape_error_names_shapes():
    w = jnp.zeros((E, F, D))
    with pytest.raises(KernelError, match=r"expert_matmul.*\(8, 32, 64\)"):
        moe.expert_matmul(jnp.zeros((3, F)), w, jnp.zeros(3, jnp.int32))


# --- transformers -------------------------------------------------------------------------------------------


HF_CONFIGS = {
    "qwen3moe": MoEConfig(n_experts=6, top_k=2, n_ff_exp=16),
    "qwen3next": MoEConfig(n_experts=6, top_k=2, n_ff_exp=16, has_shared=True, shared_gate=True),
    "gpt-oss": MoEConfig(n_experts=6, top_k=2, n_ff_exp=16, gating="topk_softmax", activation="swiglu_oai"),
}


@pytest.mark.parametrize("block", list(HF_CONFIGS))
def test_matches_transformers(block):
    z = np.load(FIXTURE)
    leaves = {k.split("/", 1)[1]: jnp.asarray(z[k]) for k in z.files if k.startswith(f"{block}/")}
    x, want = leaves.pop("x"), np.asarray(leaves.pop("out"))
    p = MoE(**leaves)
    for path in (moe.GATHER, moe.GROUPED):
        got = np.asarray(_moe_jit(p, HF_CONFIGS[block], x, path=path))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=path)
