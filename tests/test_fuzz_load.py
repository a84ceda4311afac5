"""Robustness of the whole load path: broken files give an ImpError naming the defect, never anything else.

Mutated and truncated copies of a tiny but complete llama GGUF go through ``open_gguf``, ``imp_jax.load``
(config, tokenizer, params validation, device transfer) and ``plan_memory``. Only ImpError subclasses may
escape, no case may take long (nothing hangs on a flipped count), and memory stays bounded. Hundreds of cases
run in CI; ``IMP_JAX_FUZZ_CASES`` raises the count for a longer, slow run.
"""

from __future__ import annotations

import os
import resource
import time

import gguf
import numpy as np
import pytest

import imp_jax
from imp_jax.errors import GGUFError, ImpError, UnsupportedModel
from imp_jax.gguf import open_gguf
from imp_jax.planning.memory import plan_memory
from tests.tiny_gguf import write_tiny_llama

CASES = int(os.environ.get("IMP_JAX_FUZZ_CASES", "300"))
SLOWEST_CASE_S = 5.0  # opening and loading one mutant (planning compiles, so it is not timed)
RSS_GROWTH = 400 * 2**20
PLANNED = 6  # mutants that also go through plan_memory (each new config compiles two steps)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("fuzz") / "tiny.gguf")
    imp_jax.load(path, max_context=32)  # compile what every load of this config shares, before timing cases
    plan_memory(path, max_context=32)
    return path.read_bytes(), open_gguf(path).data_offset


def _mutants(data: bytes, header: int, n: int, seed: int):
    """(description, bytes): truncations, header byte writes, and writes anywhere (data too), interleaved."""
    rng = np.random.default_rng(seed)
    special = np.array([0x00, 0x01, 0x7F, 0x80, 0xFF], np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            end = int(rng.integers(0, header if i % 2 else len(data)))
            yield f"truncated to {end} bytes", data[:end]
            continue
        buf = np.frombuffer(data, np.uint8).copy()
        limit = header if kind == 1 else len(data)
        at = rng.integers(0, limit, size=int(rng.integers(1, 5)))
        values = np.where(rng.random(len(at)) < 0.5, rng.choice(special, len(at)), rng.integers(0, 256, len(at)))
        buf[at] = values
        yield f"bytes {at.tolist()} set to {values.tolist()}", buf.tobytes()


def _exercise(path, plan: bool) -> tuple[list[str], bool, float]:
    """What escaped as something other than ImpError, per call; whether it loaded; seconds to open and load."""
    calls = [("open_gguf", lambda: open_gguf(path)), ("load", lambda: imp_jax.load(path, max_context=32))]
    bad, loaded, t0 = [], False, time.perf_counter()
    for name, call in calls:
        try:
            call()
            loaded = name == "load"
        except ImpError:
            pass
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__}: {e}"[:300])
        if loaded and plan:  # planning compiles the steps: only for the first few files that load
            calls.append(("plan_memory", lambda: plan_memory(path, max_context=32)))
            plan = False
        if name == "load":
            elapsed = time.perf_counter() - t0
    return bad, loaded, elapsed


def test_mutated_and_truncated_files_only_raise_imp_errors(base, tmp_path):
    data, header = base
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, slowest, planned = [], (0.0, ""), 0
    path = tmp_path / "mutant.gguf"
    for what, blob in _mutants(data, header, CASES, seed=1):
        path.write_bytes(blob)
        problems, loaded, elapsed = _exercise(path, plan=planned < PLANNED)
        planned += loaded
        slowest = max(slowest, (elapsed, what))
        failures += [f"{what}: {p}" for p in problems]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    assert not failures, f"{len(failures)} of {CASES} cases escaped as non-ImpError:\n" + "\n".join(failures[:10])
    assert slowest[0] < SLOWEST_CASE_S, f"slowest case took {slowest[0]:.1f} s: {slowest[1]}"
    assert grown < RSS_GROWTH, f"max RSS grew by {grown / 2**20:.0f} MiB over the fuzz"


@pytest.mark.parametrize(
    "defect, error, names",
    [
        (dict(drop=("blk.1.ffn_up.weight",)), GGUFError, "blk.1.ffn_up.weight"),
        (dict(drop=("blk.0.attn_k.weight",)), GGUFError, "blk.0.attn_k.weight"),
        (dict(drop=("token_embd.weight",)), GGUFError, "token_embd.weight"),
        (dict(drop=("output_norm.weight",)), GGUFError, "output_norm.weight"),
        (dict(reshape={"blk.1.attn_q.weight": (32, 64)}), GGUFError, "blk.1.attn_q.weight"),
        (dict(reshape={"blk.0.ffn_down.weight": (64, 96)}), GGUFError, "blk.0.ffn_down.weight"),
        (dict(reshape={"token_embd.weight": (32, 64)}), GGUFError, "token_embd.weight"),
        (dict(arch="mamba9"), UnsupportedModel, "mamba9"),
        (dict(kv={"llama.attention.head_count_kv": 3}), UnsupportedModel, "3 key/value heads"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_semantic_defects_name_the_thing(tmp_path, defect, error, names):
    path = write_tiny_llama(tmp_path / "broken.gguf", **defect)
    for call in (lambda: imp_jax.load(path, max_context=32), lambda: plan_memory(path, max_context=32)):
        with pytest.raises(error, match=names.replace(".", r"\.")):
            call()


def test_missing_metadata_key_is_named(tmp_path):
    path = tmp_path / "nokey.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match=r"llama\.embedding_length"):
        imp_jax.load(path)
