"""Record transformers' MoE blocks on random weights for tests/test_moe.py (tests/fixtures/moe/hf_moe.npz).

Three blocks, each with every parameter randomised (seeded): ``Qwen3MoeSparseMoeBlock`` (softmax top-k,
renormalised), ``Qwen3NextSparseMoeBlock`` (plus a sigmoid-gated shared expert) and ``GptOssMLP`` (top-k softmax,
router and expert biases, clamped SwiGLU). The weights are stored in GGUF (numpy) order, transformed as
llama.cpp's converter does (``conversion/qwen.py``, ``conversion/gpt_oss.py``):

* Qwen: ``gate_up_proj`` [E, 2F, D] is gate rows then up rows (the layout of ``ffn_gate_up_exps``); split at F
  into ``ffn_gate_exps`` / ``ffn_up_exps``; ``down_proj`` [E, D, F] is ``ffn_down_exps`` as is.
* gpt-oss: ``gate_up_proj`` [E, D, 2F] is transposed and de-interleaved, gate = even, up = odd columns (biases
  likewise); ``down_proj`` [E, F, D] is transposed to [E, D, F].

Keys are ``<block>/<tensor>`` plus ``<block>/x`` (input [1, T, D]) and ``<block>/out`` (f32 output). Run with
the reference venv (see scripts/make_fixtures.py)::

    .refenv/bin/python scripts/make_moe_fixture.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import GptOssConfig, Qwen3MoeConfig, Qwen3NextConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "moe" / "hf_moe.npz"
D, F, F_SHARED, E, K, T = 32, 16, 24, 6, 2, 7


def _randomise(module: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale / np.sqrt(p.shape[-1]))


def _run(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = module(x)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def qwen_experts(block: torch.nn.Module) -> dict[str, np.ndarray]:
    gate_up = _np(block.experts.gate_up_proj)
    return {
        "router": _np(block.gate.weight),
        "gate_exps": gate_up[:, :F],
        "up_exps": gate_up[:, F:],
        "down_exps": _np(block.experts.down_proj),
    }


def main() -> None:
    torch.manual_seed(0)
    eager = dict(experts_implementation="eager")  # the per-expert loop, the plainest of transformers' kernels
    common = dict(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, **eager)
    x = torch.randn(1, T, D)
    arrays: dict[str, np.ndarray] = {}

    qwen3moe = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(**common, norm_topk_prob=True))
    _randomise(qwen3moe, 2.0)
    arrays |= {f"qwen3moe/{k}": v for k, v in qwen_experts(qwen3moe).items()}
    arrays |= {"qwen3moe/x": _np(x), "qwen3moe/out": _run(qwen3moe, x)}

    cfg = Qwen3NextConfig(**common, shared_expert_intermediate_size=F_SHARED, norm_topk_prob=True)
    qwen3next = Qwen3NextSparseMoeBlock(cfg)
    _randomise(qwen3next, 2.0)
    shared = {
        "shared_gate": _np(qwen3next.shared_expert.gate_proj.weight),
        "shared_up": _np(qwen3next.shared_expert.up_proj.weight),
        "shared_down": _np(qwen3next.shared_expert.down_proj.weight),
        "shared_router": _np(qwen3next.shared_expert_gate.weight).reshape(D),
    }
    arrays |= {f"qwen3next/{k}": v for k, v in (qwen_experts(qwen3next) | shared).items()}
    arrays |= {"qwen3next/x": _np(x), "qwen3next/out": _run(qwen3next, x)}

    oss_cfg = GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, **eager)
    oss = GptOssMLP(oss_cfg)
    _randomise(oss, 4.0)  # large enough that the swiglu clamp (7.0) bites
    gate_up = _np(oss.experts.gate_up_proj).transpose(0, 2, 1)  # [E, 2F, D], gate/up interleaved
    gate_up_bias = _np(oss.experts.gate_up_proj_bias)
    arrays |= {
        "gpt-oss/router": _np(oss.router.weight),
        "gpt-oss/router_bias": _np(oss.router.bias),
        "gpt-oss/gate_exps": np.ascontiguousarray(gate_up[:, ::2]),
        "gpt-oss/up_exps": np.ascontiguousarray(gate_up[:, 1::2]),
        "gpt-oss/gate_bias": np.ascontiguousarray(gate_up_bias[:, ::2]),
        "gpt-oss/up_bias": np.ascontiguousarray(gate_up_bias[:, 1::2]),
        "gpt-oss/down_exps": np.ascontiguousarray(_np(oss.experts.down_proj).transpose(0, 2, 1)),
        "gpt-oss/down_bias": _np(oss.experts.down_proj_bias),
        "gpt-oss/x": _np(x),
        "gpt-oss/out": _run(oss, x),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
