"""The serving engine's page pool, sized from a memory plan (like vLLM's gpu_memory_utilization).

``plan_pool`` adds what the engine holds beside the pages, each measured: the weights (the load plan's), the
recurrent-state slots of ``max_seqs`` sequences, and XLA's workspace of a step. What remains of the budget, less
the plan's headroom, is pages. A model with sliding-window layers has two KV groups (runtime.cache), each with its
pool: the full layers' pages, as many as a context needs, and the window layers', as many as ``max_seqs`` rows
can hold at once (``pages.window_pool_pages``: about ceil(window / P) + 2 per row, whatever the context), so a
page of the full group costs only the full layers' bytes and the budget holds more sequences.

With ``utilization`` the pool fills that fraction of the budget (capped at what ``max_seqs`` full contexts can
reference), so the workspace is measured on the step the engine actually runs, ``engine_step``, lowered and
compiled at the buckets a warmed-up engine runs (``_engine_workspace``). Without it the pool is the
``batch`` x ``max_context`` that load() planned and checked, with that plan's workspace: no extra compile on the
way to a first generate().
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from imp_jax.errors import ImpError, ModelTooLarge
from imp_jax.planning.memory import Budget, MemoryPlan, StepMemory, step_memory
from imp_jax.runtime import steps
from imp_jax.runtime.cache import Cache, paged_shapes
from imp_jax.runtime.pages import window_pages, window_pool_pages
from imp_jax.weights.loading import abstract_params


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """The engine's memory on one device: weights, state slots, engine_step's workspace, ``n_pages`` pages of the
    full-attention layers and ``n_window_pages`` of the sliding-window layers (none without them)."""

    label: str
    page_size: int
    n_pages: int
    max_seqs: int
    token_budget: int
    max_context: int
    page_bytes: int  # K and V of one page over the full-attention layers
    window: int  # the window group's window (0: no window layers)
    n_window_pages: int
    window_page_bytes: int  # K and V of one page over the sliding-window layers
    slot_bytes: int  # the recurrent state of max_seqs sequences (zero without recurrent layers)
    weights_bytes: int
    steps: tuple[StepMemory, ...]
    budget: Budget
    utilization: float | None

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_context // self.page_size)

    @property
    def workspace_bytes(self) -> int:
        return max((s.workspace_bytes for s in self.steps), default=0)

    @property
    def pool_bytes(self) -> int:
        """Both groups' pages: what init_paged_cache allocates for this plan."""
        return self.n_pages * self.page_bytes + self.n_window_pages * self.window_page_bytes

    @property
    def needed_bytes(self) -> int:
        return (
            self.weights_bytes + self.slot_bytes + self.workspace_bytes + self.pool_bytes + self.budget.headroom_bytes
        )

    def pages_for(self, length: int) -> int:
        """Pages one sequence of ``length`` tokens holds."""
        return -(-min(length, self.max_context) // self.page_size)

    def window_pages_for(self, length: int) -> int:
        """Window-group pages one decoding sequence of ``length`` tokens holds (0 without window layers)."""
        return min(self.pages_for(length), window_pages(self.window, self.page_size, 1)) if self.window else 0

    def sequences(self, length: int) -> int:
        """How many sequences of ``length`` tokens (prompt + output) the pools hold at once, at most max_seqs."""
        if length < 1:
            raise ImpError(f"a sequence length must be >= 1, got {length}")
        n = min(self.n_pages // self.pages_for(length), self.max_seqs)
        return min(n, self.n_window_pages // self.window_pages_for(length)) if self.window else n

    def report(self) -> str:
        kv = [(f"KV pages  ({self.n_pages} x {self.page_size} tokens, {_mib(self.page_bytes)} each)",
               self.n_pages * self.page_bytes)]  # fmt: skip
        notes = []
        if self.window:
            kv.append(
                (
                    f"KV window pages  ({self.n_window_pages} x {self.page_size} tokens, "
                    f"{_mib(self.window_page_bytes)} each)",
                    self.n_window_pages * self.window_page_bytes,
                )
            )
            notes.append(
                f"  the window layers (window {self.window}) hold {self.window_pages_for(self.max_context)} "
                f"pages of a {self.max_context}-token sequence, the full layers {self.pages_per_seq}"
            )
        rows = [
            ("weights", self.weights_bytes),
            (f"state slots  ({self.max_seqs} sequences)", self.slot_bytes),
            *((f"workspace  {s.name}", s.workspace_bytes) for s in self.steps),
            *kv,
            ("runtime headroom", self.budget.headroom_bytes),
            ("needed", self.needed_bytes),
            (f"available  ({self.budget.source})", self.budget.available_bytes),
        ]
        width = max(len(label) for label, _ in rows) + 2
        fit = ", ".join(f"{self.sequences(n)} x {n}" for n in (512, 2048, self.max_context) if n <= self.max_context)
        return "\n".join(
            [f"page pool: {self.label}", *(f"  {label:<{width}}{_mib(n):>14}" for label, n in rows), *notes,
             f"  sequences that fit at once (tokens each): {fit}"]
        )  # fmt: skip


def plan_pool(
    plan: MemoryPlan,
    *,
    page_size: int,
    max_seqs: int,
    token_budget: int,
    utilization: float | None = None,
    decode_steps: int = 1,
) -> PoolPlan:
    """Size the engine's page pool for the model ``plan`` describes (see the module docstring). Raises
    ModelTooLarge when not one page fits beside the weights, the slots and engine_step's workspace."""
    if utilization is not None and not 0 < utilization <= 1:
        raise ImpError(f"utilization is the fraction of device memory the engine may use, in (0, 1]; got {utilization}")
    cfg, dtype = plan.config, jnp.dtype(plan.dtype)
    pages_per_seq = -(-plan.max_context // page_size)
    page_bytes = _bytes(paged_shapes(cfg, 1, page_size, 0, dtype, 0), ("k", "v"))
    window_page_bytes = _bytes(paged_shapes(cfg, 0, page_size, 0, dtype, 1), ("wk", "wv"))
    window = cfg.kv_window
    slots = paged_shapes(cfg, 0, page_size, max_seqs, dtype)
    slot_bytes = _bytes(slots, ("conv", "ssm"))
    if utilization is None:
        workspace = plan.steps
    else:
        workspace = _engine_workspace(plan, page_size, max_seqs, token_budget, pages_per_seq, decode_steps)
    available = plan.available_bytes * (utilization or 1.0)
    room = available - plan.budget.headroom_bytes - plan.weights_bytes - slot_bytes
    room -= max((s.workspace_bytes for s in workspace), default=0)
    target = max_seqs * pages_per_seq if utilization is not None else max(plan.batch, 1) * pages_per_seq
    cap = min(window_pool_pages(window, page_size, max_seqs, token_budget), target) if window else 0
    n_pages, n_window = _split(room, page_bytes, window_page_bytes, cap, target)
    pool = PoolPlan(plan.label, page_size, n_pages, max_seqs, token_budget, plan.max_context, page_bytes, window,
                    n_window, window_page_bytes, slot_bytes, plan.weights_bytes, workspace, plan.budget,
                    utilization)  # fmt: skip
    if pool.n_pages < 1:
        raise ModelTooLarge(
            f"{plan.label}: no KV page of {page_size} tokens fits: weights {_mib(plan.weights_bytes)}, state slots "
            f"{_mib(slot_bytes)}, engine_step workspace {_mib(pool.workspace_bytes)} and headroom "
            f"{_mib(plan.budget.headroom_bytes)} leave {_mib(max(int(room), 0))} of {_mib(int(available))}; "
            f"lower max_seqs or token_budget, or give the engine more memory",
            needed=pool.needed_bytes + page_bytes + (window_page_bytes if window else 0),
            available=int(available),
        )
    return pool


def _engine_workspace(
    plan: MemoryPlan, page_size: int, max_seqs: int, token_budget: int, pages_per_seq: int, decode_steps: int
):
    """XLA's accounting of the engine_step programs a warmed-up engine runs (``steps.cover_buckets``, every slot
    reading a full context's page table, the sampling variant that needs most): the decode of ``decode_steps``
    per dispatch, and the two ends of the prefill buckets (one row of the longest chunk, the most rows of the
    shortest), between which a prefill step's activations and page reads trade places."""
    cfg, dtype = plan.config, jnp.dtype(plan.dtype)
    params = abstract_params(plan.specs, plan.kernels)
    n_pg = steps.table_width(pages_per_seq, page_size, pages_per_seq)
    # A probe pool of one table's pages: XLA:CPU's temp does not grow with the pool (the cache is donated); on an
    # H100 it did, which Engine.warm_up checks on the programs compiled for the real pool.
    probe = Cache(**paged_shapes(cfg, n_pg, page_size, max_seqs, dtype))
    persistent = plan.weights_bytes + sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(probe))
    buckets = steps.cover_buckets(max_seqs, token_budget, plan.max_context, decode_steps)
    prefill = [b for b in buckets if not b[2]]
    out = []
    for rows, t, decode, k in (max(b for b in buckets if b[2]), *dict.fromkeys((prefill[0], prefill[-1]))):
        args = steps.engine_step_args(cfg, probe, rows, t, n_pg)
        compiled = steps.engine_step.lower(
            params, **args, decode=decode, kernels=plan.kernels, n_steps=k, **dict(steps.COVER_FLAGS)
        ).compile()
        out.append(step_memory(f"engine_step {'decode' if decode else 'prefill'} [{rows} x {t}]", compiled, persistent))
    return tuple(out)


def _split(room: float, page_bytes: int, window_page_bytes: int, cap: int, target: int) -> tuple[int, int]:
    """(full pages n, window pages min(n, cap)): the largest n <= target whose pages fit ``room`` bytes. The
    window group never needs more pages than the full one (a row's window pages are some of its columns), nor
    more than ``cap``."""
    n = int(room // (page_bytes + window_page_bytes))
    if n > cap:  # the window pool is full at cap: the rest of the room is full pages
        n = cap + int((room - cap * (page_bytes + window_page_bytes)) // page_bytes) if page_bytes else target
    n = max(min(n, target), 0)
    return n, min(n, cap)


def _bytes(shapes: dict[str, jax.ShapeDtypeStruct], names: tuple[str, ...]) -> int:
    return sum(math.prod(s.shape) * s.dtype.itemsize for k, s in shapes.items() if k in names)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
