"""The serving engine: continuous batching over a paged KV cache, per-request sampling, prefix reuse.

``Engine(model)`` owns the device state of one loaded model: the paged cache (``runtime.cache``), the host-side
page pool (``runtime.pages``) and the requests. Each ``step()`` is one scheduling round in the manner of vLLM v1's
scheduler: every running sequence that has only its last sampled token left to feed decodes it (one token each),
and the rest of a per-step token budget goes to chunks of prompts still being prefilled, oldest first (chunked
prefill). A request joins and leaves the running batch between steps without stalling the others. The decode rows
run as one jitted call and the prefill chunks as another; row counts, chunk lengths and page-table widths are
bucketed to powers of two, so a warmed-up engine does not recompile.

Sliding-window layers (Gemma-3, gpt-oss) keep their K/V in a second KV group with its own pool and page tables
(vLLM's hybrid KV allocator): a row holds only the window pages its next query can see, the pages wholly before
``position - window + 1`` go back to that pool as the sequence advances (a prefill chunk keeps every page it
spans until it has run), and the full-attention layers keep every page. The window pool is sized so that it
never runs out while the full pool has room (``pages.window_pool_pages``).

Memory: the pool never runs out mid-step. Before a step feeds a row it takes the pages that row needs; when none
are free the youngest running request is preempted (its pages are released and it is recomputed later from its
prompt and the tokens it already generated, which greedy decoding reproduces exactly). A request whose prompt can
never fit the pool is refused at ``add_request``.

Threads: every public method takes the engine's lock, so one thread may drive ``step()`` (or ``run()``) while
others ``submit`` requests and iterate their outputs (a per-request queue), as an HTTP server needs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax import user_input
from imp_jax.errors import ImpError, ModelTooLarge, RequestTooLarge, gib
from imp_jax.models.config import ModelConfig
from imp_jax.planning.memory import step_memory
from imp_jax.planning.pool import PoolPlan, plan_pool
from imp_jax.runtime import sampling
from imp_jax.runtime.cache import Cache, Rows, init_paged_cache
from imp_jax.runtime.compiled_steps import Call
from imp_jax.runtime.pages import PagePool, chain_hashes, window_pool_pages
from imp_jax.runtime.steps import COVER_FLAGS, MAX_LOGPROBS, cover_buckets, engine_step, pow2, table_width
from imp_jax.text.detok import StopDetokenizer

PAGE_SIZE = 16
MAX_SHRINKS = 3  # warm_up's pool shrinks at most this often before it serves on what fits
GROWTH_SLACK = 0.01  # the pool and a compiled step's workspace may exceed the plan's room by this share of it
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one request produced in one step: its new token ids (an EOS id is not among them), whether it ended
    and why (None | "stop" | "length" | "abort"), its new text, and with logprobs=N per new token a pair
    (chosen token's logprob, [(id, logprob)] * N of the top N). ``cached_tokens``: how many of its prompt tokens
    the prefix cache held when it was first scheduled (OpenAI's usage.prompt_tokens_details.cached_tokens)."""

    request_id: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str = ""
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled program of engine_step: its bucket (rows, tokens per row, page-table width) and static flags.
    A program runs any step whose bucket fits in its own and whose flags it serves: a non-greedy sampler serves
    greedy rows (temperature 0 takes the argmax), the repeat penalty leaves a row with penalty 1 unchanged,
    logprobs nobody asked for are dropped, and a chunked prefill attends over pages that hold the chunk too."""

    rows: int
    tokens: int
    width: int
    decode: bool
    chunked: bool
    greedy: bool
    penalty: bool
    n_logprobs: int
    n_steps: int

    def covers(self, other: Variant) -> bool:
        return (
            self.rows >= other.rows
            and self.tokens >= other.tokens
            and self.width >= other.width
            and self.decode == other.decode
            and self.n_steps == other.n_steps
            and (self.chunked or not other.chunked)
            and (other.greedy or not self.greedy)
            and (self.penalty or not other.penalty)
            and self.n_logprobs >= other.n_logprobs
        )

    @property
    def label(self) -> str:
        return f"{'decode' if self.decode else 'prefill'} [{self.rows} x {self.tokens}] x{self.n_steps}"

    @property
    def cost(self) -> int:
        return self.rows * self.tokens * self.width * self.n_steps

    def flags(self) -> dict:
        names = ("decode", "chunked", "greedy", "penalty", "n_logprobs", "n_steps")
        return {k: getattr(self, k) for k in names}


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    tokens: list[int]  # prompt + generated (an EOS id included): what the cache must hold before the next sample
    max_new: int  # tokens it may still generate in all (max_tokens capped by the context)
    params: sampling.SamplingParams
    seed: int
    n_logprobs: int
    detok: StopDetokenizer
    order: int  # arrival order: the youngest is preempted first
    n_cached: int = 0  # tokens whose K/V (and recurrent state) the cache holds
    pages: list[int] = dataclasses.field(default_factory=list)  # full group: column c holds positions c*P ..
    window: list[int] = dataclasses.field(default_factory=list)  # window group: columns window_first ..
    window_first: int = 0  # columns before it fell behind the window and were given back
    keys: list[int] = dataclasses.field(default_factory=list)  # prefix keys of its registered full pages
    slot: int | None = None
    n_generated: int = 0
    finish_reason: str | None = None
    cached_prompt: int | None = None  # prompt tokens found cached when first scheduled
    out: queue.Queue | None = None  # StepOutputs for a submit() caller


class Engine:
    """Continuous batching over a paged KV cache on one loaded model (see the module docstring).

    ``page_size`` tokens per page; ``max_seqs`` how many requests run at once (default max(batch, 8)); a step feeds
    at most ``token_budget`` tokens; ``prefix_caching`` shares full pages of equal prefixes between requests
    (models with recurrent layers never do: their state at a page boundary is not kept). With sliding-window
    layers a prefix is reused when both groups still hold it: every page of it in the full group and, in the
    window group, the pages of its last ``window`` positions (the only ones its next query can see).

    The pool comes from the model's memory plan (``planning.pool.plan_pool``, kept as ``pool_plan``): ``batch``
    sequences of ``max_context`` as load() planned them, or with ``memory_utilization`` as many pages as fit that
    fraction of the device budget beside the weights and engine_step's compiled workspace. ``n_pages`` sets the
    pool directly instead (tests, experiments; no plan is made), and the window group's pool follows from it:
    ``pages.window_pool_pages``, at most n_pages.
    """

    def __init__(
        self,
        model,
        *,
        page_size: int = PAGE_SIZE,
        n_pages: int | None = None,
        max_seqs: int | None = None,
        token_budget: int = 256,
        prefix_caching: bool = True,
        memory_utilization: float | None = None,
        decode_steps: int | None = None,
    ):
        if page_size < 1 or token_budget < 1:
            raise ImpError(f"page_size and token_budget must be >= 1, got {page_size} and {token_budget}")
        self.decode_steps = default_decode_steps() if decode_steps is None else int(decode_steps)
        if self.decode_steps < 1:
            raise ImpError(f"decode_steps must be >= 1, got {decode_steps}")
        self.model = model
        self.cfg: ModelConfig = model.config
        self.max_context = int(model.max_context)
        self.page_size = page_size
        self.pages_per_seq = -(-self.max_context // page_size)
        self.max_seqs = max_seqs if max_seqs is not None else max(model.batch, 8)
        self.token_budget = token_budget
        self.pool_plan: PoolPlan | None = None
        if n_pages is None:
            if model.plan is None:
                raise ImpError("the model has no memory plan to size the engine's pool from: give n_pages")
            self.pool_plan = plan_pool(model.plan, page_size=page_size, max_seqs=self.max_seqs,
                                       token_budget=token_budget, utilization=memory_utilization,
                                       decode_steps=self.decode_steps)  # fmt: skip
            n_pages = self.pool_plan.n_pages
        self.n_pages = n_pages
        self.window = self.cfg.kv_window  # 0: no window layers, no window group
        if self.pool_plan is not None:
            n_window = self.pool_plan.n_window_pages
        else:
            n_window = min(n_pages, window_pool_pages(self.window, page_size, self.max_seqs, token_budget))
        self._reuse = prefix_caching and self.cfg.n_recurrent_layers == 0
        self._allocate(n_pages, n_window)
        self.shrunk_from: int | None = None  # the pool's planned pages, when warm_up had to shrink it
        self._probe_workspace: int | None = None
        self.free_slots = list(range(self.max_seqs))
        self.waiting: list[_Request] = []  # in arrival order (preempted requests go back in theirs)
        self.running: list[_Request] = []
        self.requests: dict[int, _Request] = {}
        self.pending: list[StepOutput] = []  # outputs decided outside step() (abort, max_tokens=0)
        self.preemptions = 0
        self.compile_waits = 0  # steps that waited for their program to compile
        self.covered_steps = 0  # steps run on a covering program while their own compiled (warm_up)
        self.warm_up_s: float | None = None
        self._covers: tuple[Variant, ...] = ()  # set by warm_up
        self._ready: set[Variant] = set()
        self._background = None  # the on-demand compile in flight (one at a time)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)

    def _allocate(self, n_pages: int, n_window: int) -> None:
        """The page pools and the paged cache: n_pages pages of the full group, n_window of the window group."""
        self.n_pages = n_pages
        self.pool = PagePool(n_pages, prefix_caching=self._reuse)
        self.window_pool = PagePool(n_window, prefix_caching=self._reuse) if self.window else None
        self.cache = None  # the old pages are freed before the new ones are allocated
        self.cache = init_paged_cache(self.cfg, n_pages, self.page_size, self.max_seqs, jnp.dtype(self.model.dtype),
                                      n_window if self.window else 0)  # fmt: skip

    # ---- requests

    def add_request(
        self,
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
        logprobs: int = 0,
    ) -> int:
        """Queue a request; returns its id. Raises InvalidRequest for a value out of range
        (``imp_jax.user_input``), ContextOverflow when the prompt exceeds max_context and RequestTooLarge when it
        could never fit the page pool."""
        with self._lock:
            return self._add(self._request(prompt, max_tokens, temperature, top_k, top_p, min_p,
                                           repeat_penalty, seed, stop, logprobs))  # fmt: skip

    def submit(self, prompt: str | Sequence[int], **kwargs) -> Iterator[StepOutput]:
        """Thread-safe add_request (same arguments) whose StepOutputs arrive on an iterator while another thread
        drives ``run`` or ``step``; the iterator ends after the request's final output."""
        out: queue.Queue = queue.Queue()
        with self._lock:
            rid = self.add_request(prompt, **kwargs)
            self.requests[rid].out = out
            self._work.notify_all()

        def outputs() -> Iterator[StepOutput]:
            while True:
                item = out.get()
                yield item
                if item.finished:
                    return

        return outputs()

    def run(self, stop: threading.Event) -> None:
        """Drive the engine until ``stop`` is set: step while there is work, wait for submissions otherwise."""
        while not stop.is_set():
            with self._lock:
                if not self.has_unfinished():
                    self._work.wait(timeout=0.05)
                    continue
            self.step()

    def abort(self, request_id: int) -> None:
        """End a request now: its pages and slot are freed; its final StepOutput (reason "abort") comes with the
        next step. Unknown or finished ids are ignored."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.finish_reason is not None:
                return
            self.pending.append(self._finish(req, "abort", [], []))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self.pending)

    def _request(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, n_lp):
        tok = self.model.tokenizer
        checked = user_input.request(
            prompt, tok, vocab_size=self.cfg.vocab_size, max_context=self.max_context, max_tokens=max_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
            seed=seed, stop=stop, logprobs=n_lp, max_logprobs=MAX_LOGPROBS,
        )  # fmt: skip
        ids, max_tokens, sp, seed = checked.token_ids, checked.max_tokens, checked.params, checked.params.seed
        # Its whole length, prompt and output: a request that outgrows the pool alone could only preempt itself.
        # The window pool needs no check: it is window_pool_pages(...) or n_pages, and either holds one row.
        total = min(len(ids) + max(max_tokens, 1), self.max_context)
        needed = -(-total // self.page_size)
        if needed > self.n_pages:
            raise RequestTooLarge(
                f"a request of {len(ids)} prompt tokens and up to {total - len(ids)} more needs {needed} KV pages of "
                f"{self.page_size} tokens but the engine's pool has {self.n_pages}; shorten the prompt or max_tokens, "
                f"or give the engine more memory (memory_utilization, load(device_memory=...), n_pages)",
                needed=needed,
                available=self.n_pages,
            )
        seed = seed if seed is not None else int.from_bytes(np.random.default_rng().bytes(4), "little") >> 1
        return _Request(
            id=next(self._ids),
            prompt=ids,
            tokens=list(ids),
            max_new=min(max_tokens, self.max_context - len(ids)),
            params=sp,
            seed=int(seed) & 0x7FFFFFFF,
            n_logprobs=checked.n_logprobs,
            detok=StopDetokenizer(tok, checked.stop),
            order=0,
        )

    def _add(self, req: _Request) -> int:
        req.order = req.id
        self.requests[req.id] = req
        if req.max_new <= 0:
            self.pending.append(self._finish(req, "length", [], []))
        else:
            self.waiting.append(req)
        return req.id

    # ---- one scheduling round

    def step(self) -> list[StepOutput]:
        """Run one engine step; returns the StepOutputs of every request that produced tokens or ended."""
        with self._lock:
            outputs = self.pending
            self.pending = []
            decode, prefill = self._schedule()
            if prefill:
                outputs += self._run(prefill, False)
            if decode:
                outputs += self._run(decode, True, self._steps_ahead(decode, prefill))
            for o in outputs:
                req = self.requests.get(o.request_id)
                if req is not None and req.out is not None:
                    req.out.put(o)
                if o.finished:
                    self.requests.pop(o.request_id, None)
            return outputs

    def _schedule(self) -> tuple[list[tuple[_Request, int]], list[tuple[_Request, int]]]:
        """(decode rows, prefill rows) as (request, tokens to feed) under the token budget, pages taken."""
        budget = self.token_budget
        decode: list[tuple[_Request, int]] = []
        prefill: list[tuple[_Request, int]] = []
        for req in sorted(self.running, key=lambda r: r.order):
            if budget == 0:
                break
            if req not in self.running:  # preempted by an older request this round
                continue
            n = min(len(req.tokens) - req.n_cached, budget)
            is_decode = len(req.tokens) - req.n_cached == 1
            if not is_decode and not self._padded_room(prefill, n):
                continue
            if not self._reserve(req, req.n_cached + n, preempt=True):
                continue
            (decode if is_decode else prefill).append((req, n))
            budget -= n
        while self.waiting and budget > 0 and self.free_slots:
            req = self.waiting[0]
            self._match_prefix(req)
            n = min(len(req.tokens) - req.n_cached, budget)
            is_decode = len(req.tokens) - req.n_cached == 1
            if (not is_decode and not self._padded_room(prefill, n)) or not self._reserve(
                req, req.n_cached + n, preempt=False
            ):
                self._release(req)
                break
            self.waiting.pop(0)
            req.slot = self.free_slots.pop()
            self.running.append(req)
            (decode if is_decode else prefill).append((req, n))
            budget -= n
        return decode, prefill

    def _padded_room(self, prefill: list[tuple[_Request, int]], n: int) -> bool:
        """Whether a prompt chunk of n tokens may join this step's prefill rows: the step runs them padded to its
        bucket (rows and tokens each to a power of two), and that padded size stays within the token budget
        unless the chunk is the step's first. Without it, a fifth 512-token chunk beside four made the step
        8 x 512 for 2,048 real tokens, twice the compute the budget allows."""
        if not prefill:
            return True
        tokens = max(n, *(m for _, m in prefill))
        return pow2(len(prefill) + 1) * pow2(tokens, 16) <= max(self.token_budget, pow2(prefill[0][1], 16))

    def _steps_ahead(self, decode: list[tuple[_Request, int]], prefill: list) -> int:
        """How many decode steps this round's decode rows run in one dispatch: ``decode_steps`` when nothing else
        wants the next step (no prompt chunk, no waiting request), every row has that many tokens of room left
        (its max_tokens and the context) and the pool holds their pages without preempting; else 1."""
        k = self.decode_steps
        if k == 1 or prefill or self.waiting:
            return 1
        if any(min(r.max_new - r.n_generated, self.max_context - r.n_cached) < k for r, _ in decode):
            return 1
        if not all(self._reserve(r, r.n_cached + k, preempt=False) for r, _ in decode):
            return 1  # the pages some rows took stay theirs: they fill them in the next steps
        return k

    def _match_prefix(self, req: _Request) -> None:
        """Pin the cached pages of the longest cached prefix of its tokens (all but the last token: one must be
        fed to get logits) that both KV groups hold: the window group only needs the pages its window sees."""
        keys = []
        for key in chain_hashes(req.tokens, self.page_size, (len(req.tokens) - 1) // self.page_size):
            if not self.pool.cached(key):
                break
            keys.append(key)
        n = len(keys)
        while (
            self.window_pool is not None
            and n
            and not all(self.window_pool.cached(k) for k in keys[self._window_first(n * self.page_size) : n])
        ):
            n -= 1
        req.keys = keys[:n]
        req.pages = [self.pool.lookup(k) for k in req.keys]
        req.n_cached = n * self.page_size
        if self.window_pool is not None:
            req.window_first = self._window_first(req.n_cached)
            req.window = [self.window_pool.lookup(k) for k in req.keys[req.window_first :]]
        if req.cached_prompt is None:
            req.cached_prompt = req.n_cached

    def _window_first(self, position: int) -> int:
        """The first page column the window of a query at ``position`` sees."""
        return max((position - self.window + 1) // self.page_size, 0)

    def _trim_window(self, req: _Request) -> None:
        """Give back the window group's pages wholly before the window of the row's next query (at n_cached)."""
        if self.window_pool is None:
            return
        first = max(self._window_first(req.n_cached), req.window_first)
        drop = first - req.window_first
        self.window_pool.release(req.window[:drop])
        req.window, req.window_first = req.window[drop:], first

    def _reserve(self, req: _Request, end: int, *, preempt: bool) -> bool:
        """Take the pages of both groups that hold positions < end (the window group's from its first visible
        column); preempting younger running requests when allowed. False: it cannot run this step (preempted
        itself, or a waiting request the pool cannot take yet)."""
        cols = -(-end // self.page_size)
        while not (_grow(self.pool, req.pages, cols) and _grow(self.window_pool, req.window, cols - req.window_first)):
            if not preempt:
                return False
            victim = max(self.running, key=lambda r: r.order)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: _Request) -> None:
        self.preemptions += 1
        self.running.remove(req)
        self._release(req)
        self.waiting.append(req)
        self.waiting.sort(key=lambda r: r.order)

    def _release(self, req: _Request) -> None:
        """Give back its pages and slot; it keeps its tokens (to be recomputed)."""
        self.pool.release(req.pages)
        if self.window_pool is not None:
            self.window_pool.release(req.window)
        req.pages, req.keys, req.n_cached, req.window, req.window_first = [], [], 0, [], 0
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    def _finish(self, req: _Request, reason: str, ids: list[int], lps, text: str = "") -> StepOutput:
        """Retire a request (pages and slot freed); returns its final output."""
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        lps = lps if req.n_logprobs else None
        return StepOutput(req.id, ids, True, reason, text + req.detok.flush(), lps, req.cached_prompt or 0)

    # ---- device calls

    def _bucket(self, rows: int, n_tokens: int, n_pages: int, is_decode: bool) -> tuple[int, int, int]:
        """The bucketed (rows, tokens, page-table width) of a step: the shape one compiled program serves."""
        t = 1 if is_decode else pow2(n_tokens, 16)
        return pow2(rows), t, table_width(n_pages, self.page_size, self.pages_per_seq)

    def _blank(self, b: int, t: int, n_pg: int) -> dict:
        """A step's host inputs for b rows of t tokens with n_pg page columns, every row padding."""
        samp = {f: np.zeros((b,), np.int32 if f == "top_k" else np.float32) for f in SAMPLING_FIELDS}
        samp["top_p"][:] = samp["repeat_penalty"][:] = 1.0
        return dict(
            tokens=np.zeros((b, t), np.int32),
            pos=np.zeros((b, t), np.int32),
            valid=np.zeros((b,), np.int32),
            pages=np.zeros((b, n_pg), np.int32),
            window_pages=np.zeros((b, n_pg), np.int32),
            slot=np.full((b,), self.max_seqs, np.int32),
            recent=np.full((b, sampling.RECENT), -1, np.int32),
            seeds=np.zeros((b,), np.int32),
            counts=np.zeros((b,), np.int32),
            samp=samp,
        )

    def _step_call(self, params, cache: Cache, x: dict, v: Variant) -> Call:
        """engine_step's (arguments, static arguments) for params, cache and inputs ``x`` (arrays or shapes)."""
        rows = Rows(x["pages"], x["slot"], x["window_pages"])
        args = (params, cache, x["tokens"], x["pos"], x["valid"], rows, x["samp"], x["recent"], x["seeds"],
                x["counts"])  # fmt: skip
        return args, dict(cfg=self.cfg, kernels=self.model.kernels, **v.flags())

    def _abstract_call(self, v: Variant, params=None) -> Call:
        """The call of program ``v`` with shapes for arguments (``params``: the model's when not given)."""
        shape = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
        params = self.model.params if params is None else params
        return self._step_call(params, shape(self.cache), shape(self._blank(v.rows, v.tokens, v.width)), v)

    def compile_ahead(self, params, prompt_tokens: int = 16) -> None:
        """Start compiling, on a worker thread, the steps the first greedy generation of a prompt of up to
        ``prompt_tokens`` tokens runs: its prefill chunk and its decode step (with ``decode_steps`` > 1 the
        multi-step one first, then the single step its last tokens take). ``params`` may be the abstract params
        the planner has, so this runs while the weights are still streaming."""
        n = min(prompt_tokens, self.token_budget, self.max_context)
        runs = [(False, -(-n // self.page_size), 1)]  # the prompt's chunk, then the decode steps
        runs += [(True, -(-(n + k) // self.page_size), k) for k in sorted({self.decode_steps, 1}, reverse=True)]
        calls = []
        for is_decode, pages, k in runs:
            b, t, n_pg = self._bucket(1, n, pages, is_decode)
            v = Variant(b, t, n_pg, is_decode, chunked=is_decode, greedy=True, penalty=False, n_logprobs=0, n_steps=k)
            calls.append(self._abstract_call(v, params))
        self.model.programs.ahead(engine_step, calls)

    def cover_variants(self) -> tuple[Variant, ...]:
        """The programs that together run every step this engine can schedule (``steps.cover_buckets``), each
        over a full context's page table with the flags that serve every request (``Variant.covers``)."""
        width = table_width(self.pages_per_seq, self.page_size, self.pages_per_seq)
        buckets = cover_buckets(self.max_seqs, self.token_budget, self.max_context, self.decode_steps)
        return tuple(Variant(r, t, width, decode, n_steps=k, **dict(COVER_FLAGS)) for r, t, decode, k in buckets)

    def warm_up(self, workers: int = 4) -> None:
        """Compile (on ``workers`` threads) and wait for ``cover_variants``, shrinking the pool first where the
        compiled programs need more memory than the plan measured (``_shrink_to_fit``). From then on no step
        waits for a compile: a step whose own program is not compiled yet runs padded to the cheapest compiled
        program that covers it (a multi-step decode falls back to one step), while its own compiles on a worker
        thread, one at a time, for the next steps of that shape. A server calls this before it takes requests."""
        t0 = time.perf_counter()
        covers = self.cover_variants()
        for attempt in range(MAX_SHRINKS + 1):
            calls = [self._abstract_call(v) for v in covers]
            compiled = [f.result() for f in self.model.programs.ahead(engine_step, calls, workers=workers)]
            if attempt == MAX_SHRINKS or not self._shrink_to_fit(covers, compiled):
                break
        self.warm_up_s = time.perf_counter() - t0
        with self._lock:
            self._ready.update(covers)
            self._covers = covers

    def _shrink_to_fit(self, covers: tuple[Variant, ...], compiled: list) -> bool:
        """Check the pool plan against XLA's accounting of the programs compiled for the real pool. The plan
        measured them on a small probe pool, assuming the pool's size does not change a step's workspace (the
        cache is donated and updated in place); where XLA keeps a copy of pages after all, the workspace grows
        with the pool and the planned pool would run out of memory mid-step. Then the pool shrinks so that pages
        and the grown workspace fit what the plan gave both (the growth taken as proportional to the pool), and
        True says the covers must be compiled again for it. Raises ModelTooLarge when not one page fits."""
        plan = self.pool_plan
        if plan is None:
            return False
        persistent = plan.weights_bytes + sum(a.nbytes for a in jax.tree.leaves(self.cache))
        measured = tuple(step_memory(f"engine_step {v.label} at {self.n_pages} pages", c, persistent)
                         for v, c in zip(covers, compiled, strict=True))  # fmt: skip
        workspace = max(s.workspace_bytes for s in measured)
        # what the pool and a step's workspace may take together: the budget's share less weights, slots, headroom
        room = plan.budget.available_bytes * (plan.utilization or 1.0) - plan.needed_bytes
        room += plan.pool_bytes + plan.workspace_bytes
        if plan.pool_bytes + workspace <= room * (1 + GROWTH_SLACK):
            return False
        base = self._probe_workspace = self._probe_workspace or plan.workspace_bytes  # as the plan measured it
        growth = max(workspace - base, 1)
        scale = min((room - base) / (plan.pool_bytes + growth), 1.0)
        n_pages = int(self.n_pages * scale)
        if n_pages < 1:
            raise ModelTooLarge(
                f"{plan.label}: engine_step's compiled workspace grows with the page pool ({gib(growth)} more at "
                f"{self.n_pages} pages than planned) and leaves no room for a page; lower max_seqs or "
                f"token_budget, or give the engine more memory",
                needed=plan.needed_bytes + growth,
                available=plan.budget.available_bytes,
            )
        if self.shrunk_from is None:
            self.shrunk_from = self.n_pages
        n_window = min(int(plan.n_window_pages * scale), n_pages) if self.window else 0
        self.pool_plan = dataclasses.replace(plan, n_pages=n_pages, n_window_pages=n_window, steps=measured)
        self._ready.clear()
        self._allocate(n_pages, n_window)
        return True

    def _is_ready(self, v: Variant) -> bool:
        if v not in self._ready and self.model.programs.ready(engine_step, *self._abstract_call(v)):
            self._ready.add(v)
        return v in self._ready

    def _program(self, exact: Variant) -> Variant:
        """The program a step of bucket and flags ``exact`` runs (see warm_up)."""
        if not self._covers or self._is_ready(exact):
            return exact
        if self._background is None or self._background.done():
            self._background = self.model.programs.ahead(engine_step, [self._abstract_call(exact)])[0]
        for k in dict.fromkeys((exact.n_steps, 1)):
            want = dataclasses.replace(exact, n_steps=k)
            fits = [c for c in self._covers if c.covers(want) and self._is_ready(c)]
            if fits:
                self.covered_steps += 1
                return min(fits, key=lambda c: c.cost)
        return exact

    def _run(self, batch: list[tuple[_Request, int]], is_decode: bool, n_steps: int = 1) -> list[StepOutput]:
        b, t, n_pg = self._bucket(len(batch), max(n for _, n in batch), max(len(r.pages) for r, _ in batch), is_decode)
        v = self._program(
            Variant(
                b, t, n_pg, is_decode,
                chunked=is_decode or any(req.n_cached > 0 for req, _ in batch),
                greedy=all(req.params.greedy for req, _ in batch),
                penalty=any(req.params.repeat_penalty != 1.0 for req, _ in batch),
                n_logprobs=MAX_LOGPROBS if any(req.n_logprobs for req, _ in batch) else 0,
                n_steps=n_steps,
            )
        )  # fmt: skip
        t, n_steps = v.tokens, v.n_steps
        x = self._blank(v.rows, t, v.width)
        for i, (req, n) in enumerate(batch):
            start = req.n_cached
            x["tokens"][i, :n] = req.tokens[start : start + n]
            x["pos"][i] = start + np.arange(t)
            x["valid"][i] = n
            x["pages"][i, : len(req.pages)] = req.pages
            x["window_pages"][i, req.window_first : req.window_first + len(req.window)] = req.window
            x["slot"][i] = req.slot
            tail = req.tokens[-sampling.RECENT :]
            x["recent"][i, sampling.RECENT - len(tail) :] = tail
            x["seeds"][i], x["counts"][i] = req.seed, req.n_generated
            for f in SAMPLING_FIELDS:
                x["samp"][f][i] = getattr(req.params, f)
        if not self._is_ready(v):
            self.compile_waits += 1
        # jax.device_put: jnp.asarray would compile a program per input shape
        args, statics = self._step_call(self.model.params, self.cache, jax.device_put(x), v)
        out, self.cache = self.model.programs.call(engine_step, args, statics)
        out = jax.device_get(out)
        results = []
        for i, (req, n) in enumerate(batch):
            produced: list[StepOutput] = []
            for j in range(n_steps):  # step j fed the token step j - 1 sampled
                req.n_cached += n if j == 0 else 1
                self._register_pages(req)
                self._trim_window(req)
                if req.n_cached < len(req.tokens):
                    break  # a prompt chunk that does not reach its end samples nothing
                produced.append(self._accept(req, {k: a[j] for k, a in out.items()}, i))
                if produced[-1].finished:
                    break  # what the device sampled after the row's end is dropped
            if produced:
                results.append(_joined(produced))
        return results

    def _register_pages(self, req: _Request) -> None:
        full = req.n_cached // self.page_size
        if self.pool.prefix_caching and full > len(req.keys):
            parent = req.keys[-1] if req.keys else None
            new = chain_hashes(req.tokens, self.page_size, full, len(req.keys), parent)
            for col, key in enumerate(new, start=len(req.keys)):
                self.pool.register(req.pages[col], key)
                if self.window_pool is not None:  # not trimmed yet: the step's columns are all held
                    self.window_pool.register(req.window[col - req.window_first], key)
            req.keys += new

    def _accept(self, req: _Request, out: dict, i: int) -> StepOutput:
        """Take the token row ``i`` sampled in one step's outputs ``out``."""
        token = int(out["token"][i])
        req.tokens.append(token)
        req.n_generated += 1
        before = len(req.detok.token_ids)
        piece = req.detok.push(token)
        ids = req.detok.token_ids[before:]
        lps = None
        if req.n_logprobs:
            top = [(int(a), float(b)) for a, b in zip(out["top_ids"][i], out["top_logprobs"][i], strict=True)]
            lps = [(float(out["logprob"][i]), top[: req.n_logprobs])] if ids else []
        if req.detok.finished:
            return self._finish(req, "stop", ids, lps, piece)
        if req.n_generated >= req.max_new:
            return self._finish(req, "length", ids, lps, piece)
        return StepOutput(req.id, ids, False, None, piece, lps, req.cached_prompt or 0)

    # ---- introspection

    def pages_in_use(self) -> int:
        """Full-group pages referenced by running requests (cached free pages not counted; the window group's
        are ``window_pages_in_use``)."""
        with self._lock:
            return self.pool.n_used

    @property
    def n_window_pages(self) -> int:
        """Pages of the sliding-window KV group's pool (0 for a model without windowed layers)."""
        return 0 if self.window_pool is None else self.window_pool.n_pages

    def window_pages_in_use(self) -> int:
        """Sliding-window pages referenced by running requests (0 without that group)."""
        with self._lock:
            return 0 if self.window_pool is None else self.window_pool.n_used


def default_decode_steps() -> int:
    """Decode steps per dispatch by backend: on a GPU the host's work between steps leaves the device idle, on
    XLA:CPU the step itself dominates and streaming stays token by token."""
    return 1 if jax.default_backend() == "cpu" else 8


def _joined(outputs: list[StepOutput]) -> StepOutput:
    """One request's outputs of consecutive steps as one (tokens, text and logprobs in order; the last one's end)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    lps = None if last.logprobs is None else [lp for o in outputs for lp in o.logprobs]
    return dataclasses.replace(
        last,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        logprobs=lps,
    )


def _grow(pool: PagePool | None, pages: list[int], n: int) -> bool:
    """Extend ``pages`` to n pages from ``pool`` (None: a group the model lacks); False, nothing taken, when the
    pool has too few free."""
    if pool is None or len(pages) >= n:
        return True
    got = pool.allocate(n - len(pages))
    if got is None:
        return False
    pages += got
    return True
