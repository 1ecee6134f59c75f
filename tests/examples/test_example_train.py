"""examples/train.py: trains on the bundled digits, the loss falls, and the fused backends follow the
reference backend's loss trajectory."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rla_model_testing import kernel_problem
import rla_ext

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

pytest.importorskip("sklearn", reason="examples/train.py needs scikit-learn for its bundled digits data")
pytest.importorskip("tqdm", reason="examples/train.py shows a tqdm progress bar")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train.py"
FAST = ["--epochs", "1", "--max-steps", "25", "--batch-size", "32", "--threads", "1", "--no-progress",
        "--arch", "rla_resnet20", "--rla-channel", "8", "--size", "16"]


def _main():
    spec = importlib.util.spec_from_file_location("rla_train_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_script_runs_and_loss_falls(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *FAST, "--backend", "torch", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out accuracy" in proc.stdout
    losses = json.loads(out.read_text())["losses"]
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3


def _fused_params():
    params = []
    for b in rla_ext.available_backends("cpu"):
        if b == "torch":
            continue
        problem = kernel_problem(b)
        if b == "triton" and not problem:
            problem = "Triton runs on CPU only through its interpreter: too slow for a training run"
        params.append(pytest.param(b, marks=[pytest.mark.skip(reason=problem)] if problem else [], id=b))
    return params or [pytest.param("none", marks=pytest.mark.skip(reason="no fused CPU backend is built here "
                                                                          "(build the C++ extension for 'cpp')"))]


@pytest.mark.parametrize("backend", _fused_params())
def test_fused_backend_follows_reference_trajectory(backend):
    # float64 carries the real comparison: its rounding noise (1e-16) stayed below 1.5e-14 over 25 steps
    # (measured with oneDNN/ATen on their AVX-512 and forced AVX2 paths), so 1e-11 leaves a 700x margin
    # and still catches any gradient that is not the reference's.
    main = _main()
    steps = ["--max-steps", "10", "--lr", "0.02"]
    for dtype, tight_steps, loose in (("float64", 10, None), ("float32", 1, 0.1)):
        ref = main([*FAST, *steps, "--dtype", dtype, "--backend", "torch"])["losses"]
        fused = main([*FAST, *steps, "--dtype", dtype, "--backend", backend])["losses"]
        assert len(ref) == len(fused) == 10
        for i, (a, b) in enumerate(zip(ref, fused)):
            # float32: this small network amplifies rounding differences ~30x per step (the reference
            # alone differs by 2e-3 at step 4 between oneDNN's AVX2 and AVX-512 kernels, by up to 4e-2
            # from its own float64 run within 10 steps, and once by 1.6e-4 at step 2 from the cpp run
            # in a full-suite run), so only step 0 (the forward before any update) is held tight;
            # later steps get a loose bound ~3x the measured spread.
            tol = (1e-11 if dtype == "float64" else 1e-5) if i < tight_steps else loose
            assert abs(a - b) <= tol * abs(a), f"{dtype} step {i}: torch {a} vs {backend} {b}"


def test_amp_and_channels_last_run():
    res = _main()([*FAST, "--max-steps", "2", "--amp", "--channels-last", "--backend", "torch"])
    assert res["steps"] == 2 and all(x == x for x in res["losses"])


def test_recurrent_cell_variant_trains_and_plots(tmp_path):
    """A ConvGRU-cell RLA-ResNet (small config, 3 x 32 px digits) trains a few steps and writes the plot."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    backend = "cpp" if "cpp" in rla_ext.available_backends("cpu") else "torch"
    out, png = tmp_path / "run.json", tmp_path / "curves.png"
    args = ["--epochs", "1", "--max-steps", "6", "--batch-size", "16", "--threads", "1", "--no-progress",
            "--arch", "rlagru_small", "--rla-channel", "8", "--backend", backend, "--json", str(out),
            "--plot", str(png)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 6 and len(result["accuracy"]) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
