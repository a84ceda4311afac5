"""Each tensor keeps its own qtype (imp PR #60's two bugs), and quantized hybrids stay close to transformers.

Mixed-format files are made from the f32 fixtures with ``quantize_file``; their reference is the same model with
every tensor replaced by its dequantized values in F32, which the f32 path matches to transformers (test_models).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from imp_jax.gguf import open_gguf
from imp_jax.runtime import steps
from imp_jax.weights.quantize import quantize_file
from tests.helpers import load_raw

FIXTURES = Path(__file__).parent / "fixtures"


def _logits(path, ids):
    cfg, params = load_raw(path, "float32")
    out, _ = steps.run_prefill(params, cfg, ids, steps.bucket(len(ids), 256), jnp.float32, all_logits=True)
    return np.asarray(out[0, : len(ids)])


def _pair(arch: str, choose, tmp_path):
    """The mixed file, and its dequantized-to-F32 twin."""
    src = open_gguf(FIXTURES / arch / "model-f32.gguf")
    mixed = open_gguf(quantize_file(src, tmp_path / "mixed.gguf", choose))
    dense = quantize_file(mixed, tmp_path / "dense.gguf", lambda info: T.F32 if len(info.shape) > 1 else T(info.qtype))
    return mixed, dense


def _gdn_mixed(info):
    """alpha/beta in Q8_0 beside F16 and F32 neighbours; untied output in Q4_0 and embedding in Q8_0."""
    name = info.name
    if len(info.shape) < 2 or "ssm_conv1d" in name or "ffn_gate_inp" in name:
        return T(info.qtype)
    if "ssm_alpha" in name or "ssm_beta" in name or name == "token_embd.weight":
        return T.Q8_0
    if name == "output.weight":
        return T.Q4_0
    if "attn_qkv" in name or "ffn_" in name:
        return T.F16
    return T.F32


def test_every_tensor_keeps_its_own_qtype(tmp_path):
    mixed, dense = _pair("qwen35", _gdn_mixed, tmp_path)
    assert mixed.tensors["blk.0.ssm_alpha.weight"].qtype_name == "Q8_0"
    assert mixed.tensors["blk.0.attn_qkv.weight"].qtype_name == "F16"
    assert mixed.tensors["output.weight"].qtype_name == "Q4_0"
    assert mixed.tensors["token_embd.weight"].qtype_name == "Q8_0"
    ids = np.load(FIXTURES / "qwen35" / "reference.npz")["ids"][:40].tolist()
    np.testing.assert_allclose(_logits(mixed.path, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen35", "qwen3next", "qwen35moe", "qwen3moe"])
def test_mxfp4_projections_run_and_match_their_dequantized_weights(arch, tmp_path):
    """MXFP4 projections (every matrix): within 1e-4 of the model on the dequantized weights, i.e. of what
    transformers computes with them. The rounding itself is large on these tiny random models (measured
    2026-11-25 against the f32 originals: max |delta logit| / max |logit| 0.22 (qwen3moe) to 0.88 (qwen35),
    argmax agreement 0.10 to 0.68; Q8_0 moves them 0.03 to 0.08): random weights have no structure for the 4-bit
    grid to preserve, and the GDN gates feed the rounding through exp(). Quality on a real model is checked by
    test_quantize (smollm2 in MXFP4 keeps >= 90% top-1 agreement)."""
    mixed, dense = _pair(arch, _mxfp4_matrices, tmp_path)
    assert mixed.nbytes_by_qtype().get("MXFP4", 0) > 0
    ids = np.load(FIXTURES / arch / "reference.npz")["ids"][:64].tolist()
    got = _logits(mixed.path, ids)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _logits(dense, ids), atol=1e-4, rtol=1e-4)


def _mxfp4_matrices(info):
    skip = len(info.shape) < 2 or "ssm_conv1d" in info.name or "ffn_gate_inp" in info.name
    return T(info.qtype) if skip or info.shape[-1] % 32 else T.MXFP4
