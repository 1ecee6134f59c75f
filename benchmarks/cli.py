"""``python -m benchmarks``: every available backend against eager and torch.compile, on this device.

Rows: every fused op x its stage shapes (benchmarks.shapes.OP_STAGES) x {fwd, fwd+bwd} x providers (eager, compile, fused backends,
and each fused backend under torch.compile: compile+cpp, ...; for the block boundary rla_update_and_entry
also unfused+cpp, the two ops it replaces on cpp), then, unless --quick, one RLA-ResNet-50 training step
per provider beside a plain ResNet-50.
Eager and fused ops run first, then their training steps, then the compiled ops and steps (the
slow compilations), so a --max-minutes budget that runs out still leaves the core comparison. Nothing that fails inside a row stops the run: the
row records the error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import rla_ext
from rla_ext import info
from benchmarks import allocator, cases, model_step, report, timing
from benchmarks.shapes import OP_STAGES, Stage, select_stages, stages_for

Row = dict[str, Any]
PACKAGE_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
E2E_NAMES = {**model_step.FACTORIES, "plain": "resnet50"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if visible, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, help="op batch size; default 128 on cuda, 8 on cpu (--quick: 4 / 2)")
    p.add_argument("--shapes", help="comma-separated stages, e.g. C256xH56,2048,C16xH32s2: each op runs those "
                   "of its own stage table (default: every stage of each op's table; --quick: two per op). "
                   + "; ".join(f"{op}: {','.join(s.label for s in stages)}" for op, stages in OP_STAGES.items()))
    p.add_argument("--ops", default=",".join(cases.OPS), help="comma-separated ops (default: all: %(default)s)")
    p.add_argument("--passes", default=",".join(cases.PASSES), help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--providers", help=f"comma-separated subset of {', '.join(cases.PROVIDERS)} (default: "
                   "eager, compile and every fused backend available on the device, plain and compiled, and "
                   "their unfused+<backend>; auto = rla_ext's measured choice; unfused+<backend> = the ops a "
                   "fused op replaces (rla_update_and_entry's two) on that backend, only for such ops)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--compile-mode", help="torch.compile mode (default: max-autotune on cuda, default on cpu)")
    p.add_argument("--contiguous", action="store_true", help="NCHW-contiguous inputs instead of channels_last")
    p.add_argument("--warmup", type=int, help="untimed calls before timing on cpu (default 3, --quick 1)")
    p.add_argument("--repeats", type=int, help="timed calls per row on cpu (default 20, --quick 5)")
    p.add_argument("--row-budget-s", type=float, default=10.0, help="stop repeating a cpu row after this long")
    p.add_argument("--quick", action="store_true", help="small batch, two shapes per op, few repeats, no e2e: "
                   "a couple of minutes on a laptop-class CPU")
    e2e = p.add_mutually_exclusive_group()
    e2e.add_argument("--e2e", action="store_true", help="run the end-to-end training step even with --quick")
    e2e.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step")
    e2e.add_argument("--e2e-only", action="store_true", help="only the end-to-end training step")
    p.add_argument("--e2e-models", default="plain,rla", help="comma-separated training-step models: "
                   f"{', '.join(model_step.MODELS)} (default: plain,rla; rlagru = rlagru_resnet50, "
                   "dsrla_mnv2 = dsrla_mobilenetv2, ...)")
    p.add_argument("--e2e-batch", type=int, help="training-step batch (default 128 on cuda, 4 on cpu)")
    p.add_argument("--image-size", type=int, help="training-step image size, a multiple of 64 "
                   "(default 224 on cuda, 128 on cpu)")
    p.add_argument("--e2e-compile-mode", help="torch.compile mode for the training step (default: --compile-mode)")
    p.add_argument("--e2e-repeats", type=int, help="timed training steps (default 10 on cuda, 3 on cpu)")
    p.add_argument("--max-minutes", type=float, help="after this long, remaining rows are recorded as skipped "
                   "(default: none; --quick: 1.25)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/local/<timestamp>)")
    p.add_argument("--include-interpreted", action="store_true",
                   help="also time triton on cpu through its interpreter (very slow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--system-malloc", action="store_true",
                   help="on cpu, time with the C allocator as configured; by default glibc is told to keep "
                        "freed memory, so no row pays page faults for memory an earlier call gave back "
                        "(benchmarks/allocator.py)")
    return p.parse_args(argv)


class Settings:
    """The arguments resolved against the device: every default decided in one place."""

    def __init__(self, args: argparse.Namespace) -> None:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        self.device = torch.device(dev)
        gpu = self.device.type == "cuda"
        q = args.quick
        self.quick = q
        self.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
        self.batch = args.batch or ((4 if q else 128) if gpu else (2 if q else 8))
        self.ops = _choose(args.ops, cases.OPS, "--ops")
        self.stages = _op_stages(self.ops, args.shapes, q)
        self.passes = _choose(args.passes, cases.PASSES, "--passes")
        available = cases.providers(self.device, include_interpreted=args.include_interpreted)
        if args.providers:
            self.providers = _choose(args.providers, cases.PROVIDERS, "--providers")
        else:
            self.providers = tuple(available)
        if args.no_compile:
            self.providers = tuple(p for p in self.providers if not cases.is_compiled(p))
        self.compile_mode = args.compile_mode or cases.default_compile_mode(self.device)
        self.channels_last = not args.contiguous
        self.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
        self.repeats = args.repeats if args.repeats is not None else (5 if q else 20)
        self.row_budget_s = args.row_budget_s
        self.run_ops = not args.e2e_only
        self.run_e2e = args.e2e or args.e2e_only or not (q or args.no_e2e)
        self.e2e_models = tuple(m.strip() for m in args.e2e_models.split(",") if m.strip())
        bad = [m for m in self.e2e_models if m not in model_step.MODELS]
        if bad:
            raise SystemExit(f"--e2e-models: unknown {bad}; expected some of {', '.join(model_step.MODELS)}")
        self.e2e_batch = args.e2e_batch or (128 if gpu else 4)
        self.image_size = args.image_size or (224 if gpu else 128)
        self.e2e_compile_mode = args.e2e_compile_mode or self.compile_mode
        self.e2e_repeats = args.e2e_repeats or (10 if gpu else 3)
        # --quick promises a couple of minutes even on a loaded machine: later rows give way.
        minutes = args.max_minutes if args.max_minutes is not None else (1.25 if q else None)
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.progress = not args.no_progress
        self.system_malloc = args.system_malloc or gpu

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def describe(self) -> dict[str, Any]:
        return {"device_type": self.device.type, "dtype": str(self.dtype).replace("torch.", ""),
                "batch": self.batch, "shapes": {op: [s.label for s in st] for op, st in self.stages.items()},
                "ops": list(self.ops),
                "passes": list(self.passes), "providers": list(self.providers), "compile_mode": self.compile_mode,
                "channels_last": self.channels_last, "warmup": self.warmup, "repeats": self.repeats,
                "quick": self.quick, "e2e": self.run_e2e, "e2e_batch": self.e2e_batch,
                "e2e_models": list(self.e2e_models), "image_size": self.image_size, "e2e_repeats": self.e2e_repeats,
                "e2e_compile_mode": self.e2e_compile_mode}


def _choose(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in chosen if s not in allowed]
    if bad or not chosen:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {tuple(allowed)}, got {text!r}")
    return chosen


def _op_stages(ops: Sequence[str], shapes: str | None, quick: bool) -> dict[str, tuple[Stage, ...]]:
    """Each op's stages: those of its table named in `shapes` (an op whose table has none of them runs
    no rows), else its whole table (--quick: its quick subset). A name no chosen op knows is an error."""
    if not shapes:
        return {op: stages_for(op, quick) for op in ops}
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    chosen = {op: select_stages(names, stages_for(op)) for op in ops}
    unknown = [n for n in names if not any(n in (s.label, str(s.channels)) for st in chosen.values() for s in st)]
    if unknown or not any(chosen.values()):
        known = {op: [s.label for s in stages_for(op)] for op in ops}
        raise SystemExit(f"--shapes: {unknown or names} match no stage of the chosen ops; their stages: {known}")
    return chosen


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fail(row: Row, e: BaseException) -> None:
    """Mark `row` failed with `e` (call inside the except block: the traceback is the current one)."""
    row.update(status="error", error=_error_text(e), traceback=traceback.format_exc(limit=4))


def _base_row(kind: str, op: str, pass_: str, shape: str, provider: str, batch: int, cfg: Settings) -> Row:
    return {"kind": kind, "op": op, "pass": pass_, "shape": shape, "provider": provider, "batch": batch,
            "dtype": str(cfg.dtype).replace("torch.", ""), "status": "ok", "error": None, "time_ms": None}


def run_op_case(op: str, stage: Stage, providers: Sequence[str], cfg: Settings, bandwidth_gbps: float) -> list[Row]:
    """Both passes of one (op, stage) for each provider: one setup (and, for compile, one compilation)
    per provider; the providers of a pass are timed interleaved (timing.time_interleaved)."""
    rows: dict[tuple[str, str], Row] = {(pass_, p): _base_row("op", op, pass_, stage.label, p, cfg.batch, cfg)
                                        for pass_ in cfg.passes for p in providers}
    built: dict[str, cases.Case] = {}
    for p in providers:
        try:
            built[p] = cases.make_op_case(op, stage, p, batch=cfg.batch, dtype=cfg.dtype, device=cfg.device,
                                          channels_last=cfg.channels_last, compile_mode=cfg.compile_mode)
        except cases.CaseUnavailable as e:
            for pass_ in cfg.passes:
                rows[pass_, p].update(status="unavailable", error=str(e))
        except Exception as e:
            for pass_ in cfg.passes:
                _fail(rows[pass_, p], e)
    for pass_ in cfg.passes:
        fns = {}
        for p, case in built.items():
            fn = case.run(pass_)
            try:
                fn()  # a failing provider gets its error row instead of stopping the others' timing
            except Exception as e:
                _fail(rows[pass_, p], e)
                continue
            fns[p] = fn
        try:
            timings = timing.time_interleaved(fns, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats,
                                              budget_s=cfg.row_budget_s)
        except Exception as e:
            for p in fns:
                _fail(rows[pass_, p], e)
            continue
        for p, t in timings.items():
            row, case = rows[pass_, p], built[p]
            traffic = case.traffic(pass_) if case.traffic else None
            row["time_ms"] = t.as_dict()
            row.update(case.meta)
            if traffic is not None:
                gbps = traffic.total / (t.median * 1e-3) / 1e9
                row.update(bytes_read=traffic.read, bytes_written=traffic.written, bytes_moved=traffic.total,
                           gbps=gbps, pct_of_copy_bw=100.0 * gbps / bandwidth_gbps if bandwidth_gbps else None)
            try:
                row["peak_mem_bytes"] = timing.peak_memory(fns[p], cfg.device)
            except Exception as e:
                row["peak_mem_error"] = _error_text(e)
    for p, case in built.items():
        try:
            saved: int | str = timing.saved_for_backward_bytes(case.run("fwd"), case.resident_storages())
        except Exception as e:
            saved = _error_text(e)
        for pass_ in cfg.passes:
            if rows[pass_, p]["time_ms"] is None:
                continue
            if isinstance(saved, int):
                rows[pass_, p]["saved_for_backward_bytes"] = saved
            else:
                rows[pass_, p]["saved_for_backward_error"] = saved
    del built
    _free(cfg.device)
    return list(rows.values())


def run_e2e_cases(entries: Sequence[tuple[str, str]], cfg: Settings) -> list[Row]:
    """Training steps of (model, provider) pairs: each set up once, then timed against each other
    (interleaved on the CPU, see timing.time_interleaved)."""
    rows: dict[tuple[str, str], Row] = {}
    built: dict[tuple[str, str], model_step.TrainStep] = {}
    for model, provider in entries:
        row = _base_row("e2e", E2E_NAMES[model], "train_step", f"{cfg.image_size}px", provider, cfg.e2e_batch, cfg)
        row["image_size"] = cfg.image_size
        rows[model, provider] = row
        try:
            ts = model_step.make_train_step(model, provider, batch=cfg.e2e_batch, dtype=cfg.dtype,
                                            device=cfg.device, image_size=cfg.image_size,
                                            channels_last=cfg.channels_last, compile_mode=cfg.e2e_compile_mode)
            ts.step()  # compilation, first-touch allocations; a failing one leaves the others' timing alone
        except cases.CaseUnavailable as e:
            row.update(status="unavailable", error=str(e))
            continue
        except Exception as e:
            _fail(row, e)
            continue
        built[model, provider] = ts
    if built:
        warmup = 3 if any(cases.is_compiled(p) for _, p in built) else 2
        try:
            timings = timing.time_interleaved({key: ts.step for key, ts in built.items()}, cfg.device,
                                              warmup=warmup, repeats=cfg.e2e_repeats, gpu_timer=timing.time_loop)
        except Exception as e:
            for key in built:
                _fail(rows[key], e)
            timings = {}
        for key, t in timings.items():
            rows[key]["time_ms"] = t.as_dict()
            rows[key]["images_per_s"] = built[key].batch / (t.median * 1e-3)
    for (model, provider), ts in built.items():
        row = rows[model, provider]
        if row["status"] != "ok":
            continue
        try:
            if cfg.device.type == "cuda":
                # Whole-step peak, model and optimizer state included: what decides the largest batch that fits.
                timing.sync(cfg.device)
                torch.cuda.reset_peak_memory_stats(cfg.device)
                ts.step()
                timing.sync(cfg.device)
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(cfg.device)
        except Exception as e:
            row["peak_mem_error"] = _error_text(e)
        # Not for compiled models: saved-tensor hooks would make dynamo trace (and autotune) them again.
        if not cases.is_compiled(provider):
            try:
                resident = {p.untyped_storage().data_ptr() for p in ts.model.parameters()}
                row["saved_for_backward_bytes"] = timing.saved_for_backward_bytes(ts.forward_loss, resident)
            except Exception as e:
                row["saved_for_backward_error"] = _error_text(e)
    del built
    _free(cfg.device)
    return list(rows.values())


@dataclass
class Task:
    """One setup (and at most one compilation): its rows, or the same rows marked skipped."""

    label: str
    run: Callable[[], list[Row]]
    skip: Callable[[str], list[Row]]


def plan(cfg: Settings, bandwidth: dict[str, float]) -> list[Task]:
    """Tasks in run order, most informative first, so a time budget cuts the least useful rows:
    eager and fused ops, eager and fused training steps, then compiled ops, then compiled steps."""
    def op_task(op: str, stage: Stage, providers: Sequence[str]) -> Task:
        def skip(reason: str) -> list[Row]:
            rows = [_base_row("op", op, pass_, stage.label, p, cfg.batch, cfg) for pass_ in cfg.passes
                    for p in providers]
            for r in rows:
                r.update(status="skipped", error=reason)
            return rows
        return Task(f"{op} {stage.label} {'+'.join(providers)}",
                    lambda: run_op_case(op, stage, providers, cfg, bandwidth["gbps"]), skip)

    def e2e_task(entries: Sequence[tuple[str, str]]) -> Task:
        def skip(reason: str) -> list[Row]:
            rows = []
            for model, provider in entries:
                row = _base_row("e2e", E2E_NAMES[model], "train_step", f"{cfg.image_size}px", provider,
                                cfg.e2e_batch, cfg)
                row.update(status="skipped", error=reason, image_size=cfg.image_size)
                rows.append(row)
            return rows
        label = " ".join(f"{m}:{p}" for m, p in entries)
        return Task(f"e2e {label}", lambda: run_e2e_cases(entries, cfg), skip)

    compiled = [p for p in cfg.providers if cases.is_compiled(p)]
    plain = [p for p in cfg.providers if not cases.is_compiled(p)]
    tasks: list[Task] = []
    for providers in (plain, compiled):
        # Eager and the fused backends of one (op, stage) are timed against each other in one task;
        # each compiled provider is its own task (compilation is slow and comes last).
        groups = [providers] if providers is plain else [[p] for p in providers]
        if cfg.run_ops and providers:
            # An op takes only the providers that apply to it (unfused+<backend>: the ops that fuse others).
            tasks += [op_task(op, stage, mine) for op in cfg.ops for stage in cfg.stages[op] for g in groups
                      if (mine := cases.op_providers(op, g))]
        if cfg.run_e2e:
            # The plain ResNet-50 has no RLA ops: it runs as eager (and compiled), the cost baseline.
            # unfused+<backend> is an op-level baseline: a model has no unfused form.
            entries = [(m, p) for m in cfg.e2e_models for p in providers if not cases.is_unfused(p)
                       and (m not in model_step.PLAIN_MODELS or p in (cases.EAGER, cases.COMPILE))]
            # Eager and fused steps are timed against each other; compiled ones one by one.
            tasks += [e2e_task(entries)] if providers is plain else [e2e_task([e]) for e in entries]
    return tasks


def _sort_key() -> Callable[[Row], tuple]:
    order = {p: i for i, p in enumerate(cases.PROVIDERS)}
    shapes = {(op, s.label): i for op, stages in OP_STAGES.items() for i, s in enumerate(stages)}
    ops = {o: i for i, o in enumerate(cases.OPS)}
    return lambda r: (r["kind"] != "op", ops.get(r["op"], len(ops)), r["op"], r["pass"],
                      shapes.get((r["op"], r["shape"]), len(shapes)), order.get(r["provider"], len(order)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{info.cpu_info()['model']} ({torch.get_num_threads()} threads)"


def git_commit() -> dict[str, Any]:
    root = PACKAGE_DIR.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def metadata(cfg: Settings, argv: Sequence[str] | None) -> dict[str, Any]:
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        pass
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_name": device_name(cfg.device), "torch_version": torch.__version__,
            "triton_version": triton_version, "python": platform.python_version(), **git_commit(),
            "build_info": rla_ext.build_info(), "cpu": info.cpu_info(),
            "argv": list(sys.argv[1:] if argv is None else argv), **cfg.describe()}


class _Terminated(BaseException):
    """SIGTERM, raised past the rows' own `except Exception` handlers."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(f"terminated by signal {signum}")


def write_results(out: Path, meta: dict[str, Any], rows: list[Row], final: bool) -> str:
    """results.json always (complete=False while running, so a killed run leaves data); md and png at the end."""
    done = sorted(rows, key=_sort_key())
    report.add_speedups(done)
    report.write_json(out / "results.json", {**meta, "complete": final}, done)
    if not final:
        return ""
    table = report.markdown(meta, done)
    (out / "results.md").write_text(table)
    try:
        report.plot(out / "speedup.png", meta, done)
    except Exception as e:  # a missing plot must not cost the data
        print(f"plot failed: {_error_text(e)}", file=sys.stderr)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Settings(args)
    started = time.monotonic()
    out = args.out or PACKAGE_DIR / "results" / "local" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(cfg, argv)
    meta["cpu_allocator"] = allocator.SYSTEM if cfg.system_malloc else allocator.keep_freed_memory()
    bandwidth = timing.copy_bandwidth(cfg.device)
    meta["copy_bandwidth"] = bandwidth
    tasks = plan(cfg, bandwidth)
    # An outer `timeout` sends SIGTERM: finish with what we have instead of dying without a report.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)

    from tqdm import tqdm

    rows: list[Row] = []
    stop_reason: str | None = None
    bar = tqdm(total=len(tasks), disable=not cfg.progress, unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        for task in tasks:
            bar.set_description(task.label)
            if stop_reason is None and cfg.out_of_time():
                stop_reason = "time budget (--max-minutes) used up"
            if stop_reason is not None:
                rows += task.skip(stop_reason)
            else:
                try:
                    rows += task.run()
                except (_Terminated, KeyboardInterrupt) as e:
                    stop_reason = f"run interrupted ({e or type(e).__name__})"
                    rows += task.skip(stop_reason)
                write_results(out, {**meta, "wall_s": round(time.monotonic() - started, 1)}, rows, final=False)
            bar.update()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    meta["wall_s"] = round(time.monotonic() - started, 1)
    meta["stopped_early"] = stop_reason
    table = write_results(out, meta, rows, final=True)
    print(table)
    print(f"results in {out} ({meta['wall_s']} s)")
    return 0
