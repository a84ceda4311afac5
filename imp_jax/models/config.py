"""Static model configuration read from GGUF metadata, one reader per architecture family.

The config is a frozen dataclass: hashable, so it is a static argument of every jitted step, and every field the
forward pass branches on is decided here, from the file, not at trace time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

from imp_jax.errors import UnsupportedModel
from imp_jax.gguf.metadata_checks import check_config, check_model_metadata

LLAMA = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]
QWEN2 = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2]
QWEN3 = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3]
GEMMA3 = MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA3]
QWEN3MOE = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]
QWEN35 = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN35]
QWEN35MOE = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN35MOE]
QWEN3NEXT = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3NEXT]
GPT_OSS = MODEL_ARCH_NAMES[MODEL_ARCH.GPT_OSS]

ATTENTION = "attention"
RECURRENT = "recurrent"


GATINGS = ("softmax", "topk_softmax")
ACTIVATIONS = ("silu", "swiglu_oai")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static MoE settings, read from the file's ``expert_*`` keys.

    ``gating``: "softmax" takes the top-k of a softmax over all experts (renormalised over the k when
    ``norm_topk``; llama.cpp always does for qwen3moe, qwen35moe and qwen3next); "topk_softmax" (gpt-oss) takes
    the top-k logits and a softmax over those k. ``activation``: "silu" is SwiGLU; "swiglu_oai" is gpt-oss's
    clamped variant ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
    """

    n_experts: int
    top_k: int
    n_ff_exp: int
    gating: str = "softmax"
    norm_topk: bool = True
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    has_shared: bool = False
    shared_gate: bool = False

    def __post_init__(self):
        if self.gating not in GATINGS:
            raise UnsupportedModel(f"expert gating '{self.gating}' is not supported (supported: {GATINGS})")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModel(f"expert activation '{self.activation}' is not supported ({ACTIVATIONS})")
        if not 0 < self.top_k <= self.n_experts:
            raise UnsupportedModel(f"{self.top_k} experts used per token out of {self.n_experts} is not valid")
        if self.shared_gate and not self.has_shared:
            raise UnsupportedModel("a shared-expert gate without a shared expert")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer kind. ``neox`` pairs dims (i, i+d/2); otherwise adjacent pairs (2i, 2i+1),
    which is what llama.cpp's converter prepares llama Q/K weights for by permuting their rows.

    YaRN: ``beta_fast``/``beta_slow`` bound the ramp between kept and interpolated dims; ``yarn_truncate`` rounds
    that range to whole dims (llama.cpp always does; transformers only when the config does not say otherwise).
    """

    base: float
    dim: int
    neox: bool
    scaling: str = "none"  # none | linear | llama3 (freq factors tensor) | yarn
    factor: float = 1.0
    original_context: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    yarn_truncate: bool = True

    @property
    def attn_factor(self) -> float:
        """YaRN's magnitude correction: llama.cpp and transformers multiply cos and sin, i.e. q and k, by it."""
        if self.scaling != "yarn" or self.factor <= 1.0:
            return 1.0
        return 1.0 + 0.1 * math.log(self.factor)


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Gated-DeltaNet mixer shape (gdn_spec.md §6.1). ``tiled``: qwen35* files tile the value heads (value head j
    reads key head j % Hk); qwen3next files group them (j // (Hv/Hk))."""

    n_k_heads: int
    n_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    tiled: bool

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.head_k_dim + self.n_v_heads * self.head_v_dim


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope: RopeConfig
    # Per-layer attention window (0 = global) and, for layers with a window, their own rope (Gemma-3 local layers).
    layer_window: tuple[int, ...]
    rope_local: RopeConfig | None = None
    attn_scale: float = 0.0
    embed_scale: float = 1.0
    final_softcap: float = 0.0
    attn_softcap: float = 0.0
    activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    post_norms: bool = False  # Gemma: norms after attention and after the MLP too
    tied_output: bool = False
    layer_types: tuple[str, ...] = ()  # ATTENTION or RECURRENT per layer; () means all attention
    attn_gate: bool = False  # Qwen3.5/Next: q_proj interleaves [q | gate] per head, output *= sigmoid(gate)
    gdn: GDNConfig | None = None
    moe: MoEConfig | None = None
    # The devices one model spans (weights.sharding): its ``tp`` axis splits heads, ffn, experts and vocab; fused
    # matrices are laid out per shard. None: one device, no mesh.
    mesh: Any = None

    @property
    def tp(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tp"])

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.layer_types or (ATTENTION,) * self.n_layers

    @property
    def n_attention_layers(self) -> int:
        return self.kinds.count(ATTENTION)

    @property
    def n_window_layers(self) -> int:
        """Attention layers with a sliding window: their K/V live in the cache's window group (runtime.cache)."""
        return sum(1 for k, w in zip(self.kinds, self.layer_window, strict=True) if k == ATTENTION and w > 0)

    @property
    def kv_window(self) -> int:
        """The widest window of the window group (0 without one): how far back any of its layers reads."""
        return max((w for k, w in zip(self.kinds, self.layer_window, strict=True) if k == ATTENTION), default=0)

    @property
    def n_recurrent_layers(self) -> int:
        return self.kinds.count(RECURRENT)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Human-readable kind of each layer: recurrent, local (sliding-window) or global attention."""
        return tuple(
            RECURRENT if k == RECURRENT else ("local" if w else "global")
            for k, w in zip(self.kinds, self.layer_window, strict=True)
        )

    @property
    def n_rep(self) -> int:
        return self.n_head // self.n_head_kv


def _get(meta: Mapping[str, Any], key: str, arch: str, default: Any = None, *, required: bool = False) -> Any:
    name = key.format(arch=arch)
    if name in meta:
        return meta[name]
    if required:
        raise UnsupportedModel(f"GGUF metadata lacks '{name}', which a {arch} model needs")
    return default


def _dim(meta: Mapping[str, Any], key: str, arch: str, default: Any = None, *, required: bool = False) -> int:
    """A size from the metadata; zero or negative would only fail later, as a division by zero."""
    value = int(_scalar(_get(meta, key, arch, default, required=required)))
    if value < 1:
        raise UnsupportedModel(f"GGUF metadata '{key.format(arch=arch)}' is {value}: it must be positive")
    return value


def _scalar(value: Any) -> Any:
    """Per-layer arrays (some files store head counts per layer) collapse to one value when uniform."""
    if hasattr(value, "__len__") and not isinstance(value, str):
        values = set(int(v) for v in value)
        if len(values) != 1:
            raise UnsupportedModel(f"per-layer values {sorted(values)} that differ are not supported here")
        return values.pop()
    return value


def _base(
    meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str], *, require_ff: bool = True, skip_layers: int = 0
) -> dict[str, Any]:
    n_embd = _dim(meta, Keys.LLM.EMBEDDING_LENGTH, arch, required=True)
    n_head = _dim(meta, Keys.Attention.HEAD_COUNT, arch, required=True)
    n_head_kv = _dim(meta, Keys.Attention.HEAD_COUNT_KV, arch, n_head)
    head_dim = _dim(meta, Keys.Attention.KEY_LENGTH, arch, n_embd // n_head)
    n_layers = _dim(meta, Keys.LLM.BLOCK_COUNT, arch, required=True) - skip_layers
    vocab = _get(meta, Keys.LLM.VOCAB_SIZE, arch) or len(meta.get(Keys.Tokenizer.LIST, ()))
    if not vocab:
        raise UnsupportedModel(f"cannot tell the vocabulary size of this {arch} model")
    if n_head % n_head_kv:
        raise UnsupportedModel(f"{n_head} query heads are not a multiple of {n_head_kv} key/value heads")
    scaling = str(_get(meta, Keys.Rope.SCALING_TYPE, arch, "none"))
    if "rope_freqs.weight" in tensor_names:
        scaling = "llama3"
    if scaling not in ("none", "linear", "llama3", "yarn"):
        raise UnsupportedModel(f"rope scaling '{scaling}' is not supported for {arch} yet")
    context_length = int(_get(meta, Keys.LLM.CONTEXT_LENGTH, arch, 4096))
    rope = RopeConfig(
        base=float(_get(meta, Keys.Rope.FREQ_BASE, arch, 10000.0)),
        dim=int(_get(meta, Keys.Rope.DIMENSION_COUNT, arch, head_dim)),
        neox=arch != LLAMA,
        scaling=scaling,
        factor=float(_get(meta, Keys.Rope.SCALING_FACTOR, arch, 1.0) or 1.0),
        original_context=int(_get(meta, Keys.Rope.SCALING_ORIG_CTX_LEN, arch, 0) or context_length),
        beta_fast=float(_get(meta, Keys.Rope.SCALING_YARN_BETA_FAST, arch, 32.0)),
        beta_slow=float(_get(meta, Keys.Rope.SCALING_YARN_BETA_SLOW, arch, 1.0)),
    )
    # Scaling q and k by YaRN's attn_factor (as rope does in llama.cpp and transformers) scales the scores by its
    # square: folded into the softmax scale here, so the forward pass has no YaRN special case.
    attn_scale = float(_get(meta, Keys.Attention.SCALE, arch, 0.0) or 1.0 / math.sqrt(head_dim))
    return dict(
        arch=arch,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=int(_scalar(_get(meta, Keys.LLM.FEED_FORWARD_LENGTH, arch, 0, required=require_ff))),
        vocab_size=int(vocab),
        context_length=context_length,
        rms_eps=float(_get(meta, Keys.Attention.LAYERNORM_RMS_EPS, arch, 1e-6)),
        rope=rope,
        layer_window=(0,) * n_layers,
        attn_scale=attn_scale * rope.attn_factor**2,
        final_softcap=float(_get(meta, Keys.LLM.FINAL_LOGIT_SOFTCAPPING, arch, 0.0) or 0.0),
        attn_softcap=float(_get(meta, Keys.LLM.ATTN_LOGIT_SOFTCAPPING, arch, 0.0) or 0.0),
        tied_output="output.weight" not in tensor_names,
    )


def _dense(meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str]) -> ModelConfig:
    return ModelConfig(**_base(meta, arch, tensor_names))


def _layer_windows(meta: Mapping[str, Any], arch: str, n_layers: int, default_pattern: int) -> tuple[int, ...]:
    """The sliding window of each layer (0 = global), as llama.cpp's ``load_swa_pattern``: the file's per-layer
    array, else a period p whose last layer is global (p = 0: all local), else the architecture's default p."""
    window = int(_get(meta, Keys.Attention.SLIDING_WINDOW, arch, 0) or 0)
    pattern = _get(meta, Keys.Attention.SLIDING_WINDOW_PATTERN, arch, default_pattern)
    if hasattr(pattern, "__len__"):
        is_local = [bool(p) for p in pattern]
    else:
        p = int(pattern)
        is_local = [p == 0 or i % p < p - 1 for i in range(n_layers)]
    return tuple(window if (loc and window) else 0 for loc in is_local[:n_layers])


def _gemma3(meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str]) -> ModelConfig:
    """Gemma-3: sliding-window layers with every 6th layer global unless the file says otherwise; local layers use
    rope base 10000 without scaling (as llama.cpp does); embeddings scaled by sqrt(n_embd); GeGLU; four norms."""
    base = _base(meta, arch, tensor_names)
    if base["rope"].scaling == "yarn":
        raise UnsupportedModel("YaRN on Gemma-3's global layers only is not supported")
    base_swa = float(_get(meta, Keys.Rope.FREQ_BASE_SWA, arch, 10000.0))
    base.update(
        layer_window=_layer_windows(meta, arch, base["n_layers"], default_pattern=6),
        rope_local=dataclasses.replace(base["rope"], base=base_swa, scaling="none", factor=1.0),
        embed_scale=math.sqrt(base["n_embd"]),
        activation="gelu_tanh",
        post_norms=True,
    )
    return ModelConfig(**base)


def _moe(meta: Mapping[str, Any], arch: str, *, shared: bool) -> MoEConfig:
    return MoEConfig(
        n_experts=int(_get(meta, Keys.LLM.EXPERT_COUNT, arch, required=True)),
        top_k=int(_get(meta, Keys.LLM.EXPERT_USED_COUNT, arch, required=True)),
        n_ff_exp=int(_get(meta, Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, arch, required=True)),
        norm_topk=bool(_get(meta, Keys.LLM.EXPERT_WEIGHTS_NORM, arch, True)),
        has_shared=shared,
        shared_gate=shared,
    )


def _qwen3moe(meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str]) -> ModelConfig:
    base = _base(meta, arch, tensor_names, require_ff=False)
    return ModelConfig(**base, moe=_moe(meta, arch, shared=False))


def _gpt_oss(meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str]) -> ModelConfig:
    """gpt-oss: sliding-window and global layers alternating (llama.cpp's default period 2: even layers local),
    the same YaRN rope on both, attention sinks, experts picked by the top-k router logits and weighted by a
    softmax over those k, and the clamped SwiGLU (alpha 1.702, limit 7: llama.cpp hard-codes both).

    YaRN's ramp bounds are not rounded to whole dims: gpt-oss's config sets ``truncate: false`` and transformers
    (like OpenAI's reference) follows it; llama.cpp rounds them, which moves a few mid frequencies slightly.
    """
    base = _base(meta, arch, tensor_names, require_ff=False)
    base.update(
        rope=dataclasses.replace(base["rope"], yarn_truncate=False),
        layer_window=_layer_windows(meta, arch, base["n_layers"], default_pattern=2),
    )
    moe = dataclasses.replace(_moe(meta, arch, shared=False), gating="topk_softmax", activation="swiglu_oai")
    return ModelConfig(**base, moe=moe)


def _hybrid(meta: Mapping[str, Any], arch: str, tensor_names: frozenset[str]) -> ModelConfig:
    """Qwen3.5 / Qwen3.5-MoE / Qwen3-Next: Gated-DeltaNet layers with a gated attention layer every
    ``full_attention_interval``; MTP (nextn) blocks counted in block_count are not part of the main stack."""
    nextn = int(_get(meta, Keys.LLM.NEXTN_PREDICT_LAYERS, arch, 0) or 0)
    base = _base(meta, arch, tensor_names, require_ff=arch == QWEN35, skip_layers=nextn)
    n = base["n_layers"]
    recurrent = _get(meta, "{arch}.attention.recurrent_layers", arch)
    if recurrent is not None:
        is_rec = [bool(x) for x in recurrent][:n]
    else:
        interval = int(_get(meta, Keys.LLM.FULL_ATTENTION_INTERVAL, arch, 4) or 4)
        is_rec = [(i + 1) % interval != 0 for i in range(n)]
    n_v = int(_get(meta, Keys.SSM.TIME_STEP_RANK, arch, required=True))
    gdn = GDNConfig(
        n_k_heads=int(_get(meta, Keys.SSM.GROUP_COUNT, arch, required=True)),
        n_v_heads=n_v,
        head_k_dim=int(_get(meta, Keys.SSM.STATE_SIZE, arch, required=True)),
        head_v_dim=int(_get(meta, Keys.SSM.INNER_SIZE, arch, required=True)) // n_v,
        conv_kernel=int(_get(meta, Keys.SSM.CONV_KERNEL, arch, required=True)),
        tiled=arch != QWEN3NEXT,
    )
    moe = _moe(meta, arch, shared=True) if arch != QWEN35 else None
    return ModelConfig(
        **base,
        layer_types=tuple(RECURRENT if r else ATTENTION for r in is_rec),
        attn_gate=True,
        gdn=gdn,
        moe=moe,
    )


_READERS: dict[str, Callable[[Mapping[str, Any], str, frozenset[str]], ModelConfig]] = {
    LLAMA: _dense,
    QWEN2: _dense,
    QWEN3: _dense,
    GEMMA3: _gemma3,
    QWEN3MOE: _qwen3moe,
    QWEN35: _hybrid,
    QWEN35MOE: _hybrid,
    QWEN3NEXT: _hybrid,
    GPT_OSS: _gpt_oss,
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(_READERS)


def config_from_gguf(
    meta: Mapping[str, Any], tensor_names: frozenset[str] | set[str] | Mapping[str, Any]
) -> ModelConfig:
    """ModelConfig for a file's metadata; UnsupportedModel names the architecture when there is no reader, and
    the key whose value no model can have (imp_jax.gguf.metadata_checks), before anything is planned or allocated.
    Given the tensor table (name -> TensorInfo) instead of names, expert counts are checked against it too."""
    arch = str(meta.get(Keys.General.ARCHITECTURE, ""))
    reader = _READERS.get(arch)
    if reader is None:
        raise UnsupportedModel(
            f"architecture '{arch or '(missing)'}' is not supported; supported: {', '.join(supported_architectures())}"
        )
    check_model_metadata(meta, arch)
    config = reader(meta, arch, frozenset(tensor_names))
    check_config(config, tensor_names)
    return config
