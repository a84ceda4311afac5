"""GGUF vocabularies as tokenizers that give llama.cpp's token ids.

A GGUF file carries its vocabulary as metadata (tokens, scores, token types, BPE merges); llama.cpp's
``llama-vocab.cpp`` defines how those become ids, and its vocab test files are the conformance suite. The models
are HuggingFace ``tokenizers`` BPEs, not a BPE written here:

* ``gpt2`` vocabularies: byte-level BPE over the file's merges, after llama.cpp's pre-tokenizer regexes for the
  file's ``tokenizer.ggml.pre`` (applied in sequence, each splitting the pieces of the one before).
* ``llama`` (SentencePiece) vocabularies: llama.cpp merges adjacent symbols greedily by the score of the token
  they form, with ``<0xXX>`` byte fallback. That is a BPE whose merge ranks follow the scores, so the merges are
  derived from the vocabulary as HF's LlamaConverter does: every split of a token into two tokens, ranked by the
  merged token's score. (On equal scores llama.cpp merges the leftmost pair and the BPE the lower token id
  first; no vocabulary tested tells them apart.)
* ``gemma4`` vocabularies: SentencePiece-style BPE (spaces as ``▁``, raw UTF-8, byte fallback) over the file's
  merges, line by line, with a run of newlines taken whole when it is a token.

Special tokens are split off before the model as llama.cpp's ``tokenizer_st_partition`` does (longest first, with
Phi-3's right-stripping): user-defined tokens always, control tokens only when ``parse_special`` is true. The
end-of-generation set and the token-type fix-ups by token text (``<|im_end|>`` made a control token, gpt-oss's
``<|channel|>`` shown as text, ...) follow ``llama_vocab::impl::load``.

Decoding looks each id up in a table of the bytes llama.cpp's ``token_to_piece`` gives, so n new tokens cost
O(n), and a stream of pieces joins to exactly ``decode`` of all ids. Like llama.cpp's generation path it neither
strips a SentencePiece prefix space nor applies ``clean_up_tokenization_spaces``.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from gguf import Keys, TokenType
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from imp_jax.errors import GGUFError, ImpError, UnsupportedModel
from imp_jax.gguf.metadata_checks import check_merges, check_vocabulary, split_merge

_K = Keys.Tokenizer
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = (
    int(TokenType.NORMAL),
    int(TokenType.UNKNOWN),
    int(TokenType.CONTROL),
    int(TokenType.USER_DEFINED),
    int(TokenType.BYTE),
)

# Pre-tokenizer regexes from llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp), by tokenizer.ggml.pre. Oniguruma
# (inside `tokenizers`) gives them the meaning llama.cpp's category-collapsing matcher does. Non-ASCII characters
# are written as escapes so no editor can normalise them. llama.cpp turns non-ASCII whitespace into \v before
# matching, so explicit non-ASCII ranges never match it: those classes are intersected with \S (&&\S).
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_LOWER = r"((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"  # llama.cpp's stand-ins for \p{Lu}* \p{Ll}+
_LOWER_UPPER = r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER}|[^\r\n\p{{L}}\p{{N}}]?{_LOWER_UPPER}"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER}{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_LOWER_UPPER}{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&\\S]+"
_DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[A-Za-z"
    "\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~" "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002&&\\S]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclasses.dataclass(frozen=True)
class _Pre:
    """What llama.cpp derives from one ``tokenizer.ggml.pre`` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself a token is taken whole
    add_bos: bool = False  # the default when the file has no add_bos_token key


def _pre_table() -> dict[str, _Pre]:
    groups: list[tuple[tuple[str, ...], _Pre]] = [
        (("default",), _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))),
        (
            ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
            _Pre((_LLAMA3,), ignore_merges=True, add_bos=True),
        ),
        (("dbrx", "smaug-bpe"), _Pre((_LLAMA3,))),
        (("deepseek-llm",), _Pre(_DEEPSEEK_LLM)),
        (("deepseek-coder",), _Pre(_DEEPSEEK_CODER)),
        (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _Pre(_DEEPSEEK_V3)),
        (("falcon",), _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))),
        (
            ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "mellum"),
            _Pre((_GPT2,)),
        ),
        (
            ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
            _Pre((r"\p{N}", _GPT2)),
        ),
        (
            ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open", "megrez"),
            _Pre((_QWEN2,)),
        ),
        (("qwen35",), _Pre((_QWEN35,))),
        (("tekken",), _Pre((_TEKKEN,), ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "kanana2", "talkie"), _Pre((_GPT4O,))),
    ]
    return {name: pre for names, pre in groups for name in names}


_PRE = _pre_table()
_NEWLINE_RUNS = re.compile(r"(\n+)")
_C_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips next to a special token

# Token texts llama.cpp ends generation on (llama_vocab::impl::load); the texts it looks for when the file names
# no end-of-turn / end-of-message / fill-in-the-middle token (a token found that way becomes a control token, and
# FIM pad/repo/separator end generation too); the gpt-oss (harmony) markers it always prints as text.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<｜end▁of▁sentence｜>", "[e~[",
    }
)  # fmt: skip
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_FIM = (  # (key, texts, ends generation)
    (_K.FIM_PRE_ID, ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                     "<|code_prefix|>", "<|prefix|>"), False),
    (_K.FIM_SUF_ID, ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                     "<|code_suffix|>", "<|suffix|>"), False),
    (_K.FIM_MID_ID, ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                     "<|code_middle|>", "<|middle|>"), False),
    (_K.FIM_PAD_ID, ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"), True),
    (_K.FIM_REP_ID, ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"), True),
    (_K.FIM_SEP_ID, ("<|file_sep|>",), True),
)  # fmt: skip
_HARMONY_VISIBLE = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _byte_level_decoder() -> dict[int, int]:
    """GPT-2's printable stand-in characters (as ordinals) -> the bytes they encode."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: b for b in printable}, **{256 + i: b for i, b in enumerate(shifted)}}


_BYTE_LEVEL = _byte_level_decoder()
# str.translate table for the fast path; raw characters below 256 that are not in the alphabet map out of latin-1.
_BYTE_LEVEL_TABLE = {**{c: 0xFFFF for c in range(256)}, **_BYTE_LEVEL}


class StreamDecoder:
    """Ids in one at a time, text out: every piece is whole UTF-8 characters, an incomplete one is held back.

    The pieces from ``push`` followed by ``finish()`` join to ``Tokenizer.decode`` of the same ids.
    """

    def __init__(self, pieces: Sequence[bytes], skip: frozenset[int]):
        self._pieces = pieces
        self._skip = skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a multi-byte character is still incomplete)."""
        token_id = int(token_id)
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._pieces[_checked(token_id, len(self._pieces))])

    def finish(self) -> str:
        """What is held back, flushed (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _checked(token_id: int, n: int) -> int:
    if not 0 <= token_id < n:
        raise ImpError(f"token id {token_id} is outside the vocabulary (0..{n - 1})")
    return token_id


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's ids, special tokens, BOS/EOS rules and end-of-generation set.

    Build one with ``Tokenizer.from_metadata``.
    """

    kind: str  # "gpt2" (byte-level BPE), "llama" (SentencePiece) or "gemma4" (SentencePiece-style BPE)
    pre: str  # the pre-tokenizer: tokenizer.ggml.pre for gpt2 vocabularies, else the kind
    bos_id: int | None
    eos_id: int | None
    eos_ids: frozenset[int]  # every id that ends generation (eos, eot, eom, <|im_end|>, <end_of_turn>, ...)
    add_bos: bool  # encode(add_special=True) prepends bos_id
    add_eos: bool  # encode(add_special=True) appends eos_id
    add_space_prefix: bool  # SentencePiece: a space before text at the start or after a special token

    def __init__(self, metadata: Mapping[str, Any], source: object = "GGUF metadata"):
        """source: the file the metadata came from, named by every GGUFError about it."""
        check_vocabulary(metadata, source)
        model = str(metadata.get(_K.MODEL, ""))
        if model not in ("gpt2", "llama", "gemma4"):
            raise UnsupportedModel(f"tokenizer model '{model}' ({_K.MODEL}) is not supported (gpt2, llama, gemma4 are)")
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(_required(metadata, _K.LIST))]
        n = len(tokens)
        if n == 0:
            raise UnsupportedModel(f"the vocabulary ({_K.LIST}) is empty")
        types = np.array(metadata.get(_K.TOKEN_TYPE, np.full(n, _NORMAL)), dtype=np.int32)
        if len(types) < n:
            raise UnsupportedModel(f"{_K.TOKEN_TYPE} has {len(types)} entries for {n} tokens")
        types = types[:n]
        ids = dict(zip(tokens, range(n), strict=True))
        self.kind = model
        self.pre = str(metadata.get(_K.PRE) or "default") if model == "gpt2" else model
        if self.pre not in _PRE and model == "gpt2":
            raise UnsupportedModel(
                f"pre-tokenizer '{self.pre}' ({_K.PRE}) is not supported; supported: {', '.join(sorted(_PRE))}"
            )
        self._read_flags(metadata, n)
        self.eos_ids = _end_of_generation(metadata, tokens, ids, types, self.eos_id)
        self._tokens = tokens
        self._ids = ids
        try:  # what `tokenizers` rejects is named here (a bad merge by check_merges)
            if model == "llama":
                scores = np.asarray(metadata.get(_K.SCORES, np.zeros(n)), dtype=np.float32)
                self._hf = _spm_model(tokens, ids, scores)
            else:
                self._hf = _bpe_model(model, self.pre, ids, _required(metadata, _K.MERGES))
        except ImpError:
            raise
        except Exception as e:  # `tokenizers` raises bare Exception
            check_merges(metadata, source)  # names the merge at fault, when one is
            raise GGUFError(source, f"the tokenizers library rejects this vocabulary: {e}") from e
        self._pieces = [_token_bytes(model, t, k) for t, k in zip(tokens, types.tolist(), strict=True)]
        self._hidden = frozenset(np.flatnonzero((types == _CONTROL) | (types == _UNKNOWN)).tolist())
        self._specials = _special_index(tokens, types, (_CONTROL, _USER_DEFINED, _UNKNOWN))
        self._user_specials = _special_index(tokens, types, (_USER_DEFINED,))
        self._rstrip = _rstrip_ids(metadata, ids, self._specials)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: object = "GGUF metadata") -> Tokenizer:
        """Build from GGUF metadata as ``{key: value}`` (keys as in ``gguf.Keys.Tokenizer``); ``source`` names
        the file in errors."""
        return cls(metadata, source)

    def _read_flags(self, metadata: Mapping[str, Any], n: int) -> None:
        """Special ids and BOS/EOS/prefix flags: llama.cpp's defaults per vocabulary type, then the file's keys."""
        if self.kind == "llama":
            bos, eos, add_bos, prefix = 1, 2, True, True
        elif self.kind == "gemma4":
            bos, eos, add_bos, prefix = None, None, True, False
        else:
            bos, eos, add_bos, prefix = 11, 11, _PRE[self.pre].add_bos, False
        self.bos_id = _token_id(metadata, _K.BOS_ID, n, bos)
        self.eos_id = _token_id(metadata, _K.EOS_ID, n, eos)
        # llama.cpp forces BOS on for Gemma 4 whatever the file says.
        self.add_bos = bool(metadata.get(_K.ADD_BOS, add_bos)) or self.kind == "gemma4"
        self.add_eos = bool(metadata.get(_K.ADD_EOS, False))
        self.add_space_prefix = self.kind == "llama" and bool(metadata.get(_K.ADD_PREFIX, prefix))

    # -- queries ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The token's text as the vocabulary stores it (``▁Hello``, ``ĠHello``, ``<|im_end|>``)."""
        return self._tokens[_checked(token_id, len(self._tokens))]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry (the exact stored text), or None."""
        return self._ids.get(piece)

    # -- encode -------------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as llama.cpp's ``llama_tokenize`` gives them.

        add_special: add BOS (and EOS) where the file (or llama.cpp's default for it) asks for them.
        parse_special: control tokens written in the text (``<|im_start|>``) become their ids, as in llama.cpp's
        CLI and server; with False they are tokenized as plain text (llama.cpp's vocab tests). User-defined
        tokens are matched either way.
        """
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        after_special = True
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
            else:
                out.extend(self._encode_text(fragment, after_special))
                after_special = False
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Text and special-token ids in order, as llama.cpp's tokenizer_st_partition splits them: each special
        token that occurs, longest first, splits every text piece at all its occurrences."""
        index = self._specials if parse_special else self._user_specials
        present = [tok for head, toks in index.items() if head in text for tok in toks if tok[0] in text]
        present.sort(key=lambda tok: -len(tok[0].encode()))  # llama.cpp orders by length in bytes
        parts: list[str | int] = [text] if text else []
        for special, token_id in present:
            split: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or special not in part:
                    split.append(part)
                    continue
                for i, piece in enumerate(part.split(special)):
                    if i:
                        split.append(token_id)
                        if token_id in self._rstrip:
                            piece = piece.lstrip(_C_SPACE)
                    if piece:
                        split.append(piece)
            parts = split
        return parts

    def _encode_text(self, text: str, after_special: bool) -> list[int]:
        if self.kind == "gpt2":
            return self._hf.encode(text, add_special_tokens=False).ids
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", "▁")
        if self.kind == "llama":
            return self._hf.encode(text, add_special_tokens=False).ids
        out: list[int] = []  # gemma4: lines through the BPE; a run of newlines whole when it is a token
        for piece in _NEWLINE_RUNS.split(text):
            if piece.startswith("\n") and (token_id := self._ids.get(piece)) is not None:
                out.append(token_id)
            elif piece:
                out.extend(self._hf.encode(piece, add_special_tokens=False).ids)
        return out

    # -- decode -------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``: llama.cpp's token pieces concatenated; control tokens left out if ``skip_special``."""
        pieces, n = self._pieces, len(self._pieces)
        skip = self._hidden if skip_special else frozenset()
        return b"".join([pieces[_checked(i, n)] for i in map(int, ids) if i not in skip]).decode("utf-8", "replace")

    def stream(self, *, skip_special: bool = True) -> StreamDecoder:
        """An incremental decoder for generated ids (see ``StreamDecoder``)."""
        return StreamDecoder(self._pieces, self._hidden if skip_special else frozenset())

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------------------------
# Construction helpers
# ---------------------------------------------------------------------------------------------------------------


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise UnsupportedModel(f"the GGUF metadata has no '{key}', which the tokenizer needs")
    return metadata[key]


def _token_id(metadata: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    """An id from the file, else the default; out-of-range ids are ignored as llama.cpp does."""
    value = metadata.get(key)
    if value is not None and 0 <= int(value) < n:
        return int(value)
    return default if default is not None and default < n else None


def _end_of_generation(
    metadata: Mapping[str, Any], tokens: list[str], ids: Mapping[str, int], types: np.ndarray, eos_id: int | None
) -> frozenset[int]:
    """The ids that end generation, with token types fixed up in place the way llama.cpp does by token text."""
    n = len(tokens)

    def by_key_or_text(key: str, texts: Iterable[str]) -> int | None:
        if (found := _token_id(metadata, key, n, None)) is not None:
            return found
        if (found := next((ids[t] for t in texts if t in ids), None)) is not None:
            types[found] = _CONTROL  # llama.cpp: "control-looking token ... its type will be overridden"
        return found

    eog = {i for i in (eos_id, by_key_or_text(_K.EOT_ID, _EOT_TEXTS), by_key_or_text(_K.EOM_ID, ["<|eom_id|>"]))
           if i is not None}  # fmt: skip
    for key, texts, ends in _FIM:
        if (i := by_key_or_text(key, texts)) is not None and ends:
            eog.add(i)
    for text in _EOG_TEXTS & ids.keys():
        eog.add(ids[text])
        types[ids[text]] = _CONTROL
    for text in _HARMONY_VISIBLE:
        if text in ids:
            types[ids[text]] = _USER_DEFINED
    texts = {tokens[i] for i in eog}
    if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts):
        eog.discard(ids["<|end|>"])  # harmony: <|end|> closes a message, not the generation
        types[ids["<|end|>"]] = _USER_DEFINED
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(ids["</s>"])  # gemma4: </s> is an ordinary token
        types[ids["</s>"]] = _NORMAL
    return frozenset(eog)


def _rstrip_ids(metadata: Mapping[str, Any], ids: Mapping[str, int], specials: Mapping[str, Any]) -> frozenset[int]:
    """Special tokens that swallow the whitespace after them: llama.cpp sets this by model name, for Phi-3 only."""
    name = str(metadata.get(Keys.General.NAME, "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return frozenset()
    rstrip = {i for group in specials.values() for _, i in group} | {ids[t] for t in ("</s>",) if t in ids}
    return frozenset(rstrip - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids})


def _special_index(tokens: list[str], types: np.ndarray, kinds: tuple[int, ...]) -> dict[str, list[tuple[str, int]]]:
    """Special tokens grouped by their first four characters, so a text is searched for each group once."""
    index: dict[str, list[tuple[str, int]]] = {}
    for i in np.flatnonzero(np.isin(types, kinds)).tolist():
        index.setdefault(tokens[i][:4], []).append((tokens[i], i))
    return index


def _bpe_model(model: str, pre: str, ids: dict[str, int], merges: Sequence[str]) -> HFTokenizer:
    pairs = [split_merge(m) for m in merges]
    if model == "gemma4":
        return HFTokenizer(models.BPE(ids, pairs, byte_fallback=True))
    hf = HFTokenizer(models.BPE(ids, pairs, ignore_merges=_PRE[pre].ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE[pre].regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf


def _spm_model(tokens: list[str], ids: dict[str, int], scores: np.ndarray) -> HFTokenizer:
    """llama.cpp's score-greedy SentencePiece merging as a BPE: every split a+b of a token, best score first."""
    unk = "<unk>" if "<unk>" in ids else None
    return HFTokenizer(models.BPE(ids, _spm_merges(tokens, scores), byte_fallback=True, unk_token=unk))


_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64


def _spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, ordered by the token's score (ties: lower id), then split point.

    Slicing and hashing the ~10^6 candidate halves of a 262k vocabulary in Python takes seconds, so candidates
    are matched in numpy instead: a polynomial hash (mod 2**64) of every token, looked up for both halves of
    every split. A false match (odds ~1e-8 per vocabulary) would name a non-token, which the BPE constructor
    rejects loudly; it cannot give wrong ids.
    """
    by_score = [tokens[i] for i in np.argsort(-scores, kind="stable").tolist()]
    n = len(by_score)
    lengths = np.fromiter(map(len, by_score), dtype=np.int64, count=n)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    chars = np.frombuffer("".join(by_score).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        one = np.ones(1, dtype=np.uint64)
        power = np.concatenate((one, np.cumprod(np.full(len(chars), _HASH_BASE, dtype=np.uint64))))
        inverse = np.concatenate((one, np.cumprod(np.full(len(chars) - 1, pow(_HASH_BASE, -1, 2**64), np.uint64))))
        prefix = np.concatenate((one - one, np.cumsum(chars * inverse)))

        def substring_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # of chars[a:b], wherever it sits
            return (prefix[b] - prefix[a]) * power[a]

        known = np.sort(substring_hash(starts, ends))
        splits = np.maximum(lengths - 1, 0)
        owner = np.repeat(np.arange(n), splits)
        at = np.arange(len(owner)) - np.repeat(np.cumsum(splits) - splits, splits) + 1
        mid = starts[owner] + at

        def is_token(h: np.ndarray) -> np.ndarray:
            return known[np.minimum(np.searchsorted(known, h), n - 1)] == h

        hit = np.flatnonzero(is_token(substring_hash(starts[owner], mid)) & is_token(substring_hash(mid, ends[owner])))
    return [
        (t[:k], t[k:]) for t, k in zip(map(by_score.__getitem__, owner[hit].tolist()), at[hit].tolist(), strict=True)
    ]


def _token_bytes(kind: str, text: str, token_type: int) -> bytes:
    """What llama.cpp's token_to_piece(special=True) gives for one token."""
    if token_type in (_CONTROL, _UNKNOWN, _USER_DEFINED):
        return text.encode()
    if token_type == _BYTE and kind != "gpt2" and len(text) == 6 and text.startswith("<0x"):
        return bytes([int(text[3:5], 16)])
    if token_type not in (_NORMAL, _BYTE):
        return b""  # unused / undefined tokens print nothing
    if kind != "gpt2":
        return text.replace("▁", " ").encode()
    try:
        return text.translate(_BYTE_LEVEL_TABLE).encode("latin-1")
    except UnicodeEncodeError:  # characters outside the byte-level alphabet: as llama.cpp's llama_decode_text
        raw = text.encode()
        return b"".join(
            bytes([_BYTE_LEVEL[ord(c)]])
            if ord(c) in _BYTE_LEVEL
            else b"[UNK_BYTE_0x" + c.encode().hex().encode() + raw + b"]"
            for c in text
        )
