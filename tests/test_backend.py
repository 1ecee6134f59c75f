"""Backend selection rules: per call > use_backend() > set_backend() > $RLA_EXT_BACKEND > auto."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rla_ext
from rla_ext import _backend
from rla_ext.ops import concat_conv_bn_act
from rla_testing import make_ccba_inputs


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("RLA_EXT_BACKEND", raising=False)
    rla_ext.set_backend(None)
    yield
    rla_ext.set_backend(None)


def test_precedence(monkeypatch):
    cpu = torch.device("cpu")
    assert rla_ext.get_backend() == "auto"
    monkeypatch.setenv("RLA_EXT_BACKEND", "torch")
    assert _backend.resolve(None, cpu) == "torch"
    rla_ext.set_backend("auto")
    assert rla_ext.get_backend() == "auto"
    with rla_ext.use_backend("torch"):
        assert rla_ext.get_backend() == "torch"
        with rla_ext.use_backend("auto"):
            assert rla_ext.get_backend() == "auto"
        assert rla_ext.get_backend() == "torch"
        assert _backend.resolve("auto", cpu) == rla_ext.available_backends("cpu")[0]
    assert rla_ext.get_backend() == "auto"


def test_auto_picks_fastest_available_on_cpu():
    expected = "cpp" if rla_ext.build_info()["cpp_compiled"] else "torch"
    assert _backend.resolve("auto", torch.device("cpu")) == expected
    assert rla_ext.available_backends("cpu")[0] == expected


def test_bad_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        rla_ext.set_backend("fast")
    with pytest.raises(ValueError, match="backend"):
        with rla_ext.use_backend("fast"):
            pass
    monkeypatch.setenv("RLA_EXT_BACKEND", "fast")
    with pytest.raises(ValueError, match="RLA_EXT_BACKEND"):
        rla_ext.get_backend()


def test_unavailable_backend_says_why_and_how():
    inp = make_ccba_inputs(2, 4, 2, 3, (2, 2), torch.float32, "cpu", "contiguous")
    with pytest.raises(rla_ext.BackendUnavailableError, match="'cuda' backend runs on CUDA tensors only"):
        concat_conv_bn_act(**inp, training=True, backend="cuda")
    assert "cuda" not in rla_ext.available_backends("cpu")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _backend.unavailable_reason("triton", "cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_environment_variable_selects_backend_in_a_fresh_process():
    code = ("import torch, rla_ext; from rla_ext import _backend; "
            "print(_backend.resolve(None, torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "RLA_EXT_BACKEND": "torch"})
    assert out.stdout.strip() == "torch"


def test_use_backend_routes_calls(monkeypatch):
    """The context manager really changes which implementation runs."""
    calls = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve",
                        lambda name, dev, *rest: calls.append(real(name, dev, *rest)) or calls[-1])
    inp = make_ccba_inputs(2, 4, 2, 3, (2, 2), torch.float32, "cpu", "contiguous")
    with rla_ext.use_backend("torch"):
        concat_conv_bn_act(**inp, training=True)
    concat_conv_bn_act(**inp, training=True, backend="torch")
    assert calls == ["torch", "torch"]


@pytest.mark.parametrize(("hw", "expected"), [((56, 56), 56), ((40, 40), 56), ((39, 39), 28), ((28, 28), 28),
                                              ((14, 14), 14), ((7, 7), 7), ((1, 1), 7), ((112, 8), 28)])
def test_size_class_is_the_nearest_stage_by_pixels(hw, expected):
    from rla_ext import _auto_table

    assert _auto_table.size_class(*hw) == expected


@pytest.mark.skipif(not _backend.triton_interpreter_on() or "cpp" not in rla_ext.available_backends("cpu"),
                    reason="needs two fused CPU backends: cpp and Triton's interpreter")
def test_auto_follows_the_measured_table_per_op_and_size(monkeypatch):
    from rla_ext import _auto_table

    cpu = torch.device("cpu")
    monkeypatch.setattr(_auto_table, "PREFERENCE", {("cpu", "rla_update", 28, "fwd+bwd"): ("triton", "cpp"),
                                                    ("cpu", "rla_update", 7, "fwd+bwd"): ("cuda", "cpp")})
    assert _backend.resolve("auto", cpu, "rla_update", (28, 28)) == "triton"
    assert _backend.resolve("auto", cpu, "rla_update", (30, 26)) == "triton"  # same size class
    assert _backend.resolve("auto", cpu, "rla_update", (14, 14)) == "cpp"  # no entry: static order
    assert _backend.resolve("auto", cpu, "concat_conv_bn_act", (28, 28)) == "cpp"  # other op
    assert _backend.resolve("auto", cpu, "rla_update", (7, 7)) == "cpp"  # unavailable entries fall through
    assert _backend.resolve("auto", cpu) == "cpp"  # no op given
    assert _backend.resolve("cpp", cpu, "rla_update", (28, 28)) == "cpp"  # explicit names are not reordered


def test_auto_takes_the_forward_entry_without_autograd(monkeypatch):
    """Inference (no_grad / inference_mode) and training are timed apart, and the fastest backend
    differs (on the CPU cpp wins every forward but loses some training passes to the reference)."""
    from rla_ext import _auto_table

    cpu = torch.device("cpu")
    monkeypatch.setattr(_auto_table, "PREFERENCE", {("cpu", "rla_update", 28, "fwd+bwd"): ("torch", "cpp"),
                                                    ("cpu", "rla_update", 28, "fwd"): ("cpp", "torch")})
    expected_fwd = "cpp" if "cpp" in rla_ext.available_backends("cpu") else "torch"
    assert _backend.resolve("auto", cpu, "rla_update", (28, 28)) == "torch"
    with torch.no_grad():
        assert _backend.resolve("auto", cpu, "rla_update", (28, 28)) == expected_fwd
    with torch.inference_mode():
        assert _backend.resolve("auto", cpu, "rla_update", (28, 28)) == expected_fwd
    assert _backend.auto_candidates("cpu", "rla_update", (28, 28), "fwd")[0] == "cpp"


def test_auto_takes_the_compiled_entry_while_torch_compile_traces(monkeypatch):
    from rla_ext import _auto_table

    monkeypatch.setattr(_auto_table, "PREFERENCE", {("cpu", "rla_update", 28, "fwd+bwd"): ("cpp", "torch"),
                                                    ("cpu", "rla_update", 28, "compiled fwd+bwd"): ("torch", "cpp")})
    assert _backend.auto_candidates("cpu", "rla_update", (28, 28))[0] == "cpp"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _backend.auto_candidates("cpu", "rla_update", (28, 28))[0] == "torch"


def test_auto_runs_the_reference_for_an_unmeasured_slower_op(monkeypatch):
    """The basic block's 3x3 entry: its cpp kernel measured slower than eager at small batches, so
    `auto` takes it only where the measured table says it won."""
    from rla_ext import _auto_table

    monkeypatch.setattr(_auto_table, "PREFERENCE", {})  # no measurement of the op
    assert _backend.auto_candidates("cpu", "concat_conv3x3_bn_act", (32, 32))[0] == "torch"
    monkeypatch.setattr(_auto_table, "PREFERENCE", {("cpu", "concat_conv3x3_bn_act", 28, "fwd+bwd"): ("cpp",
                                                                                                 "torch")})
    assert _backend.auto_candidates("cpu", "concat_conv3x3_bn_act", (32, 32))[0] == "cpp"
