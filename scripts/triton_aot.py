"""Compile every Triton launch of rla_ext for the H100 (sm_90) ahead of time, without a GPU.

    python scripts/triton_aot.py [--tier quick|full] [--self-test] [--jobs N] [--json PATH]
                                 [--max-spill BYTES] [--kernel NAME] [--op A|B|C] [--no-table]

1. Record: the real launchers (rla_ext.triton_kernels.<op>.forward / backward) run on meta
   tensors (no data, so ImageNet-sized shapes cost nothing) with Triton's launch path patched:
   every launch is recorded (kernel, arguments, constexprs, grid) instead of run, and an
   autotuned kernel records one launch per configuration. fp64 is not recorded: on a GPU it takes
   the ATen fallback (triton_kernels/_aten.py), never a Triton kernel.
2. Compile: each launch goes through the kernel's own JIT path (`JITFunction.warmup`, so the
   signature and specialisation are exactly what a GPU run would compile) with a stand-in driver
   whose target is GPUTarget("cuda", 90, 32), in --jobs processes. Triton's cache dir
   ($TRITON_CACHE_DIR, default ~/.triton/cache) keeps the kernels and their ptxas report, so a
   rerun takes seconds.
3. Check every compiled kernel: shared memory (the compiled metadata) <= 232,448 bytes (sm_90's
   227 KB per block opt-in), threads per block <= 1024, registers x threads <= 65,536, spill
   bytes (`ptxas -v` on the produced PTX, with the ptxas Triton ships) <= --max-spill, and no
   NaN-dropping float max/min in the IR (torch.relu keeps NaN; `tl.maximum(y, 0.0)` does not on a
   GPU); every launch's grid: 0 < x < 2^31, 0 < y, z <= 65,535; and that every `*_kernel` of the
   op modules was launched. --self-test first compiles four kernels built to break one rule each.

Prints a table (kernel, config, variant, shared memory, registers, spill bytes, compile CPU seconds
including ptxas) and a per-kernel summary; exits 1 if any check fails. Tiers: `quick` (one shape,
every kernel and configuration; CI runs it from tests/triton_kernels/test_triton_aot.py) and
`full` (`make triton-aot`: every RLA-ResNet-50 block-boundary shape, batch 256 and 1, every
dtype, dot precision, memory format and mode).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

# Recording needs Triton's real JIT, not its interpreter; set before Triton is imported.
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner as _triton_autotuner  # noqa: E402
from triton.runtime import jit as _triton_jit  # noqa: E402
from triton.runtime.driver import driver as _triton_driver  # noqa: E402

from rla_ext.triton_kernels import common  # noqa: E402
from rla_ext.triton_kernels import concat_conv_bn_act as op_a  # noqa: E402
from rla_ext.triton_kernels import rla_update as op_b  # noqa: E402
from rla_ext.triton_kernels import rla_update_and_entry as op_c  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)
MAX_THREADS = 1024
REGS_PER_SM = 65_536
GRID_X_MAX = 2 ** 31 - 1
GRID_YZ_MAX = 65_535
# Spill bytes (stores + loads, per thread) allowed per kernel. ptxas spills a few words by heuristic
# even far below the 255-register limit (an elementwise kernel at 72 registers: 8 B stored, 8 B
# reloaded; GEMM tiles up to 64 B), a few L1 hits per thread, nothing next to a tile's global
# traffic. A tile that does not fit in registers (kernels at 255 registers) spilled 72 B to 73 KB,
# in the main loop, before the tile lists were fixed (issue 12). 64 B is the line between the two.
DEFAULT_MAX_SPILL = 64
K = 32  # the RLA hidden-state width
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# ------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of one op's forward and backward at one shape and mode."""

    op: str  # "A" (concat_conv_bn_act), "B" (rla_update) or "C" (rla_update_and_entry: B, then A on y)
    n: int
    c: int  # x (A) / y (B, C) channels
    size: int  # H = W of the activation
    co: int = 0  # A, C: (entry) output channels
    pool: bool = False  # B, C: h is twice the size of y and gets average-pooled
    dtype: torch.dtype = torch.bfloat16
    tf32: bool = False  # fp32 only: PyTorch's matmul precision set to TF32
    channels_last: bool = True
    training: bool = True
    relu: bool = True  # A, C

    def label(self) -> str:
        dt = _DT[self.dtype]
        if self.dtype == torch.float32:
            dt += "-tf32" if self.tf32 else "-ieee"
        shape = f"N{self.n}-C{self.c}-H{self.size}" + (f"-Co{self.co}" if self.op in "AC" else "")
        flag = "-".join(([("relu" if self.relu else "linear")] if self.op in "AC" else [])
                        + ([("pool" if self.pool else "nopool")] if self.op in "BC" else []))
        return "-".join((self.op, shape, dt, "cl" if self.channels_last else "nchw",
                         "train" if self.training else "eval", flag))


# RLA-ResNet-50 at 224x224 (stage: block input channels, spatial size, bottleneck width); op A runs
# at every block entry (the first block of a stage reads the previous stage's output, at the
# previous resolution), op B after every block (pooling h when the block strides).
ENTRIES = [(64, 56, 64), (256, 56, 64), (256, 56, 128), (512, 28, 128), (512, 28, 256), (1024, 14, 256),
           (1024, 14, 512), (2048, 7, 512)]
UPDATES = [(256, 56, False), (512, 28, True), (512, 28, False), (1024, 14, True), (1024, 14, False),
           (2048, 7, True), (2048, 7, False)]
# The block boundaries (op C): each update above followed by the next block's entry, which reads the
# same y: (C, size, pool, entry width), in network order; the last block of stage 4 has no entry.
BOUNDARIES = [(256, 56, False, 64), (256, 56, False, 128), (512, 28, True, 128), (512, 28, False, 128),
              (512, 28, False, 256), (1024, 14, True, 256), (1024, 14, False, 256), (1024, 14, False, 512),
              (2048, 7, True, 512), (2048, 7, False, 512)]
DTYPES = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]


def cases(tier: str) -> list[Case]:
    out = []
    if tier == "quick":
        # One shape (stage 2, batch 256) and every configuration of every kernel: channels_last in
        # bf16 (mixed-precision training) and fp32 with TF32 (the largest shared-memory tiles), each
        # in training with the op's flag on (ReLU, pooling) and in eval with it off; and NCHW fp32
        # without TF32 in training, which takes the lean tiles (common.register_bound).
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True)):
            for training in (True, False):
                out.append(Case("A", 256, 512, 28, co=128, dtype=dtype, tf32=tf32, training=training,
                                relu=training))
                out.append(Case("B", 256, 512, 28, pool=training, dtype=dtype, tf32=tf32, training=training))
                out.append(Case("C", 256, 512, 28, co=128, pool=training, dtype=dtype, tf32=tf32,
                                training=training, relu=training))
        out.append(Case("A", 256, 512, 28, co=128, dtype=torch.float32, channels_last=False))
        out.append(Case("B", 256, 512, 28, pool=True, dtype=torch.float32, channels_last=False))
        out.append(Case("C", 256, 512, 28, co=128, pool=True, dtype=torch.float32, channels_last=False))
        return out
    for n in (256, 1):
        for dtype, tf32 in DTYPES:
            for cl in (True, False):
                for training in (True, False):
                    for flag in (True, False):
                        for c, size, co in ENTRIES:
                            out.append(Case("A", n, c, size, co=co, dtype=dtype, tf32=tf32, channels_last=cl,
                                            training=training, relu=flag))
                        for c, size, pool in UPDATES:
                            if pool == flag:
                                out.append(Case("B", n, c, size, pool=pool, dtype=dtype, tf32=tf32,
                                                channels_last=cl, training=training))
                        # The entry's activation alternates with the boundary so both meet each shape.
                        for i, (c, size, pool, co) in enumerate(BOUNDARIES):
                            out.append(Case("C", n, c, size, co=co, pool=pool, dtype=dtype, tf32=tf32,
                                            channels_last=cl, training=training, relu=flag == bool(i % 2)))
    return out


def _act(n, c, size, case):
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    return torch.empty((n, c, size, size), dtype=case.dtype, device="meta").contiguous(memory_format=fmt)


def run_case(case: Case) -> None:
    """Call the op's Triton forward and backward launchers on meta tensors."""
    sd = torch.float32
    vec = lambda c: torch.empty(c, dtype=sd, device="meta")  # noqa: E731
    eps = 1e-5
    with fp32_precision("tf32" if case.tf32 else "ieee"):
        if case.op == "A":
            x = _act(case.n, case.c, case.size, case)
            h = _act(case.n, K, case.size, case)
            w = torch.empty((case.co, case.c + K), dtype=case.dtype, device="meta")
            stats = (None, None) if case.training else (vec(case.co), vec(case.co))
            out, z, mean, var = op_a.forward(x, h, w, vec(case.co), vec(case.co), *stats, eps, case.relu)
            op_a.backward(torch.empty_like(out), x, h, w, vec(case.co), vec(case.co), z, mean, var, eps,
                          case.relu, case.training)
        elif case.op == "C":
            hs = case.size * 2 if case.pool else case.size
            h = _act(case.n, K, hs, case)
            y = _act(case.n, case.c, case.size, case)
            wo = torch.empty((K, case.c), dtype=case.dtype, device="meta")
            wr = torch.empty((K, K, 3, 3), dtype=case.dtype, device="meta")
            we = torch.empty((case.co, case.c + K), dtype=case.dtype, device="meta")
            stats = (None, None) if case.training else (vec(K), vec(K))
            e_stats = (None, None) if case.training else (vec(case.co), vec(case.co))
            h_next, s, mean, var, out, z, em, ev = op_c.forward(
                h, y, wo, vec(K), vec(K), *stats, wr, we, vec(case.co), vec(case.co), *e_stats, case.pool,
                eps, eps, case.relu)
            op_c.backward(torch.empty_like(h_next), torch.empty_like(out), h, y, wo, vec(K), vec(K), wr, s,
                          mean, var, h_next, we, vec(case.co), vec(case.co), z, em, ev, case.pool, eps, eps,
                          case.relu, case.training)
        else:
            hs = case.size * 2 if case.pool else case.size
            h = _act(case.n, K, hs, case)
            y = _act(case.n, case.c, case.size, case)
            wo = torch.empty((K, case.c), dtype=case.dtype, device="meta")
            wr = torch.empty((K, K, 3, 3), dtype=case.dtype, device="meta")
            stats = (None, None) if case.training else (vec(K), vec(K))
            out, s, mean, var = op_b.forward(h, y, wo, vec(K), vec(K), *stats, wr, case.pool, eps)
            op_b.backward(torch.empty_like(out), h, y, wo, vec(K), vec(K), wr, s, mean, var, case.pool, eps,
                          case.training)


@contextlib.contextmanager
def fp32_precision(value: str):
    """PyTorch's float32 matmul precision ("ieee" or "tf32"), through the API this torch has."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = value
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = value == "tf32"
        try:
            yield
        finally:
            m.allow_tf32 = old

# -------------------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    case: Case | None  # None: a self-test launch

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def label(self) -> str:
        return self.case.label() if self.case is not None else "self-test"

    def config(self) -> str:
        b = {k[6:]: v for k, v in self.kwargs.items() if k.startswith("BLOCK_")}
        blocks = f"{b.pop('M')}x{b.pop('N')}x{b.pop('K')}" if {"M", "N", "K"} <= b.keys() else ""
        blocks = " ".join([blocks] * bool(blocks) + [f"{k}{v}" for k, v in sorted(b.items())])
        return f"{blocks} w{self.kwargs.get('num_warps', 4)} s{self.kwargs.get('num_stages', 3)}".strip()

    def variant(self) -> str:
        """dtype (and dot precision), memory format, the kernel's other constexprs, and the shape of
        the first case that compiled it (integer arguments are specialised on divisibility by 16)."""
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                          for k, v in sorted(self.kwargs.items())
                          if k.isupper() and not k.startswith("BLOCK_") and k != "PREC")
        c = self.case
        if c is None:
            return consts
        dt = _DT[c.dtype] + (f"/{self.kwargs['PREC']}" if c.dtype == torch.float32 and "PREC" in self.kwargs
                              else "")
        fmt = "cl" if c.channels_last else "nchw"
        return " ".join(filter(None, (dt, fmt, consts, f"N{c.n}C{c.c}H{c.size}")))


def record(all_cases: list[Case]) -> list[Launch]:
    launches: list[Launch] = []
    current: list[Case] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        g = grid(named) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(g))
        launches.append(Launch(self, args, dict(kwargs), g, current[0]))

    def tuner_run(self, *args, **kwargs):
        # Every configuration of an autotuned kernel, as a GPU run could pick any of them.
        configs = self.configs
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        for cfg in configs:
            self.fn.run(*args, grid=grid, warmup=False, **kwargs, **cfg.all_kwargs())

    patches = [(_triton_jit.JITFunction, "run", jit_run), (_triton_autotuner.Autotuner, "run", tuner_run)]
    tuned_cls = getattr(common, "Autotuned", None)
    if tuned_cls is not None:
        def tuned_run(self, grid, *args, **kwargs):
            for cfg in self.candidates(args, kwargs):
                self.launch(cfg, grid, args, kwargs)
        patches.append((tuned_cls, "run", tuned_run))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved_sm = getattr(common, "sm_count", None)
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        if saved_sm is not None:
            common.sm_count = lambda device: H100_SMS
        for case in all_cases:
            current[:] = [case]
            run_case(case)
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        if saved_sm is not None:
            common.sm_count = saved_sm
    return launches

# -------------------------------------------------------------------------------------- compiling


class _H100Driver:
    """What Triton's JIT asks of a driver before it launches anything: a device, a stream, a target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def h100_driver():
    # reset_active() would create the real driver, which fails without a GPU: put back what was there.
    old = getattr(_triton_driver, "_active", None)
    _triton_driver.set_active(_H100Driver())
    try:
        yield
    finally:
        _triton_driver._active = old


def ptxas_path() -> str:
    try:
        return triton.knobs.nvidia.ptxas.path
    except AttributeError:  # older layouts
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path if callable(get_ptxas) else get_ptxas().path


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(kernel) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX, cached next to the kernel in
    Triton's cache (its directory is named by the kernel's hash)."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)
    fname = "rla_ext_ptxas_v.json"
    ptx = kernel.asm["ptx"]
    digest = hashlib.sha256(ptx.encode()).hexdigest()
    path = cache.get_file(fname)
    if path is not None:
        data = json.loads(Path(path).read_text())
        if data.get("ptx_sha256") == digest:
            return data
    arch = "sm_90a"
    with _tempfile(ptx, ".ptx") as src:
        proc = subprocess.run([ptxas_path(), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                               os.devnull], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {kernel.name}:\n{proc.stderr[-2000:]}")
    data = {"ptx_sha256": digest}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(proc.stderr)
        data[key] = int(m.group(1)) if m else 0
    cache.put(json.dumps(data), fname, binary=False)
    return data


@contextlib.contextmanager
def _tempfile(text: str, suffix: str):
    import tempfile
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        yield path
    finally:
        os.unlink(path)


# float max/min that return the other operand when one is NaN (torch.maximum/relu propagate NaN)
_NAN_DROPPING = re.compile(r"arith\.(maxnumf|minnumf)")


@dataclasses.dataclass
class Row:
    name: str
    config: str
    variant: str
    smem: int = 0
    regs: int = 0
    spills: int = 0
    num_warps: int = 0
    seconds: float = 0.0
    problems: list = dataclasses.field(default_factory=list)
    key: str = ""  # the compiled kernel's hash


def check_kernel(row: Row, kernel, max_spill: int) -> None:
    md = kernel.metadata
    row.smem, row.num_warps = md.shared, md.num_warps
    usage = ptxas_usage(kernel)
    row.regs, row.spills = usage["regs"], usage["spill_stores"] + usage["spill_loads"]
    threads = row.num_warps * 32
    if row.smem > SMEM_LIMIT:
        row.problems.append(f"shared memory {row.smem} B > {SMEM_LIMIT} B")
    if threads > MAX_THREADS:
        row.problems.append(f"{threads} threads per block > {MAX_THREADS}")
    if row.regs * threads > REGS_PER_SM:
        row.problems.append(f"{row.regs} registers x {threads} threads > {REGS_PER_SM}")
    if row.spills > max_spill:
        row.problems.append(f"{row.spills} B spilled > {max_spill} B")
    found = _NAN_DROPPING.search(kernel.asm.get("ttir", "") + kernel.asm.get("ttgir", ""))
    if found:
        row.problems.append(f"NaN-dropping float max/min ({found.group(0)})")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost that does not
    grow when other jobs share the machine, unlike wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def check_grid(launch: Launch) -> str | None:
    gx, gy, gz = launch.grid
    if 0 < gx <= GRID_X_MAX and 0 < gy <= GRID_YZ_MAX and 0 < gz <= GRID_YZ_MAX:
        return None
    return f"grid {launch.grid} outside 0 < x <= {GRID_X_MAX}, 0 < y, z <= {GRID_YZ_MAX}"


def compile_all(launches: list[Launch], max_spill: int, log=print) -> tuple[list[Row], list[str]]:
    """Compile every launch (each distinct kernel once: Triton's JIT cache dedups them) and check it."""
    rows: dict[str, Row] = {}
    failures: list[str] = []
    with h100_driver():
        for i, launch in enumerate(launches):
            t0 = cpu_seconds()
            try:
                kernel = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
                err = ""
            except Exception as e:  # a compile error is a finding, not a crash of the tool
                kernel, err = None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            key = (kernel.hash if kernel is not None
                   else f"error:{launch.name}:{launch.config()}:{launch.variant()}")
            if key not in rows:
                row = rows[key] = Row(launch.name, launch.config(), launch.variant(), key=key)
                if kernel is not None:
                    check_kernel(row, kernel, max_spill)
                else:
                    row.problems.append(f"compile error: {err}")
                row.seconds = cpu_seconds() - t0
                failures += [f"{row.name} [{row.config}] {row.variant} ({launch.label()}): {p}"
                             for p in row.problems]
                if row.seconds > 5:
                    log(f"  slow compile: {row.name} [{row.config}] {row.variant}: {row.seconds:.1f} CPU s")
            problem = check_grid(launch)
            if problem:
                failures.append(f"{launch.name} [{launch.config()}] ({launch.label()}): {problem}")
            if (i + 1) % 500 == 0:
                log(f"  {i + 1}/{len(launches)} launches, {len(rows)} kernels compiled")
    return list(rows.values()), failures


_LAUNCHES: list[Launch] = []  # what forked workers compile from (launches hold JIT functions)


def _compile_shard(job):
    indexes, max_spill = job
    return compile_all([_LAUNCHES[i] for i in indexes], max_spill, log=lambda s: print(s, flush=True))


def compile_parallel(launches: list[Launch], max_spill: int, jobs: int,
                     log=print) -> tuple[list[Row], list[str]]:
    """compile_all in `jobs` forked processes. Launches that look alike (kernel, configuration,
    variant) go to the same process, so a kernel is compiled once, not once per process."""
    if jobs <= 1 or len(launches) < 2:
        return compile_all(launches, max_spill, log)
    groups = defaultdict(list)
    for i, lt in enumerate(launches):
        groups[(lt.name, lt.config(), lt.variant())].append(i)
    shards = [[] for _ in range(jobs)]
    for n, key in enumerate(sorted(groups)):
        shards[n % jobs] += groups[key]
    _LAUNCHES[:] = launches
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.map(_compile_shard, [(shard, max_spill) for shard in shards if shard])
    _LAUNCHES.clear()
    rows = {}
    failures = []
    for shard_rows, shard_failures in results:
        for r in shard_rows:
            rows.setdefault(r.key, r)
        failures += shard_failures
    return list(rows.values()), list(dict.fromkeys(failures))


def coverage(launches: list[Launch]) -> list[str]:
    """Every kernel the op modules define (a `*_kernel` JIT function, autotuned or not) must have
    been launched, and every configuration of an autotuned one: a kernel the cases never reach
    would go unchecked."""
    launched = defaultdict(set)
    for lt in launches:
        launched[lt.name].add(lt.config())
    missing = []
    for mod in _kernel_modules():
        for obj in vars(mod).values():
            fn = getattr(obj, "fn", None) if not isinstance(obj, _triton_jit.JITFunction) else obj
            if not isinstance(fn, _triton_jit.JITFunction) or not fn.fn.__name__.endswith("_kernel"):
                continue
            name = fn.fn.__name__
            if name not in launched:
                missing.append(f"{mod.__name__}.{name}: never launched by the recorded cases")
            elif hasattr(obj, "configs"):
                every = {_config_label(c) for c in obj.configs + getattr(obj, "lean_configs", [])}
                if every - launched[name]:
                    missing.append(f"{name}: configurations never launched: {sorted(every - launched[name])}")
    return missing


def _config_label(config) -> str:
    return Launch(None, (), {**config.all_kwargs()}, (1, 1, 1), None).config()


def _kernel_modules():
    from rla_ext.triton_kernels import batchnorm, gemm
    return (op_a, op_b, op_c, gemm, batchnorm)

# ------------------------------------------------------------------------------------ self-test
# Kernels that break one rule each, to show every check can fail.


@triton.jit
def _selftest_relu_kernel(x, y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.maximum(tl.load(x + offs, mask=offs < N), 0.0), mask=offs < N)


@triton.jit
def _selftest_smem_kernel(a, b, c, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.arange(0, BLOCK)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        at = tl.load(a + r[:, None] * K + k0 + kk[None, :])
        acc = tl.dot(at, tl.load(b + (k0 + kk[:, None]) * BLOCK + r[None, :]), acc)
    tl.store(c + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def _selftest_spill_kernel(x, y, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    v = tl.load(x + offs)
    tl.store(y + offs, v / tl.sum(v * v, axis=1)[:, None] + tl.sum(v, axis=0)[None, :])


def self_test(max_spill: int) -> list[str]:
    """Compile the rule-breaking kernels and return what the checks missed (empty: all caught)."""
    f32 = lambda *shape: torch.empty(shape, dtype=torch.float32, device="meta")  # noqa: E731
    relu_args = (f32(1024), f32(1024), 1024)
    cases = [
        (Launch(_selftest_relu_kernel, relu_args, {"BLOCK": 256}, (4, 1, 1), None), "NaN-dropping"),
        (Launch(_selftest_smem_kernel, (f32(128, 512), f32(512, 128), f32(128, 128), 512),
                {"BLOCK": 128, "BLOCK_K": 128, "num_stages": 3, "num_warps": 4}, (1, 1, 1), None),
         "shared memory"),
        (Launch(_selftest_spill_kernel, (f32(64, 128), f32(64, 128)),
                {"ROWS": 64, "COLS": 128, "num_warps": 1}, (1, 1, 1), None), "spilled"),
        (Launch(_selftest_relu_kernel, relu_args, {"BLOCK": 256}, (1, 70000, 1), None), "grid"),
    ]
    missed = []
    for launch, expect in cases:
        _, failures = compile_all([launch], max_spill, log=lambda s: None)
        caught = [f for f in failures if expect in f]
        print(f"  self-test: {caught[0] if caught else launch.name + ': NOT caught (' + expect + ')'}")
        if not caught:
            missed.append(f"{launch.name} grid {launch.grid}: expected a '{expect}' failure, got {failures}")
    return missed

# ------------------------------------------------------------------------------------------- report


def print_table(rows: list[Row], out=sys.stdout) -> None:
    header = (f"{'kernel':<23} {'config':<17} {'variant':<52} {'smem B':>7} {'regs':>4} {'spill B':>7} "
              f"{'cpu s':>6}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in sorted(rows, key=lambda r: (r.name, r.config, r.variant)):
        flag = "  <-- " + "; ".join(r.problems) if r.problems else ""
        print(f"{r.name:<23} {r.config:<17} {r.variant[:52]:<52} {r.smem:>7} {r.regs:>4} {r.spills:>7} "
              f"{r.seconds:>6.2f}{flag}", file=out)


def print_summary(rows: list[Row], out=sys.stdout) -> None:
    by = defaultdict(list)
    for r in rows:
        by[r.name].append(r)
    header = (f"{'kernel':<23} {'compiled':>8} {'max smem B':>10} {'max regs':>8} {'max spill B':>11} "
              f"{'max cpu s':>9} {'sum cpu s':>9}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for name in sorted(by):
        rs = by[name]
        print(f"{name:<23} {len(rs):>8} {max(r.smem for r in rs):>10} {max(r.regs for r in rs):>8} "
              f"{max(r.spills for r in rs):>11} {max(r.seconds for r in rs):>9.2f} "
              f"{sum(r.seconds for r in rs):>9.1f}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", choices=("quick", "full"), default="full")
    ap.add_argument("--json", help="write the rows and failures to this file")
    ap.add_argument("--max-spill", type=int, default=DEFAULT_MAX_SPILL, help="spill bytes allowed per kernel")
    ap.add_argument("--kernel", action="append", help="only kernels with this name (repeatable)")
    ap.add_argument("--op", action="append", choices=("A", "B", "C"),
                    help="only this op's cases (repeatable); skips the coverage check")
    ap.add_argument("--no-table", action="store_true", help="print the per-kernel summary only")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="compile in this many processes (default: the CPUs this process may use)")
    ap.add_argument("--self-test", action="store_true",
                    help="first check that each rule catches a kernel built to break it")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    failures: list[str] = []
    if args.self_test:
        missed = self_test(args.max_spill)
        failures += [f"self-test: {m}" for m in missed]
        print(f"self-test: {4 - len(missed)} of 4 rule-breaking kernels caught "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    launches = record([c for c in cases(args.tier) if not args.op or c.op in args.op])
    if not args.op:
        failures += coverage(launches)
    if args.kernel:
        launches = [lt for lt in launches if lt.name in args.kernel]
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} launches recorded "
          f"({args.tier} tier); compiling for {TARGET} in {args.jobs} process(es)", flush=True)
    rows, found = compile_parallel(launches, args.max_spill, args.jobs, log=lambda s: print(s, flush=True))
    failures += found
    elapsed = time.perf_counter() - t0
    if not args.no_table:
        print_table(rows)
        print()
    print_summary(rows)
    print(f"\n{len(rows)} kernels from {len(launches)} launches in {elapsed:.1f} s "
          f"(Triton cache: {_cache_dir()})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tier": args.tier, "triton": triton.__version__, "torch": torch.__version__, "seconds": elapsed,
            "launches": len(launches), "rows": [dataclasses.asdict(r) for r in rows], "failures": failures},
            indent=1))
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s)")
        for f in failures:
            print("  " + f)
        return 1
    print("OK: every launch compiles for sm_90 within shared-memory, register, spill and grid limits")
    return 0


def _cache_dir() -> str:
    try:
        return triton.knobs.cache.dir
    except AttributeError:
        return os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")


if __name__ == "__main__":
    sys.exit(main())
