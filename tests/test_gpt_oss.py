"""gpt-oss (issue 8): config, YaRN, attention sinks, MXFP4 experts, the harmony template and harmony replies.

Fixture: tests/fixtures/gpt-oss/ (scripts/make_fixtures.py, documented in tests/fixtures/README.md): a tiny random
GptOssForCausalLM (2 layers [sliding 8, full], YaRN factor 32, 4 experts top-2) converted by llama.cpp's converter.
The f32 and q8_0 files also run through the generic tests of test_models.py. ``model-mxfp4.gguf`` is the converter's
output for the same model saved as OpenAI ships gpt-oss (MXFP4 expert blocks, the rest Q8_0); ``logits_mxfp4`` is
transformers on exactly those dequantized weights.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import imp_jax
from imp_jax import ops
from imp_jax.gguf import open_gguf
from imp_jax.gguf.qtensor import QTensor
from imp_jax.models.config import RopeConfig, config_from_gguf
from imp_jax.models.layers import rope_inv_freq
from imp_jax.models.moe import GATHER, expert_path
from imp_jax.runtime import steps
from imp_jax.text import harmony
from imp_jax.text.chat import ChatTemplate
from imp_jax.text.tokenizer import Tokenizer
from imp_jax.weights.specs import param_specs
from tests.helpers import incremental_logits, load_raw

FIX = Path(__file__).parent / "fixtures" / "gpt-oss"
# Every dequantized weight is exact, so MXFP4 experts leave only f32 rounding: observed 3.3e-6 (2026-11-25).
MXFP4_TOL = 1e-4


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((FIX / "reference.json").read_text())


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "reference.npz")


@pytest.fixture(scope="module")
def f32_file():
    mf = open_gguf(FIX / "model-f32.gguf")
    return mf, config_from_gguf(mf.metadata, set(mf.tensors))


def _prefill(cfg, params, ids: list[int]) -> np.ndarray:
    out, _ = steps.run_prefill(params, cfg, ids, 64, jnp.float32, all_logits=True)
    return np.asarray(out[0, : len(ids)])


# --- config, YaRN and params -------------------------------------------------------------------------------


def test_config_follows_the_transformers_model(f32_file, stats):
    _, cfg = f32_file
    hf = json.loads((FIX / "hf_config.json").read_text())
    assert cfg.arch == "gpt-oss"
    windows = tuple(hf["sliding_window"] if t == "sliding_attention" else 0 for t in hf["layer_types"])
    assert cfg.layer_window == windows == (8, 0)
    assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.n_ff_exp) == (4, 2, hf["intermediate_size"])
    assert (cfg.moe.gating, cfg.moe.activation) == ("topk_softmax", "swiglu_oai")
    assert (cfg.moe.swiglu_alpha, cfg.moe.swiglu_limit) == (hf["swiglu_alpha"], hf["swiglu_limit"])
    rope = hf["rope_parameters"]
    assert cfg.rope.scaling == rope["rope_type"] == "yarn"
    assert (cfg.rope.factor, cfg.rope.original_context) == (rope["factor"], rope["original_max_position_embeddings"])
    assert cfg.rope.yarn_truncate is rope["truncate"] is False
    # transformers multiplies cos and sin (so q and k) by the attention factor: the scores by its square.
    assert cfg.rope.attn_factor == pytest.approx(stats["rope_attention_scaling"], rel=1e-12)
    assert cfg.attn_scale == pytest.approx(hf["head_dim"] ** -0.5 * stats["rope_attention_scaling"] ** 2, rel=1e-12)


def test_yarn_inverse_frequencies_match_transformers(f32_file, stats):
    _, cfg = f32_file
    np.testing.assert_allclose(rope_inv_freq(cfg.rope), stats["rope_inv_freq"], rtol=1e-6)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_ramp_keeps_fast_dims_and_interpolates_slow_ones(truncate):
    # gpt-oss-20b's rope: dims turning over 32 times in 4096 positions keep their frequency, those turning under
    # once are divided by the factor. The ramp bounds are 8.09 and 17.40 dims, rounded to 8 and 18 by llama.cpp.
    rope = RopeConfig(150000.0, 64, True, "yarn", 32.0, 4096, yarn_truncate=truncate)
    plain = rope_inv_freq(dataclasses.replace(rope, scaling="none"))
    inv = rope_inv_freq(rope)
    np.testing.assert_allclose(inv[:9], plain[:9])
    np.testing.assert_allclose(inv[18:], plain[18:] / 32.0)
    mix = (plain[9:18] - inv[9:18]) / (plain[9:18] - plain[9:18] / 32.0)  # 0 = kept, 1 = interpolated
    low, high = (8.0, 18.0) if truncate else (8.09278, 17.39802)
    np.testing.assert_allclose(mix, (np.arange(9, 18) - low) / (high - low), atol=1e-4)
    assert rope.attn_factor == pytest.approx(1 + 0.1 * math.log(32))


def test_params_carry_sinks_and_biases_in_f32(f32_file):
    mf, cfg = f32_file
    segments = param_specs(mf, cfg, "bfloat16").segments
    assert len(segments[0]) == 2  # sliding and full layers alternate: a unit of two, each window static
    assert sum(p.mixer.sinks.stack[0] for unit in segments for p in unit) == cfg.n_layers
    layer = segments[0][0]
    assert layer.mixer.sinks.shape == (cfg.n_head,)
    assert layer.mixer.bo.shape == (cfg.n_embd,)
    for spec in (layer.mixer.sinks, layer.mixer.bo, layer.mixer.bq, layer.moe.router_bias, layer.moe.gate_bias):
        assert spec.dtype == "float32", spec.names
    assert layer.moe.gate_bias.shape == (cfg.moe.n_experts, cfg.moe.n_ff_exp)
    assert layer.moe.gate_up_exps.dtype == "bfloat16"  # gate and up stacks fused (weights.fusion.FUSED)


# --- attention sinks ---------------------------------------------------------------------------------------


def _eager_attention_with_sinks(q, k, v, sinks, scale, window):
    """transformers' GptOss eager_attention_forward in numpy (float64): the sink logit joins each row's softmax
    and is dropped afterwards."""
    b, t, h, _ = q.shape
    rep = h // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    rel = np.arange(t)[:, None] - np.arange(t)[None, :]
    s = np.where((rel >= 0) & ((window <= 0) | (rel < window)), s, -np.inf)
    s = np.concatenate([s, np.broadcast_to(sinks[None, :, None, None], (b, h, t, 1))], axis=-1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True))[..., :-1]
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("window", [0, 3])
def test_attention_sinks_match_transformers_eager(window):
    rng = np.random.default_rng(8)
    q = rng.normal(size=(2, 9, 4, 8))
    k, v = rng.normal(size=(2, 9, 2, 8)), rng.normal(size=(2, 9, 2, 8))
    sinks = rng.normal(size=4) * 2
    pos = np.broadcast_to(np.arange(9), (2, 9))
    got = ops.attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
        jnp.asarray(pos),
        jnp.asarray(pos),
        scale=0.35,
        window=window,
        sinks=jnp.asarray(sinks, jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(got), _eager_attention_with_sinks(q, k, v, sinks, 0.35, window), atol=2e-6)


# --- MXFP4 experts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4_model():
    return load_raw(FIX / "model-mxfp4.gguf", "float32")


def test_mxfp4_file_keeps_experts_packed(mxfp4_model, stats):
    cfg, params = mxfp4_model
    moe = params.segments[0][0].moe
    for w in (moe.gate_up_exps, moe.down_exps):
        assert isinstance(w, QTensor) and w.qtype == GGMLQuantizationType.MXFP4
    # the converter's repack of the MXFP4 checkpoint dequantizes to what transformers makes of it
    assert stats["mxfp4_experts_equal_transformers_dequantized"] is True
    assert expert_path(cfg.moe.top_k, cfg.moe.n_experts) == GATHER  # a decode step reads only its top-k experts


def test_mxfp4_logits_match_transformers_on_dequantized_weights(mxfp4_model, ref):
    cfg, params = mxfp4_model
    got, want = _prefill(cfg, params, ref["ids"].tolist()), ref["logits_mxfp4"]  # 40 tokens, 5 windows
    np.testing.assert_allclose(got, want, atol=MXFP4_TOL, rtol=MXFP4_TOL)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_mxfp4_prefill_then_decode_across_the_window(mxfp4_model, ref):
    cfg, params = mxfp4_model
    ids = ref["ids"].tolist()  # 40 tokens, window 8: decode steps 20..39 attend past the window's edge
    inc = incremental_logits(params, cfg, ids, 20, 64, jnp.float32)
    np.testing.assert_allclose(inc, _prefill(cfg, params, ids), atol=1e-4, rtol=1e-4)


def test_sliding_window_matters_past_its_length(mxfp4_model, ref):
    cfg, params = mxfp4_model
    ids = ref["ids"].tolist()
    full = _prefill(dataclasses.replace(cfg, layer_window=(0, 0)), params, ids)
    want = ref["logits_mxfp4"]
    np.testing.assert_allclose(full[:8], want[:8], atol=MXFP4_TOL, rtol=MXFP4_TOL)  # no key is outside the window yet
    assert np.abs(full[8:] - want[8:]).max() > 1e-2


# --- harmony: template and replies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(f32_file) -> Tokenizer:
    return Tokenizer.from_metadata(f32_file[0].metadata)


def test_harmony_template_renders_as_transformers(f32_file, tokenizer):
    chat = json.loads((FIX / "chat.json").read_text())
    template = ChatTemplate.from_metadata(f32_file[0].metadata, tokenizer)
    assert not template.is_default
    for case in chat["cases"]:
        got = template.render(
            case["messages"],
            tools=case.get("tools"),
            add_generation_prompt=case["add_generation_prompt"],
            **case["kwargs"],
        )
        assert got.replace(datetime.date.today().isoformat(), chat["today"]) == case["text"]
        ids = tokenizer.encode(got)
        assert tokenizer.decode(ids, skip_special=False) == got
        for marker in harmony.MARKERS:  # each framing token is one id, not text split into pieces
            assert ids.count(tokenizer.piece_to_id(marker)) == got.count(marker)


def test_harmony_tokens_and_end_of_generation(tokenizer):
    assert harmony.is_harmony(tokenizer)
    ends = {tokenizer.id_to_piece(i) for i in tokenizer.eos_ids}
    assert {"<|return|>", "<|call|>"} <= ends and "<|end|>" not in ends  # <|end|> only closes a message
    qwen = Tokenizer.from_metadata(open_gguf(FIX.parent / "qwen2" / "model-q8_0.gguf").metadata)
    assert not harmony.is_harmony(qwen)


@pytest.mark.parametrize(
    ("text", "answer", "reasoning"),
    [
        (
            "<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>4",
            "4",
            "2+2 is 4.",
        ),
        ("<|channel|>final<|message|>Hi there.<|return|>", "Hi there.", None),
        ("<|channel|>analysis<|message|>Cut off in the mid", "", "Cut off in the mid"),
        ("plain text, no framing", "plain text, no framing", None),
        (
            "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": '
            '"Paris"}',
            "Need the tool.",
        ),
    ],
)
def test_split_reply(text, answer, reasoning):
    assert harmony.split_reply(text) == (answer, reasoning)


@pytest.fixture(scope="module")
def model():
    return imp_jax.load(FIX / "model-f32.gguf", dtype="float32", max_context=64)


def test_generate_separates_reasoning_from_the_answer(model, monkeypatch):
    """What the engine hands back for a harmony reply is split into the final answer and the analysis channel."""
    import imp_jax.model as model_module
    from imp_jax.runtime.engine import StepOutput

    tok = model.tokenizer
    reply = "<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>final<|message|>The answer."
    ids = tok.encode(reply, add_special=False)
    requests = []

    def scripted(engine, runs):
        for run in runs:
            requests.append((engine, run.request_id))
            run.take(StepOutput(run.request_id, ids, True, "stop", text=reply))

    monkeypatch.setattr(model_module, "engine_step_into", scripted)
    gen = imp_jax.generate(model, "Hi", max_tokens=len(ids) + 3)
    for engine, rid in requests:  # the scripted request never ran: free it
        engine.abort(rid)
        engine.step()
    assert (gen.text, gen.reasoning, gen.finish_reason) == ("The answer.", "Think first.", "stop")
    assert gen.token_ids == ids


@pytest.mark.slow
def test_generate_on_the_model_splits_what_it_wrote(model):
    gen = imp_jax.generate(model, "<|start|>user<|message|>Hello!<|end|><|start|>assistant", max_tokens=12)
    assert (gen.text, gen.reasoning) == harmony.split_reply(model.tokenizer.decode(gen.token_ids))
