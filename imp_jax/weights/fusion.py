"""Matrices that read the same input, loaded as one matrix where they are stored alike.

One matmul launch instead of two or three, and small matrices (k/v, the GDN gates) no longer run alone: measured
in docs/BENCHMARKS.md (decode is launch-bound beside the weight reads). The parts are concatenated along N.
"""

from __future__ import annotations

import dataclasses

from imp_jax.weights.tensor_spec import TensorSpec

# field -> its parts, in order
FUSED = {
    "wqkv": ("wq", "wk", "wv"),
    "w_gate_up": ("w_gate", "w_up"),
    "w_qkvz": ("w_qkv", "w_z"),
    "w_alpha_beta": ("w_alpha", "w_beta"),
    "gate_up_exps": ("gate_exps", "up_exps"),  # [E, 2F, D], gate rows first: the layout converters also write
    "shared_gate_up": ("shared_gate", "shared_up"),
}


def fuse(fields: dict) -> dict:
    """Fields with each ``FUSED`` group whose matrices (or expert stacks) share qtype, storage, K and stack shape
    replaced by one spec, concatenated along N."""
    for name, group in FUSED.items():
        specs = [fields.get(field) for field in group]
        if not all(isinstance(s, TensorSpec) and len(s.shape) >= 2 and not s.scale_names for s in specs):
            continue
        first = specs[0]
        key = (first.qtype, first.dtype, first.shape[:-2], first.shape[-1])
        if any((s.qtype, s.dtype, s.shape[:-2], s.shape[-1]) != key for s in specs):
            continue
        rows = tuple(s.shape[-2] for s in specs)
        fields = {k: v for k, v in fields.items() if k not in group}
        fields[name] = dataclasses.replace(
            first,
            shape=(*first.shape[:-2], sum(rows), first.shape[-1]),
            fused=tuple(s.names for s in specs[1:]),
            rows=rows,
        )
    return fields
