"""imp-jax serve (issue 17): the official ``openai`` client against live servers on free localhost ports.

One server on the registry's smollm2 (greedy equals alone, logprobs against Model.logits, streaming joins,
disconnects, errors, API key, metrics) and two on scripted fixtures (tests/scripted_gguf.py: the gpt-oss fixture
that writes a harmony analysis message, and the qwen3 fixture with a tools template that thinks and then calls a
tool), plus the reply parsers on their own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import imp_jax
from imp_jax.serving.app import ServerSettings, create_app
from imp_jax.serving.reasoning import HarmonySplitter, ThinkSplitter
from imp_jax.serving.reply import ChatReply
from imp_jax.serving.tool_calls import parse_hermes
from tests.scripted_gguf import script_gguf

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "test-key"
NAME = "smollm2-135m"

# A Hermes-style template of our own: tools listed in a system turn, calls written as <tool_call> JSON.
HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    '{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}'
    "{%- else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@contextlib.contextmanager
def _server(model, **settings):
    """A live server on a free port in a thread of this process; yields (base URL, app state)."""
    app = create_app(model, ServerSettings(**settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.imp
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def smol(real_model):
    model = imp_jax.load(real_model(NAME), dtype="float32", max_context=512, batch=8, progress=False)
    with _server(model, model_name=NAME, api_key=KEY, max_queue=0) as (url, state):
        yield model, url, state


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=smol[1] + "/v1", api_key=KEY, max_retries=0)


def _idle(state, timeout=20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if state.driver.in_flight == 0 and state.engine.pages_in_use() == 0:
            return True
        time.sleep(0.05)
    return False


CHAT = [{"role": "user", "content": "Name three colours."}]


def test_chat_streamed_joins_to_the_non_streamed_reply(client, smol):
    full = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(smol[0].tokenizer.encode(smol[0].chat_template(CHAT)))
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the second run found the first one's full prompt pages in the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (full.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_completions_streamed_and_not(client):
    full = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=10, temperature=0)
    stream = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=10, temperature=0,
                                       stream=True)  # fmt: skip
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert full.choices[0].text and text == full.choices[0].text
    many = client.completions.create(model=NAME, prompt=["One, two,", "Red, green,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # n greedy rows agree


def test_eight_concurrent_greedy_requests_equal_their_solo_texts(client):
    prompts = [f"Write about the number {i}:" for i in range(8)]

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0).choices[0].text

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo


def test_logprobs_match_model_logits(client, smol):
    model = smol[0]
    prompt = model.tokenizer.encode("The quick brown fox")
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ids = imp_jax.generate(model, prompt, max_tokens=4).token_ids
    logits = model.logits(prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    top = logits.max(-1, keepdims=True)
    want = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(len(ids)), ids], atol=2e-3)
    for k, top in enumerate(lp.top_logprobs):
        best = np.argsort(-want[k])[:3]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), want[k][best], atol=2e-3)
    assert [model.tokenizer.decode([i]) for i in ids] == lp.tokens


def test_a_disconnect_mid_stream_frees_the_slot(smol):
    _, url, state = smol
    assert _idle(state)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
        assert state.driver.in_flight == 1
    assert _idle(state), "the aborted request still holds pages"


def test_each_error_case_is_answered_with_its_code(client, smol):
    model, url, state = smol
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[5] * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=NAME, prompt=[model.config.vocab_size + 3], max_tokens=4)
    for bad in ({"temperature": -1}, {"top_p": 2}, {"max_tokens": -5}, {"n": 0}, {"presence_penalty": 1.0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=CHAT, **bad)
        assert e.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={
            "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        full = http.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "n": 9})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["type"] == "rate_limit_error"
        assert http.get("/health").json() == {"status": "ok"}
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices[0].text is not None
    assert _idle(state)


def test_a_failing_engine_step_fails_its_request_not_the_server(client, smol, monkeypatch):
    engine = smol[2].engine
    real_step = engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky)
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0)
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0).choices[0].text
    assert _idle(smol[2])


def test_the_api_key_is_enforced_on_every_route_but_health(smol):
    url = smol[1]
    with httpx.Client(base_url=url) as http:
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions")):  # fmt: skip
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = http.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()] == [NAME]


def test_metrics_parse(client, smol):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    r = httpx.get(smol[1] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels
               or s.name.endswith(("_count", "_total"))}  # fmt: skip
    assert samples["imp_jax_generation_tokens_total"] >= 3 and samples["imp_jax_prompt_tokens_total"] > 0
    assert samples["imp_jax_time_to_first_token_seconds_count"] >= 1
    assert samples["imp_jax_inter_token_latency_seconds_count"] >= 1
    assert samples["imp_jax_kv_pages_total"] == smol[2].engine.n_pages
    assert samples["imp_jax_kv_window_pages_total"] == smol[2].engine.n_window_pages == 0  # llama: no window layers
    for name in ("imp_jax_requests_waiting", "imp_jax_requests_running", "imp_jax_kv_pages_used"):
        assert name in samples
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert "imp_jax_requests" in families


def test_the_load_generator_measures_a_live_server(smol, tmp_path):
    """benchmarks/serve.py as the H200 run uses it (here two levels of 2 short requests): every request answered,
    TTFT and inter-token latency percentiles and rates reported, the rows written as JSON, the server idle after."""
    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "benchmarks" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    out = tmp_path / "serve.json"
    argv = ["--url", smol[1] + "/v1", "--api-key", KEY, "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4",
            "--prompt-words", "12", "--time-limit", "60", "--json", str(out)]  # fmt: skip
    rows = serve.main(argv)
    assert [(r["concurrency"], r["requests"], r["failed"]) for r in rows] == [(1, 2, 0), (2, 2, 0)]
    assert all(r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0 and r["output_tok_per_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["model"] == NAME
    assert _idle(smol[2])


def test_a_warmed_up_server_sized_by_utilization_never_waits_for_a_compile():
    """As `imp-jax serve` starts: a load planned for one sequence, the pool sized from the engine's own programs
    (memory_utilization), the covering programs compiled before the port opens. Then concurrent requests of
    other shapes give their solo texts and no step waits for a compile; the engine load() made is gone (a
    generate() beside the server gets one of its own)."""
    model = imp_jax.load(FIXTURES / "llama" / "model-f32.gguf", dtype="float32", max_context=128, progress=False)
    first = imp_jax.model.engine_for(model)
    settings = dict(model_name="tiny", max_seqs=4, token_budget=64, memory_utilization=0.5, warm_up=True)
    with _server(model, **settings) as (url, state):
        assert model._engine is None and state.engine is not first and state.engine.pool_plan.utilization == 0.5
        assert state.engine.n_pages == 4 * 128 // 16  # capped at max_seqs full contexts
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        prompts = [" ".join(["tok"] * n) for n in (3, 20, 7, 40)]

        def ask(prompt):
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
            return reply.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, prompts))
        assert state.engine.compile_waits == 0
        assert together == [ask(p) for p in prompts]


# ---- scripted fixtures: reasoning and tools end to end


@pytest.fixture(scope="module")
def harmony_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted") / "gpt-oss.gguf"
    script_gguf(FIXTURES / "gpt-oss" / "model-f32.gguf", path,
                ["<|channel|>", "analysis", "<|message|>", "Think first.", "<|end|>"])  # fmt: skip
    model = imp_jax.load(path, dtype="float32", max_context=512, progress=False)
    with _server(model, model_name="gpt-oss") as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_gpt_oss_fixture_returns_reasoning_content(harmony_server):
    kw = dict(model="gpt-oss", messages=CHAT, max_tokens=10, temperature=0, reasoning_effort="low")
    reply = harmony_server.chat.completions.create(**kw)
    message = reply.choices[0].message
    assert message.reasoning_content == "Think first." and not message.content
    chunks = list(harmony_server.chat.completions.create(**kw, stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "Think first."


@pytest.fixture(scope="module")
def hermes_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted") / "qwen3-tools.gguf"
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    script_gguf(FIXTURES / "qwen3" / "model-f32.gguf", path,
                ["<think>", "The user wants the weather.", "</think>", "<tool_call>", call, "</tool_call>"],
                template=HERMES)  # fmt: skip
    model = imp_jax.load(path, dtype="float32", max_context=512, progress=False)
    with _server(model, model_name="qwen3-tools") as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_a_tools_request_round_trips_a_tool_call(hermes_server):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model="qwen3-tools", max_tokens=10, temperature=0)
    plain = hermes_server.chat.completions.create(messages=ask, **kw)
    reply = hermes_server.chat.completions.create(messages=ask, tools=[WEATHER], **kw)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools went through the template
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert plain.choices[0].message.tool_calls is None  # without tools the block stays text
    assert "<tool_call>" in plain.choices[0].message.content
    streamed = list(hermes_server.chat.completions.create(messages=ask, tools=[WEATHER], stream=True, **kw))
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    turn2 = [*ask, choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]  # fmt: skip
    again = hermes_server.chat.completions.create(messages=turn2, tools=[WEATHER], **kw)
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens and again.choices[0].message.tool_calls


# ---- the reply parsers


def _pieces(splitter_or_reply, text: str, size: int):
    out = []
    for i in range(0, len(text), size):
        out += splitter_or_reply.push(text[i : i + size])
    return out + splitter_or_reply.finish()


def _joined(parts) -> dict:
    got: dict[str, str] = {}
    for p in parts:
        field, text = (p.field, p.text) if hasattr(p, "field") else p
        got[field] = got.get(field, "") + text
    return got


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_think_split_does_not_depend_on_the_pieces(size):
    text = "<think>\nLet me see.\n</think>\n\nThe answer is 4."
    assert _joined(_pieces(ThinkSplitter(), text, size)) == {
        "reasoning_content": "Let me see.\n", "content": "The answer is 4."}  # fmt: skip
    assert _joined(_pieces(ThinkSplitter(in_reasoning=True), "Hm.</think>Yes", size)) == {
        "reasoning_content": "Hm.", "content": "Yes"}  # fmt: skip


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_harmony_split_and_tool_call(size):
    text = ("<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')  # fmt: skip
    reply = ChatReply(HarmonySplitter(), tools=True)
    assert _joined(_pieces(reply, text, size)) == {"reasoning_content": "Need the tool."}
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris"})]  # fmt: skip
    final = "<|channel|>final<|message|>Hi there."
    assert _joined(_pieces(HarmonySplitter(), final, size)) == {"content": "Hi there."}
    broken = ChatReply(HarmonySplitter(), tools=True)
    bad = "<|channel|>commentary to=functions.f<|message|>{not json"
    assert _joined(_pieces(broken, bad, size)) == {"content": bad} and not broken.calls


def test_hermes_calls_parse_and_malformed_ones_stay_text():
    text, calls = parse_hermes('Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert text == "Sure." and [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"x": 1}')]
    assert len({c.id for c in parse_hermes('<tool_call>{"name": "f"}</tool_call>' * 2)[1]}) == 2
    for bad in ("<tool_call>{oops</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[1]"):
        assert parse_hermes(bad) == (bad, [])
    reply = ChatReply(None, tools=True)
    assert _joined(_pieces(reply, "Hello <tool_call>{broken", 2)) == {"content": "Hello <tool_call>{broken"}
