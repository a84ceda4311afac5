"""The kernel policy is resolved once, from the setting and the device: the Pallas kernels on Hopper only, the
reference path everywhere else (on one CPU device with the layer matrices held per unit), and for tensor
parallelism "auto" means the reference path (the kernels have no sharded layout yet) while an explicit "all" is
refused by the mesh."""

from __future__ import annotations

import dataclasses

import pytest

from imp_jax.errors import ImpError
from imp_jax.models.config import config_from_gguf
from imp_jax.ops.policy import REFERENCE, KernelPolicy, resolve_kernels
from imp_jax.weights import sharding


@dataclasses.dataclass
class FakeDevice:
    platform: str
    compute_capability: str = ""


HOPPER = FakeDevice("gpu", "9.0")


def test_no_kernels_off_hopper():
    for setting in ("auto", "all", "1", "off"):
        assert resolve_kernels(setting, FakeDevice("gpu", "8.0")) == REFERENCE


def test_the_cpu_holds_layer_matrices_per_unit_unless_off_or_spread():
    cpu = FakeDevice("cpu")
    for setting in ("auto", "all", "1"):
        policy = resolve_kernels(setting, cpu)
        assert policy == KernelPolicy(unit_arrays=True) and not policy.enabled and policy.label == ""
    assert resolve_kernels("off", cpu) == REFERENCE
    assert resolve_kernels("auto", cpu, devices=2) == REFERENCE


def test_hopper_runs_the_kernels_on_one_device():
    auto = resolve_kernels("auto", HOPPER)
    assert auto.matmul and auto.attention and auto.bf16_matmul
    assert resolve_kernels("0", HOPPER) == REFERENCE


def test_auto_over_several_devices_is_the_reference_path():
    assert resolve_kernels("auto", HOPPER, devices=2) == REFERENCE
    assert resolve_kernels("all", HOPPER, devices=2).enabled


def test_explicit_kernels_under_tensor_parallelism_are_refused(tmp_path):
    from imp_jax.weights.files import open_model_file
    from tests.tiny_gguf import write_tiny_llama

    mf = open_model_file(write_tiny_llama(tmp_path / "t.gguf"))
    cfg = config_from_gguf(mf.metadata, mf.tensors)
    mesh = type("TwoDevices", (), {"shape": {sharding.TP: 2}})()
    with pytest.raises(ImpError, match="XLA path only"):
        sharding.on_mesh(cfg, mesh, resolve_kernels("all", HOPPER, devices=2))


def test_unknown_setting_names_the_choices():
    with pytest.raises(ImpError, match="auto, off, all"):
        resolve_kernels("fast", HOPPER)
