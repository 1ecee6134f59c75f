"""Writing a run's results: results.json (the data), results.md (tables) and speedup.png."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


UNFUSED_PREFIX = "unfused+"  # benchmarks.cases: the ops a fused op replaces, on one backend


def add_speedups(rows: Sequence[Row]) -> None:
    """Fill speedup_vs_eager / speedup_vs_compile from the eager and compile rows of the same case, and,
    for a fused backend's row whose case also has ``unfused+<that backend>`` (the block boundary against
    its two ops), speedup_vs_unfused."""
    def key(r: Row) -> tuple:
        return (r["kind"], r["op"], r["pass"], r["shape"], r["dtype"], r["batch"])

    ref: dict[tuple, dict[str, float]] = {}
    for r in rows:
        baseline = r["provider"] in ("eager", "compile") or r["provider"].startswith(UNFUSED_PREFIX)
        if r["status"] == "ok" and baseline:
            ref.setdefault(key(r), {})[r["provider"]] = r["time_ms"]["median"]
    for r in rows:
        base = ref.get(key(r), {})
        t = r["time_ms"]["median"] if r["status"] == "ok" else None
        for provider in ("eager", "compile"):
            b = base.get(provider)
            r[f"speedup_vs_{provider}"] = b / t if (b is not None and t) else None
        unfused = base.get(UNFUSED_PREFIX + r["provider"])
        if unfused is not None and t:
            r["speedup_vs_unfused"] = unfused / t


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    path.write_text(json.dumps({**meta, "rows": list(rows)}, indent=2, default=str) + "\n")


def _f(value: float | None, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _mb(nbytes: float | None) -> str:
    """Bytes as MiB (2**20 B), the unit of every memory column here (rates stay GB/s, 1e9 B/s)."""
    if nbytes is None:
        return ""
    mb = nbytes / 2**20
    return _f(mb, ".1f" if mb >= 10 else ".2f")  # small k-channel tensors would all read 0.0


def _note(r: Row) -> str:
    """Why a row has no time; for a row timed on the reference in a backend's stead, that it was; for an
    unfused row, the ops it ran; for a fused row with an unfused peer, its speedup over that peer."""
    if r["status"] == "ok":
        notes = [str(r[f]) for f in ("fallback", "composition") if r.get(f)]
        if r.get("speedup_vs_unfused") is not None:
            notes.append(f"{r['speedup_vs_unfused']:.2f}x vs {UNFUSED_PREFIX}{r['provider']}")
        return "; ".join(notes)
    text = " ".join(str(r.get("error") or "").split())
    return f"{r['status']}: {text[:120]}" + ("..." if len(text) > 120 else "")


def _cpu_line(cpu: dict[str, Any]) -> str:
    """The instruction sets that ran: tables from different CPUs (or caps) must not be compared blind."""
    caps = ", ".join(f"{k}={v}" for k, v in (cpu.get("isa_caps") or {}).items()) or "none"
    return (f"CPU {cpu.get('model')} · torch ISA {cpu.get('torch_isa')} · rla_ext cpp kernels ISA "
            f"{cpu.get('kernels_isa')} (best supported {cpu.get('kernels_isa_supported')}) · ISA caps: {caps}")


def markdown(meta: dict[str, Any], rows: Sequence[Row]) -> str:
    """Two tables, ops then end-to-end, preceded by the run's device, settings and copy bandwidth."""
    bw = meta.get("copy_bandwidth", {})
    gpu = meta.get("device_type") == "cuda"
    peak_head, peak_rule = (" peak MiB |", "---:|") if gpu else ("", "")
    lines = [
        f"# rla_ext benchmarks: {meta.get('device_name')}",
        "",
        f"{meta.get('date')} · commit {str(meta.get('git_commit'))[:12]} · torch {meta.get('torch_version')} · "
        f"triton {meta.get('triton_version')} · dtype {meta.get('dtype')} · batch {meta.get('batch')} · "
        f"channels_last {meta.get('channels_last')} · compile mode {meta.get('compile_mode')}",
        "",
        _cpu_line(meta.get("cpu") or {}),
        "",
        *([f"CPU allocator: {meta['cpu_allocator']}.", ""] if meta.get("cpu_allocator") else []),
        f"Copy bandwidth (copy of {_mb(bw.get('bytes'))} MiB): {_f(bw.get('gbps'), '.1f')} GB/s. "
        "MiB moved = compulsory traffic of a fused implementation (benchmarks/bytes_model.py); "
        "% BW = achieved / copy bandwidth"
        + ("; " if gpu else " (small working sets stay in CPU caches, so this can pass 100%); ")
        + ("peak MiB = device memory one call needs beyond what was allocated before it (whole step for "
           "end to end; compiled rows under CUDA graphs use a pool allocated at capture, so theirs reads low); "
           if gpu else "")
        + "saved MiB = tensors autograd keeps for backward, inputs and parameters excluded.",
    ]
    ops = [r for r in rows if r["kind"] == "op"]
    if ops:
        lines += ["", f"| op | pass | shape | provider | median ms | IQR ms | vs eager | vs compile | MiB moved | GB/s "
                  f"| % BW |{peak_head} saved MiB | note |",
                  f"|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|{peak_rule}---:|---|"]
    for r in ops:
        t = r.get("time_ms") or {}
        iqr = (t["q75"] - t["q25"]) if t else None
        peak = f" {_mb(r.get('peak_mem_bytes'))} |" if gpu else ""
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['shape']} | {r['provider']} | {_f(t.get('median'), '.3f')} | "
            f"{_f(iqr, '.3f')} | {_f(r.get('speedup_vs_eager'), '.2f')} | {_f(r.get('speedup_vs_compile'), '.2f')} | "
            f"{_mb(r.get('bytes_moved'))} | {_f(r.get('gbps'), '.1f')} | {_f(r.get('pct_of_copy_bw'), '.1f')} | "
            f"{peak} {_mb(r.get('saved_for_backward_bytes'))} | {_note(r)} |")
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["", "## End to end: one training step (forward, backward, SGD step)", "",
                  "| model | provider | batch | image | median ms | IQR ms | images/s | vs eager | vs compile "
                  f"|{peak_head} saved MiB | note |",
                  f"|---|---|---:|---:|---:|---:|---:|---:|---:|{peak_rule}---:|---|"]
        for r in e2e:
            t = r.get("time_ms") or {}
            iqr = (t["q75"] - t["q25"]) if t else None
            peak = f" {_mb(r.get('peak_mem_bytes'))} |" if gpu else ""
            lines.append(
                f"| {r['op']} | {r['provider']} | {r['batch']} | {r.get('image_size', '')} | "
                f"{_f(t.get('median'), '.1f')} | {_f(iqr, '.1f')} | {_f(r.get('images_per_s'), '.1f')} | "
                f"{_f(r.get('speedup_vs_eager'), '.2f')} | {_f(r.get('speedup_vs_compile'), '.2f')} | "
                f"{peak} {_mb(r.get('saved_for_backward_bytes'))} | {_note(r)} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    """Speedup over eager per shape and provider, one panel per (op, pass); e2e images/s if present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    ops = list(dict.fromkeys((r["op"], r["pass"]) for r in rows if r["kind"] == "op"))
    e2e = [r for r in rows if r["kind"] == "e2e" and r["status"] == "ok"]
    ncols = 2
    nrows = max(1, math.ceil(len(ops) / ncols)) + (1 if e2e else 0)
    fig = plt.figure(figsize=(6 * ncols, 3.6 * nrows))
    grid = fig.add_gridspec(nrows, ncols)
    for i, (op, pass_) in enumerate(ops):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        sel = [r for r in rows if r["kind"] == "op" and r["op"] == op and r["pass"] == pass_]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        providers = [p for p in dict.fromkeys(r["provider"] for r in sel) if p != "eager"]
        width = 0.8 / max(1, len(providers))
        for j, provider in enumerate(providers):
            vals = []
            for shape in shapes:
                match = [r for r in sel if r["shape"] == shape and r["provider"] == provider]
                s = match[0].get("speedup_vs_eager") if match else None
                vals.append(s if s is not None else math.nan)  # no bar: failed, skipped or missing
            xs = [x + (j - (len(providers) - 1) / 2) * width for x in range(len(shapes))]
            # Bars grow from 1 (up: faster than eager, down: slower), labelled with their value.
            bars = ax.bar(xs, [v - 1.0 for v in vals], bottom=1.0, width=width, label=provider)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in vals], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # 2x faster and 2x slower should look equally far from 1
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_title(f"{op} {pass_}")
        ax.set_ylabel("speedup vs eager")
        if providers:
            ax.legend(fontsize=8)
    if e2e:
        ax = fig.add_subplot(grid[nrows - 1, :])
        labels = [f"{r['op']}\n{r['provider']}" for r in e2e]
        ax.bar(range(len(e2e)), [r.get("images_per_s") or 0.0 for r in e2e])
        ax.set_xticks(range(len(e2e)), labels, fontsize=8)
        ax.set_ylabel("images/s (train step)")
    fig.suptitle(f"{meta.get('device_name')} · {meta.get('dtype')} · batch {meta.get('batch')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
