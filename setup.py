"""Build rla_ext: one extension module, rla_ext._C, with the CPU kernels and (optionally) CUDA ones.

Environment knobs (printed at build time):
  RLA_EXT_FORCE_CUDA=1   compile the CUDA sources even without a visible GPU (needs nvcc)
  RLA_EXT_NO_CUDA=1      never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: the visible GPU's, else 9.0)
  MAX_JOBS               parallel compile jobs for ninja
  CUDA_HOME              CUDA toolkit root (found from nvcc on PATH when unset)
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[rla_ext setup] {msg}", file=sys.stderr)


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def find_cuda_home() -> str | None:
    """The toolkit root holding bin/nvcc.

    torch guesses the parent of the directory of the first `nvcc` on PATH, which is wrong when that
    `nvcc` is a wrapper script outside the toolkit; nvcc's own --dryrun names its real location.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    m = re.search(r"^#\$ TOP=(.+)$", text, flags=re.M)
    if m and _is_toolkit_root(os.path.realpath(m.group(1).strip())):
        return os.path.realpath(m.group(1).strip())
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return guess if _is_toolkit_root(guess) else None


def nvidia_wheel_includes() -> list[str]:
    """Header folders of the nvidia-* wheels (cusparse.h, cublas headers that torch includes)."""
    found = []
    for entry in sys.path:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")) or os.path.isfile(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return list(dict.fromkeys(found))


def want_cuda(cuda_home: str | None) -> tuple[bool, str]:
    if os.environ.get("RLA_EXT_NO_CUDA", "0") == "1":
        return False, "RLA_EXT_NO_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    if os.environ.get("RLA_EXT_FORCE_CUDA", "0") == "1":
        return True, "RLA_EXT_FORCE_CUDA=1"
    # The folder's name, not its path: build info lands in committed benchmark results.
    toolkit = os.path.basename(os.path.normpath(cuda_home))
    return True, f"CUDA toolkit found ({toolkit}, via CUDA_HOME or nvcc) and torch CUDA {torch.version.cuda}"


def build_extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, why = want_cuda(cuda_home)
    log(f"CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch >= 2.14 headers use C++20 (std::strong_ordering, requires-clauses).
    # -fno-trapping-math (as torch's own build): lets GCC if-convert selects next to float
    # arithmetic, without which the fused CPU loops with tanh/ReLU are not vectorised.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    macros = []
    arch_list = None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                cap = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"TORCH_CUDA_ARCH_LIST={arch_list}")
        extra = nvidia_wheel_includes()
        if extra:
            log(f"extra CUDA header folders: {extra}")
        include_dirs += extra
        macros.append(("RLA_EXT_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "rla_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20",
                                                     "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("rla_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}; sources: {sources}")
    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cpp_compiled": True,
        "cuda_compiled": with_cuda,
        "cuda_reason": why,
        "cuda_home": cuda_home if with_cuda else None,
        "cuda_arch_list": arch_list,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(ROOT, "rla_ext", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    name="rla_ext",
    version="0.1.0",
    description="Fused CPU/CUDA/Triton kernels for Recurrent Layer Aggregation (RLA-Net)",
    # triton_kernels/ ships INSIDE the package (rla_ext.triton_kernels), never as a top-level name.
    packages=find_packages(include=["rla_ext", "rla_ext.*"]) + ["rla_ext.triton_kernels"],
    package_dir={"rla_ext.triton_kernels": "triton_kernels"},
    package_data={"rla_ext": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
)
