"""On a Hopper GPU: a file loaded through the streaming loader (repacked one unit at a time for the kernels)
gives the logits of the same file on the reference path (device tool)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import imp_jax

pytestmark = pytest.mark.gpu

FIXTURES = Path(__file__).parent / "fixtures"


def _logits(path: Path, kernels: str) -> np.ndarray:
    model = imp_jax.load(path, max_context=64, compile_cache=False, kernels=kernels)
    return model.logits([1, 5, 9, 30, 2, 7, 11]).astype(np.float64)


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "gpt-oss"])
def test_streamed_kernel_leaves_match_the_reference_path(arch):
    path = FIXTURES / arch / "model-q8_0.gguf"
    if not path.exists():
        pytest.skip(f"no Q8_0 fixture for {arch}")
    fast, ref = _logits(path, "1"), _logits(path, "0")
    assert np.isfinite(fast).all()
    assert np.linalg.norm(fast - ref) / np.linalg.norm(ref) < 2e-2
    assert (fast.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
