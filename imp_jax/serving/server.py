"""Run the app under uvicorn (the ``imp-jax serve`` command's body)."""

from __future__ import annotations

import uvicorn

from imp_jax.feedback import say
from imp_jax.serving.app import ServerSettings, create_app


def serve(model, settings: ServerSettings, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted; one process, one event loop, one engine thread. Says how the engine's
    pool was sized and how long the warm-up took before the port opens."""
    app = create_app(model, settings)
    engine = app.state.imp.engine
    if engine.pool_plan is not None:
        say(engine.pool_plan.report())
    if engine.shrunk_from is not None:
        say(f"the page pool shrank from {engine.shrunk_from} to {engine.n_pages} pages: the step programs compiled "
            f"for it needed more memory than the plan measured on a small pool")  # fmt: skip
    if engine.warm_up_s is not None:
        say(f"compiled the {len(engine.cover_variants())} step programs that cover every request in "
            f"{engine.warm_up_s:.1f} s")  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
