"""The kernel sources keep to the emulation contract (docs/ARCHITECTURE.md, "Keeping the CUDA kernels
emulatable"): everything CUDA- or device-specific goes through csrc/cuda/device.cuh, so the same sources
compile for the GPU and for the CPU emulator. A source-level check: runs without a compiler."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CUDA = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted([*CUDA.glob("*.cu"), *CUDA.glob("*.cuh")])

# pattern -> what to use instead
FORBIDDEN = {
    r"<<<": "launch<kernel<...>>(grid, block, smem, args...) (device.cuh)",
    r"__shared__": "RLA_SHARED(static|extern, T, name, dims) (device.cuh)",
    r"\bat::empty(_like)?\s*\(": "device_empty / device_empty_like (poisoned under emulation)",
    r"\btorch::empty": "device_empty",
    r"getCurrentCUDAStream|cudaStream_t": "launch() (it takes the current stream)",
    r"CUDAGuard": "DeviceGuard (device.cuh)",
    r"getCurrentDeviceProperties": "multiprocessor_count() (device.cuh)",
    r"C10_CUDA_KERNEL_LAUNCH_CHECK|cudaGetLastError": "launch() (it checks)",
    r"#include\s*<(ATen/cuda|c10/cuda|cuda_runtime|cuda_fp16|cuda_bf16)": "device.cuh's includes",
    r"\.is_cuda\(\)": "is_device_tensor()",
    r"TORCH_LIBRARY": "register.cpp",
    r"#include\s*<torch/(library|extension)\.h>": "ATen only (registration lives in register.cpp)",
    r"__shfl|atomic[A-Z]\w*\(|__ldg|__syncwarp|cooperative_groups": "nothing yet: extend the emulator first",
}


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_kernel_sources_exist():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"batchnorm.cuh", "concat_conv_bn_act.cu", "concat_z.cuh", "device.cuh", "rla_update.cu",
            "rla_update_and_entry.cu", "update_tail.cuh"} <= names


@pytest.mark.parametrize("path", [p for p in KERNEL_SOURCES if p.name != "device.cuh"], ids=lambda p: p.name)
def test_device_specifics_only_through_device_cuh(path):
    code = strip_comments(path.read_text())
    found = [f"{pat!r}: use {instead}" for pat, instead in FORBIDDEN.items() if re.search(pat, code)]
    assert not found, f"{path.name}: " + "; ".join(found)


def test_registration_is_host_compiled_and_alone():
    """register.cpp (compiled by setup.py's glob of csrc/cuda/*.cpp) is the only registration; the
    emulator's sources live one level down, out of that glob."""
    reg = (CUDA / "register.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(rla_ext, CUDA" in reg
    for name in ("concat_conv_bn_act_kernel_fwd", "concat_conv_bn_act_kernel_bwd", "rla_update_kernel_fwd",
                 "rla_update_kernel_bwd", "rla_update_and_entry_kernel_fwd", "rla_update_and_entry_kernel_bwd"):
        assert f'"{name}"' in reg
    assert [p.name for p in CUDA.glob("*.cpp")] == ["register.cpp"]


def test_every_cu_file_has_an_emulator_wrapper():
    for cu in CUDA.glob("*.cu"):
        wrapper = CUDA / "emulate" / f"{cu.stem}.cpp"
        assert wrapper.exists() and f'#include "../{cu.name}"' in wrapper.read_text(), wrapper
