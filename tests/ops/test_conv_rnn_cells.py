"""conv_gru_cell / conv_lstm_cell: the fused cpp cells against the `torch` reference and the nn cells
(values and gradients, both memory formats, odd sizes), gradcheck in float64, NaN propagation,
bad-input errors, opcheck of the custom ops, and torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import rla_ext
import rla_ext._backend
from rla_ext.nn import ConvGRUCell, ConvLSTMCell
from rla_ext.ops import conv_gru_cell, conv_lstm_cell
from rla_testing import TOLERANCES, assert_close, opcheck_kernel_calls, to_format

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

CPP = [pytest.param("cpp", marks=pytest.mark.skipif(rla_ext._backend.unavailable_reason("cpp", "cpu") is not None,
                                                    reason="the cpp backend is not built"))]
# (N, C, k, (H, W)): odd sizes, N = 1, 1x1 maps (the 3x3 conv sees only padding around one pixel). The
# cpp cells run their convs over a transient cat(x, h) at these sizes; SEGMENT_CASE's concatenation is
# over 1 MiB (1.06 MiB in bf16 / fp16, 4.2 MiB in fp64), where they take the weight's segments instead
# (conv_over_cat in csrc/cpu/conv_cell.h).
CASES = [(2, 5, 4, (6, 7)), (1, 3, 2, (1, 1)), (3, 4, 3, (5, 2))]
SEGMENT_CASE = (2, 24, 16, (80, 83))
FORMATS = ["contiguous", "channels_last"]
CELLS = ["gru", "lstm"]
# Differentiable arguments of each op, in call order (names as the op's keywords).
GRU_ARGS = ("x", "h", "gate_weight", "gate_bias", "output_weight", "output_bias", "reset_norm_weight",
            "reset_norm_bias", "update_norm_weight", "update_norm_bias", "output_norm_weight", "output_norm_bias")
LSTM_ARGS = ("x", "h", "c", "weight", "bias")


def make_inputs(cell: str, n: int, c: int, k: int, hw: tuple[int, int], dtype: torch.dtype, fmt: str,
                seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    fan = (c + k) * 9
    out = dict(x=to_format(rnd(n, c, *hw), fmt), h=to_format(rnd(n, k, *hw), fmt))
    if cell == "gru":
        out.update(gate_weight=rnd(2 * k, c + k, 3, 3) * fan ** -0.5, gate_bias=0.1 * rnd(2 * k),
                   output_weight=rnd(k, c + k, 3, 3) * fan ** -0.5, output_bias=0.1 * rnd(k))
        for name in ("reset_norm", "update_norm", "output_norm"):
            out[f"{name}_weight"] = 1 + 0.3 * rnd(k)
            out[f"{name}_bias"] = 0.2 * rnd(k)
    else:
        out.update(c=to_format(rnd(n, k, *hw), fmt), weight=rnd(4 * k, c + k, 3, 3) * fan ** -0.5, bias=0.1 * rnd(4 * k))
    return out


def op_of(cell: str):
    return conv_gru_cell if cell == "gru" else conv_lstm_cell


def run(cell: str, inputs: dict, backend: str, seed: int = 1) -> tuple[list, dict]:
    """Outputs and the gradients of every input under a fixed random upstream gradient."""
    leaves = {k: None if v is None else v.detach().clone(memory_format=torch.preserve_format).requires_grad_()
              for k, v in inputs.items()}
    outs = op_of(cell)(**leaves, backend=backend)
    outs = [outs] if cell == "gru" else list(outs)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_fused_matches_reference(backend, cell, case, fmt, dtype):
    inputs = make_inputs(cell, *case, dtype, fmt, seed=case[0] * 7 + case[1])
    got, got_grads = run(cell, inputs, backend)
    ref, ref_grads = run(cell, inputs, "torch")
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m: f"output {i}: {m}")
        want = torch.channels_last if fmt == "channels_last" and case[3] != (1, 1) else torch.contiguous_format
        assert a.is_contiguous(memory_format=want)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, **TOLERANCES[dtype], msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", CELLS)
def test_segment_route_matches_reference(backend, cell, fmt):
    """SEGMENT_CASE in float64 (its large reductions are beyond fp32's per-element bar; the
    half-precision test below covers it in bf16 / fp16)."""
    test_fused_matches_reference(backend, cell, SEGMENT_CASE, fmt, torch.float64)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", [CASES[0], SEGMENT_CASE], ids=str)
def test_half_precision_within_the_reference_error(backend, cell, fmt, dtype, case):
    """bf16 / fp16 cells: every output and gradient at most 2x the reference's own error (both
    against a float64 run of the reference on the same rounded inputs) plus a small absolute term."""
    inputs = make_inputs(cell, *case, dtype, fmt, seed=3)
    got, got_grads = run(cell, inputs, backend)
    ref, ref_grads = run(cell, inputs, "torch")
    ref64, ref64_grads = run(cell, {k: v.double() for k, v in inputs.items()}, "torch")
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"output {i}", ref64[i])
    for name, g in ref_grads.items():
        assert_close(got_grads[name], g, dtype, f"grad of {name}", ref64_grads[name])


@pytest.mark.parametrize("cell", CELLS)
def test_reference_is_the_nn_cell(cell):
    """The op's reference computes exactly what rla_ext.nn.ConvGRUCell / ConvLSTMCell compute."""
    torch.manual_seed(0)
    x, h, c = torch.randn(2, 5, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    if cell == "gru":
        m = ConvGRUCell(5, 4, backend="torch")
        m.reset_gate_norm.weight.data.uniform_(0.5, 1.5)
        want = m(x, h)
        got = conv_gru_cell(x, h, m.gate_conv.weight, m.gate_conv.bias, m.output_conv.weight, m.output_conv.bias,
                            m.reset_gate_norm.weight, m.reset_gate_norm.bias, m.update_gate_norm.weight,
                            m.update_gate_norm.bias, m.output_norm.weight, m.output_norm.bias, backend="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        m = ConvLSTMCell(5, 4, backend="torch")
        want = m(x, (h, c))
        got = conv_lstm_cell(x, h, c, m.conv.weight, m.conv.bias, backend="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch"] + CPP)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(backend, cell, fmt):
    inputs = make_inputs(cell, 2, 2, 2, (3, 3), torch.float64, fmt, seed=3)
    names = list(inputs)

    def fn(*args):
        return op_of(cell)(**dict(zip(names, args)), backend=backend)

    args = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in inputs.values()]
    # fast_mode: one random projection of the Jacobian instead of every column (12 inputs for the GRU).
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("cell", CELLS)
def test_no_affine_no_bias_matches_reference(backend, cell):
    inputs = make_inputs(cell, 2, 3, 3, (4, 4), torch.float64, "channels_last")
    for name in list(inputs):
        if name.endswith("bias") or name.endswith("norm_weight"):
            inputs[name] = None
    inputs["h"] = inputs["h"].contiguous()  # another layout than x: the op conforms it to x
    got, got_grads = run(cell, inputs, backend)
    ref, ref_grads = run(cell, inputs, "torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("cell", CELLS)
def test_nan_propagates_as_in_reference(backend, cell):
    inputs = make_inputs(cell, 2, 3, 2, (4, 4), torch.float32, "contiguous")
    inputs["x"][0, 1, 2, 2] = float("nan")
    got, got_grads = run(cell, inputs, backend)
    ref, ref_grads = run(cell, inputs, "torch")
    for a, b in zip(got + list(got_grads.values()), ref + list(ref_grads.values())):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["torch"] + CPP)
def test_bad_inputs_name_the_argument(backend):
    gru = make_inputs("gru", 2, 3, 2, (4, 4), torch.float32, "contiguous")
    lstm = make_inputs("lstm", 2, 3, 2, (4, 4), torch.float32, "contiguous")
    cases = [
        ("gru", dict(h=gru["h"][:, :, :3]), "h"),
        ("gru", dict(h=gru["h"].double()), "h"),
        ("gru", dict(gate_weight=gru["gate_weight"][:3]), "gate_weight"),
        ("gru", dict(output_weight=gru["output_weight"][:, :, :1, :1]), "output_weight"),
        ("gru", dict(gate_bias=gru["gate_bias"][:3]), "gate_bias"),
        ("gru", dict(update_norm_weight=gru["update_norm_weight"][:1]), "update_norm_weight"),
        ("gru", dict(x=gru["x"][:, :, :, :0]), "x"),
        ("gru", dict(eps=-1.0), "eps"),
        ("lstm", dict(c=lstm["c"][:1]), "c"),
        ("lstm", dict(weight=lstm["weight"][:, :4]), "weight"),
        ("lstm", dict(bias=lstm["bias"].double()), "bias"),
        ("lstm", dict(x=lstm["x"].int()), "x"),
    ]
    for cell, change, name in cases:
        args = dict(gru if cell == "gru" else lstm, **change)
        with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
            op_of(cell)(**args, backend=backend)


@pytest.mark.parametrize("cell", CELLS)
def test_gpu_backends_route_to_reference(cell):
    """'triton' (CPU, through its interpreter in tests) has no cell kernels: the call runs the reference."""
    if rla_ext._backend.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("triton is not available on CPU here")
    inputs = make_inputs(cell, 2, 3, 2, (4, 4), torch.float64, "contiguous")
    got, _ = run(cell, inputs, "triton")
    ref, _ = run(cell, inputs, "torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(backend, fmt):
    """The custom ops, and the C++ kernel ops they call (torch.compile records those directly on cpp)."""
    with opcheck_kernel_calls("conv_gru_cell", backend), opcheck_kernel_calls("conv_lstm_cell", backend):
        _opcheck_cells(backend, fmt)


def _opcheck_cells(backend, fmt):
    gru = make_inputs("gru", 2, 3, 2, (4, 5), torch.float32, fmt)
    gamma, beta = torch.ones(6), torch.zeros(6)
    fwd = (gru["x"], gru["h"], gru["gate_weight"], gru["gate_bias"], gru["output_weight"], gru["output_bias"], gamma,
           beta, 1e-6, backend)
    torch.library.opcheck(torch.ops.rla_ext.conv_gru_cell_fwd.default, fwd)
    out, zg, zo, stats = torch.ops.rla_ext.conv_gru_cell_fwd(*fwd)
    torch.library.opcheck(torch.ops.rla_ext.conv_gru_cell_bwd.default,
                          (torch.randn_like(out), gru["x"], gru["h"], gru["gate_weight"], gru["output_weight"], gamma,
                           beta, zg, zo, stats, backend))
    lstm = make_inputs("lstm", 2, 3, 2, (4, 5), torch.float32, fmt)
    fwd = (lstm["x"], lstm["h"], lstm["c"], lstm["weight"], lstm["bias"], backend)
    torch.library.opcheck(torch.ops.rla_ext.conv_lstm_cell_fwd.default, fwd)
    h2, c2, z = torch.ops.rla_ext.conv_lstm_cell_fwd(*fwd)
    torch.library.opcheck(torch.ops.rla_ext.conv_lstm_cell_bwd.default,
                          (torch.randn_like(h2), torch.randn_like(c2), lstm["x"], lstm["h"], lstm["c"],
                           lstm["weight"], z, c2, backend))


def _two_steps(x, h, c, gru, lstm, backend):
    """A GRU step feeding an LSTM step, as the recurrent models chain cells."""
    h1 = conv_gru_cell(x, h, **gru, backend=backend)
    h2, c2 = conv_lstm_cell(x, h1, c, **lstm, backend=backend)
    return h2.square().mean() + c2.mean()


@pytest.mark.parametrize("backend", CPP)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g0 = make_inputs("gru", 2, 3, 2, (4, 4), torch.float32, "channels_last")
    l0 = make_inputs("lstm", 2, 3, 2, (4, 4), torch.float32, "channels_last")
    results = []
    for compiled in (False, True):
        gru = {k: v.clone().requires_grad_() for k, v in g0.items()}
        lstm = {k: v.clone().requires_grad_() for k, v in l0.items()}
        x, h, c = gru.pop("x"), gru.pop("h"), lstm.pop("c")
        del lstm["x"], lstm["h"]
        fn = torch.compile(_two_steps, fullgraph=True, backend="aot_eager") if compiled else _two_steps
        loss = fn(x, h, c, gru, lstm, backend)
        loss.backward()
        results.append((loss.detach(), x.grad, h.grad, c.grad, gru["gate_weight"].grad, lstm["weight"].grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def _small_model_counting_cell_calls(cell: str, backend: str, monkeypatch) -> tuple[torch.nn.Module, list]:
    """A two-block GRU / LSTM RLA-ResNet and the list that grows by one per fused cell-op call."""
    import sys

    from rla_ext.models import RLAgru_ResNet, RLAlstm_ResNet

    mod = sys.modules[f"rla_ext.ops.conv_{cell}_cell"]
    fn = mod.ConvGRUCellFunction if cell == "gru" else mod.ConvLSTMCellFunction
    calls = []
    real = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: calls.append(1) or real(*a))
    cls = RLAgru_ResNet if cell == "gru" else RLAlstm_ResNet
    return cls((1, 1), num_classes=3, rla_channel=4, widths=(4, 8), backend=backend), calls


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("cell", CELLS)
def test_models_cells_take_the_fused_op(backend, cell, monkeypatch):
    """The GRU / LSTM RLA-ResNets' cells run the fused cell op on a fused backend, the plain step on torch."""
    m, calls = _small_model_counting_cell_calls(cell, backend, monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert len(calls) == 2  # one cell step per block
    m.set_backend("torch")
    torch.testing.assert_close(m(x), out, **TOLERANCES[torch.float32])
    assert len(calls) == 2


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("cell", CELLS)
def test_auto_takes_the_fused_cell(backend, cell, monkeypatch):
    """auto: the fused cell in training steps and without grad alike (both measured faster); the named
    backend gets it too, and the reference backend never does."""
    m, calls = _small_model_counting_cell_calls(cell, "auto", monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        m(x)
    assert len(calls) == 4
    m.set_backend(backend)
    m(x)
    assert len(calls) == 6
    m.set_backend("torch")
    m(x)
    assert len(calls) == 6
