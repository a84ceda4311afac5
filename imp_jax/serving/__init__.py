"""``imp-jax serve``: an OpenAI-compatible HTTP server on the serving engine.

``app.create_app`` builds the FastAPI app for one loaded model; ``driver`` steps the engine on one thread of its
own and hands outputs to the event loop; ``reasoning`` and ``tool_calls`` turn a chat reply into OpenAI's
``reasoning_content`` and ``tool_calls``; ``metrics`` is the Prometheus registry; ``server.serve`` runs uvicorn.
"""
