"""A fixture model that writes a reply chosen by the test: a tiny GGUF rewritten so greedy decoding is a script.

``script_gguf`` copies a fixture file and rewrites its weights so the model is a lookup table from the current
token to the next: every layer's output projections are zeroed (attention and MLP add nothing to the residual),
each reply token gets an embedding of its own (a one-hot direction), every other token shares one more, and the
output matrix maps each direction to the token after it. Whatever the prompt, greedy decoding then writes the
reply pieces in order and ends with EOS. A piece that is not in the vocabulary is appended as a user-defined token
(as a real model's added tokens are: ``<think>``, ``<tool_call>``), so each piece is one id.

The architecture, tokenizer and template code paths stay the real ones; only the numbers are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

USER_DEFINED = 4
ZEROED = ("attn_output", "ffn_down")  # everything that writes into the residual stream
LOGIT = 4.0


def script_gguf(src: Path, dst: Path, reply: Sequence[str], *, template: str | None = None) -> list[int]:
    """Write ``dst``: ``src`` answering every prompt with ``reply`` (pieces, each one token) then EOS. Returns the
    pieces' token ids."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    ids = []
    for piece in reply:
        if piece not in tokens:
            tokens.append(piece)
            types.append(USER_DEFINED)
        ids.append(tokens.index(piece))
    assert len(set(ids)) == len(ids), "each reply piece must be a different token"
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    overrides = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if template is not None:
        overrides["tokenizer.chat_template"] = template
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in overrides:
            continue
        if name == "tokenizer.ggml.scores":
            scores = list(field.contents())
            overrides[name] = scores + [0.0] * (len(tokens) - len(scores))
            continue
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    writer.add_token_list(overrides["tokenizer.ggml.tokens"])
    writer.add_token_types(overrides["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in overrides:
        writer.add_token_scores(overrides["tokenizer.ggml.scores"])
    if template is not None:
        writer.add_chat_template(template)
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if any(z in t.name for z in ZEROED):
            data = np.zeros_like(data)
        elif t.name == "output_norm.weight":
            data = np.ones_like(data)
        elif t.name in ("token_embd.weight", "output.weight"):
            data = _table(t.name, len(tokens), data.shape[1], ids, eos)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ids


def _table(name: str, n_vocab: int, n_embd: int, ids: list[int], eos: int) -> np.ndarray:
    """Embeddings: reply token k is direction k, every other token direction len(ids). Output: the token after
    direction k is reply token k + 1 (after the last, EOS; after any other token, the first)."""
    assert len(ids) < n_embd
    other = len(ids)
    table = np.zeros((n_vocab, n_embd), np.float32)
    if name == "token_embd.weight":
        table[:, other] = 1.0
        for k, i in enumerate(ids):
            table[i] = 0.0
            table[i, k] = 1.0
        return table
    table[ids[0], other] = LOGIT
    for k, nxt in enumerate([*ids[1:], eos]):
        table[nxt, k] = LOGIT
    return table
