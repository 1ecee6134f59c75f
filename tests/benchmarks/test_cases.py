"""benchmarks.cases and benchmarks.shapes for concat_conv3x3_bn_act: its stage table is the CIFAR
basic-block models' real entries, and its case builds and runs for eager and cpp at a tiny shape."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rla_ext

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, cli, shapes  # noqa: E402
from benchmarks.shapes import Stage  # noqa: E402

OP = "concat_conv3x3_bn_act"
TINY = (Stage(8, 6, 8, k=4), Stage(8, 6, 16, stride=2, k=4))  # a stride-1 and a downsampling entry
needs_cpp = pytest.mark.skipif("cpp" not in rla_ext.available_backends("cpu"), reason="the cpp backend was not built")


def test_stage_table_is_the_cifar_basic_block_models_entries(monkeypatch):
    """Every (C, H, C_out, stride, k) the basic block's entry sees in rla_resnet20 is a stage, and no other."""
    from rla_ext.models import zoo
    from rla_ext.nn import blocks

    seen = set()
    real = blocks.concat_conv3x3_bn_act

    def spy(x, h, weight, *args, stride=1, **kwargs):
        seen.add((x.shape[1], x.shape[2], weight.shape[0], stride, h.shape[1]))
        return real(x, h, weight, *args, stride=stride, **kwargs)

    monkeypatch.setattr(blocks, "concat_conv3x3_bn_act", spy)
    with torch.no_grad():
        zoo.get_model("rla_resnet20", backend="torch").eval()(torch.randn(1, 3, 32, 32))
    assert seen == {(s.channels, s.size, s.width, s.stride, s.k) for s in shapes.stages_for(OP)}
    assert [s.label for s in shapes.stages_for(OP)] == ["C16xH32", "C32xH16", "C64xH8", "C16xH32s2", "C32xH16s2"]
    assert set(shapes.stages_for(OP, quick=True)) <= set(shapes.stages_for(OP))
    assert shapes.stages_for("rla_update") == shapes.STAGES  # the bottleneck ops keep RLA-ResNet-50's


def test_stage_lookup_is_per_op():
    assert shapes.stage_by_label("C16xH32s2", OP).stride == 2
    assert shapes.stage_by_label("C256xH56") == shapes.STAGES[0]
    with pytest.raises(ValueError, match="unknown stage"):
        shapes.stage_by_label("C256xH56", OP)
    # A channel count selects every stage of the op with that many input channels.
    assert [s.label for s in shapes.select_stages(["32"], shapes.stages_for(OP))] == ["C32xH16", "C32xH16s2"]


def test_cli_shapes_are_chosen_per_op():
    cfg = cli.Settings(cli.parse_args(["--device", "cpu", "--shapes", "C2048xH7,C64xH8", "--no-compile",
                                        "--no-e2e"]))
    assert {op: [s.label for s in st] for op, st in cfg.stages.items()} == {
        "concat_conv_bn_act": ["C2048xH7"], "rla_update": ["C2048xH7"], OP: ["C64xH8"],
        "rla_update_and_entry": ["C2048xH7"]}
    assert [t.label.split()[:2] for t in cli.plan(cfg, {"gbps": 1.0})] == [
        ["concat_conv_bn_act", "C2048xH7"], ["rla_update", "C2048xH7"], [OP, "C64xH8"],
        ["rla_update_and_entry", "C2048xH7"]]
    quick = cli.Settings(cli.parse_args(["--device", "cpu", "--quick", "--ops", OP]))
    assert quick.stages == {OP: shapes.stages_for(OP, quick=True)}
    with pytest.raises(SystemExit, match="C256xH56"):  # not a stage of the only op chosen
        cli.Settings(cli.parse_args(["--device", "cpu", "--ops", OP, "--shapes", "C256xH56"]))


@pytest.mark.parametrize("stage", TINY, ids=lambda s: s.label)
@pytest.mark.parametrize("provider", ["eager", pytest.param("cpp", marks=needs_cpp)])
def test_case_runs_fwd_and_fwd_bwd(stage, provider):
    case = cases.make_op_case(OP, stage, provider, batch=2, dtype=torch.float32, device="cpu")
    out = case.run("fwd")()
    side = -(-stage.size // stage.stride)
    assert out.shape == (2, stage.width, side, side) and out.is_contiguous(memory_format=torch.channels_last)
    grads = case.run("fwd+bwd")()
    # x, h, then the conv weight and BatchNorm's weight and bias.
    assert [g.shape for g in grads] == [t.shape for t in case.inputs + case.params]
    assert all(torch.isfinite(g).all() for g in grads)
    assert case.meta == {"batch": 2, "channels": 8, "size": 6, "width": stage.width, "k": 4, "stride": stage.stride}
    assert case.label == stage.label and case.traffic("fwd+bwd").total > case.traffic("fwd").total > 0


@needs_cpp
def test_cpp_case_matches_eager():
    """The providers get the same seeded data, so they differ only in how the op is computed."""
    built = {p: cases.make_op_case(OP, TINY[1], p, batch=2, dtype=torch.float32, device="cpu") for p in ("eager", "cpp")}
    torch.testing.assert_close(built["cpp"].run("fwd")(), built["eager"].run("fwd")())
    for a, b in zip(built["cpp"].run("fwd+bwd")(), built["eager"].run("fwd+bwd")()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_rows_are_marked_as_the_reference(monkeypatch):
    """The op has no Triton kernels: a triton row times the reference, and its row says so."""
    monkeypatch.setattr(cases, "check_provider", lambda provider, device, op=None: "triton")
    case = cases.make_op_case(OP, TINY[0], "triton", batch=1, dtype=torch.float32, device="cpu")
    assert "runs the reference" in case.meta["fallback"]
    monkeypatch.setattr(cases, "check_provider", lambda provider, device, op=None: "cpp")
    assert "fallback" not in cases.make_op_case(OP, TINY[0], "cpp", batch=1, dtype=torch.float32, device="cpu").meta
