"""Build and load the CUDA kernels of csrc/cuda/ under the CPU emulator of csrc/cuda/emulate/.

The kernel sources compile as host C++ (g++, RLA_EXT_EMULATE_CUDA) into a Python module whose
functions are the kernels' host functions on CPU tensors; see csrc/cuda/emulate/runtime.h for what is
emulated and docs/ARCHITECTURE.md for the rules that keep a kernel emulatable.

Builds go through torch.utils.cpp_extension.load into a cache folder (ninja rebuilds only what changed):
    RLA_EXT_EMULATE_BUILD_DIR   cache folder (default: build/emulate in the repository)
    RLA_EXT_EMULATE_FULL=1      run the full tier of tests/csrc/emulate (what `make emulate-cuda` does)
    RLA_EXT_EMULATE_SRC=DIR     emulate the kernel sources in DIR (a modified copy of csrc/cuda/) instead

Also a command line, used by the mutation and sanitizer tests to run a build in its own process:
    python tests/cuda_emulation.py probe [--src DIR] [--variant NAME] [--sanitize]
prints one JSON line {"built": bool, "failures": [...], "cases": n}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "csrc" / "cuda"
# The emulator itself (always from this repository's csrc/cuda/emulate/) and the kernel translation
# units (one wrapper per .cu file, taken from the kernel source folder being emulated).
EMULATOR_SOURCES = ("emulate/runtime.cpp", "emulate/module.cpp", "emulate/selftest.cpp")
KERNEL_SOURCES = ("emulate/concat_conv_bn_act.cpp", "emulate/concat_conv3x3_bn_act.cpp", "emulate/rla_update.cpp",
                  "emulate/rla_update_and_entry.cpp")
MODULE_NAME = "rla_ext_cuda_emulated"  # the same in every variant: a fresh variant starts from a copy
                                       # of the default build and recompiles only the kernels that differ
SCHEDULES = ("inorder", "shuffled", "threaded")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def full_tier() -> bool:
    return os.environ.get("RLA_EXT_EMULATE_FULL", "0") == "1"


def compiler() -> str | None:
    """The C++ compiler the build would use (CXX, else c++ on PATH), or None."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx)


def no_compiler_reason() -> str:
    return f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found; set CXX) to build the CUDA emulation"


def cache_dir() -> Path:
    return Path(os.environ.get("RLA_EXT_EMULATE_BUILD_DIR", ROOT / "build" / "emulate"))


def runtime_library(name: str) -> str | None:
    """Path of a runtime library of the compiler (libasan.so, libstdc++.so), or None."""
    cxx = compiler()
    if cxx is None:
        return None
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def sanitizer_runtime() -> str | None:
    """libasan of the compiler: it must be preloaded into an uninstrumented Python for a sanitized build."""
    return runtime_library("libasan.so")


def load(src: Path | None = None, variant: str | None = None, sanitize: bool = False, verbose: bool = False):
    """Build (if needed) and import the emulated kernels from the kernel sources in `src`.

    `src` defaults to RLA_EXT_EMULATE_SRC, else csrc/cuda/. Each variant has its own cache folder; one
    process can load several variants. A sanitized build only loads in a process started with the
    sanitizer runtime preloaded (see `probe_in_subprocess`).
    """
    if compiler() is None:
        raise RuntimeError(no_compiler_reason())
    import warnings

    from torch.utils import cpp_extension

    if src is None:
        src = os.environ.get("RLA_EXT_EMULATE_SRC") or SOURCE_DIR
        variant = variant or ("default" if Path(src).resolve() == SOURCE_DIR.resolve() else "custom")
    variant = variant or "default"
    src = Path(src).resolve()
    build = cache_dir() / variant
    default_build = cache_dir() / "default"
    if not sanitize and variant != "default" and not build.exists() and (default_build / "build.ninja").exists():
        shutil.copytree(default_build, build, ignore=shutil.ignore_patterns("lock"))
    build.mkdir(parents=True, exist_ok=True)
    cflags = ["-O1", "-std=c++20", "-DRLA_EXT_EMULATE_CUDA", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE"]
    ldflags = []
    if sanitize:
        cflags += SANITIZE_FLAGS
        ldflags += SANITIZE_FLAGS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA runtime found" and compiler-ABI notes: not for this build
        sources = [str(SOURCE_DIR / f) for f in EMULATOR_SOURCES] + [str(src / f) for f in KERNEL_SOURCES]
        return cpp_extension.load(name=MODULE_NAME, sources=sources,
                                  extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(build),
                                  verbose=verbose, with_cuda=False)


def probe_in_subprocess(src: Path, variant: str, sanitize: bool = False, timeout: float = 1800,
                        extra_env: dict | None = None, args: list[str] | None = None) -> dict:
    """Build `src` as `variant` and run the probe cases in a fresh process (a broken kernel may crash it).

    Returns the probe's JSON result plus "returncode" and "output" (the tail of its stdout/stderr)."""
    if not sanitize and variant != "default":
        load()  # builds the default variant first, so this one starts from its objects
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if sanitize:
        runtime = sanitizer_runtime()
        if runtime is None:
            raise RuntimeError("the compiler has no libasan.so to preload")
        # libstdc++ too: Python does not link it, and ASan's __cxa_throw interceptor needs it up front.
        env["LD_PRELOAD"] = " ".join([runtime] + [p for p in [runtime_library("libstdc++.so")] if p])
        # Python and torch are not instrumented: no leak report at exit, no container-overflow
        # annotations across the boundary; every error found in our code aborts with a report.
        env["ASAN_OPTIONS"] = "detect_leaks=0:detect_container_overflow=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.update(extra_env or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", "--src", str(src), "--variant", variant]
    if sanitize:
        cmd.append("--sanitize")
    cmd += args or []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    result = {"built": False, "failures": [], "cases": 0}
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"failures"' in line:
            result = json.loads(line)
    result["returncode"] = proc.returncode
    result["output"] = (proc.stdout + proc.stderr)[-6000:]
    return result


# Probe cases: every kernel, both memory formats, training and eval, under the in-order and shuffled
# schedules; small enough to run in a few seconds per build (the mutation tests run them per mutant).
PROBE_CCBA = [(3, 40, 5, 37, (9, 7)), (5, 48, 8, 40, (13, 17))]
PROBE_UPDATE = [(3, 24, 20, (5, 6), True, True), (2, 16, 64, (9, 7), False, False)]
# (N, C, k, C_entry, (H, W), pool, odd h): the boundary (op C), where its module has it.
PROBE_BOUNDARY = [(3, 24, 20, 13, (5, 6), True, True)]


def probe(mod, stop_at_first: bool = True, schedules=("inorder", "shuffled"),
          dtypes=("float32",)) -> tuple[list[str], int]:
    """Runs the probe cases on an emulated-kernels module; returns (failure messages, cases run)."""
    import torch

    import kernel_cases as kc

    torch.set_num_threads(1)
    kernels = kc.module_kernels(mod)
    failures: list[str] = []
    cases = 0
    try:
        for schedule, dtype, fmt, training in itertools.product(schedules, dtypes, kc.FORMATS, (True, False)):
            mod.configure(schedule, 0)
            dt = getattr(torch, dtype)
            runs = [(f"{dtype} ccba{shape}", lambda s=shape: kc.check_ccba(
                *s, dt, fmt, training, relu=True, device="cpu", kernels=kernels)) for shape in PROBE_CCBA]
            runs += [(f"{dtype} update{case}", lambda c=case: kc.check_update(
                *c[:5], dt, fmt, training, odd_h=c[5], device="cpu", kernels=kernels)) for case in PROBE_UPDATE]
            if kernels.boundary_fwd is not None:
                runs += [(f"{dtype} boundary{case}", lambda c=case: kc.check_boundary(
                    *c[:6], dt, fmt, training, odd_h=c[6], device="cpu", kernels=kernels)) for case in PROBE_BOUNDARY]
            for name, run in runs:
                cases += 1
                try:
                    run()
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    failures.append(f"{schedule} {fmt} {'train' if training else 'eval'} {name}: "
                                    f"{type(e).__name__}: {str(e)[:500]}")
                    if stop_at_first:
                        return failures, cases
    finally:
        mod.configure("inorder", 0)
    return failures, cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="build a kernel source folder and run the probe cases")
    p.add_argument("--src", type=Path, default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--sanitize", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--selftest", help="run this selftest kernel (csrc/cuda/emulate/selftest.cpp) instead")
    p.add_argument("--all", action="store_true", help="run every probe case (default: stop at the first failure)")
    p.add_argument("--schedules", default="inorder,shuffled")
    p.add_argument("--dtypes", default="float32")
    args = parser.parse_args(argv)

    t0 = time.time()
    try:
        mod = load(args.src, args.variant, args.sanitize, args.verbose)
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        print(json.dumps({"built": False, "failures": [f"build: {e}"[-3000:]], "cases": 0}), flush=True)
        return 2
    build_s = time.time() - t0
    if args.selftest:
        out = mod.selftest(args.selftest)
        print(json.dumps({"built": True, "failures": [], "cases": 1, "selftest": out.tolist()}), flush=True)
        return 0
    failures, cases = probe(mod, stop_at_first=not args.all, schedules=args.schedules.split(","),
                            dtypes=args.dtypes.split(","))
    print(json.dumps({"built": True, "failures": failures, "cases": cases, "build_s": round(build_s, 1),
                      "run_s": round(time.time() - t0 - build_s, 1)}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
