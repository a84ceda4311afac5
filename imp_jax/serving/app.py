"""The FastAPI app for one loaded model: ``create_app(model, ServerSettings(...))``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``,
``GET /metrics``. With an API key every route but /health needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from imp_jax.errors import ImpError
from imp_jax.model import release_engine
from imp_jax.runtime.engine import Engine, StepOutput
from imp_jax.serving import errors, schemas
from imp_jax.serving.driver import EngineDriver, Failed
from imp_jax.serving.metrics import Metrics
from imp_jax.serving.reply import ChatReply
from imp_jax.serving.sse import done, event
from imp_jax.text import harmony
from imp_jax.text.chat import ChatTemplateError

DISCONNECT_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """model_name: the id clients give as ``model``; api_key: None serves anyone; max_queue: requests that may
    wait beyond the engine's running batch before new ones get 429; max_seqs: the engine's running batch;
    token_budget: tokens one engine step may feed (prompt chunks beside the decode rows); memory_utilization: the
    fraction of the device budget the engine's pool may fill beside the weights and its compiled workspace (None:
    the batch x max_context load() planned); warm_up: compile the programs that cover every step before serving
    (``Engine.warm_up``), so no request waits for a compile."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 256
    max_seqs: int | None = None
    token_budget: int = 2048
    memory_utilization: float | None = None
    warm_up: bool = False


@dataclasses.dataclass
class _State:
    model: object
    settings: ServerSettings
    engine: Engine
    driver: EngineDriver
    metrics: Metrics


def create_app(model, settings: ServerSettings) -> FastAPI:
    """The app; its engine thread starts with the app (lifespan) and stops with it."""
    release_engine(model)  # load()'s engine: its pages go before the server's pool is allocated
    engine = Engine(model, max_seqs=settings.max_seqs, token_budget=settings.token_budget,
                    memory_utilization=settings.memory_utilization)  # fmt: skip
    if settings.warm_up:
        engine.warm_up()
    metrics = Metrics(engine.n_pages, engine.n_window_pages)
    state = _State(model, settings, engine, EngineDriver(engine, metrics), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.driver.start()
        try:
            yield
        finally:
            state.driver.stop()

    app = FastAPI(title="imp-jax", lifespan=lifespan)
    app.state.imp = state  # the engine and driver, for introspection (tests, a debugger)
    errors.install(app)
    auth = Depends(_authorizer(settings.api_key))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[auth])
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "imp-jax",
                "max_model_len": engine.max_context}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        return await _completions(state, body, request)

    return app


def _authorizer(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise errors.APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")  # fmt: skip

    return check


# ---- shared by both endpoints


def _check_model(state: _State, name: str | None) -> None:
    if name is not None and name != state.settings.model_name:
        raise errors.APIError(404, f"model '{name}' is not served here; this server serves "
                              f"'{state.settings.model_name}'", type="not_found_error", param="model",
                              code="model_not_found")  # fmt: skip


def _engine_kwargs(body: schemas._Request, n_logprobs: int, index: int) -> dict:
    seed = None if body.seed is None else body.seed + index
    max_tokens = body.max_tokens if body.max_tokens is not None else 1 << 30
    return dict(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                min_p=body.min_p, repeat_penalty=body.repetition_penalty, seed=seed, stop=body.stop_list(),
                logprobs=n_logprobs)  # fmt: skip


class _Run:
    """The engine requests behind one HTTP request (n per prompt), their outputs on one queue."""

    def __init__(self, state: _State):
        self.state = state
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: dict[int, int] = {}  # choice index -> engine id
        self.open: set[int] = set()
        self.n = 1
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}  # per prompt (its n rows share it; the first row's count)

    async def start(self, prompts: list[list[int]], body: schemas._Request, n_logprobs: int) -> None:
        s = self.state
        wanted = len(prompts) * body.n
        self.n = body.n
        if s.driver.in_flight + wanted > s.engine.max_seqs + s.settings.max_queue:
            raise errors.APIError(429, f"the server is full ({s.driver.in_flight} requests in flight, "
                                  f"{s.settings.max_queue} may queue): retry shortly", type="rate_limit_error",
                                  code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        try:
            for i, ids in enumerate(prompts):
                self.prompt_tokens += len(ids)
                for j in range(body.n):
                    index = i * body.n + j
                    kw = _engine_kwargs(body, n_logprobs, j)
                    self.rids[index] = await s.driver.submit(ids, self.queue, index, **kw)
                    self.open.add(index)
        except ImpError as e:
            self.abort()
            raise errors.from_imp_error(e) from None
        except BaseException:
            self.abort()
            raise
        s.metrics.tokens_in.inc(self.prompt_tokens)

    async def outputs(self, request: Request) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) until every choice has finished; a client gone meanwhile aborts them."""
        try:
            while self.open:
                try:
                    index, out = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(out, Failed):
                    raise errors.APIError(500, out.message, type="server_error")
                self.completion_tokens += len(out.token_ids)
                self.cached_tokens.setdefault(index // self.n, out.cached_tokens)
                if out.finished:
                    self.open.discard(index)
                yield index, out
        finally:
            self.abort()

    def abort(self) -> None:
        for index in list(self.open):
            self.state.driver.abort(self.rids[index])
        self.open.clear()

    def usage(self) -> schemas.Usage:
        details = schemas.PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values()))
        return schemas.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                             total_tokens=self.prompt_tokens + self.completion_tokens,
                             prompt_tokens_details=details)  # fmt: skip


def _token_text(model, token_id: int) -> str:
    return model.tokenizer.decode([token_id], skip_special=False)


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- chat


def _render(state: _State, body: schemas.ChatCompletionRequest) -> str:
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    use_tools = bool(body.tools) and body.tool_choice != "none"
    if use_tools:
        kwargs["tools"] = body.tools
        if body.tool_choice is not None:
            kwargs.setdefault("tool_choice", body.tool_choice)
    try:
        return state.model.chat_template([m.for_template() for m in body.messages], **kwargs)
    except ChatTemplateError as e:
        raise errors.from_imp_error(e) from None


def _splitter(state: _State, prompt: str):
    from imp_jax.serving.reasoning import HarmonySplitter, ThinkSplitter

    tok = state.model.tokenizer
    if harmony.is_harmony(tok):
        return HarmonySplitter()
    if tok.piece_to_id(ThinkSplitter.OPEN) is not None and tok.piece_to_id(ThinkSplitter.CLOSE) is not None:
        return ThinkSplitter(in_reasoning=prompt.rstrip().endswith(ThinkSplitter.OPEN))
    return None


def _chat_logprobs(model, out: StepOutput, top: int) -> dict | None:
    if out.logprobs is None:
        return None
    content = []
    for token_id, (lp, alts) in zip(out.token_ids, out.logprobs, strict=False):
        text = _token_text(model, token_id)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _token_text(model, a)), "logprob": v,
                                          "bytes": list(t.encode())} for a, v in alts[:top]]})  # fmt: skip
    return {"content": content}


async def _chat(state: _State, body: schemas.ChatCompletionRequest, request: Request) -> Response:
    _check_model(state, body.model)
    prompt = _render(state, body)
    ids = state.model.tokenizer.encode(prompt)
    run = _Run(state)
    n_lp = max(body.top_logprobs, 1) if body.logprobs else 0
    await run.start([ids], body, n_lp)
    tools = bool(body.tools) and body.tool_choice != "none"
    replies = {i: ChatReply(_splitter(state, prompt), tools=tools) for i in range(body.n)}
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(_chat_chunks(state, body, request, run, replies, rid, created, include_usage))
    fields = {i: {"content": "", "reasoning_content": ""} for i in replies}
    logprobs: dict[int, list] = {i: [] for i in replies}
    reasons: dict[int, str] = {}
    async for index, out in run.outputs(request):
        for field, text in replies[index].push(out.text):
            fields[index][field] += text
        if lp := _chat_logprobs(state.model, out, body.top_logprobs):
            logprobs[index] += lp["content"]
        if out.finished:
            for field, text in replies[index].finish():
                fields[index][field] += text
            reasons[index] = out.finish_reason
    choices = []
    for i, reply in replies.items():
        f = fields[i]
        message = schemas.ReplyMessage(content=f["content"] if f["content"] or not reply.calls else None,
                                       reasoning_content=f["reasoning_content"] or None,
                                       tool_calls=reply.calls or None)  # fmt: skip
        choices.append(schemas.ChatChoice(index=i, message=message, finish_reason=_reason(reasons.get(i), reply),
                                          logprobs={"content": logprobs[i]} if body.logprobs else None))  # fmt: skip
    reply_body = schemas.ChatCompletion(id=rid, created=created, model=state.settings.model_name, choices=choices,
                                        usage=run.usage())  # fmt: skip
    return JSONResponse(reply_body.model_dump(exclude_none=True))


def _reason(engine_reason: str | None, reply: ChatReply) -> str:
    return "tool_calls" if reply.calls else (engine_reason or "stop")


async def _chat_chunks(state, body, request, run, replies, rid, created, include_usage) -> AsyncIterator[str]:
    name = state.settings.model_name

    def chunk(index: int, delta: schemas.Delta, finish: str | None = None, logprobs=None) -> str:
        c = schemas.ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            schemas.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])  # fmt: skip
        return event(c.model_dump(exclude_none=True))

    try:
        for i in replies:
            yield chunk(i, schemas.Delta(role="assistant", content=""))
        async for index, out in run.outputs(request):
            reply = replies[index]
            pieces = reply.push(out.text) + (reply.finish() if out.finished else [])
            delta = _delta(pieces)
            lp = _chat_logprobs(state.model, out, body.top_logprobs)
            if delta is not None or lp:
                yield chunk(index, delta or schemas.Delta(), logprobs=lp)
            if out.finished:
                if reply.calls:
                    calls = [schemas.StreamedToolCall(index=k, **c.model_dump()) for k, c in enumerate(reply.calls)]
                    yield chunk(index, schemas.Delta(tool_calls=calls))
                yield chunk(index, schemas.Delta(), _reason(out.finish_reason, reply))
        if include_usage:
            usage = schemas.ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=run.usage())
            yield event(usage.model_dump(exclude_none=True))
    except errors.APIError as e:
        yield event(errors.error_body(e.message, e.type, e.param, e.code))
    yield done()


def _delta(pieces: list[tuple[str, str]]) -> schemas.Delta | None:
    if not pieces:
        return None
    joined: dict[str, str] = {}
    for field, text in pieces:
        joined[field] = joined.get(field, "") + text
    return schemas.Delta(**joined)


# ---- completions


def _completion_logprobs(model, out: StepOutput, offset: int) -> dict | None:
    if out.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, (lp, alts) in zip(out.token_ids, out.logprobs, strict=False):
        text = _token_text(model, token_id)
        tokens.append(text)
        lps.append(lp)
        tops.append({_token_text(model, a): v for a, v in alts})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _completions(state: _State, body: schemas.CompletionRequest, request: Request) -> Response:
    _check_model(state, body.model)
    tok = state.model.tokenizer
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    if not prompts:
        raise errors.APIError(400, "prompt: give at least one prompt", param="prompt")
    run = _Run(state)
    await run.start(prompts, body, body.logprobs or 0)
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.settings.model_name
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(_completion_chunks(state, request, run, rid, created, include_usage))
    texts: dict[int, str] = {i: "" for i in run.rids}
    logprobs: dict[int, dict] = {}
    reasons: dict[int, str] = {}
    async for index, out in run.outputs(request):
        if lp := _completion_logprobs(state.model, out, len(texts[index])):
            acc = logprobs.setdefault(index, {k: [] for k in lp})
            for k, v in lp.items():
                acc[k] += v
        texts[index] += out.text
        if out.finished:
            reasons[index] = out.finish_reason
    choices = [schemas.CompletionChoice(index=i, text=t, finish_reason=reasons.get(i, "stop"),
                                        logprobs=logprobs.get(i)) for i, t in texts.items()]  # fmt: skip
    return JSONResponse(schemas.Completion(id=rid, created=created, model=name, choices=choices,
                                           usage=run.usage()).model_dump(exclude_none=True))  # fmt: skip


async def _completion_chunks(state, request, run, rid, created, include_usage) -> AsyncIterator[str]:
    name = state.settings.model_name
    offsets = dict.fromkeys(run.rids, 0)
    try:
        async for index, out in run.outputs(request):
            lp = _completion_logprobs(state.model, out, offsets[index])
            offsets[index] += len(out.text)
            if out.text or lp or out.finished:
                reason = out.finish_reason if out.finished else None
                choice = schemas.CompletionChoice(index=index, text=out.text, logprobs=lp, finish_reason=reason)
                c = schemas.Completion(id=rid, created=created, model=name, choices=[choice])
                yield event(c.model_dump(exclude_none=True))
        if include_usage:
            c = schemas.Completion(id=rid, created=created, model=name, choices=[], usage=run.usage())
            yield event(c.model_dump(exclude_none=True))
    except errors.APIError as e:
        yield event(errors.error_body(e.message, e.type, e.param, e.code))
    yield done()
