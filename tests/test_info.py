"""build_info() / python -m rla_ext.info, and that the built extension holds what the build says."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import rla_ext
from rla_ext import _extension

KERNEL_OPS = ["concat_conv_bn_act_kernel_fwd", "concat_conv_bn_act_kernel_bwd", "rla_update_kernel_fwd",
              "rla_update_kernel_bwd"]


def test_build_info_fields():
    info = rla_ext.build_info()
    for key in ("torch_version", "cpp_compiled", "cuda_compiled", "cuda_arch_list", "triton_available",
                "available_backends"):
        assert key in info
    assert info["torch_version"] == torch.__version__


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "rla_ext.info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["torch_version"] == torch.__version__


@pytest.mark.skipif(not _extension.recorded_build_info(), reason="package not built (no _build_info.json)")
def test_extension_loads_and_registers_cpu_kernels():
    assert _extension.load_error() is None
    for name in KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rla_ext::{name}", "CPU"), name
    assert rla_ext.build_info()["cpp_compiled"]


@pytest.mark.skipif(not _extension.recorded_build_info().get("cuda_compiled"),
                    reason="this build was made without the CUDA sources (see build_info()['cuda_build_reason'])")
def test_cuda_kernels_are_registered_when_built_with_cuda():
    for name in KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rla_ext::{name}", "CUDA"), name
    info = rla_ext.build_info()
    assert info["cuda_compiled"] and info["cuda_arch_list"]
