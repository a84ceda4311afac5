"""Write tests/fixtures/gdn/hf_gated_delta_rule.npz: transformers' own gated delta rule on seeded inputs.

Runs in the reference venv (Python 3.11, torch + transformers; `pip install .[reference]`):

    .refenv/bin/python scripts/make_gdn_fixture.py

Inputs are the post-conv q, k (raw; transformers L2-normalises them with `use_qk_l2norm_in_kernel=True`, as its
Qwen3-Next layer does), v, g <= 0, beta and a non-zero initial state, with Hv = 2 Hk (transformers pairs heads
grouped, value head j -> key head j // 2) and T = 130 (three chunks, the last one padded). Outputs:
`o_chunk`, `s_chunk` from `torch_chunk_gated_delta_rule` and `o_recurrent`, `s_recurrent` from
`torch_recurrent_gated_delta_rule`, plus `norm_x`, `norm_z`, `norm_w`, `norm_out` from `Qwen3NextRMSNormGated`.
All float32, as transformers computes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub-kernel decorator must fall back to the torch code

import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gdn" / "hf_gated_delta_rule.npz"
B, T, HK, HV, DK, DV = 1, 130, 2, 4, 16, 8


def main() -> None:
    rng = np.random.default_rng(20260101)
    x = dict(
        q=rng.normal(size=(B, T, HK, DK)),
        k=rng.normal(size=(B, T, HK, DK)),
        v=rng.normal(size=(B, T, HV, DV)),
        g=np.log(rng.uniform(0.3, 1.0, size=(B, T, HV))),
        beta=rng.uniform(0.05, 0.95, size=(B, T, HV)),
        state=0.5 * rng.normal(size=(B, HV, DK, DV)),
    )
    x = {name: a.astype(np.float32) for name, a in x.items()}
    t = {name: torch.from_numpy(a) for name, a in x.items()}
    args = (t["q"], t["k"], t["v"], t["g"], t["beta"])
    common = dict(initial_state=t["state"], output_final_state=True, use_qk_l2norm_in_kernel=True)
    with torch.no_grad():
        o_chunk, s_chunk = hf.torch_chunk_gated_delta_rule(*args, chunk_size=64, **common)
        o_rec, s_rec = hf.torch_recurrent_gated_delta_rule(*args, **common)
        norm = hf.Qwen3NextRMSNormGated(DV, eps=1e-6)
        norm.weight.copy_(torch.from_numpy((1 + 0.1 * rng.normal(size=DV)).astype(np.float32)))
        norm_x = rng.normal(size=(2, 3, HV, DV)).astype(np.float32)
        norm_z = rng.normal(size=(2, 3, HV, DV)).astype(np.float32)
        norm_out = norm(torch.from_numpy(norm_x), torch.from_numpy(norm_z))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        **x,
        o_chunk=o_chunk.numpy(),
        s_chunk=s_chunk.numpy(),
        o_recurrent=o_rec.numpy(),
        s_recurrent=s_rec.numpy(),
        norm_x=norm_x,
        norm_z=norm_z,
        norm_w=norm.weight.detach().numpy(),
        norm_out=norm_out.numpy(),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
