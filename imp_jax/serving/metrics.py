"""The server's Prometheus metrics, in a registry of the app's own (two apps in one process never share one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# TTFT spans a queue wait and a prefill; the inter-token gap is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters the handlers and the engine thread update (prometheus_client's metrics are thread-safe)."""

    def __init__(self, n_pages: int, n_window_pages: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("imp_jax_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.waiting = Gauge("imp_jax_requests_waiting", "requests queued for the engine", registry=r)
        self.running = Gauge("imp_jax_requests_running", "requests in the engine's running batch", registry=r)
        self.pages_used = Gauge("imp_jax_kv_pages_used", "KV cache pages held by requests", registry=r)
        Gauge("imp_jax_kv_pages_total", "KV cache pages in the engine's pool", registry=r).set(n_pages)
        # sliding-window layers' own KV group (zero for models without one): runtime.engine
        self.window_pages_used = Gauge(
            "imp_jax_kv_window_pages_used", "sliding-window KV pages held by requests", registry=r
        )
        Gauge("imp_jax_kv_window_pages_total", "sliding-window KV pages in the engine's pool", registry=r).set(
            n_window_pages
        )
        self.ttft = Histogram(
            "imp_jax_time_to_first_token_seconds", "arrival to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "imp_jax_inter_token_latency_seconds", "time between tokens of a request", buckets=ITL_BUCKETS, registry=r
        )
        self.tokens_in = Counter("imp_jax_prompt_tokens", "prompt tokens received", registry=r)
        self.tokens_out = Counter("imp_jax_generation_tokens", "tokens generated", registry=r)
        # runtime.engine.Engine.warm_up: after it, steps whose program is still compiling run on a covering one
        self.compile_waits = Gauge("imp_jax_steps_waiting_for_compile", "engine steps that waited for a compile",
                                   registry=r)  # fmt: skip
        self.covered_steps = Gauge("imp_jax_steps_on_covering_program",
                                   "engine steps run padded to a covering program while theirs compiled",
                                   registry=r)  # fmt: skip

    def engine_state(self, engine) -> None:
        """The engine's queue, batch, pages and compile counters (runtime.engine.Engine)."""
        self.waiting.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.pages_used.set(engine.pages_in_use())
        self.window_pages_used.set(engine.window_pages_in_use())
        self.compile_waits.set(engine.compile_waits)
        self.covered_steps.set(engine.covered_steps)

    def text(self) -> bytes:
        return generate_latest(self.registry)
