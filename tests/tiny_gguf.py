"""A complete, tiny llama GGUF written with gguf-py, for tests that need a file they can break on purpose.

Two layers, n_embd 64, 4 query / 2 key-value heads, a 64-token SentencePiece (or byte-level BPE) vocabulary;
matrices in Q8_0 (or F16), norms in F32. ``drop`` leaves tensors out, ``reshape`` gives tensors other shapes,
``kv`` overrides metadata, so each test states the one defect it is about.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_LAYERS, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, VOCAB = 2, 64, 4, 2, 16, 128, 64


def tensor_shapes(n_layers: int = N_LAYERS) -> dict[str, tuple[int, ...]]:
    """Logical (numpy-order) shapes of every tensor of the tiny model."""
    q, kv = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    shapes = {"token_embd.weight": (VOCAB, N_EMBD), "output_norm.weight": (N_EMBD,), "output.weight": (VOCAB, N_EMBD)}
    for i in range(n_layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (N_EMBD,),
                f"blk.{i}.attn_q.weight": (q, N_EMBD),
                f"blk.{i}.attn_k.weight": (kv, N_EMBD),
                f"blk.{i}.attn_v.weight": (kv, N_EMBD),
                f"blk.{i}.attn_output.weight": (N_EMBD, q),
                f"blk.{i}.ffn_norm.weight": (N_EMBD,),
                f"blk.{i}.ffn_gate.weight": (N_FF, N_EMBD),
                f"blk.{i}.ffn_up.weight": (N_FF, N_EMBD),
                f"blk.{i}.ffn_down.weight": (N_EMBD, N_FF),
            }
        )
    return shapes


def write_tiny_llama(
    path: Path,
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    reshape: dict[str, tuple[int, ...]] | None = None,
    kv: dict[str, int | float | str] | None = None,
    seed: int = 0,
    vocab: str = "spm",
) -> Path:
    """vocab: "spm" (SentencePiece, no chat template) or "bpe" (a byte-level BPE with merges, ChatML specials and
    a ChatML chat template)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    meta: dict[str, int | float | str] = {
        f"{arch}.block_count": N_LAYERS,
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": N_EMBD,
        f"{arch}.feed_forward_length": N_FF,
        f"{arch}.attention.head_count": N_HEAD,
        f"{arch}.attention.head_count_kv": N_HEAD_KV,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
    }
    meta.update(kv or {})
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    if vocab == "bpe":
        _add_bpe_vocab(w)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", *(f"▁t{i}" for i in range(VOCAB - 3))])
        w.add_token_scores([0.0] * 3 + [-float(i) for i in range(VOCAB - 3)])
        w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    for name, shape in tensor_shapes().items():
        if name in drop:
            continue
        shape = (reshape or {}).get(name, shape)
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32))
            continue
        values = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _add_bpe_vocab(w: gguf.GGUFWriter) -> None:
    """64 tokens: three ChatML specials, space, newline, a-z, then 33 merges (space+letter and a few bigrams)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    bigrams = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e")]
    merges = [("\u0120", c) for c in letters[: VOCAB - 5 - 26 - len(bigrams)]] + bigrams
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u0120", "\u010a", *letters, *(a + b for a, b in merges)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
