"""Turn a benchmark run into the order in which ``auto`` tries the backends.

    python -m benchmarks.auto_table benchmarks/results/<run>/results.json            # print
    python -m benchmarks.auto_table benchmarks/results/<run>/results.json --write    # update rla_ext

For each op, size class and pass of the run (fwd and fwd+bwd rows that succeeded, at the stage shapes of
benchmarks.shapes.OP_STAGES; several shapes of one class are summed) the fused backends and the reference
(the run's `eager` rows, backend "torch") are ordered by median time, so that where eager PyTorch was
faster than every fused kernel ``auto`` runs the reference there. Rows measured under torch.compile
(``compile``, ``compile+<backend>``) make entries of their own (pass "compiled fwd+bwd", ...), which
``auto`` follows while torch.compile traces: the reference where Inductor's fusion of it beat the
opaque fused op. The entries of the run's device type replace the old ones in rla_ext/_auto_table.py,
with the run's device, date and commit recorded beside them. Entries of other device types stay.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.bytes_model import PASSES
from benchmarks.shapes import stage_by_label
from rla_ext import _auto_table

FUSED = ("cpp", "cuda", "triton")
# Benchmark provider -> (backend name, whether compiled): the eager rows time the reference backend,
# the compile rows the reference under torch.compile (which Inductor decomposes and fuses), and the
# compile+<backend> rows that backend's opaque custom ops inside the compiled graph. The unfused+<backend>
# rows (the ops a fused op such as rla_update_and_entry replaces) are no backend of that op: left out.
BACKEND_OF = {**{b: (b, False) for b in FUSED}, "eager": ("torch", False), "compile": ("torch", True),
              **{f"compile+{b}": (b, True) for b in FUSED}}
COMPILED = "compiled "  # prefix of the pass of an entry measured under torch.compile
# The reference leads only when it was more than this much faster than a fused backend: closer than
# that, one run's medians do not tell them apart (run-to-run drift on a shared CPU is several
# percent), and the fused backend still saves memory (no concat, less saved for backward).
REFERENCE_MARGIN = 0.03
TABLE_PATH = Path(_auto_table.__file__)
_BEGIN, _END = "# BEGIN GENERATED\n", "# END GENERATED\n"


Key = tuple[str, str, int, str]  # (device type, op, size class, pass)


def preference_from_results(results: dict[str, Any]) -> dict[Key, tuple[str, ...]]:
    """(device type, op, size class, pass) -> backends (fused and "torch") ordered by median time.

    The size class is that of the op's input (x's H, W: what ``rla_ext._backend.resolve`` looks up), so
    a strided entry shares its key with the stride-1 entry at the same input size (the basic block's
    C16xH32 and C16xH32s2). Where a key holds several shapes, the backends are ordered by the sum of
    their medians over the shapes every one of them measured: one order for the calls of that class.
    """
    device = results["device_type"]
    times: dict[Key, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in results["rows"]:
        if (row.get("kind") != "op" or row.get("pass") not in PASSES or row.get("status") != "ok"
                or row.get("provider") not in BACKEND_OF or not row.get("time_ms")):
            continue
        try:
            size = stage_by_label(row["shape"], row["op"]).size
        except ValueError:  # not one of the op's stage shapes (or not a benchmarked op)
            continue
        backend, compiled = BACKEND_OF[row["provider"]]
        key = (device, row["op"], _auto_table.size_class(size, size), (COMPILED if compiled else "") + row["pass"])
        times[key][backend][row["shape"]] = row["time_ms"]["median"]
    preference = {}
    for key, per_backend in sorted(times.items()):
        shapes = set.intersection(*(set(s) for s in per_backend.values()))
        if len(per_backend) < 2 or not shapes:  # one measured backend orders nothing: the static order stays
            continue
        total = {b: sum(s[shape] for shape in shapes) for b, s in per_backend.items()}
        margin = {b: 1 + (REFERENCE_MARGIN if b == "torch" else 0.0) for b in total}
        preference[key] = tuple(b for _, b in sorted((total[b] * margin[b], b) for b in total))
    return preference


def render(sources: dict[str, dict[str, str]], preference: dict[Key, tuple[str, ...]], text: str) -> str:
    """`text` (the table module) with its generated section replaced."""
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    lines = ["SOURCES: dict[str, dict[str, str]] = {"]
    lines += [f"    {k!r}: {v!r}," for k, v in sources.items()]
    lines += ["}", "PREFERENCE: dict[tuple[str, str, int, str], tuple[str, ...]] = {"]
    lines += [f"    {k!r}: {v!r}," for k, v in preference.items()]
    lines += ["}"]
    return text[:start] + "\n".join(lines) + "\n" + text[end:]


def updated_table(results: dict[str, Any], text: str) -> str:
    device = results["device_type"]
    namespace: dict[str, Any] = {}
    exec(text[text.index(_BEGIN):text.index(_END)], namespace)  # noqa: S102  (our own generated literals)
    # Entries of this device type are replaced, and so are those of an older format (no pass).
    preference = {k: v for k, v in namespace["PREFERENCE"].items() if k[0] != device and len(k) == 4}
    preference.update(preference_from_results(results))
    sources = {k: v for k, v in namespace["SOURCES"].items() if k != device}
    sources[device] = {"device": str(results.get("device_name")), "date": str(results.get("date")),
                       "commit": str(results.get("git_commit"))}
    return render(sources, dict(sorted(preference.items())), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results.json written by python -m benchmarks")
    parser.add_argument("--write", action="store_true", help=f"update {TABLE_PATH.name} in place")
    parser.add_argument("--out", type=Path, help="write the updated table module here instead")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    text = updated_table(results, TABLE_PATH.read_text())
    if args.write or args.out:
        (args.out or TABLE_PATH).write_text(text)
    else:
        print(text[text.index(_BEGIN):text.index(_END) + len(_END)], end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
