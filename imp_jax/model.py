"""The public Python surface: ``load``, ``Model``, ``generate`` and ``Generation`` (API contract)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from imp_jax import feedback
from imp_jax.debug import check_prefill, debug_nans_enabled
from imp_jax.errors import ContextOverflow, ImpError, gib
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.config import ModelConfig, config_from_gguf
from imp_jax.ops.policy import resolve_dtype
from imp_jax.planning import memory
from imp_jax.runtime import compile_cache as compile_cache_mod
from imp_jax.runtime import steps
from imp_jax.runtime.sampling import SamplingParams
from imp_jax.text import harmony
from imp_jax.text.chat import ChatTemplate
from imp_jax.text.tokenizer import Tokenizer
from imp_jax.weights.files import open_model_file
from imp_jax.weights.loading import load_params
from imp_jax.weights.specs import param_specs

DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    timings: steps.Timings
    # Harmony models (gpt-oss): the analysis channel, while ``text`` holds the final answer. None otherwise.
    reasoning: str | None = None


class Model:
    """A loaded model: config, weights on the device, tokenizer and chat template."""

    def __init__(
        self,
        file: ModelFile,
        config: ModelConfig,
        params: Any,
        tokenizer: Tokenizer,
        *,
        dtype: str,
        max_context: int,
        batch: int,
    ):
        self.file = file
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_context = max_context
        self.batch = batch
        self.plan: memory.MemoryPlan | None = None  # the plan load() checked before any weight moved
        self._chat = ChatTemplate.from_metadata(file.metadata, tokenizer)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self.file.path.name}: {c.arch}, {c.n_layers} layers, n_embd {c.n_embd}, "
            f"dtype {self.dtype}, max_context {self.max_context})"
        )

    @property
    def path(self) -> Path:
        return self.file.path

    def chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation rendered with the GGUF's own template (ChatML when the file has none, as llama.cpp)."""
        return self._chat.render(list(messages), add_generation_prompt=add_generation_prompt, **kwargs)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[len(token_ids), vocab] f32: one causal forward of the whole sequence from an empty cache."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids)
        logits, _ = steps.run_prefill(
            self.params,
            self.config,
            ids,
            steps.bucket(len(ids), self.max_context),
            jnp.dtype(self.dtype),
            all_logits=True,
        )
        return np.asarray(logits[0, : len(ids)], np.float32)

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ImpError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) > self.max_context:
            raise ContextOverflow(
                f"{len(ids)} tokens do not fit the context of {self.max_context}; "
                f"load with a larger max_context (the model allows {self.config.context_length})"
            )


def _parse_dtype(dtype: str) -> str:
    name = str(jnp.dtype(dtype)) if dtype not in DTYPES else dtype
    if name not in DTYPES:
        raise ImpError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    return name


def load(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    max_context: int | str = 4096,
    batch: int = 1,
    device_memory: int | str | None = None,
    path: str = "auto",
    force: bool = False,
    debug: bool = False,
    progress: bool | None = None,
    compile_cache: bool | str | os.PathLike[str] = True,
) -> Model:
    """Open, validate and plan a model, then put its weights on the device.

    ``path_or_name`` is a .gguf path or a registry name. ``dtype`` "auto" is float32 on XLA:CPU (no fast bf16
    dot there) and bfloat16 elsewhere. ``max_context`` (capped at the model's own context, or
    "auto" for the largest that fits) and ``batch`` size the KV cache. The memory plan is made first and
    ``ModelTooLarge`` is raised before any weight reaches the device when it does not fit ``device_memory`` (default:
    what the device reports free). ``path`` picks how quantized weights run ("auto": packed kernels where they
    exist, the dequantized fallback only where it fits); ``force`` loads past the budget with a warning.
    ``debug`` (or IMP_JAX_DEBUG_NANS=1) runs a checked forward that names the first non-finite layer and op.
    ``compile_cache`` keeps compiled steps on disk for the next process (``runtime.compile_cache``): True for the
    imp-jax cache folder, a folder of your own, or False.
    ``progress`` (default: when stderr is a terminal) prints the loading line, the plan's choices and progress.
    """
    dtype = _parse_dtype(resolve_dtype(dtype))
    compile_cache_mod.configure(compile_cache)
    show = os.isatty(2) if progress is None else progress
    mf = open_model_file(path_or_name, progress=show)
    if show:
        feedback.say(f"loading {mf.path.name} ({feedback.size_words(mf.path.stat().st_size)}, {mf.path}) ...")
    config = config_from_gguf(mf.metadata, mf.tensors)
    tokenizer = Tokenizer.from_metadata(mf.metadata, mf.path)
    specs = param_specs(mf, config, dtype)
    plan = memory.plan_specs(
        specs, config, label=mf.path.name, max_context=max_context, batch=batch, dtype=dtype,
        budget=memory.resolve_budget(device_memory), path=path,
    )  # fmt: skip
    memory.check_fits(plan, force=force)
    params = load_params(mf, config, plan.specs, on_bytes=_progress(mf, plan, show))
    if debug or debug_nans_enabled():
        check_prefill(params, config, tokenizer.encode("The quick brown fox"), dtype=dtype, specs=plan.specs)
    model = Model(mf, config, params, tokenizer, dtype=dtype, max_context=plan.max_context, batch=batch)
    model.plan = plan
    return model


def _progress(mf: ModelFile, plan: memory.MemoryPlan, show: bool):
    """Say what was planned (dtype, weight path, context) and report file bytes as they reach the device."""
    import jax

    from imp_jax.weights.tensor_spec import is_spec

    if not show:
        return None
    feedback.say(
        f"{plan.dtype}, {plan.path_label}, context {plan.max_context}: needs {gib(plan.needed_bytes)} "
        f"of {gib(plan.available_bytes)} ({plan.budget.source})"
    )
    leaves = jax.tree.leaves(plan.specs, is_leaf=is_spec)
    total = sum(mf.tensors[n].nbytes for s in leaves for part in s.parts for n in part if n in mf.tensors)
    advance, close = feedback.byte_progress("loading weights", total)
    done = {"bytes": 0}

    def on_bytes(n: int) -> None:
        advance(n)
        done["bytes"] += n
        if done["bytes"] >= total:
            close()

    return on_bytes


def generate(
    model: Model,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repeat_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stream: bool = False,
):
    """Generate a continuation. Returns a Generation, or with stream=True an iterator of text pieces whose join
    equals the final text. temperature=0 is greedy and bitwise deterministic."""
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    model._check_ids(ids)
    if max_tokens < 0:
        raise ImpError(f"max_tokens must be >= 0, got {max_tokens}")
    sp = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    sp.validate()
    run = _Run(model, ids, sp, max_tokens, tuple(s for s in stop if s))
    if stream:
        return run.pieces()
    for _ in run.pieces():
        pass
    return run.result()


class _Run:
    """One generation: drives the token stream, detokenizes incrementally, applies EOS and stop strings."""

    def __init__(self, model: Model, ids: list[int], sp: SamplingParams, max_tokens: int, stop: tuple[str, ...]):
        self.model, self.ids, self.sp, self.max_tokens, self.stop = model, ids, sp, max_tokens, stop
        self.out_ids: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.times: dict[str, float] = {"prefill_s": 0.0, "decode_s": 0.0}

    def pieces(self) -> Iterator[str]:
        m = self.model
        if self.max_tokens == 0:
            return
        decoder = m.tokenizer.stream()
        emitted = 0
        hold = max((len(s) for s in self.stop), default=1) - 1
        tokens = steps.token_stream(
            m.params,
            m.config,
            self.ids,
            m.max_context,
            jnp.dtype(m.dtype),
            self.sp,
            self.max_tokens,
            self.times,
        )
        cut = None
        for tok in tokens:
            if tok in m.tokenizer.eos_ids:
                self.finish_reason = "stop"
                break
            self.out_ids.append(tok)
            self.text += decoder.push(tok)
            cut = self._stop_at()
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                break
            safe = len(self.text) - hold
            if safe > emitted:
                yield self.text[emitted:safe]
                emitted = safe
        tokens.close()
        if cut is None:
            self.text += decoder.finish()
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def _stop_at(self) -> int | None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def result(self) -> Generation:
        timings = steps.Timings(len(self.ids), len(self.out_ids), self.times["prefill_s"], self.times["decode_s"])
        text, reasoning = self.text, None
        if harmony.is_harmony(self.model.tokenizer):
            text, reasoning = harmony.split_reply(self.text)
        return Generation(text, self.out_ids, self.finish_reason, timings, reasoning)
