"""Robustness of the whole load path: broken files give an ImpError naming the defect, never anything else.

``test_mutants_only_raise_imp_errors`` runs 1,000 mutants from tests/mutants.py (header, metadata type tags,
lengths and values, tokenizer arrays, chat template, tensor table, byte flips, truncations) over two tiny
fixtures and the three registry models, each through what a user does with a file (tests/fuzz_cases.py): only
success or an ImpError subclass may come out, no case may run long (a hang is stopped by an alarm), no leaf may be
loaded that the plan did not give, and memory stays bounded. ``IMP_JAX_FUZZ_SCALE`` multiplies the counts for a
longer run; benchmarks/fuzz.py runs the same generator at scale in a worker pool.
"""

from __future__ import annotations

import collections
import os
import resource

import gguf
import pytest

import imp_jax
from imp_jax.errors import GGUFError, UnsupportedModel
from imp_jax.gguf import open_gguf
from imp_jax.planning.memory import plan_memory
from tests.fuzz_cases import CI_COUNTS, open_bases, run_case
from tests.mutants import Base, Mutant, mutant
from tests.tiny_gguf import write_tiny_llama

SCALE = float(os.environ.get("IMP_JAX_FUZZ_SCALE", "1"))
LIMIT_S = 30.0  # a case past it is a hang
SLOWEST_CASE_S = 15.0
RSS_GROWTH = 1536 * 2**20


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = open_bases(tmp_path_factory.mktemp("fuzz"))
    for base in out:  # the unmutated files load: what every case compiles once is compiled before timing
        assert not run_case(base.path, small=base.small, limit_s=120).bad
    return out


def test_mutants_only_raise_imp_errors(bases, tmp_path):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bad, slowest, kinds = [], (0.0, ""), collections.Counter()
    for base in bases:
        path = tmp_path / f"{base.label}.gguf"
        for i in range(int(CI_COUNTS[base.label] * SCALE)):
            case = mutant(base, i, seed=20)
            outcome = run_case(case.write(path), small=base.small, limit_s=LIMIT_S)
            kinds[outcome.kind] += 1
            slowest = max(slowest, (outcome.seconds, case.label))
            if outcome.bad:
                bad.append(f"{case.label}: {outcome.kind}: {outcome.detail}")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    total = sum(kinds.values())
    assert total >= 1000 * SCALE
    assert not bad, f"{len(bad)} of {total} cases escaped ({dict(kinds)}):\n" + "\n".join(bad[:10])
    assert slowest[0] < SLOWEST_CASE_S, f"slowest case took {slowest[0]:.1f} s: {slowest[1]}"
    assert grown < RSS_GROWTH, f"max RSS grew by {grown / 2**20:.0f} MiB over the fuzz"
    assert kinds["ok"] and kinds["GGUFError"] and kinds["ChatTemplateError"], dict(kinds)  # the generator reaches


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


def test_a_tensor_offset_rewritten_onto_another_tensor_is_a_gguf_error(tmp_path):
    """Found by the corruption run: an offset moved onto a neighbour's bytes still parsed and loaded."""
    base = Base.open(write_tiny_llama(tmp_path / "tiny.gguf"))
    victim, other = base.tensors[3], base.tensors[5]
    offset = base.header[other.offset.start : other.offset.start + 8]
    header = base.header[: victim.offset.start] + offset + base.header[victim.offset.start + 8 :]
    path = Mutant(base, 0, "tensor_offset", "onto another tensor", header).write(tmp_path / "overlap.gguf")
    with pytest.raises(GGUFError, match="overlaps tensor") as e:
        open_gguf(path)
    assert victim.name in str(e.value) and other.name in str(e.value)
