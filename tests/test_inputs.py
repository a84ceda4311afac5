"""Every value a user sends is checked at one boundary (imp_jax.user_input): load, generate, Engine.add_request
(and so the server) raise InvalidRequest or ContextOverflow naming the value and the limit (issue 20, item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import imp_jax
from imp_jax import user_input
from imp_jax.errors import ContextOverflow, ImpError, InvalidRequest
from imp_jax.runtime.engine import Engine
from tests.tiny_gguf import VOCAB, write_tiny_llama

CONTEXT = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("inputs") / "tiny.gguf")
    return path, imp_jax.load(path, max_context=CONTEXT)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny[1])


BAD_REQUESTS = [
    (dict(prompt=b"ok \xff\xfe"), InvalidRequest, r"not valid UTF-8: byte 0xff at offset 3"),
    (dict(prompt="ok \ud800"), InvalidRequest, r"lone surrogate U\+D800 at character 3"),
    (dict(prompt=[1, VOCAB]), InvalidRequest, rf"token id {VOCAB} .*0\.\.{VOCAB - 1}"),
    (dict(prompt=[1, -1]), InvalidRequest, r"token id -1 .*outside the vocabulary"),
    (dict(prompt=[1, 2.0]), InvalidRequest, r"token id 1 is float 2\.0, not an integer"),
    (dict(prompt=[1, True]), InvalidRequest, r"not an integer"),
    (dict(prompt=[]), InvalidRequest, r"prompt is empty"),
    (dict(prompt={"a": 1}), InvalidRequest, r"string or a list of token ids, got dict"),
    (dict(prompt=np.ones((2, 2), np.int32)), InvalidRequest, r"one-dimensional"),
    (dict(prompt=[3] * (CONTEXT + 1)), ContextOverflow, rf"{CONTEXT + 1} tokens does not fit the context of {CONTEXT}"),
    (dict(prompt=" t1" * 200), ContextOverflow, rf"context of {CONTEXT}"),
    (dict(stop=[""]), InvalidRequest, r"stop string 0 is empty"),
    (dict(stop=["a"] * 17), InvalidRequest, r"17 stop strings given; at most 16"),
    (dict(stop=["x" * 1025]), InvalidRequest, r"1025 characters; at most 1024"),
    (dict(stop=["\udfff"]), InvalidRequest, r"stop string 0 has a lone surrogate"),
    (dict(stop=5), InvalidRequest, r"stop must be a string or a list"),
    (dict(temperature=math.nan), InvalidRequest, r"temperature must be a finite number in \[0, .*got nan"),
    (dict(temperature=math.inf), InvalidRequest, r"temperature .* got inf"),
    (dict(temperature=-0.5), InvalidRequest, r"temperature"),
    (dict(temperature=1e39), InvalidRequest, r"temperature"),
    (dict(temperature="hot"), InvalidRequest, r"temperature .* got 'hot'"),
    (dict(top_k=-1), InvalidRequest, r"top_k must be an integer in 0\.\.2147483647, got -1"),
    (dict(top_k=2**40), InvalidRequest, r"top_k"),
    (dict(top_k=1.5), InvalidRequest, r"top_k"),
    (dict(top_p=0.0), InvalidRequest, r"top_p must be a finite number in \(0, 1\], got 0\.0"),
    (dict(top_p=math.nan), InvalidRequest, r"top_p"),
    (dict(min_p=1.0), InvalidRequest, r"min_p must be a finite number in \[0, 1\)"),
    (dict(min_p=-math.inf), InvalidRequest, r"min_p"),
    (dict(repeat_penalty=0.0), InvalidRequest, r"repeat_penalty"),
    (dict(repeat_penalty=math.nan), InvalidRequest, r"repeat_penalty"),
    (dict(seed=2**64), InvalidRequest, r"seed must be an integer in -9223372036854775808\.\.18446744073709551615"),
    (dict(seed=1.5), InvalidRequest, r"seed"),
    (dict(max_tokens=-1), InvalidRequest, r"max_tokens must be an integer >= 0, got -1"),
    (dict(max_tokens=3.0), InvalidRequest, r"max_tokens"),
    (dict(logprobs=21), InvalidRequest, r"logprobs must be an integer in 0\.\.20, got 21"),
    (dict(logprobs=-1), InvalidRequest, r"logprobs"),
]


@pytest.mark.parametrize(("kw", "error", "message"), BAD_REQUESTS, ids=lambda x: str(x)[:40])
def test_engine_refuses_bad_requests_naming_value_and_limit(engine, kw, error, message):
    kw = {"prompt": "hello", **kw}
    before = (len(engine.waiting), len(engine.requests))
    with pytest.raises(error, match=message):
        engine.add_request(kw.pop("prompt"), **kw)
    assert (len(engine.waiting), len(engine.requests)) == before  # nothing half-queued


def test_invalid_request_is_an_imp_error():
    assert issubclass(InvalidRequest, ImpError) and issubclass(ContextOverflow, InvalidRequest)


def test_good_values_pass_in_any_numeric_type(engine):
    rid = engine.add_request(
        np.array([1, 5, 6], np.int64), max_tokens=np.int32(2), temperature=np.float32(0.7), top_k=np.int64(5),
        top_p=1, seed=-3, stop="t9", logprobs=2,
    )  # fmt: skip
    assert engine.requests[rid].prompt == [1, 5, 6]
    engine.abort(rid)
    engine.step()
    assert engine.add_request(b"t1 t2", max_tokens=0) >= 0
    engine.step()


def test_generate_checks_every_prompt_of_a_batch_before_running(tiny):
    model = tiny[1]
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        imp_jax.generate(model, ["fine", "bad \ud800"], max_tokens=2)
    assert not imp_jax.model.engine_for(model).waiting  # the first prompt was withdrawn
    with pytest.raises(InvalidRequest, match="top_p"):
        imp_jax.generate(model, "hi", top_p=2.0, stream=True)
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        model.logits([0, VOCAB + 3])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(dtype="float8"), r"dtype 'float8' is not supported; use one of bfloat16, float32"),
        (dict(dtype=object()), r"dtype .* is not supported"),
        (dict(max_context=0), r"max_context must be an integer >= 1 or 'auto', got 0"),
        (dict(max_context="big"), r"max_context"),
        (dict(max_context=1.5), r"max_context"),
        (dict(batch=0), r"batch must be an integer >= 1, got 0"),
        (dict(batch=True), r"batch"),
    ],
)
def test_load_refuses_bad_arguments_before_opening_the_file(kw, message):
    with pytest.raises(InvalidRequest, match=message):
        imp_jax.load("/nonexistent/never-opened.gguf", **kw)


def test_dtype_aliases():
    assert user_input.dtype("bf16") == user_input.dtype(np.dtype("bfloat16").name) == "bfloat16"
    assert user_input.dtype(np.float32) == "float32"
