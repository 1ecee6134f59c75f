"""benchmarks.perf_model: the arithmetic of the performance model, checked by hand (CPU only, fast)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import bytes_model  # noqa: E402
from benchmarks import perf_model as pm  # noqa: E402
from benchmarks.shapes import STAGES  # noqa: E402

# n=2, C=8, k=4, C_out=3, 5x5: M = 50 pixels.
SMALL = pm.OpShape(n=2, c=8, size=5, width=3, k=4, label="small")
TEST_DEVICE = pm.DeviceSpec("test", "test device", bandwidth_gbps=1.0, tensor_tflops=1e-3, tf32_tflops=0.5e-3,
                            fp32_tflops=1e-3, launch_us=10.0, l2_mb=1.0, sms=4, source="test")
GPUS = (pm.H100, pm.H200)


def _kernel(row_or_kernels, name: str) -> pm.Kernel:
    kernels = row_or_kernels.kernels if isinstance(row_or_kernels, pm.OpRow) else row_or_kernels
    (found,) = [kn for kn in kernels if kn.name == name]
    return found


def test_gemm_bytes_and_flops_by_hand():
    # CUDA op A backward, dx = dz @ Wx in bf16: reads dz (50 x 3) and Wx (3 x 8), writes dx (50 x 8).
    kernels = pm.op_kernels("concat_conv_bn_act", "cuda", SMALL, torch.bfloat16, pm.H100)
    dgrad = _kernel(kernels, "dgrad dx = dz.Wx (cuBLAS)")
    assert dgrad.read == 50 * 3 * 2 + 3 * 8 * 2 == 348
    assert dgrad.written == 50 * 8 * 2 == 800
    assert dgrad.tensor_flops == 2 * 50 * 3 * 8 == 2400 and dgrad.fp32_flops == 0
    assert dgrad.phase == "bwd" and dgrad.launches == 1
    # Its forward GEMM writes the x-part unrounded, in fp32.
    fwd = _kernel(kernels, "GEMM x-part -> zx fp32 (cuBLAS)")
    assert (fwd.read, fwd.written, fwd.tensor_flops) == (50 * 8 * 2 + 3 * 8 * 2, 50 * 3 * 4, 2400)


def test_eager_concat_materialises_cat():
    kernels = pm.op_kernels("concat_conv_bn_act", "eager", SMALL, torch.bfloat16, pm.H100, "fwd")
    cat = _kernel(kernels, "cat(x, h)")
    assert cat.read == cat.written == 50 * 12 * 2
    conv = _kernel(kernels, "conv1x1 on cat (cuDNN)")
    assert conv.read == 50 * 12 * 2 + 3 * 12 * 2 and conv.written == 50 * 3 * 2
    assert conv.tensor_flops == 2 * 50 * 3 * 12
    # Forward launches: cat, conv, 4 native BatchNorm kernels, relu.
    assert sum(kn.launches for kn in kernels) == 7


def test_direct_conv_counts_overhanging_tiles():
    # k = 32: 4 channel groups, 64 pixels per block -> 8x8 tiles; a 7x7 image is one tile, 56x56 is 49.
    assert pm.cuda_direct_conv_work(1, 32, 7) == (64, 10 * 10 * 32)
    assert pm.cuda_direct_conv_work(2, 32, 56)[0] == 2 * 56 * 56
    shape = pm.OpShape(n=1, c=64, size=7, k=32)
    conv = _kernel(pm.op_kernels("rla_update", "cuda", shape, torch.bfloat16, pm.H100, "fwd"),
                   "direct conv3x3, tanh(bn(s)) on load (FP32 cores)")
    assert conv.tensor_flops == 0
    assert conv.fp32_flops == 2 * 64 * 32 * 32 * 9 + 10 * 10 * 32 * (pm.BN_OPS + pm.TANH_OPS)


def test_reduce_plan_and_splits_follow_the_code():
    # make_reduce_plan: 1024 target blocks over ceil(C/32) channel blocks, at least 32 rows per block.
    assert pm.cuda_reduce_chunks(64, 10**6) == 512
    assert pm.cuda_reduce_chunks(32, 320) == 10
    # split_rows: 4 programs per SM over the tiles, chunks a multiple of 256 rows.
    # 528 // 5 = 105 programs wanted: ceil(100000 / 105) = 953 rows -> 1024 -> 98 splits.
    assert pm.triton_splits(100_000, 5, pm.H100) == 98
    assert pm.triton_splits(100, 5, pm.H100) == 1


def test_time_is_max_of_terms_plus_launches():
    kn = pm.Kernel("k", read=3_000_000, written=1_000_000, tensor_flops=2_000_000, fp32_flops=5_000_000, launches=2)
    # memory 4e6 B / 1e9 B/s = 4 ms, tensor 2e6 / 1e9 = 2 ms, fp32 5e6 / 1e9 = 5 ms; + 2 x 10 us.
    assert pm.kernel_time_ms(kn, TEST_DEVICE, torch.bfloat16) == pytest.approx(5.0 + 0.02)
    assert pm.kernel_bound(kn, TEST_DEVICE, torch.bfloat16) == "fp32"
    # fp32 activations: GEMMs at the TF32 rate (half here): 4 ms, still below fp32's 5 ms.
    assert pm.kernel_time_ms(replace_flops(kn, 4_000_000), TEST_DEVICE, torch.float32) == pytest.approx(8.02)
    tiny = pm.Kernel("tiny", read=10)
    assert pm.kernel_bound(tiny, TEST_DEVICE, torch.bfloat16) == "launch"


def replace_flops(kn: pm.Kernel, tensor_flops: int) -> pm.Kernel:
    return pm.Kernel(kn.name, kn.read, kn.written, tensor_flops, 0, kn.launches)


def test_row_totals_are_sums_of_kernels():
    row = pm.model_op("rla_update", "fwd+bwd", SMALL, "triton", TEST_DEVICE, torch.bfloat16)
    assert row.time_ms == pytest.approx(sum(pm.kernel_time_ms(kn, TEST_DEVICE, torch.bfloat16) for kn in row.kernels))
    assert row.read == sum(kn.read for kn in row.kernels)
    assert row.written == sum(kn.written for kn in row.kernels)
    assert row.launches == sum(kn.launches for kn in row.kernels)
    fwd = pm.model_op("rla_update", "fwd", SMALL, "triton", TEST_DEVICE, torch.bfloat16)
    assert row.kernels[:len(fwd.kernels)] == fwd.kernels
    assert {kn.phase for kn in row.kernels[len(fwd.kernels):]} == {"bwd"}


def test_floor_is_bytes_model_in_one_launch_per_pass():
    shape = pm.OpShape.from_stage(STAGES[1], 4)
    row = pm.model_op("concat_conv_bn_act", "fwd+bwd", shape, "floor", pm.H100)
    traffic = bytes_model.concat_conv_bn_act_traffic(4, 512, 32, 128, 28 * 28, torch.bfloat16, "fwd+bwd")
    assert (row.read, row.written, row.launches) == (traffic.read, traffic.written, 2)
    assert row.tensor_flops == 3 * 2 * shape.m * 128 * (512 + 32)
    pooled = pm.OpShape(n=2, c=512, size=28, k=32, pool=True)
    row = pm.model_op("rla_update", "fwd", pooled, "floor", pm.H100)
    assert row.read + row.written == bytes_model.rla_update_traffic(2, 512, 32, 28 * 28, torch.bfloat16, "fwd",
                                                                    pool=True).total


@pytest.mark.parametrize("dev", [*GPUS, pm.cpu_device()], ids=lambda d: d.key)
def test_floor_is_never_above_a_design(dev):
    for batch in (2, 256):
        for row in pm.model_ops(dev, batch):
            floor = pm.model_op(row.op, row.pass_, row.shape, "floor", dev)
            assert row.time_ms >= row.floor_ms * (1 - 1e-12), row
            assert row.read + row.written >= floor.read + floor.written, row
            assert row.launches >= floor.launches, row
    for shape_a, shape_b in pm.rla_resnet50_steps(8):  # first blocks: other channels, pooling
        for design in pm.designs_for(dev):
            for op, shape in ((pm.ENTRY, shape_a), (pm.UPDATE, shape_b)):
                row = pm.model_op(op, "fwd+bwd", shape, design, dev)
                assert row.time_ms >= row.floor_ms * (1 - 1e-12), row
    for shape in pm.rla_resnet50_boundaries(8):  # stage transitions: pooling, another entry width
        for design in pm.designs_for(dev):
            if pm.has_design(pm.BOUNDARY, design):
                row = pm.model_op(pm.BOUNDARY, "fwd+bwd", shape, design, dev)
                assert row.time_ms >= row.floor_ms * (1 - 1e-12), row


def test_rla_resnet50_steps():
    steps = pm.rla_resnet50_steps(256)
    assert len(steps) == 16
    first_a, first_b = steps[0]
    assert (first_a.c, first_a.size, first_a.width) == (64, 56, 64) and (first_b.c, first_b.pool) == (256, False)
    # Stage 2's first block: conv1 at 56x56 on 256 channels; the update pools h from 56x56 to 28x28.
    a, b = steps[3]
    assert (a.c, a.size, a.width) == (256, 56, 128) and (b.c, b.size, b.pool) == (512, 28, True)
    assert sum(b.pool for _, b in steps) == 3
    assert steps[-1][0] == pm.OpShape(n=256, c=2048, size=7, width=512, label="C2048xH7 block 2")


def test_network_is_the_sum_of_its_op_rows():
    rows = {r.label: r for r in pm.model_network(pm.H100, batch=4)}
    assert set(rows) == set(pm.DESIGNS) | {f"{d}, fused boundary" for d in ("cuda", "triton", "floor")}
    steps = pm.rla_resnet50_steps(4)
    ops = [pm.model_op(op, "fwd+bwd", shape, "cuda", pm.H100) for a, b in steps
           for op, shape in ((pm.ENTRY, a), (pm.UPDATE, b))]
    # Two ops per step: autograd sums dy and dh_next at each of the 15 boundaries.
    sums = [kn for b in pm.rla_resnet50_boundaries(4) for kn in pm.consumer_sums(b, torch.bfloat16)]
    assert len(sums) == 30
    assert rows["cuda"].time_ms == pytest.approx(sum(r.time_ms for r in ops)
                                                 + sum(pm.kernel_time_ms(kn, pm.H100, torch.bfloat16) for kn in sums))
    assert rows["cuda"].launches == sum(r.launches for r in ops) + 30
    assert rows["cuda"].launches_per_step == rows["cuda"].launches / 16
    assert rows["floor"].launches == 4 * 16 + 30  # one launch per pass and op, and the sums
    fused = rows["floor, fused boundary"]
    calls = pm.network_calls(4, boundary=True)
    assert [op for op, _ in calls] == [pm.ENTRY] + [pm.BOUNDARY] * 15 + [pm.UPDATE]
    assert fused.launches == 2 * 17
    assert fused.time_ms == pytest.approx(sum(pm.model_op(op, "fwd+bwd", shape, "floor", pm.H100).time_ms
                                              for op, shape in calls))
    assert fused.time_ms < rows["floor"].time_ms
    # Memory-bound at batch 256, reading y once each way pays for the CUDA boundary kernel.
    big = {r.label: r for r in pm.model_network(pm.H100, batch=256, designs=["cuda"])}
    assert big["cuda, fused boundary"].time_ms < big["cuda"].time_ms
    labels = [r.label for r in pm.model_network(pm.cpu_device(), batch=4)]
    assert labels == [*pm.CPU_DESIGNS, "floor, fused boundary"]


def test_boundaries_of_rla_resnet50():
    bounds = pm.rla_resnet50_boundaries(256)
    steps = pm.rla_resnet50_steps(256)
    assert len(bounds) == 15
    for t, b in enumerate(bounds):
        update, entry = steps[t][1], steps[t + 1][0]
        assert (b.c, b.size, b.pool, b.width) == (update.c, update.size, update.pool, entry.width)
    # Into stage 2: y is stage 1's output (256 x 56x56), the next entry is stage 2's conv1 (width 128).
    assert (bounds[2].c, bounds[2].size, bounds[2].width, bounds[2].pool) == (256, 56, 128, False)
    # Stage 2's first update pools h; its boundary's entry is stage 2's second block.
    assert (bounds[3].c, bounds[3].size, bounds[3].width, bounds[3].pool) == (512, 28, 128, True)
    assert sum(b.pool for b in bounds) == 3


def test_boundary_eager_is_the_two_ops_and_autograd_sums():
    shape = pm.OpShape(n=4, c=512, size=28, width=128, k=32, pool=True)
    row = pm.model_op(pm.BOUNDARY, "fwd+bwd", shape, "eager", pm.H100)
    uf, ub = pm.eager_rla_update(shape, torch.bfloat16, pm.H100)
    ef, eb = pm.eager_concat_conv_bn_act(shape, torch.bfloat16, pm.H100)
    assert list(row.kernels) == uf + ef + eb + ub + pm.consumer_sums(shape, torch.bfloat16)
    y = 4 * 28 * 28 * 512 * 2
    assert pm.consumer_sums(shape, torch.bfloat16)[0].bytes == 3 * y
    assert pm.model_op(pm.BOUNDARY, "fwd", shape, "eager", pm.H100).kernels == tuple(uf + ef)


@pytest.mark.parametrize("design", ["cuda", "triton"])
def test_fused_boundary_reads_y_once_each_way(design):
    """The cuda and triton boundary kernels: one GEMM over y forward (the stacked weight's Ce + k
    columns), one dgrad into y and one weight gradient over y backward; y is never written forward, dy
    once backward; less traffic than the same design's two ops plus autograd's sums."""
    shape = pm.OpShape(n=8, c=512, size=28, width=128, k=32, pool=True)
    dt = torch.bfloat16
    fwd, bwd = pm.BUILDERS[design][pm.BOUNDARY](shape, dt, pm.H100)
    y = shape.m * shape.c * 2
    gemm_y = 2 * shape.m * (shape.width + shape.k) * shape.c
    assert [kn.tensor_flops for kn in fwd if kn.tensor_flops >= gemm_y] == [gemm_y]
    assert [kn.tensor_flops for kn in bwd if kn.tensor_flops >= gemm_y] == [gemm_y, gemm_y]
    assert sum(kn.written for kn in bwd if kn.written >= y) == y
    fused = pm.model_op(pm.BOUNDARY, "fwd+bwd", shape, design, pm.H100, dt)
    two = pm.two_op_boundary(pm.BUILDERS[design][pm.UPDATE], pm.BUILDERS[design][pm.ENTRY])(shape, dt, pm.H100)
    assert fused.read + fused.written < sum(kn.bytes for kn in two[0] + two[1])


def test_boundary_floor_is_its_bytes_model():
    shape = pm.OpShape(n=2, c=1024, size=14, width=256, k=32, pool=True)
    for pass_ in pm.PASSES:
        row = pm.model_op(pm.BOUNDARY, pass_, shape, "floor", pm.H100)
        traffic = bytes_model.rla_update_and_entry_traffic(2, 1024, 32, 256, 14 * 14, torch.bfloat16, pass_,
                                                           pool=True)
        assert (row.read, row.written) == (traffic.read, traffic.written)
    gemms = 2 * shape.m * (32 * 1024 + 9 * 32 * 32 + 256 * (1024 + 32))
    assert row.tensor_flops == 3 * gemms


def test_triton_rereads_reach_dram_only_beyond_l2():
    # Op B's dgrad sweeps (g, s) once per 64 columns of y: C = 256 -> 4 sweeps.
    def dgrad(dev, n):
        shape = pm.OpShape(n=n, c=256, size=56, k=32)
        return _kernel(pm.op_kernels("rla_update", "triton", shape, torch.bfloat16, dev),
                       "dgrad dz.Wout -> dy, dz rebuilt on load")
    gs_small = 2 * (2 * 56 * 56 * 32 * 2)
    assert dgrad(pm.H100, 2).read == gs_small + 32 * 256 * 2  # 0.8 MB fits in L2: read once
    gs_big = 2 * (256 * 56 * 56 * 32 * 2)
    assert dgrad(pm.H100, 256).read == 4 * gs_big + 32 * 256 * 2  # 103 MB does not: once per sweep
    # Op A's forward at C2048xH7, batch 256: 8 column sweeps over x + h (53 MB, more than half the L2),
    # 196 programs per sweep, 132 x 4 resident: two sweeps at a time share a read -> 4 reads.
    shape = pm.OpShape.from_stage(STAGES[3], 256)
    gemm = _kernel(pm.op_kernels("concat_conv_bn_act", "triton", shape, torch.bfloat16, pm.H100, "fwd"),
                   "GEMM [x|h].W^T -> z, BN partials in the epilogue")
    xh = 256 * 49 * (2048 + 32) * 2
    assert gemm.read == 4 * xh + 512 * (2048 + 32) * 2


# ---------------------------------------------------------------------------------------------------
# Measured join and CLI
# ---------------------------------------------------------------------------------------------------

def _row(op, pass_, shape, provider, ms, status="ok", batch=4):
    return {"kind": "op", "op": op, "pass": pass_, "shape": shape, "provider": provider, "batch": batch,
            "dtype": "bfloat16", "k": 32, "status": status, "time_ms": {"median": ms} if status == "ok" else None}


RESULTS = {
    "device_type": "cuda", "device_name": "NVIDIA H200", "date": "2026-01-01T00:00:00", "git_commit": "abc",
    "batch": 4, "dtype": "bfloat16", "channels_last": True,
    "rows": [
        _row("rla_update", "fwd+bwd", "C512xH28", "eager", 1.5),
        _row("rla_update", "fwd+bwd", "C512xH28", "compile", 1.2),
        _row("rla_update", "fwd", "C2048xH7", "triton", 0.25, batch=8),
        _row("concat_conv_bn_act", "fwd", "C256xH56", "cuda", None, status="error"),
        _row("concat_conv_bn_act", "fwd", "C999xH3", "cuda", 1.0),  # a shape the model does not know
        {"kind": "e2e", "op": "rla_resnet50", "provider": "cuda", "status": "ok", "time_ms": {"median": 9.0}},
    ],
}


def test_measured_join_picks_the_matching_rows():
    assert pm.device_from_results(RESULTS) is pm.H200
    rows = pm.join_measured(RESULTS, pm.H200)
    assert [(r.op, r.pass_, r.shape, r.provider) for r in rows] == [
        ("rla_update", "fwd+bwd", "C512xH28", "eager"), ("rla_update", "fwd+bwd", "C512xH28", "compile"),
        ("rla_update", "fwd", "C2048xH7", "triton")]
    eager, compiled, triton = rows
    expect = pm.model_op("rla_update", "fwd+bwd", pm.OpShape.from_stage(STAGES[1], 4), "eager", pm.H200)
    assert eager.modelled_ms == pytest.approx(expect.time_ms) and eager.measured_ms == 1.5
    assert eager.ratio == pytest.approx(1.5 / expect.time_ms)
    assert eager.floor_ms == pytest.approx(expect.floor_ms)
    assert compiled.modelled_ms is None and compiled.ratio is None  # no design models torch.compile
    # Each row is modelled at its own batch.
    expect = pm.model_op("rla_update", "fwd", pm.OpShape.from_stage(STAGES[3], 8), "triton", pm.H200)
    assert (triton.batch, triton.modelled_ms) == (8, pytest.approx(expect.time_ms))


def test_cli_prints_tables(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    assert pm.main(["--measured", str(results), "--kernels", "--shape", "C2048xH7", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "MODELLED" in out and "NVIDIA H200" in out  # the device came from the results file
    assert "| design | modelled ms | x eager | x floor | launches per RLA step |" in out
    assert re.search(r"^\| triton \| [0-9.]+ \|", out, re.M)
    assert "| concat_conv_bn_act | fwd+bwd | C2048xH7 | floor |" in out
    assert "direct conv3x3, tanh(bn(s)) on load (FP32 cores)" in out  # --kernels
    assert "GEMM [x\\|h].W^T -> z" in out  # a | inside a cell is escaped, the table keeps its columns
    assert "| rla_update | fwd+bwd | C512xH28 | eager | 4 |" in out  # the measured table


def test_unmodelled_op_is_skipped_with_its_reason(tmp_path, capsys):
    """The basic block's 3x3 entry has benchmark rows but no kernel lists: modelling it raises a clear
    error, and a results file's rows of it are left out of the measured table, the report saying so."""
    op = "concat_conv3x3_bn_act"
    with pytest.raises(ValueError, match="3x3 entry is not modelled"):
        pm.model_op(op, "fwd", pm.OpShape.from_stage(STAGES[3], 2), "eager", pm.H200)
    results = dict(RESULTS, rows=RESULTS["rows"] + [_row(op, "fwd", "C16xH32", "eager", 0.5),
                                                    _row(op, "fwd+bwd", "C16xH32s2", "cuda", 0.7)])
    assert pm.join_measured(results, pm.H200) == pm.join_measured(RESULTS, pm.H200)
    assert pm.unmodelled_ops(results) == {op: 2}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert pm.main(["--measured", str(path), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert f"Skipped 2 measured {op} rows: the basic block's 3x3 entry is not modelled" in out
    assert f"| {op} |" not in out


def test_cli_cpu_parameters(capsys):
    pm.main(["--device", "cpu", "--cpu-bandwidth-gbps", "10", "--cpu-gflops", "100", "--batch", "2"])
    out = capsys.readouterr().out
    assert "CPU: 10 GB/s, GEMMs 0.1 TFLOP/s (float32)" in out
    assert "| cuda |" not in out and "| eager |" in out


def test_python_m_benchmarks_model():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "model", "--device", "h100", "--batch", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| floor |" in proc.stdout and "NVIDIA H100 SXM" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# The constants copied from the kernels' sources still match them
# ---------------------------------------------------------------------------------------------------

def _python_constants(path: Path) -> dict[str, object]:
    """Module-level literal assignments (`A if INTERPRET else B` taken as B, the GPU value)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.orelse if isinstance(node.value, ast.IfExp) else node.value
            try:
                out[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                pass
    return out


def test_triton_constants_match_the_sources():
    c = _python_constants(ROOT / "triton_kernels" / "common.py")
    assert c["STAT_ROWS"] == pm.TRITON_STAT_ROWS and c["SPLIT_GRAIN"] == pm.TRITON_SPLIT_GRAIN
    assert c["GEMM_TILES"][0][1] == pm.TRITON_GEMM_BLOCK_N
    assert c["DGRAD_TILES"][0][:2] == (pm.TRITON_DGRAD_BLOCK_M, pm.TRITON_DGRAD_BLOCK_N)
    assert c["WGRAD_TILES"][0][:2] == (pm.TRITON_WGRAD_BLOCK_M, pm.TRITON_WGRAD_BLOCK_N)
    assert c["STATE_GEMM_TILES"][0][1] == pm.TRITON_STATE_BLOCK_N
    assert c["STATE_SPLIT_TILES"][0][1] == pm.TRITON_SPLIT_BLOCK_N
    assert c["CONV3X3_TILES"][0][1] == pm.TRITON_CONV3X3_BLOCK_N
    assert c["WGRAD3X3_TILES"][0][:2] == (pm.TRITON_WGRAD3X3_BLOCK,) * 2


def test_cuda_constants_match_the_sources():
    src = "".join((ROOT / "csrc" / "cuda" / name).read_text() for name in ("update_tail.cuh", "batchnorm.cuh"))

    def const(name: str) -> int:
        return int(re.search(rf"constexpr \w+ {name} = (\d+);", src).group(1))

    assert const("kOcPerThread") == pm.CUDA_CONV_OC_PER_THREAD
    assert const("kTileW") == pm.CUDA_CONV_TILE_W
    assert const("kConvThreadsTarget") == pm.CUDA_CONV_THREADS
    assert const("kMaxDirectK") == pm.CUDA_MAX_DIRECT_K
    assert const("kTargetBlocks") == pm.CUDA_REDUCE_TARGET_BLOCKS
    assert const("kMaxChunks") == pm.CUDA_REDUCE_MAX_CHUNKS
    assert const("kMinRowsPerThread") == pm.CUDA_REDUCE_MIN_ROWS_PER_THREAD
    assert re.search(r"TX = CL \? (\d+) : 1;", src).group(1) == str(pm.CUDA_REDUCE_TX)
    assert re.search(r"TY = CL \? (\d+) : 256;", src).group(1) == str(pm.CUDA_REDUCE_TY)
