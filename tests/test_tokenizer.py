"""Tokenizer tests: llama.cpp's own vocab conformance files, an independent SentencePiece merge reference, special
tokens, end-of-generation ids, streaming decode, and the real registry models when they are cached."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from gguf import TokenType

from imp_jax import registry
from imp_jax.errors import ImpError, UnsupportedModel
from imp_jax.gguf import open_gguf
from imp_jax.text.tokenizer import Tokenizer, _spm_merges

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (
    int(TokenType.NORMAL),
    int(TokenType.UNKNOWN),
    int(TokenType.CONTROL),
    int(TokenType.USER_DEFINED),
    int(TokenType.BYTE),
)

# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's vocab test files (models/ggml-vocab-*.gguf with .inp/.out), shipped in the llama-cpp-python sdist
# ---------------------------------------------------------------------------------------------------------------

LLAMA_CPP_PYTHON = ("llama-cpp-python", "0.3.36")
VOCAB_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
SUPPORTED_VOCABS = (
    "llama-spm",  # SentencePiece (llama 2)
    "phi-3",  # SentencePiece with user-defined </s>
    "gemma-4",  # SentencePiece-style BPE
    "gpt-2",
    "llama-bpe",  # llama 3
    "qwen2",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
)
# The rest of the set: bert-bge (WordPiece) has tests but is not a vocabulary imp-jax runs; aquila, baichuan,
# gpt-neox and nomic-bert-moe ship without .inp/.out files.
UNSUPPORTED_VOCABS = {"bert-bge": "WordPiece ('bert') vocabularies are not supported"}
SEPARATOR = "\n__ggml_vocab_test__\n"


def llama_cpp_vocab_file(name: str) -> Path:
    """One file of llama.cpp's vocab test set, fetched from the pinned sdist through the registry's cache."""
    return registry.fetch_package_file(*LLAMA_CPP_PYTHON, f"{VOCAB_DIR}/{name}", sdist=True, progress=False)


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """(input, expected ids) pairs, read the way llama.cpp's test-tokenizer-0 reads them."""
    raw = llama_cpp_vocab_file(f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    inputs = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):
        inputs.pop()
    outputs = llama_cpp_vocab_file(f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(outputs) >= len(inputs)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, outputs, strict=False)]


@pytest.fixture(scope="module")
def llama_cpp_vocab():
    built: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in built:
            built[name] = Tokenizer.from_metadata(open_gguf(llama_cpp_vocab_file(f"ggml-vocab-{name}.gguf")).metadata)
        return built[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED_VOCABS)
def test_llama_cpp_vocab_conformance(llama_cpp_vocab, name):
    tok = llama_cpp_vocab(name)
    cases = vocab_cases(name)
    assert len(cases) >= 40
    # test-tokenizer-0 tokenizes with add_special=false, parse_special=false
    got = [tok.encode(text, add_special=False, parse_special=False) for text, _ in cases]
    failures = [(text, want, ids) for (text, want), ids in zip(cases, got, strict=True) if ids != want]
    assert not failures, f"{name}: {len(failures)} of {len(cases)} differ, first: {failures[0]!r}"
    for text, want in cases:  # decoding gives the text back (SentencePiece: after the prefix space it adds)
        prefix = " " if tok.add_space_prefix and text else ""
        assert tok.decode(want) == prefix + text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNSUPPORTED_VOCABS))
def test_llama_cpp_vocab_unsupported(name):
    metadata = open_gguf(llama_cpp_vocab_file(f"ggml-vocab-{name}.gguf")).metadata
    with pytest.raises(UnsupportedModel, match="not supported"):
        Tokenizer.from_metadata(metadata)


@pytest.mark.slow
def test_stream_decoder_on_byte_level_emoji(llama_cpp_vocab):
    tok = llama_cpp_vocab("qwen2")
    ids = tok.encode("🦙 and 😶‍🌫️ — 我想在apple工作", add_special=False)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids) == "🦙 and 😶‍🌫️ — 我想在apple工作"
    assert "" in pieces  # some emoji bytes are split across tokens and were held back
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic vocabularies (no downloads)
# ---------------------------------------------------------------------------------------------------------------


def spm_metadata(pieces: dict[str, float], **extra) -> dict:
    """A SentencePiece ('llama') vocabulary: <unk> <s> </s>, 256 byte tokens, then ``pieces`` with scores."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *pieces.values()]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        **extra,
    }


def byte_level_alphabet() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def gpt2_metadata(extra_tokens: dict[str, int], merges: list[str], **extra) -> dict:
    """A byte-level BPE ('gpt2') vocabulary: the 256 byte characters, merge results, then ``extra_tokens``."""
    alphabet = byte_level_alphabet()
    merged = [m.replace(" ", "") for m in merges]
    tokens = [*alphabet, *merged, *extra_tokens]
    types = [NORMAL] * (256 + len(merged)) + list(extra_tokens.values())
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": merges,
        **extra,
    }


def reference_spm(text: str, ids: dict[str, int], scores: dict[str, float]) -> list[int]:
    """llama.cpp's llm_tokenizer_spm, written plainly: merge the best-scoring adjacent pair (leftmost on ties)."""
    symbols = list(text)
    while True:
        candidates = [(-scores[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(symbols)) if a + b in ids]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out: list[int] = []
    for s in symbols:
        out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])
    return out


def test_spm_matches_reference_merge():
    rng = random.Random(0)
    pieces = ["▁", "a", "b", "c", "ab", "bc", "ca", "aa", "abc", "▁a", "▁ab", "▁abc", "cab", "bca", "▁c", "cc", "▁▁"]
    scores = dict(zip(pieces, rng.sample(range(-1000, 0), len(pieces)), strict=True))
    tok = Tokenizer.from_metadata(spm_metadata({p: float(s) for p, s in scores.items()}))
    ids = {t: tok.piece_to_id(t) for t in [*pieces, *[f"<0x{b:02X}>" for b in range(256)]]}
    for _ in range(300):
        text = "".join(rng.choice("abc é") for _ in range(rng.randint(1, 24)))
        want = reference_spm("▁" + text.replace(" ", "▁"), ids, scores)
        assert tok.encode(text, add_special=False) == want, text


def test_spm_merges_are_every_split_into_two_tokens():
    rng = random.Random(2)
    alphabet = "ab▁é我😀\U0001d11e"
    tokens = list(alphabet) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    scores = np.array([rng.choice([-1.0, -2.0, rng.random()]) for _ in tokens], dtype=np.float32)  # with ties
    ids = set(tokens)
    by_score = [tokens[i] for i in np.argsort(-scores, kind="stable")]
    want = [(t[:k], t[k:]) for t in by_score for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    assert _spm_merges(tokens, scores) == want


def test_spm_bos_prefix_space_and_specials():
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1.0, "a": -2.0, "▁a": -3.0}))
    space_a = tok.piece_to_id("▁a")
    assert (tok.kind, tok.add_bos, tok.add_space_prefix) == ("llama", True, True)
    assert tok.encode("a") == [1, space_a]
    assert tok.encode("a", add_special=False) == [space_a]
    # a prefix space again after a special token; none after plain text
    assert tok.encode("a</s>a", add_special=False) == [space_a, 2, space_a]
    assert tok.encode("</s>", add_special=False, parse_special=False)[:1] == [tok.piece_to_id("▁")]
    no_prefix = Tokenizer.from_metadata(spm_metadata({"a": -2.0}, **{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.encode("a", add_special=False) == [no_prefix.piece_to_id("a")]
    assert tok.decode([1, space_a, 2]) == " a"
    assert tok.decode([1, space_a, 2], skip_special=False) == "<s> a</s>"


def test_special_token_partition():
    merges = ["a b", "Ġ a"]
    specials = {"<|im_start|>": CONTROL, "<|im_end|>": NORMAL, "xy": USER_DEFINED, "yzw": USER_DEFINED}
    tok = Tokenizer.from_metadata(gpt2_metadata(specials, merges))
    start, end, xy, yzw = (tok.piece_to_id(t) for t in specials)
    ab = tok.piece_to_id("ab")
    assert tok.encode("<|im_start|>ab<|im_end|>", add_special=False) == [start, ab, end]
    plain = tok.encode("<|im_start|>ab", add_special=False, parse_special=False)
    assert start not in plain and plain[-1] == ab
    # user-defined tokens split even without parse_special, longest first over the whole text (llama.cpp)
    assert tok.encode("xyzw", add_special=False, parse_special=False) == [tok.piece_to_id("x"), yzw]
    assert tok.encode("xyxy", add_special=False, parse_special=False) == [xy, xy]
    # <|im_end|> ends generation, so llama.cpp makes it a control token: hidden in decode unless asked
    assert end in tok.eos_ids
    assert tok.decode([start, ab, end]) == "ab"
    assert tok.decode([start, ab, end], skip_special=False) == "<|im_start|>ab<|im_end|>"


def test_end_of_generation_ids():
    specials = {
        "<|endoftext|>": CONTROL,
        "<|im_end|>": CONTROL,
        "<|fim_pad|>": CONTROL,
        "<|return|>": CONTROL,
        "<|call|>": CONTROL,
        "<|end|>": CONTROL,
        "<|channel|>": CONTROL,
        "<|custom_eot|>": CONTROL,
    }
    md = gpt2_metadata(specials, [], **{"tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.eot_token_id": 263})
    tok = Tokenizer.from_metadata(md)
    ids = {t: tok.piece_to_id(t) for t in specials}
    want = {"<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|return|>", "<|call|>", "<|custom_eot|>"}
    assert tok.eos_ids == {ids[t] for t in want}  # harmony: <|end|> only closes a message
    assert tok.decode([ids["<|channel|>"], ids["<|end|>"], ids["<|return|>"]]) == "<|channel|><|end|>"


def test_add_bos_defaults_follow_llama_cpp():
    def gpt2(pre: str, **extra) -> Tokenizer:
        md = gpt2_metadata({"<|begin|>": CONTROL}, [], **{"tokenizer.ggml.bos_token_id": 256, **extra})
        return Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": pre})

    a, begin = ord("a"), 256  # byte-level tokens sit at their byte value here
    assert gpt2("llama-bpe").encode("a") == [begin, a]  # llama 3 adds BOS when the file says nothing
    assert gpt2("qwen2").encode("a") == [a]
    assert gpt2("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}).encode("a") == [a]
    eos = gpt2("gpt-2", **{"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": 256})
    assert eos.encode("a") == [a, begin]
    assert eos.encode("a", add_special=False) == [a]


def test_stream_decoder_matches_decode_on_random_bytes():
    rng = random.Random(1)
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1.0, "é": -2.0, "▁a": -3.0}))
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(pieces) == tok.decode(ids)
        for piece in pieces[:-1]:
            assert piece.encode("utf-8", "strict").decode("utf-8") == piece


def test_errors_name_the_problem():
    with pytest.raises(UnsupportedModel, match="'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedModel, match="pre-tokenizer 'nonesuch'"):
        Tokenizer.from_metadata(gpt2_metadata({}, [], **{"tokenizer.ggml.pre": "nonesuch"}))
    md = gpt2_metadata({}, [])
    del md["tokenizer.ggml.merges"]
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.ggml\.merges"):
        Tokenizer.from_metadata(md)
    tok = Tokenizer.from_metadata(spm_metadata({}))
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ImpError, match="outside the vocabulary"):
            tok.decode([bad])
        with pytest.raises(ImpError, match="outside the vocabulary"):
            tok.stream().push(bad)


# ---------------------------------------------------------------------------------------------------------------
# Real registry models, when they are in the cache. Expected ids: llama.cpp (llama-cpp-python 0.3.36,
# llama_tokenize with add_special=true, parse_special=true).
# ---------------------------------------------------------------------------------------------------------------


def cached_model_tokenizer(name: str) -> Tokenizer:
    path = registry.model_path(registry.MODELS[name], registry.cache_root())
    if not path.is_file():
        pytest.skip(f"{name} is not in the model cache ({path})")
    return Tokenizer.from_metadata(open_gguf(path).metadata)


def check_stream(tok: Tokenizer, ids: list[int]) -> None:
    stream = tok.stream()
    assert "".join([stream.push(i) for i in ids] + [stream.finish()]) == tok.decode(ids)


@pytest.mark.slow
def test_smollm2_vocabulary():
    tok = cached_model_tokenizer("smollm2-135m")
    assert (tok.kind, tok.pre, tok.add_bos) == ("gpt2", "smollm", False)
    # <reponame> is llama.cpp's fill-in-the-middle repo token by its text, and those end generation too
    assert tok.eos_ids == {tok.piece_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<reponame>")}
    prompt = "<|im_start|>user\nWhat's 2+2? Answer in 日本語 🙂<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids == [1, 4093, 198, 1780, 506, 216, 34, 27, 34, 47, 19842, 281, 17097, 241, 115, 40993, 179, 120, 248,
                   47526, 2, 198, 1, 520, 9531, 198]  # fmt: skip
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.decode(ids, skip_special=False) == prompt
    assert tok.decode(ids) == "user\nWhat's 2+2? Answer in 日本語 🙂\nassistant\n"
    check_stream(tok, ids)


@pytest.mark.slow
def test_gemma3_vocabulary():
    tok = cached_model_tokenizer("gemma3-270m")
    assert (tok.kind, tok.vocab_size, tok.add_bos, tok.add_space_prefix) == ("llama", 262144, True, False)
    assert {tok.piece_to_id("<eos>"), tok.piece_to_id("<end_of_turn>")} <= tok.eos_ids
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    # user-defined whitespace runs, tabs and tags are split off first, as in llama.cpp
    prompt = (
        "<start_of_turn>user\nWrite a haiku about  spaces\tand <b>tags</b>\n\n\n<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.encode(prompt)
    assert ids == [2, 105, 2364, 107, 6974, 496, 678, 20517, 1003, 138, 35220, 255968, 624, 236743, 200, 19112, 209,
                   109, 106, 107, 105, 4368, 107]  # fmt: skip
    assert tok.decode(ids, skip_special=False) == "<bos>" + prompt
    check_stream(tok, ids)


@pytest.mark.slow
def test_qwen25_vocabulary():
    tok = cached_model_tokenizer("qwen2.5-0.5b")
    assert (tok.kind, tok.pre, tok.add_bos) == ("gpt2", "qwen2", False)
    # </s> is an ordinary token in Qwen's vocabulary, but llama.cpp ends generation on that text (as it does here)
    eog = {"<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "</s>"}
    assert tok.eos_ids == {tok.piece_to_id(t) for t in eog}
    prompt = '<|im_start|>user\ndef f(x):\n    return x ** 2  # 平方\n<tool_call>{"a": 1}</tool_call><|im_end|>\n'
    ids = tok.encode(prompt)
    assert ids == [151644, 872, 198, 750, 282, 2075, 982, 262, 470, 856, 3070, 220, 17, 220, 671, 74577, 111, 23384,
                   198, 151657, 4913, 64, 788, 220, 16, 92, 151658, 151645, 198]  # fmt: skip
    assert tok.encode("The capital of France is") == [785, 6722, 315, 9625, 374]
    assert tok.decode(ids, skip_special=False) == prompt
    check_stream(tok, ids)
