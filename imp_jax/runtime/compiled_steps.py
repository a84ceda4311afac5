"""A model's step executables, compiled once per argument signature: ahead of time on a worker thread, or on the
first call of a new shape.

The first token of a new process waits for the programs of its prefill chunk and its decode step. They depend only
on shapes, which the planner knows before any weight is read, so ``ahead`` lowers and compiles them (AOT
``jit(...).lower(abstract args).compile()``) while the loader streams the weights. A plain ``jax.jit`` call does
not reuse an executable made this way (it keeps its own cache), so every step call goes through ``call``, which
runs the ``Compiled`` object kept for the call's signature, waiting for it when the worker is still compiling, and
compiling a new signature the same way when one comes. ``compiled`` lists every signature compiled, in order: a
test counts it to prove nothing compiles twice.

With a ``compile_cache.Store`` an executable another process compiled is read back instead (no tracing, no
lowering), and one compiled here is written for the next process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

from imp_jax.runtime.compile_cache import Store, compile_new, program_key

Call = tuple[tuple, dict[str, Hashable]]  # (positional arguments, static keyword arguments)


def signature(fn: Callable, args: tuple, statics: dict[str, Hashable]) -> tuple:
    """What one executable serves: the function, its static values, the argument tree and each leaf's shape,
    dtype and sharding across devices. Arrays on one device and ShapeDtypeStructs of the same shapes give the
    same signature."""
    leaves, tree = jax.tree.flatten(args)
    avals = tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), _spread(x)) for x in leaves)
    return fn, tuple(sorted(statics.items(), key=lambda kv: kv[0])), tree, avals


def _spread(x) -> Hashable:
    """The leaf's sharding when it spans several devices (None on one device, or none given)."""
    sharding = getattr(x, "sharding", None)
    return None if sharding is None or len(sharding.device_set) == 1 else sharding


def _device(leaves: list) -> jax.Device:
    """The one device a call runs on: its arguments' (JAX's default device when none is placed yet)."""
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            return next(iter(sharding.device_set))
    default = jax.config.jax_default_device
    return default if isinstance(default, jax.Device) else jax.devices()[0]


class CompiledSteps:
    """The executables of one model's jitted steps (functions whose static arguments are keyword-only)."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._programs: dict[tuple, concurrent.futures.Future] = {}
        self.compiled: list[tuple] = []
        self._workers: list[threading.Thread] = []
        self._stopped = threading.Event()

    def ahead(self, fn: Callable, calls: Sequence[Call], *, workers: int = 1) -> list[concurrent.futures.Future]:
        """Compile ``fn`` for each call (arguments may be ShapeDtypeStructs) on ``workers`` threads, in order;
        returns each call's future executable (one already compiled or compiling is not compiled again)."""
        futures, todo = [], collections.deque()
        for args, statics in calls:
            key = signature(fn, args, statics)
            future, new = self._claim(key)
            futures.append(future)
            if new:
                todo.append((key, future, args, statics))
        self._workers = [w for w in self._workers if w.is_alive()]
        for _ in range(min(workers, len(todo))):
            worker = threading.Thread(target=self._compile_all, args=(fn, todo), name="imp-jax-compile-ahead")
            self._workers.append(worker)
            worker.start()
        return futures

    def ready(self, fn: Callable, args: tuple, statics: dict[str, Hashable]) -> bool:
        """Whether a call of this signature would run at once: its executable compiled (none pending, none
        failed)."""
        with self._lock:
            future = self._programs.get(signature(fn, args, statics))
        return future is not None and future.done() and not future.cancelled() and future.exception() is None

    def stop(self) -> None:
        """Drop the compiles ahead not yet begun and wait for the one in flight. A load that fails calls this, so
        no worker goes on compiling for it, or holding what the compile refers to (the half-made model's
        arrays), after the error is raised."""
        self._stopped.set()
        for worker in self._workers:
            worker.join()

    def call(self, fn: Callable, args: tuple, statics: dict[str, Hashable]) -> Any:
        """``fn(*args, **statics)`` through the executable of its signature (compiled now if it is new)."""
        future, new = self._claim(signature(fn, args, statics))
        if new:
            self._compile(future, fn, args, statics)
        return future.result()(*args)

    def _claim(self, key: tuple) -> tuple[concurrent.futures.Future, bool]:
        with self._lock:
            if key in self._programs:
                return self._programs[key], False
            future = self._programs[key] = concurrent.futures.Future()
            self.compiled.append(key)
            return future, True

    def _compile_all(self, fn: Callable, todo: collections.deque) -> None:
        while True:
            try:
                key, future, args, statics = todo.popleft()
            except IndexError:
                return
            if self._stopped.is_set():  # forgotten: a later call of this signature compiles it afresh
                with self._lock:
                    self._programs.pop(key, None)
                    self.compiled.remove(key)
                future.cancel()
                continue
            self._compile(future, fn, args, statics)

    def _compile(self, future: concurrent.futures.Future, fn: Callable, args: tuple, statics: dict) -> None:
        try:
            future.set_result(self._executable(fn, args, statics))
        except BaseException as e:  # the caller of the step gets the compile error
            future.set_exception(e)

    def _executable(self, fn: Callable, args: tuple, statics: dict):
        """The stored executable of this call, else a new compile (then stored). Calls over several devices are
        compiled in the process (their executables hold a device assignment)."""
        leaves = jax.tree.leaves(args)
        if self.store is None or any(_spread(x) is not None for x in leaves):
            return fn.lower(*args, **statics).compile()
        key, device = program_key(fn, args, statics), _device(leaves)
        compiled = self.store.executable(key, device)
        if compiled is None:
            compiled, new = compile_new(fn.lower(*args, **statics), self.store.compile_options)
            if new:  # (one JAX's cache gave back would not run once stored: compile_cache)
                self.store.put_executable(key, device, compiled)
        return compiled
