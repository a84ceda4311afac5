"""Bad files and hostile templates end in a clear ImpError naming the key or the limit (issue 20, items 1-3)."""

from __future__ import annotations

import gc
import math
import re
import time

import numpy as np
import pytest

from imp_jax.errors import GGUFError, ImpError, UnsupportedModel
from imp_jax.models.config import config_from_gguf
from imp_jax.text.chat import ChatTemplate, ChatTemplateError
from imp_jax.text.tokenizer import Tokenizer
from imp_jax.weights.synthetic import SHAPES


def _bpe(tokens: list[str], merges: list[str]) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.ones(len(tokens), np.int32),
        "tokenizer.ggml.merges": merges,
    }


def test_a_merge_naming_a_token_outside_the_vocabulary_is_a_gguf_error():
    """The 18 escapes of the corruption run: a flipped byte inside the vocabulary orphans a merge."""
    good = _bpe(["a", "b", "ab"], ["a b"])
    Tokenizer.from_metadata(good)
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.merges"):
        Tokenizer.from_metadata(_bpe(["a", "b", "xb"], ["a b"]))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda m: m.update({"tokenizer.ggml.token_type": np.ones(2, np.int32)}), "tokenizer.ggml.token_type"),
        (lambda m: m.update({"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens"),
    ],
)
def test_vocabulary_arrays_of_the_wrong_shape_name_their_key(change, key):
    meta = _bpe(["a", "b", "ab"], ["a b"])
    change(meta)
    with pytest.raises(GGUFError, match=re.escape(key)):
        Tokenizer.from_metadata(meta)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rope.freq_base", math.nan),
        ("rope.freq_base", -1.0),
        ("attention.layer_norm_rms_epsilon", math.inf),
        ("context_length", 0),
        ("attention.head_count", 0),
        ("block_count", 10**9),
    ],
)
def test_model_metadata_no_model_can_have_names_its_key(key, value):
    shape = SHAPES["tiny"]
    meta = {**shape.metadata, f"{shape.arch}.{key}": value}
    with pytest.raises((UnsupportedModel, GGUFError), match=key.split(".")[-1]):
        config_from_gguf(meta, {"output.weight"})


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% set s = namespace(x='ab') %}{% for i in range(64) %}{% set s.x = s.x ~ s.x %}{% endfor %}{{ s.x }}",
        "{{ 'x' * 10**10 }}",
        "{{ 'a'.center(10**10) }}",
    ],
)
def test_hostile_templates_stop_quickly_with_an_imp_error(template):
    chat = ChatTemplate(template)
    t0 = time.perf_counter()
    with pytest.raises(ImpError):
        chat.render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 5


def test_template_file_access_is_refused_at_load_and_attributes_in_the_sandbox():
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate("{% include '/etc/passwd' %}")
    with pytest.raises(ImpError):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])


def test_template_syntax_errors_name_the_line_and_raise_exception_its_message():
    with pytest.raises(ChatTemplateError, match="line 2"):
        ChatTemplate("ok\n{% for m in %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        ChatTemplate("{{ raise_exception('only user and assistant') }}").render([])


def test_rope_frequencies_that_overflow_float32_fail_before_any_transfer(tmp_path, recwarn):
    """A base of 1e-45 passes the metadata check (finite, positive) but its inverse frequencies reach 1e45, past
    float32: one GGUFError naming the file and the rope metadata, no numpy overflow warning, and the load stops
    before any weight is on the device."""
    import jax

    import imp_jax
    from tests.tiny_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "rope.gguf", kv={"llama.rope.freq_base": 1e-45})
    before = len(jax.live_arrays())
    with pytest.raises(
        GGUFError, match=r"rope\.gguf: the rope frequencies .*base [0-9.]+e-45.* not finite in float32"
    ) as e:
        imp_jax.load(path, max_context=32, progress=False, compile_cache=False)
    del e  # its traceback holds the half-made model (the engine's empty KV pages)
    gc.collect()
    assert len(jax.live_arrays()) == before
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
