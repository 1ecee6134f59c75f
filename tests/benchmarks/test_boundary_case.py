"""benchmarks for the block boundary rla_update_and_entry: its stage table is RLA-ResNet-50's real
boundaries, its case builds and runs (both outputs backpropagated) for eager, cpp and unfused+cpp, the
providers it has no kernels for are unavailable with the reason, and its traffic model, report notes,
auto table entries and performance-model skip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rla_ext

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import auto_table, bytes_model, cases, cli, report, shapes  # noqa: E402
from benchmarks import perf_model as pm  # noqa: E402
from benchmarks.bytes_model import Traffic  # noqa: E402
from benchmarks.shapes import Stage  # noqa: E402

OP = "rla_update_and_entry"
TINY = Stage(8, 6, 12, k=4)  # y (2, 8, 6, 6), h (2, 4, 6, 6), the next entry 8 + 4 -> 12
HAS_CPP = "cpp" in rla_ext.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the cpp backend was not built")


def _case(provider: str, stage: Stage = TINY) -> cases.Case:
    return cases.make_op_case(OP, stage, provider, batch=2, dtype=torch.float32, device="cpu")


def test_stage_table_is_rla_resnet50s_boundaries_within_a_stage(monkeypatch):
    """Every stage (C, C_out, k) is a boundary rla_resnet50 fuses (the block before a stage's
    non-first block: y has C = 4 * width channels, the next entry width outputs, no pooling)."""
    from rla_ext.models import zoo
    from rla_ext.nn import aggregator

    seen = set()
    real = aggregator.rla_update_and_entry

    def spy(h, y, out_weight, *args, pool=False, **kwargs):
        entry_weight = args[5]
        seen.add((y.shape[1], entry_weight.shape[0], h.shape[1], pool))
        return real(h, y, out_weight, *args, pool=pool, **kwargs)

    monkeypatch.setattr(aggregator, "rla_update_and_entry", spy)
    model = zoo.get_model("rla_resnet50", backend="torch", fuse_boundary=True).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert {(s.channels, s.width, s.k, False) for s in shapes.stages_for(OP)} <= seen
    assert shapes.stages_for(OP) == shapes.STAGES
    assert set(shapes.stages_for(OP, quick=True)) <= set(shapes.STAGES)


@pytest.mark.parametrize("provider", ["eager", pytest.param("cpp", marks=needs_cpp),
                                      pytest.param("unfused+cpp", marks=needs_cpp), "auto"])
def test_case_runs_fwd_and_fwd_bwd(provider):
    case = _case(provider)
    h_next, out = case.run("fwd")()
    assert h_next.shape == (2, 4, 6, 6) and out.shape == (2, 12, 6, 6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Both outputs have an output gradient, so backward reaches every input and parameter through each.
    assert [g.shape for g in case.grad_outputs] == [h_next.shape, out.shape]
    grads = case.run("fwd+bwd")()
    assert [g.shape for g in grads] == [t.shape for t in case.inputs + case.params]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert case.label == TINY.label and case.traffic("fwd+bwd").total > case.traffic("fwd").total > 0
    assert ("composition" in case.meta) == (provider == "unfused+cpp")


@needs_cpp
@pytest.mark.parametrize("provider", ["cpp", "unfused+cpp"])
def test_cpp_cases_match_eager(provider):
    """The providers get the same seeded data and parameters, so they differ only in how the boundary
    is computed: the fused op and the two ops on cpp both match the reference."""
    fused, eager = _case(provider), _case("eager")
    for a, b in zip(fused.run("fwd")(), eager.run("fwd")()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.run("fwd+bwd")(), eager.run("fwd+bwd")()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device reason shows on a machine without CUDA")
@pytest.mark.parametrize("provider", ["cuda", "compile+cuda", "unfused+cuda"])
def test_cuda_providers_are_unavailable_here_with_the_device_reason(provider):
    """Every fused backend has boundary kernels; on a CPU machine the cuda rows say why they cannot run."""
    with pytest.raises(cases.CaseUnavailable, match="cuda"):
        _case(provider)


def test_unfused_provider_only_for_ops_that_fuse_others():
    assert cases.op_providers(OP, cases.PROVIDERS) == cases.PROVIDERS
    assert "unfused+cpp" not in cases.op_providers("rla_update", cases.PROVIDERS)
    with pytest.raises(cases.CaseUnavailable, match="only rla_update_and_entry"):
        cases.make_op_case("rla_update", TINY, "unfused+cpp", batch=1, dtype=torch.float32, device="cpu")
    with pytest.raises(cases.CaseUnavailable, match="a block or model"):
        cases.check_provider("unfused+cpp", torch.device("cpu"))
    if HAS_CPP:
        providers = cases.providers("cpu")
        assert providers.index("cpp") < providers.index("unfused+cpp") < providers.index("compile+cpp")


def test_cli_runs_unfused_for_the_boundary_only():
    """The default table has the boundary, with unfused+cpp among its providers and no other op's, nor
    any training step's."""
    cfg = cli.Settings(cli.parse_args(["--device", "cpu", "--providers", "eager,unfused+cpp", "--shapes",
                                        "C2048xH7", "--e2e"]))
    assert OP in cli.Settings(cli.parse_args(["--device", "cpu"])).ops
    assert cfg.stages[OP] == (shapes.STAGES[3],)
    labels = [t.label for t in cli.plan(cfg, {"gbps": 1.0})]
    assert f"{OP} C2048xH7 eager+unfused+cpp" in labels
    assert "rla_update C2048xH7 eager" in labels and "concat_conv_bn_act C2048xH7 eager" in labels
    assert not any("unfused" in label for label in labels if not label.startswith(OP))


def test_traffic_by_hand_and_against_the_two_ops():
    # n=2, C=8, k=4, C_out=6, 5x5, fp32: y 1600, h and h_next 800, weights: out 128 + rec 576, entry 288.
    args = dict(n=2, c=8, k=4, c_out=6, hw=25, dtype=torch.float32)
    fwd = bytes_model.rla_update_and_entry_traffic(**args, pass_="fwd")
    # fwd reads h, y, the three weights; writes h_next, s, out, z (out and z 2 * 6 * 25 * 4 = 1200 each).
    assert fwd == Traffic(read=800 + 1600 + 128 + 576 + 288, written=2 * 800 + 2 * 1200)
    both = bytes_model.rla_update_and_entry_traffic(**args, pass_="fwd+bwd")
    # bwd reads grad_h_next, s, grad_out, z, y, h_next, weights; writes dh, dy, the weight gradients.
    assert both == fwd + Traffic(read=800 + 800 + 2 * 1200 + 1600 + 800 + 992, written=800 + 1600 + 992)

    def two_ops(pass_: str) -> Traffic:
        return (bytes_model.rla_update_traffic(2, 8, 4, 25, torch.float32, pass_)
                + bytes_model.concat_conv_bn_act_traffic(2, 8, 4, 6, 25, torch.float32, pass_))

    # What the fusion saves: y and h_next read by the entry; y again, dy and dh_next in backward.
    assert two_ops("fwd").total - fwd.total == 1600 + 800
    assert two_ops("fwd+bwd").total - both.total == 2 * 1600 + 800 + 1600 + 800
    # Activations scale with the batch and the pixels, the weights do not.
    weights = 3 * 992  # read by fwd and bwd, written once as gradients
    for scaled in ({"n": 4}, {"hw": 50}):
        double = bytes_model.rla_update_and_entry_traffic(**{**args, **scaled}, pass_="fwd+bwd")
        assert double.total - weights == 2 * (both.total - weights)
    half = bytes_model.rla_update_and_entry_traffic(**{**args, "dtype": torch.bfloat16}, pass_="fwd+bwd")
    assert 2 * half.total == both.total
    with pytest.raises(ValueError, match="pass_"):
        bytes_model.rla_update_and_entry_traffic(**args, pass_="bwd")


def test_traffic_at_the_stages_is_positive_and_below_the_two_ops():
    for stage in shapes.stages_for(OP):
        for pass_ in bytes_model.PASSES:
            args = (8, stage.channels, stage.k)
            hw, f32 = stage.size ** 2, torch.float32
            fused = bytes_model.rla_update_and_entry_traffic(*args, stage.width, hw, f32, pass_)
            update = bytes_model.rla_update_traffic(*args, hw, f32, pass_)
            entry = bytes_model.concat_conv_bn_act_traffic(*args, stage.width, hw, f32, pass_)
            assert 0 < max(update.total, entry.total) < fused.total < update.total + entry.total


def _row(provider, ms, pass_="fwd+bwd", shape="C256xH56", status="ok"):
    ok = status == "ok"
    return {"kind": "op", "op": OP, "pass": pass_, "shape": shape, "provider": provider, "status": status,
            "dtype": "float32", "batch": 8, "time_ms": {"median": ms, "q25": ms, "q75": ms} if ok else None,
            "error": None if ok else "no kernels"}


def test_report_puts_the_fused_row_beside_its_two_ops():
    rows = [_row("eager", 3.0), _row("cpp", 1.0), _row("unfused+cpp", 1.5), _row("compile+cpp", 2.0),
            _row("cuda", None, status="unavailable")]
    rows[2]["composition"] = "rla_update then concat_conv_bn_act, each on cpp"
    report.add_speedups(rows)
    by = {r["provider"]: r for r in rows}
    assert by["cpp"]["speedup_vs_unfused"] == pytest.approx(1.5)
    assert by["cpp"]["speedup_vs_eager"] == pytest.approx(3.0)
    assert "speedup_vs_unfused" not in by["compile+cpp"] and "speedup_vs_unfused" not in by["unfused+cpp"]
    table = report.markdown({"device_type": "cpu"}, rows)
    assert "| cpp | 1.000 |" in table and "| 1.50x vs unfused+cpp |" in table
    assert "rla_update then concat_conv_bn_act, each on cpp |" in table
    assert "unavailable: no kernels" in table


def test_auto_table_entries_for_the_boundary(monkeypatch):
    """The boundary's eager and cpp rows make entries of their own; unfused+cpp and unavailable rows are
    no backend of the op and are left out; `auto` then follows them."""
    from rla_ext import _auto_table, _backend

    rows = [_row("eager", 1.0), _row("cpp", 0.5), _row("unfused+cpp", 0.1),
            _row("cuda", None, status="unavailable"),
            _row("eager", 0.2, shape="C2048xH7"), _row("cpp", 0.4, shape="C2048xH7"),
            _row("compile", 0.3, shape="C2048xH7"), _row("compile+cpp", 0.2, shape="C2048xH7")]
    results = {"device_type": "cpu", "device_name": "CPU", "date": "2026-01-01", "git_commit": "abc",
               "rows": rows}
    pref = auto_table.preference_from_results(results)
    assert pref == {("cpu", OP, 56, "fwd+bwd"): ("cpp", "torch"), ("cpu", OP, 7, "fwd+bwd"): ("torch", "cpp"),
                    ("cpu", OP, 7, "compiled fwd+bwd"): ("cpp", "torch")}
    namespace: dict = {}
    text = auto_table.updated_table(results, auto_table.TABLE_PATH.read_text())
    exec(text[text.index(auto_table._BEGIN):text.index(auto_table._END)], namespace)  # noqa: S102
    assert {k: v for k, v in namespace["PREFERENCE"].items() if k[1] == OP} == pref
    monkeypatch.setattr(_auto_table, "PREFERENCE", namespace["PREFERENCE"])
    assert _backend.auto_candidates("cpu", OP, (7, 7), "fwd+bwd")[0] == "torch"
    assert _backend.auto_candidates("cpu", OP, (56, 56), "fwd+bwd")[0] == "cpp"


def test_perf_model_joins_the_boundary_rows():
    """The boundary is modelled: its measured eager row gets the eager design beside it, its cpp row the
    floor only (no cpp design), and nothing of it is reported as unmodelled."""
    results = {"device_type": "cpu", "batch": 8, "rows": [_row("cpp", 1.0), _row("eager", 2.0, pass_="fwd")]}
    joined = {r.provider: r for r in pm.join_measured(results, pm.DEVICES["cpu"])}
    shape = pm.OpShape.from_stage(shapes.stage_by_label("C256xH56", OP), 8)
    assert joined["eager"].modelled_ms == pytest.approx(pm.model_op(OP, "fwd", shape, "eager",
                                                                     pm.DEVICES["cpu"], torch.float32).time_ms)
    assert joined["cpp"].modelled_ms is None and joined["cpp"].floor_ms > 0
    assert pm.unmodelled_ops(results) == {}


@needs_cpp
def test_cli_tiny_run_of_the_boundary(tmp_path):
    """--ops rla_update_and_entry at its smallest stage: eager, cpp and unfused+cpp rows, the cpp rows
    noting their speedup over the two ops, cuda reported unavailable on this CPU-only machine."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--ops", OP,
           "--shapes", "C2048xH7", "--batch", "1", "--warmup", "0", "--repeats", "1",
           "--providers", "eager,cpp,unfused+cpp,cuda", "--max-minutes", "10", "--no-e2e", "--no-progress",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["shapes"] == {OP: ["C2048xH7"]}
    rows = {(r["pass"], r["provider"]): r for r in data["rows"]}
    assert set(rows) == {(p, v) for p in ("fwd", "fwd+bwd") for v in ("eager", "cpp", "unfused+cpp", "cuda")}
    for (pass_, provider), r in rows.items():
        assert r["op"] == OP and r["shape"] == "C2048xH7"
        if provider == "cuda":
            assert r["status"] == "unavailable" and "CUDA tensors only" in r["error"]
            continue
        assert r["status"] == "ok", r
        assert r["bytes_moved"] == rows[pass_, "eager"]["bytes_moved"] > 0 and r["k"] == 32
        assert r["saved_for_backward_bytes"] > 0
    assert rows["fwd+bwd", "cpp"]["speedup_vs_unfused"] > 0
    table = (out / "results.md").read_text()
    assert f"| {OP} | fwd+bwd | C2048xH7 | unfused+cpp |" in table and "x vs unfused+cpp |" in table
