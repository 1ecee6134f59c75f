"""The emulation can fail: copies of csrc/cuda/ with one defect each must be reported by it.

Mutation kinds (each applied at one site of the kernel sources):
  sync  delete one __syncthreads();
  tid   threadIdx.x -> (threadIdx.x ^ 1) at one site;
  smem  one shared array one element short (static arrays: its storage; dynamic: the launch's byte count).
A mutant is reported when the probe of tests/cuda_emulation.py (every kernel, both layouts, training and
eval, in-order and shuffled schedules) fails, or its process dies; a mutant that does not compile is
not a detection and fails the test.

One build serves all mutants (a mutant schema): the copy of csrc/cuda/ gets EVERY mutation, each behind
RLA_EMULATE_MUTANT(id), and the probe runs once per mutant with RLA_EXT_EMULATE_MUTANT=id, in its own
process. The full tier also builds one mutant literally (the text deleted) to show the schema's switch
is the same defect. Quick tier: one mutant of each kind and
the update tail's conv barrier (ops B and C); full tier (RLA_EXT_EMULATE_FULL=1): every site.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import cuda_emulation

SOURCE = cuda_emulation.SOURCE_DIR
KERNEL_FILES = ("batchnorm.cuh", "concat_conv_bn_act.cu", "rla_update.cu", "update_tail.cuh", "concat_z.cuh",
                "rla_update_and_entry.cu")

# Sites whose mutant computes exactly what the original does, so no test can report it: threadIdx.x is
# read once, and t -> t ^ 1 only permutes the threads of an even-sized block, each of which still does
# exactly the work of the thread it replaces (grid-stride element loops, one channel per thread, the
# finalize tree and the 3x3 conv tile, where the index feeds every role consistently).
EQUIVALENT = {
    "tid:batchnorm.cuh:bn_params_kernel#0",
    "tid:batchnorm.cuh:channel_finalize_kernel#0",
    "tid:batchnorm.cuh:pointwise_kernel#0",
    "tid:batchnorm.cuh:bn_act_kernel#0",
    "tid:batchnorm.cuh:bn_backward_elementwise_kernel#0",
    "tid:update_tail.cuh:conv3x3_direct_kernel#0",
}
# Quick tier: one mutant of each kind.
QUICK = (
    "sync:batchnorm.cuh:channel_partials_kernel#0",  # the barrier between the stores and the tree
    "tid:batchnorm.cuh:channel_partials_kernel#0",   # NCHW blocks are one channel wide: t ^ 1 leaves it
    "smem:batchnorm.cuh:channel_finalize_kernel#0",  # the finalize tree's array, one element short
    "sync:update_tail.cuh:conv3x3_direct_kernel#1",  # tiles read before all are stored (ops B and C)
)


@dataclass(frozen=True)
class Site:
    name: str    # kind:file:function#occurrence
    kind: str
    file: str
    start: int
    end: int
    line: int

    def guarded(self, text: str, mid: int) -> str:
        """The site's text behind the switch of mutant `mid`."""
        old = text[self.start:self.end]
        if self.kind == "sync":
            return f"{{ if (!RLA_EMULATE_MUTANT({mid})) __syncthreads(); }}"
        if self.kind == "tid":
            return f"(RLA_EMULATE_MUTANT({mid}) ? (threadIdx.x ^ 1) : threadIdx.x)"
        if old.startswith("RLA_SHARED(static,"):
            return old.replace("RLA_SHARED(static,", f"RLA_SHARED_SHRUNK_IF_MUTANT({mid},", 1)
        return f"({old}) - (RLA_EMULATE_MUTANT({mid}) ? 1 : 0)"  # a launch's dynamic shared memory bytes

    def literal(self, text: str) -> str:
        """The mutation itself, as plain source text."""
        old = text[self.start:self.end]
        if self.kind == "sync":
            return "/* mutant: barrier deleted */"
        if self.kind == "tid":
            return "(threadIdx.x ^ 1)"
        if old.startswith("RLA_SHARED(static,"):
            return re.sub(r"\[([^\]]+)\]", lambda m: f"[{m.group(1)} - 1]", old, count=1)
        return f"({old}) - 1"


def blank_comments(text: str) -> str:
    """Comments replaced by spaces (newlines kept), so offsets into the result are offsets into `text`."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r"/\*.*?\*/|//[^\n]*", blank, text, flags=re.S)


def matching(code: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at code[i]."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] == open_:
            depth += 1
        elif code[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced")


def launch_smem_args(code: str):
    """(start, end, kernel) of the dynamic shared memory argument of each launch<...>(...) that has one."""
    for m in re.finditer(r"\blaunch<", code):
        t_end = matching(code, m.end() - 1, "<", ">")
        kernel = re.match(r"\s*(\w+)", code[m.end():]).group(1)
        if code[t_end] != "(":
            continue
        a_end = matching(code, t_end, "(", ")")
        args, depth, start = [], 0, t_end + 1
        for j in range(t_end + 1, a_end - 1):
            c = code[j]
            depth += c in "([{"
            depth -= c in ")]}"
            if c == "," and depth == 0:
                args.append((start, j))
                start = j + 1
        args.append((start, a_end - 1))
        if len(args) >= 3:
            s, e = args[2]
            while code[s].isspace():
                s += 1
            while code[e - 1].isspace():
                e -= 1
            if code[s:e] != "0":
                yield s, e, kernel


def find_sites(src: Path = SOURCE) -> list[Site]:
    sites = []
    for fname in KERNEL_FILES:
        text = (src / fname).read_text()
        code = blank_comments(text)
        funcs = [(m.start(), m.group(1)) for m in re.finditer(r"__global__\s+void\s+(\w+)", code)]

        def where(pos):
            owner = [name for start, name in funcs if start < pos]
            return owner[-1] if owner else "host"

        found = [("sync", m.start(), m.end(), where(m.start())) for m in re.finditer(r"__syncthreads\(\);", code)]
        found += [("tid", m.start(), m.end(), where(m.start())) for m in re.finditer(r"threadIdx\.x", code)]
        found += [("smem", m.start(), matching(code, m.start() + len("RLA_SHARED"), "(", ")"), where(m.start()))
                  for m in re.finditer(r"RLA_SHARED\(static,", code)]
        found += [("smem", s, e, kernel) for s, e, kernel in launch_smem_args(code)]
        counts: dict[tuple, int] = {}
        for kind, start, end, func in sorted(found, key=lambda f: f[1]):
            n = counts.get((kind, func), 0)
            counts[(kind, func)] = n + 1
            sites.append(Site(f"{kind}:{fname}:{func}#{n}", kind, fname, start, end, text.count("\n", 0, start) + 1))
    return sites


def write_tree(dst: Path, edits: dict[str, list[tuple[Site, str]]]) -> Path:
    """csrc/cuda/ copied to `dst` with the given replacements; unchanged files keep their times, so a
    rebuild compiles only what differs."""
    if not dst.exists():
        shutil.copytree(SOURCE, dst)
    for path in SOURCE.rglob("*"):
        if path.is_file():
            rel = path.relative_to(SOURCE)
            text = path.read_text()
            for site, new in sorted(edits.get(str(rel), []), key=lambda e: -e[0].start):
                text = text[:site.start] + new + text[site.end:]
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists() or out.read_text() != text:
                out.write_text(text)
    return dst


SITES = find_sites()
IDS = {site.name: i for i, site in enumerate(SITES)}
SELECTED = [s for s in SITES if cuda_emulation.full_tier() or s.name in QUICK]


@pytest.fixture(scope="module")
def schema():
    """The mutant schema's source folder (every site guarded), under the build cache."""
    if cuda_emulation.compiler() is None:
        pytest.skip(cuda_emulation.no_compiler_reason())
    edits: dict[str, list] = {}
    for site in SITES:
        text = (SOURCE / site.file).read_text()
        edits.setdefault(site.file, []).append((site, site.guarded(text, IDS[site.name])))
    return write_tree(cuda_emulation.cache_dir() / "mutants-src" / "cuda", edits)


def run_probe(src: Path, variant: str, mutant: int | None = None) -> dict:
    env = {"RLA_EXT_EMULATE_MUTANT": str(mutant)} if mutant is not None else {"RLA_EXT_EMULATE_MUTANT": "-1"}
    result = cuda_emulation.probe_in_subprocess(src, variant, extra_env=env)
    assert result["built"], f"the {variant} build failed (not a detection):\n{result['output']}"
    return result


def reported(result: dict) -> bool:
    return bool(result["failures"]) or result["returncode"] not in (0, 1)


def test_sites_of_every_kind():
    kinds = {}
    for s in SITES:
        kinds.setdefault(s.kind, []).append(s.name)
    assert len(kinds.get("sync", [])) >= 6 and len(kinds.get("tid", [])) >= 7 and len(kinds.get("smem", [])) >= 3, kinds
    assert set(QUICK) <= set(IDS) and EQUIVALENT <= set(IDS), "QUICK / EQUIVALENT name sites that no longer exist"
    assert any(s.name.startswith("smem:update_tail.cuh:conv3x3_direct_kernel") for s in SITES), "dynamic smem site"


def test_schema_without_a_mutant_passes(schema):
    result = run_probe(schema, "mutants")
    assert not reported(result), result["failures"] or result["output"]


@pytest.mark.parametrize("site", SELECTED, ids=lambda s: s.name)
def test_mutant_is_reported(schema, site):
    result = run_probe(schema, "mutants", IDS[site.name])
    if site.name in EQUIVALENT:
        assert not reported(result), f"{site.name} is listed as equivalent but was reported: update EQUIVALENT"
    else:
        assert reported(result), f"mutant {site.name} (line {site.line}) was NOT reported by the emulation"


@pytest.mark.skipif(not cuda_emulation.full_tier(), reason="full tier only (RLA_EXT_EMULATE_FULL=1)")
def test_literal_mutant_is_reported():
    """The first quick mutant as plain text (no switch), built on its own."""
    if cuda_emulation.compiler() is None:
        pytest.skip(cuda_emulation.no_compiler_reason())
    site = next(s for s in SITES if s.name == QUICK[0])
    text = (SOURCE / site.file).read_text()
    src = write_tree(cuda_emulation.cache_dir() / "literal-src" / "cuda", {site.file: [(site, site.literal(text))]})
    assert "__syncthreads" not in (src / site.file).read_text()[site.start:site.start + 60]
    result = run_probe(src, "literal")
    assert reported(result), "the literal mutant was not reported"
