"""The kernel policy is resolved once, from the setting and the device: the Pallas kernels on Hopper only, the
reference path everywhere else (on one CPU device with the layer matrices held per unit); under tensor parallelism
the kernels run per shard, all but the bf16 one (a dense matrix carries no shard layout)."""

from __future__ import annotations

import dataclasses

import pytest

from imp_jax.errors import ImpError
from imp_jax.ops.policy import REFERENCE, KernelPolicy, resolve_kernels


@dataclasses.dataclass
class FakeDevice:
    platform: str
    compute_capability: str = ""


HOPPER = FakeDevice("gpu", "9.0")


def test_no_kernels_off_hopper():
    for setting in ("auto", "all", "1", "off"):
        assert resolve_kernels(setting, FakeDevice("gpu", "8.0")) == REFERENCE


def test_hopper_runs_the_kernels_on_one_device():
    auto = resolve_kernels("auto", HOPPER)
    assert auto.matmul and auto.attention and auto.bf16_matmul
    assert resolve_kernels("0", HOPPER) == REFERENCE


def test_the_cpu_holds_layer_matrices_per_unit_unless_off_or_spread():
    cpu = FakeDevice("cpu")
    for setting in ("auto", "all", "1"):
        policy = resolve_kernels(setting, cpu)
        assert policy == KernelPolicy(unit_arrays=True) and not policy.enabled and policy.label == ""
    assert resolve_kernels("off", cpu) == REFERENCE
    assert resolve_kernels("auto", cpu, devices=2) == REFERENCE


def test_several_devices_run_the_kernels_per_shard_but_dense_matrices_on_xla():
    for setting in ("auto", "all"):
        policy = resolve_kernels(setting, HOPPER, devices=2)
        assert policy.matmul and policy.attention and not policy.bf16_matmul
    assert resolve_kernels("off", HOPPER, devices=2) == REFERENCE


def test_unknown_setting_names_the_choices():
    with pytest.raises(ImpError, match="auto, off, all"):
        resolve_kernels("fast", HOPPER)
