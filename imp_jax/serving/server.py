"""Run the app under uvicorn (the ``imp-jax serve`` command's body)."""

from __future__ import annotations

import uvicorn

from imp_jax.serving.app import ServerSettings, create_app


def serve(model, settings: ServerSettings, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted; one process, one event loop, one engine thread."""
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
