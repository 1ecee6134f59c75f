"""Build and runtime information: ``rla_ext.build_info()`` and ``python -m rla_ext.info``."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
from typing import Any

import torch

from rla_ext import _backend, _extension


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict[str, Any]:
    """The CPU and the instruction sets in use: torch's (ATen's kernel dispatch) and rla_ext's own
    (the cpp kernels' hot loops, csrc/cpu/isa.h; None when the extension is not built)."""
    ours = supported = None
    if _extension.cpp_compiled():
        ours, supported = torch.ops.rla_ext.cpu_isa(), torch.ops.rla_ext.cpu_isa_supported()
    return {
        "model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "kernels_isa": ours,
        "kernels_isa_supported": supported,
        # Environment caps that change which kernels run (and how they round).
        "isa_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                     if k in os.environ},
    }


def build_info() -> dict[str, Any]:
    """Versions, which backends were compiled, the CUDA arch list and Triton availability."""
    recorded = _extension.recorded_build_info()
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as e:  # a broken triton install is worth reporting, not crashing on
            triton_version = f"unimportable: {e}"
    return {
        "rla_ext_version": __import__("rla_ext").__version__,
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "built_with_torch": recorded.get("torch_version"),
        "cpp_compiled": _extension.cpp_compiled(),
        "cuda_compiled": _extension.cuda_compiled(),
        "cuda_build_reason": recorded.get("cuda_reason"),
        "cuda_arch_list": recorded.get("cuda_arch_list"),
        "extension_load_error": _extension.load_error(),
        "triton_version": triton_version,
        "triton_available": triton_version is not None and not str(triton_version).startswith("unimportable"),
        "triton_interpreter": _backend.triton_interpreter_on(),
        "cpu": cpu_info(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "available_backends": {"cpu": _backend.available_backends("cpu"),
                               **({"cuda": _backend.available_backends("cuda")}
                                  if torch.cuda.is_available() else {})},
    }


def main() -> None:
    print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
