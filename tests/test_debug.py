"""The NaN tracer: a checked forward names the first layer, op and weight whose output is not finite."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from imp_jax.cli import debug_setting
from imp_jax.debug import check_prefill
from imp_jax.errors import ImpError, NonFiniteError
from imp_jax.weights.synthetic import synthetic_params, synthetic_specs

TOKENS = list(range(1, 9))
F16_INF = (0x00, 0x7C)  # little-endian bytes of +inf in f16


@pytest.fixture(scope="module")
def tiny():
    config, specs = synthetic_specs("tiny", "q8_0")
    return config, specs, synthetic_params(specs, jax.random.key(0), config=config)


def _with_ffn_down(params, w):
    layer = params.segments[0][0]
    return dataclasses.replace(params, segments=((dataclasses.replace(layer, w_down=w),),))


def test_clean_model_passes(tiny):
    config, specs, params = tiny
    check_prefill(params, config, TOKENS, specs=specs)  # attention's -inf masks are not failures


def test_corrupt_block_scale_is_named_with_layer_op_and_format(tiny):
    config, specs, params = tiny
    w = params.segments[0][0].w_down
    block = jnp.asarray([*F16_INF, *[1] * 32], jnp.uint8)  # scale +inf, every quant 1 (not 0: inf * 0 is NaN)
    poisoned = dataclasses.replace(w, data=w.data.at[1, 3, 0:34].set(block))
    with pytest.raises(NonFiniteError) as e:
        check_prefill(_with_ffn_down(params, poisoned), config, TOKENS, specs=specs)
    err = e.value
    assert (err.layer, err.op) == (1, "ffn_down")
    assert err.inf == 32 and err.nan == 0  # one Q8_0 block of 32 weights times an infinite scale
    assert str(err).startswith("layer 1 ffn_down (Q8_0 [256, 256]): its values (after dequantize_rows)")
    assert "32 inf" in str(err) and "corrupt" in str(err)


def test_empty_prompt_is_refused(tiny):
    config, _, params = tiny
    with pytest.raises(ImpError, match="at least one token"):
        check_prefill(params, config, [])


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_env_switch(value, on):
    assert debug_setting({"IMP_JAX_DEBUG_NANS": value}) is on
