"""The benchmark CLI end to end in a tiny configuration, and the bytes-moved model by hand."""
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
# tests/ is on sys.path under pytest's rootdir import mode, where this folder would shadow the real
# `benchmarks` package as a namespace package; the repository root must come first.
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from benchmarks import bytes_model  # noqa: E402
from benchmarks.bytes_model import Traffic  # noqa: E402


def test_concat_conv_bn_act_traffic_by_hand():
    # n=2, C=8, k=4, C_out=3, 5x5, bf16 (2 bytes): x 800, h 400, weight 3*12*2 = 72, out (and z) 300.
    args = dict(n=2, c=8, k=4, c_out=3, hw=25, dtype=torch.bfloat16)
    assert bytes_model.concat_conv_bn_act_traffic(**args, pass_="fwd") == Traffic(read=800 + 400 + 72,
                                                                                  written=300 + 300)
    # backward reads grad_out, z, x, h, weight and writes dx, dh, dweight.
    both = bytes_model.concat_conv_bn_act_traffic(**args, pass_="fwd+bwd")
    assert both == Traffic(read=1272 + (300 + 300 + 800 + 400 + 72), written=600 + (800 + 400 + 72))
    assert both.total == 5016


def test_rla_update_traffic_by_hand():
    # n=2, C=8, k=4, 5x5, fp32: h 800, y 1600, weights (4*8 + 4*4*9)*4 = 704, out (and s) 800.
    args = dict(n=2, c=8, k=4, hw=25, dtype=torch.float32)
    assert bytes_model.rla_update_traffic(**args, pass_="fwd") == Traffic(read=800 + 1600 + 704, written=1600)
    both = bytes_model.rla_update_traffic(**args, pass_="fwd+bwd")
    # backward reads grad_out, s, y, weights; writes dh, dy, weight grads.
    assert both == Traffic(read=3104 + (800 + 800 + 1600 + 704), written=1600 + (800 + 1600 + 704))
    # pooling: h has 4x the pixels of the output (10x10 -> 5x5).
    pooled = bytes_model.rla_update_traffic(**args, pass_="fwd", pool=True)
    assert pooled.read == 3200 + 1600 + 704


def test_concat_conv3x3_bn_act_traffic_by_hand():
    # n=2, C=8, k=4, C_out=6, 6x6, fp32: x 2304, h 1152, weight 6*12*9*4 = 2592, out (and z) 1728.
    args = dict(n=2, c=8, k=4, c_out=6, height=6, width=6, dtype=torch.float32)
    fwd = bytes_model.concat_conv3x3_bn_act_traffic(**args, pass_="fwd")
    assert fwd == Traffic(read=2304 + 1152 + 2592, written=1728 + 1728)
    # backward reads grad_out, z, x, h, weight and writes dx, dh, dweight.
    both = bytes_model.concat_conv3x3_bn_act_traffic(**args, pass_="fwd+bwd")
    assert both == fwd + Traffic(read=2 * 1728 + 2304 + 1152 + 2592, written=2304 + 1152 + 2592)
    # Stride 2: a quarter of the output pixels (3x3), the inputs and weight unchanged; odd sides round up.
    strided = bytes_model.concat_conv3x3_bn_act_traffic(**args, pass_="fwd", stride=2)
    assert strided == Traffic(read=fwd.read, written=2 * 432)
    odd = bytes_model.concat_conv3x3_bn_act_traffic(**{**args, "height": 7, "width": 7}, pass_="fwd", stride=2)
    assert odd.written == 2 * (2 * 6 * 16 * 4)  # 4x4 outputs
    # Activations scale with the batch, the weight does not.
    double = bytes_model.concat_conv3x3_bn_act_traffic(**{**args, "n": 4}, pass_="fwd+bwd")
    weights = 3 * 2592  # read by fwd and bwd, written once as dweight
    assert double.total - weights == 2 * (both.total - weights)
    # Against op A on the same tensors: only the weight (9x) differs at stride 1.
    a = bytes_model.concat_conv_bn_act_traffic(2, 8, 4, 6, 36, torch.float32, "fwd+bwd")
    assert both.total - a.total == weights - 3 * 6 * 12 * 4
    with pytest.raises(ValueError, match="pass_"):
        bytes_model.concat_conv3x3_bn_act_traffic(**args, pass_="bwd")


def test_traffic_rejects_unknown_pass():
    with pytest.raises(ValueError, match="pass_"):
        bytes_model.rla_update_traffic(1, 8, 4, 25, torch.float32, pass_="bwd")


def test_cli_tiny_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "results"
    # One small shape, batch 1, one timed call; cuda asked for on purpose to check "unavailable" rows.
    # --max-minutes lifts --quick's own budget, which a loaded machine could hit before the eager rows.
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--shapes", "C2048xH7",
           "--batch", "1", "--warmup", "0", "--repeats", "1", "--providers", "eager,cuda",
           "--max-minutes", "10", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| op | pass | shape | provider |" in proc.stdout

    data = json.loads((out / "results.json").read_text())
    for key in ("device_name", "torch_version", "triton_version", "build_info", "git_commit", "date",
                "copy_bandwidth", "dtype", "batch", "cpu", "rows"):
        assert key in data, key
    # The instruction sets that ran are recorded, in the data and in the table's header.
    assert data["cpu"]["torch_isa"] == torch.backends.cpu.get_cpu_capability()
    assert data["cpu"]["kernels_isa"] == data["build_info"]["cpu"]["kernels_isa"]
    assert f"torch ISA {data['cpu']['torch_isa']} · rla_ext cpp kernels ISA {data['cpu']['kernels_isa']}" \
        in (out / "results.md").read_text()
    assert data["copy_bandwidth"]["gbps"] > 0
    # Which allocator state was timed (benchmarks/allocator.py), in the data and the table's header.
    assert data["cpu_allocator"].startswith(("glibc", "system malloc"))
    assert f"CPU allocator: {data['cpu_allocator']}." in (out / "results.md").read_text()
    rows = data["rows"]
    ops = ("concat_conv_bn_act", "rla_update", "rla_update_and_entry")  # the ops with a C2048xH7 stage
    assert {(r["op"], r["pass"]) for r in rows} == {(op, p) for op in ops for p in ("fwd", "fwd+bwd")}
    eager = [r for r in rows if r["provider"] == "eager"]
    assert len(eager) == 6 and all(r["status"] == "ok" for r in eager), eager
    for r in eager:
        assert r["time_ms"]["median"] > 0 and r["time_ms"]["n"] == 1
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert r["bytes_moved"] > 0 and r["gbps"] > 0 and r["pct_of_copy_bw"] > 0
        assert r["saved_for_backward_bytes"] > 0
    unavailable = [r for r in rows if r["provider"] == "cuda"]
    assert len(unavailable) == 6 and all(r["status"] == "unavailable" and r["error"] for r in unavailable)

    assert "| rla_update | fwd+bwd | C2048xH7 | eager |" in (out / "results.md").read_text()
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif("cpp" not in rla_ext.available_backends("cpu"), reason="the cpp backend was not built")
def test_cli_tiny_e2e_times_eager_and_fused_steps_together(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--device", "cpu", "--e2e-only", "--e2e-batch", "2",
           "--image-size", "64", "--e2e-repeats", "2", "--providers", "eager,cpp", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["op"], r["provider"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {("resnet50", "eager"), ("rla_resnet50", "eager"), ("rla_resnet50", "cpp")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["time_ms"]["n"] == 2 and r["time_ms"]["method"] == "perf_counter, interleaved"
        assert r["images_per_s"] > 0 and r["saved_for_backward_bytes"] > 0
    # The fused entry keeps no cat(x, h) and no per-op intermediates for backward.
    assert rows["rla_resnet50", "cpp"]["saved_for_backward_bytes"] < rows["rla_resnet50", "eager"][
        "saved_for_backward_bytes"]


@pytest.mark.skipif("cpp" not in rla_ext.available_backends("cpu"), reason="the cpp backend was not built")
def test_cli_tiny_e2e_of_a_recurrent_cell_model(tmp_path):
    """--e2e-models picks the other RLA families: the GRU-cell RLA-ResNet-50 on eager and cpp."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--device", "cpu", "--e2e-only", "--e2e-models", "rlagru",
           "--e2e-batch", "1", "--image-size", "64", "--e2e-repeats", "1", "--providers", "eager,cpp",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["op"], r["provider"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {("rlagru_resnet50", "eager"), ("rlagru_resnet50", "cpp")}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows.values()), rows


@pytest.mark.skipif("cpp" not in rla_ext.available_backends("cpu"), reason="the cpp backend was not built")
def test_cli_tiny_run_of_the_basic_block_entry(tmp_path):
    """--ops concat_conv3x3_bn_act runs the op at its own (CIFAR) stages, stride 2 included."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--ops", "concat_conv3x3_bn_act",
           "--batch", "1", "--warmup", "0", "--repeats", "1", "--providers", "eager,cpp", "--max-minutes", "10",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["shapes"] == {"concat_conv3x3_bn_act": ["C32xH16", "C32xH16s2"]}
    rows = data["rows"]
    assert {(r["shape"], r["pass"], r["provider"]) for r in rows} == {
        (s, p, v) for s in ("C32xH16", "C32xH16s2") for p in ("fwd", "fwd+bwd") for v in ("eager", "cpp")}
    for r in rows:
        assert r["op"] == "concat_conv3x3_bn_act" and r["status"] == "ok", r
        assert r["bytes_moved"] > 0 and r["k"] == 16 and r["stride"] == (2 if r["shape"].endswith("s2") else 1)
    assert "| concat_conv3x3_bn_act | fwd+bwd | C32xH16s2 | cpp |" in (out / "results.md").read_text()


def test_compiled_fused_providers():
    """Every fused backend also runs under torch.compile (`compile+<backend>`): the peer to beat is
    compile, and a user compiling a model built with a fused backend gets this."""
    from benchmarks import cases

    cpu = torch.device("cpu")
    assert cases.is_compiled("compile") and cases.is_compiled("compile+cpp") and not cases.is_compiled("cpp")
    if "cpp" in rla_ext.available_backends("cpu"):
        assert cases.providers(cpu)[-1] == "compile+cpp"
        assert cases.check_provider("compile+cpp", cpu) == "cpp"
    with pytest.raises(cases.CaseUnavailable, match="CUDA"):
        cases.check_provider("compile+cuda", cpu)
    with pytest.raises(ValueError, match="provider"):
        cases.check_provider("compile+torch", cpu)
    assert cases.check_provider("auto", cpu) == "auto" and "auto" not in cases.providers(cpu)
