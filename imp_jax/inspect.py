"""What a GGUF file holds, summarised for people (``imp-jax inspect``)."""

from __future__ import annotations

import dataclasses

from imp_jax.errors import ImpError
from imp_jax.gguf.reader import ModelFile


@dataclasses.dataclass(frozen=True)
class FileSummary:
    path: str
    name: str
    arch: str
    n_layers: int
    n_params: int
    file_bytes: int
    bytes_by_qtype: dict[str, int]
    context_length: int
    tokenizer: str
    tokenizer_pre: str
    vocab_size: int
    chat_template: bool

    def rows(self) -> list[tuple[str, str]]:
        qtypes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.bytes_by_qtype.items())
        return [
            ("file", self.path),
            ("name", self.name),
            ("architecture", self.arch),
            ("layers", str(self.n_layers)),
            ("parameters", f"{self.n_params:,} ({self.n_params / 1e6:.1f} M)"),
            ("size", f"{self.file_bytes:,} bytes ({self.file_bytes / 2**20:.1f} MiB)"),
            ("bytes per quant type", qtypes),
            ("context length", str(self.context_length)),
            (
                "tokenizer",
                f"{self.tokenizer}" + (f" (pre-tokenizer {self.tokenizer_pre})" if self.tokenizer_pre else ""),
            ),
            ("vocabulary", str(self.vocab_size)),
            ("chat template", "yes" if self.chat_template else "no"),
        ]


def summarize(mf: ModelFile) -> FileSummary:
    meta = mf.metadata
    arch = mf.arch
    if not arch:
        raise ImpError(f"{mf.path}: no 'general.architecture' in the metadata")
    return FileSummary(
        path=str(mf.path),
        name=str(meta.get("general.name", mf.path.stem)),
        arch=arch,
        n_layers=int(meta.get(f"{arch}.block_count", 0)),
        n_params=sum(t.n_elements for t in mf.tensors.values()),
        file_bytes=mf.path.stat().st_size,
        bytes_by_qtype=mf.nbytes_by_qtype(),
        context_length=int(meta.get(f"{arch}.context_length", 0)),
        tokenizer=str(meta.get("tokenizer.ggml.model", "none")),
        tokenizer_pre=str(meta.get("tokenizer.ggml.pre", "")),
        vocab_size=len(meta.get("tokenizer.ggml.tokens", ())),
        chat_template="tokenizer.chat_template" in meta,
    )
