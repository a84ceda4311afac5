"""The public Python surface: ``load``, ``Model``, ``generate`` and ``Generation`` (API contract)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imp_jax import feedback, registry, user_input
from imp_jax.debug import check_prefill
from imp_jax.errors import ImpError, gib
from imp_jax.gguf.reader import ModelFile
from imp_jax.models.config import ModelConfig, config_from_gguf
from imp_jax.ops import native_cpu
from imp_jax.ops.policy import REFERENCE, KernelPolicy, resolve_dtype, resolve_kernels
from imp_jax.planning import memory
from imp_jax.runtime import compile_cache as compile_cache_mod
from imp_jax.runtime import steps
from imp_jax.runtime.compiled_steps import CompiledSteps
from imp_jax.text import harmony
from imp_jax.text.chat import ChatTemplate
from imp_jax.text.tokenizer import Tokenizer
from imp_jax.weights.files import open_model_file
from imp_jax.weights.loading import load_params
from imp_jax.weights.sharding import make_mesh, on_mesh, tp_size
from imp_jax.weights.specs import param_specs


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
        kernels: KernelPolicy = REFERENCE,
        store: compile_cache_mod.Store | None = None,
    ):
        self.file = file
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_context = max_context
        self.batch = batch
        self.kernels = kernels  # resolved once at load; every step gets it as static configuration
        self.plan: memory.MemoryPlan | None = None  # the plan load() checked before any weight moved
        # the engine's step executables, shared by every engine on this model (and kept on disk with a store)
        self.programs = CompiledSteps(store)
        self._chat = ChatTemplate.from_metadata(file.metadata, tokenizer)
        self._engine = None  # the engine generate() runs on (engine_for), made on first use
        # Seconds of each load() phase (open, tokenizer, plan, weights): where a slow load went, without a profiler.
        self.load_timings: dict[str, float] = {}

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
        ids = user_input.token_ids(token_ids, vocab_size=self.config.vocab_size, max_context=self.max_context)
        logits, _ = steps.run_prefill(
            self.params,
            self.config,
            ids,
            steps.bucket(len(ids), self.max_context),
            jnp.dtype(self.dtype),
            all_logits=True,
            kernels=self.kernels,
        )
        return np.asarray(logits[0, : len(ids)], np.float32)


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
    kernels: str | KernelPolicy = "auto",
    devices: int = 1,
    mesh: Mesh | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Open, validate and plan a model, then put its weights on the device.

    ``path_or_name`` is a .gguf path or a registry name. ``dtype`` "auto" is float32 on XLA:CPU (no fast bf16
    dot there) and bfloat16 elsewhere. ``max_context`` (capped at the model's own context, or
    "auto" for the largest that fits) and ``batch`` size the KV cache. The memory plan is made first and
    ``ModelTooLarge`` is raised before any weight reaches the device when it does not fit ``device_memory`` (default:
    what the device reports free). ``path`` picks how quantized weights run ("auto": packed kernels where they
    exist, the dequantized fallback only where it fits); ``force`` loads past the budget with a warning.
    ``debug`` runs a checked forward that names the first non-finite layer and op (the CLI: IMP_JAX_DEBUG_NANS=1).
    ``compile_cache`` keeps compiled steps on disk for the next process (``runtime.compile_cache``): True for the
    imp-jax cache folder, a folder of your own, or False. ``cache_dir`` is that cache folder, where registry
    models are fetched to as well (default ``~/.cache/imp-jax``; the CLI passes ``IMP_JAX_CACHE``'s).
    ``kernels`` picks the Pallas kernels ("auto": those that beat XLA on this GPU, "off": the XLA reference path,
    "all": every kernel, or a KernelPolicy); it is resolved here once and passed to every step as static config.
    ``progress`` (default: when stderr is a terminal) prints the loading line, the plan's choices and progress.
    ``devices`` > 1 (or a ``mesh`` with a ``tp`` axis) splits the model over that many devices by tensor
    parallelism (``weights.sharding``): each tensor streams straight to its shards, and the plan is per device.
    """
    dtype = user_input.dtype(resolve_dtype(dtype))
    user_input.load_options(max_context=max_context, batch=batch)
    on = make_mesh(devices, mesh)
    root = registry.cache_root(cache_dir)
    policy = resolve_kernels(kernels, devices=tp_size(on), native=native_cpu.in_cache(root))
    store = compile_cache_mod.configure(compile_cache, root)
    show = os.isatty(2) if progress is None else progress
    clock = [time.perf_counter()]
    timings: dict[str, float] = {}

    def phase(name: str) -> None:
        now = time.perf_counter()
        timings[name + "_s"] = now - clock[0]
        clock[0] = now

    mf = open_model_file(path_or_name, progress=show, root=root)
    phase("open")
    if show:
        feedback.say(f"loading {mf.path.name} ({feedback.size_words(mf.path.stat().st_size)}, {mf.path}) ...")
    config = on_mesh(config_from_gguf(mf.metadata, mf.tensors), on)
    tokenizer = Tokenizer.from_metadata(mf.metadata, mf.path)
    phase("tokenizer")
    specs = param_specs(mf, config, dtype)
    plan = memory.plan_specs(
        specs, config, label=mf.path.name, max_context=max_context, batch=batch, dtype=dtype,
        budget=memory.resolve_budget(device_memory, mesh=config.mesh), path=path, kernels=policy, store=store,
    )  # fmt: skip
    memory.check_fits(plan, force=force)
    phase("plan")
    model = Model(
        mf, config, None, tokenizer, dtype=dtype, max_context=plan.max_context, batch=batch, kernels=policy, store=store
    )
    model.plan = plan
    engine_for(model).compile_ahead(plan.abstract_params)  # the first token's steps, while the weights stream
    phase("engine")
    on_bytes = _progress(mf, plan, show)
    loader_programs = CompiledSteps(store)  # the loader's own programs, kept in the same store as the steps
    try:
        model.params = load_params(mf, config, plan.specs, policy, on_bytes=on_bytes, programs=loader_programs)
        jax.block_until_ready(model.params)
    except BaseException:
        model.programs.stop()  # nothing goes on compiling for, or holding, a load that failed
        raise
    phase("weights")
    model.load_timings = timings
    if debug:
        ids = tokenizer.encode("The quick brown fox")
        check_prefill(model.params, config, ids, dtype=dtype, specs=plan.specs, kernels=policy)
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


def engine_for(model: Model):
    """The engine generate() runs on, made on first use and kept with the model (its pages stay allocated)."""
    from imp_jax.runtime.engine import Engine

    if model._engine is None:
        model._engine = Engine(model)
    return model._engine


def release_engine(model: Model) -> None:
    """Free the pages of the engine generate() runs on (load() makes one), so a server's own engine can take the
    memory: a server drives its engine from its own thread, which generate() must not step beside it. A later
    generate() on the model makes a new one."""
    import gc

    model._engine = None
    gc.collect()


def generate(
    model: Model,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
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
    equals the final text. temperature=0 is greedy and bitwise deterministic.

    A list of prompts (strings, or lists of token ids) runs them together on the model's engine (continuous
    batching) and returns one Generation per prompt, each equal to that prompt generated alone (greedy).
    """
    kw = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              repeat_penalty=repeat_penalty, seed=seed, stop=stop)  # fmt: skip
    if _is_batch(prompt):
        if stream:
            raise ImpError("stream=True takes one prompt; use imp_jax.Engine to stream several")
        runs: list[_Run] = []
        try:
            for p in prompt:
                runs.append(_Run(model, p, kw))
        except ImpError:  # one prompt refused: the ones already queued are withdrawn with it
            for r in runs:
                r.engine.abort(r.request_id)
            raise
        engine = runs[0].engine if runs else None
        while engine is not None and any(not r.done for r in runs):
            engine_step_into(engine, runs)
        return [r.result() for r in runs]
    run = _Run(model, prompt, kw)
    if stream:
        return run.pieces()
    for _ in run.pieces():
        pass
    return run.result()


def _is_batch(prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int | np.integer)


def engine_step_into(engine, runs: list[_Run]) -> None:
    """One engine step, its outputs handed to the runs they belong to."""
    by_id = {r.request_id: r for r in runs}
    for out in engine.step():
        run = by_id.get(out.request_id)
        if run is not None:
            run.take(out)


class _Run:
    """One generation on the model's engine: its request, the text it has produced, and its timings."""

    def __init__(self, model: Model, prompt, kw: dict):
        self.model = model
        self.engine = engine_for(model)
        self.t0 = time.perf_counter()
        self.request_id = self.engine.add_request(prompt, **kw)
        self.n_prompt = len(self.engine.requests[self.request_id].prompt)
        self.out_ids: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.done = False
        self.t_first: float | None = None
        self.t_end = self.t0
        self._new: list[str] = []

    def take(self, out) -> None:
        now = time.perf_counter()
        if self.t_first is None and out.token_ids:
            self.t_first = now
        self.out_ids += out.token_ids
        self.text += out.text
        self._new.append(out.text)
        if out.finished:
            self.done, self.finish_reason, self.t_end = True, out.finish_reason, now

    def pieces(self) -> Iterator[str]:
        try:
            while not self.done:
                engine_step_into(self.engine, [self])
                for piece in self._new:
                    if piece:
                        yield piece
                self._new = []
        finally:
            if not self.done:  # the caller stopped iterating: free the request's pages
                self.engine.abort(self.request_id)
                self.engine.step()

    def result(self) -> Generation:
        first = self.t_first if self.t_first is not None else self.t_end
        timings = steps.Timings(self.n_prompt, len(self.out_ids), first - self.t0, self.t_end - first)
        text, reasoning = self.text, None
        if harmony.is_harmony(self.model.tokenizer):
            text, reasoning = harmony.split_reply(self.text)
        return Generation(text, self.out_ids, self.finish_reason, timings, reasoning)
