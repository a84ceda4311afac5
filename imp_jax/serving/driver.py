"""The engine's one thread: every Engine call happens here, outputs go to the event loop through its queues.

The HTTP handlers never touch the engine (a step holds its lock for a whole device call, which would stall the
event loop). They ``submit`` a request and get an ``asyncio.Queue`` of what it produces; the driver thread takes
submissions and aborts between steps, steps while there is work, and puts each StepOutput on its request's queue
with ``call_soon_threadsafe``. An error in a step ends every request in flight with that error; the thread keeps
serving the next ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Any

from imp_jax.runtime.engine import Engine, StepOutput
from imp_jax.serving.metrics import Metrics

IDLE_WAIT_S = 0.05


@dataclasses.dataclass(frozen=True)
class Failed:
    """A request ended by an error in the engine (the message is shown to the client)."""

    message: str


@dataclasses.dataclass
class Ticket:
    """One submitted request as the driver sees it: where its outputs go and when it arrived."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    index: int
    prompt: list[int]
    kwargs: dict[str, Any]
    arrived: float
    accepted: asyncio.Future
    request_id: int | None = None
    last_token_at: float | None = None


class EngineDriver:
    """Runs ``engine`` on a thread of its own (``start`` / ``stop``); ``submit`` and ``abort`` from any thread."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self._count = threading.Lock()
        self._in_flight = 0
        self._commands: queue.Queue = queue.Queue()
        self._tickets: dict[int, Ticket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imp-jax-engine", daemon=True)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (the queue limit counts these)."""
        return self._in_flight

    def _add_in_flight(self, n: int) -> None:
        with self._count:
            self._in_flight += n

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def submit(self, prompt: list[int], out: asyncio.Queue, index: int, **kwargs) -> int:
        """Queue a request; returns its engine id once added, or raises the ImpError add_request raised.
        Outputs (StepOutput, or Failed) go to ``out`` as (index, output)."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(loop, out, index, prompt, kwargs, time.perf_counter(), loop.create_future())
        self._add_in_flight(1)
        self._commands.put(("submit", ticket))
        return await ticket.accepted

    def abort(self, request_id: int) -> None:
        self._commands.put(("abort", request_id))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the server outlives a failed step: its requests end with the error
                    self._fail_all(f"the engine failed during a step: {type(e).__name__}: {e}")
                    continue
                now = time.perf_counter()
                for out in outputs:
                    self._deliver(out, now)
            self.metrics.engine_state(self.engine)

    def _take_commands(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                self._run_command(*command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _run_command(self, kind: str, arg: Any) -> None:
        if kind == "abort":
            self.engine.abort(arg)
            return
        ticket: Ticket = arg
        try:
            rid = self.engine.add_request(ticket.prompt, **ticket.kwargs)
        except Exception as e:  # an ImpError is the client's (400); anything else a bug (500), never the thread's end
            self._add_in_flight(-1)
            ticket.loop.call_soon_threadsafe(self._settle, ticket.accepted, None, e)
            return
        ticket.request_id = rid
        self._tickets[rid] = ticket
        ticket.loop.call_soon_threadsafe(self._settle, ticket.accepted, rid, None)

    def _deliver(self, out: StepOutput, now: float) -> None:
        ticket = self._tickets.get(out.request_id)
        if ticket is None:
            return
        if out.token_ids:
            if ticket.last_token_at is None:
                self.metrics.ttft.observe(now - ticket.arrived)
            else:
                self.metrics.inter_token.observe((now - ticket.last_token_at) / len(out.token_ids))
            ticket.last_token_at = now
            self.metrics.tokens_out.inc(len(out.token_ids))
        if out.finished:
            del self._tickets[out.request_id]
            self._add_in_flight(-1)
        ticket.loop.call_soon_threadsafe(ticket.out.put_nowait, (ticket.index, out))

    def _fail_all(self, message: str) -> None:
        for rid, ticket in list(self._tickets.items()):
            self.engine.abort(rid)
            del self._tickets[rid]
            self._add_in_flight(-1)
            ticket.loop.call_soon_threadsafe(ticket.out.put_nowait, (ticket.index, Failed(message)))

    def _settle(self, future: asyncio.Future, request_id: int | None, error: BaseException | None) -> None:
        """Answer a submit (on the event loop); a request whose caller has gone meanwhile is aborted."""
        if future.cancelled():
            if request_id is not None:
                self.abort(request_id)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(request_id)
