"""rla_update_and_entry (the block boundary): every backend that has it against the composition of
rla_update and concat_conv_bn_act on the `torch` reference (values, running statistics, every gradient),
gradcheck in float64, the custom ops (opcheck, torch.compile), the shared read of y, bad input, and
the cuda backend's refusal of CPU tensors (its kernels run under the emulator: tests/csrc/emulate)."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext.ops import concat_conv_bn_act, rla_update, rla_update_and_entry
from rla_ext.ops.rla_update_and_entry import FUSED
from rla_testing import (HALF, assert_close, dtype_supported, is_interpreted, make_update_inputs,
                          opcheck_kernel_calls, param_dtype)

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

_OP = "rla_update_and_entry"
BACKENDS = ["torch"] + [b for b in rla_ext.available_backends("cpu") if b in FUSED]
FORMATS = ["contiguous", "channels_last"]
# (N, C, k, C_entry, (H, W) of y): odd sizes (pooling then drops h's last row / column), N=1, H=W=1;
# the last has fewer pixel rows than C, where the cpp kernel runs one GEMM per weight in channels_last
# (csrc/cpu/rla_update_and_entry.cpp, per_weight_gemms), the others one over the stacked weight.
CASES = [(2, 8, 4, 6, (4, 4)), (1, 5, 3, 7, (3, 5)), (3, 7, 2, 3, (1, 1)), (1, 20, 3, 7, (3, 3))]
UPDATE = ("out_weight", "bn_weight", "bn_bias", "running_mean", "running_var", "rec_weight")
ENTRY = ("entry_weight", "entry_bn_weight", "entry_bn_bias", "entry_running_mean", "entry_running_var")
DIFFERENTIABLE = ("h", "y", "out_weight", "bn_weight", "bn_bias", "rec_weight", "entry_weight", "entry_bn_weight",
                  "entry_bn_bias")


def make_inputs(n, c, k, ce, hw, pool, dtype, fmt, seed=0, affine=True):
    """rla_update's inputs (rla_testing.make_update_inputs) plus the next block's entry."""
    inp = make_update_inputs(n, c, k, hw, pool, dtype, "cpu", fmt, seed=seed, affine=affine)
    g = torch.Generator().manual_seed(seed + 1000)
    pd = param_dtype(dtype)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    inp.update(entry_weight=rnd(ce, c + k, 1, 1) * (c + k) ** -0.5,
               entry_bn_weight=1 + 0.3 * rnd(ce, dt=pd) if affine else None,
               entry_bn_bias=0.2 * rnd(ce, dt=pd) if affine else None,
               entry_running_mean=0.1 * rnd(ce, dt=pd),
               entry_running_var=(0.5 + torch.rand(ce, generator=g, dtype=torch.float64)).to(pd))
    return inp


def clone(inp, dtype=None):
    out = {}
    for name, t in inp.items():
        if t is not None:
            t = t.detach().clone(memory_format=torch.preserve_format)
            t = t.to(dtype) if dtype is not None else t
            t.requires_grad_(name in DIFFERENTIABLE)
        out[name] = t
    return out


def composition(inp, *, pool=False, pool_mode="floor", training, momentum=0.1, eps=1e-5, entry_momentum=0.1,
                entry_eps=1e-5, activation="relu", backend=None):
    """What the boundary op must equal: rla_update, then concat_conv_bn_act(y, h_next)."""
    h_next = rla_update(inp["h"], inp["y"], *(inp[n] for n in UPDATE), pool=pool, pool_mode=pool_mode,
                        training=training, momentum=momentum, eps=eps, backend=backend)
    out = concat_conv_bn_act(inp["y"], h_next, *(inp[n] for n in ENTRY), training=training, momentum=entry_momentum,
                             eps=entry_eps, activation=activation, backend=backend)
    return h_next, out


def fused(inp, **kw):
    return rla_update_and_entry(inp["h"], inp["y"], *(inp[n] for n in UPDATE), *(inp[n] for n in ENTRY), **kw)


def run(fn, inp, **kw):
    """Forward + backward with fixed random upstream gradients into both outputs; returns
    ({outputs, gradients, running statistics by name})."""
    h_next, out = fn(inp, **kw)
    g = torch.Generator().manual_seed(7)
    gh = torch.randn(h_next.shape, generator=g, dtype=torch.float64).to(h_next.dtype)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    ((h_next * gh).sum() + (out * go).sum()).backward()
    res = {"h_next": h_next.detach(), "entry_out": out.detach()}
    res.update({f"grad of {n}": t.grad for n, t in inp.items() if t is not None and t.requires_grad})
    res.update({n: inp[n] for n in ("running_mean", "running_var", "entry_running_mean", "entry_running_var")
                if inp[n] is not None})
    return res


def compare(inp, backend, dtype, **kw):
    got = run(fused, clone(inp), backend=backend, **kw)
    ref = run(composition, clone(inp), backend="torch", **kw)
    ref64 = run(composition, clone(inp, torch.float64), backend="torch", **kw) if dtype in HALF else None
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], dtype, name, ref64[name] if ref64 else None)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_composition(backend, dtype, fmt, training, pool, case):
    n, c, k, ce, hw = case
    inp = make_inputs(n, c, k, ce, hw, pool, dtype, fmt, seed=n * 17 + c)
    got = compare(inp, backend, dtype, pool=pool, training=training, momentum=0.1, entry_momentum=0.3)
    want = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    assert got["h_next"].is_contiguous(memory_format=want) and got["entry_out"].is_contiguous(memory_format=want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", sorted(HALF, key=str), ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_half_matches_composition(backend, dtype, fmt):
    if not dtype_supported(backend, "cpu", dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    inp = make_inputs(2, 9, 4, 5, (3, 4), True, dtype, fmt, seed=3)
    compare(inp, backend, dtype, pool=True, training=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_options(backend, affine):
    """activation "none", no affine parameters, no running statistics (training), eps / momentum per BN,
    2-D weights, h in another memory format than y, pool_mode="ceil" at an odd side."""
    inp = make_inputs(2, 6, 3, 5, (3, 3), True, torch.float64, "channels_last", affine=affine)
    inp["running_mean"] = inp["running_var"] = inp["entry_running_mean"] = inp["entry_running_var"] = None
    inp["h"] = inp["h"].contiguous()
    inp["out_weight"] = inp["out_weight"][:, :, 0, 0]
    inp["entry_weight"] = inp["entry_weight"][:, :, 0, 0]
    compare(inp, backend, torch.float64, pool=True, training=True, momentum=0.2, eps=1e-3, entry_momentum=0.05,
            entry_eps=1e-2, activation="none")
    inp = make_inputs(2, 6, 3, 5, (3, 3), False, torch.float64, "contiguous", affine=affine)
    inp["h"] = torch.randn(2, 3, 5, 5, dtype=torch.float64)  # ceil(5 / 2) = 3
    compare(inp, backend, torch.float64, pool=True, pool_mode="ceil", training=True)


def test_cpp_matches_cpp_composition():
    """The fused kernel against the two cpp ops it replaces (float32, RLA-like channel ratios)."""
    if "cpp" not in BACKENDS:
        pytest.skip("the cpp backend is not built")
    inp = make_inputs(4, 64, 8, 16, (6, 6), True, torch.float32, "channels_last", seed=5)
    got = run(fused, clone(inp), backend="cpp", pool=True, training=True)
    ref = run(composition, clone(inp), backend="cpp", pool=True, training=True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
def test_gradcheck_float64(backend, training, pool):
    inp = clone(make_inputs(1, 3, 2, 2, (3, 1) if pool else (3, 2), pool, torch.float64, "channels_last"))
    names = list(DIFFERENTIABLE)

    def fn(*args):
        kw = dict(inp, **dict(zip(names, args)))
        for n in ("running_mean", "running_var", "entry_running_mean", "entry_running_var"):
            kw[n] = inp[n].detach().clone()
        return fused(kw, pool=pool, training=training, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names),
                                    fast_mode=is_interpreted(backend, "cpu"))


def _canonical(fmt):
    inp = make_inputs(2, 5, 3, 4, (3, 3), True, torch.float32, fmt)
    return (inp["h"], inp["y"], inp["out_weight"][:, :, 0, 0].contiguous(), inp["bn_weight"], inp["bn_bias"],
            inp["running_mean"], inp["running_var"], inp["rec_weight"], inp["entry_weight"][:, :, 0, 0].contiguous(),
            inp["entry_bn_weight"], inp["entry_bn_bias"], inp["entry_running_mean"], inp["entry_running_var"])


def _cpp_only():
    if "cpp" not in BACKENDS:
        pytest.skip("the cpp backend is not built")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(fmt, training):
    """The custom ops, and the C++ kernel ops they call on cpp (torch.compile records those directly)."""
    _cpp_only()
    args = _canonical(fmt)
    opts = (True, training, 0.1, 1e-5, 0.2, 1e-3, True, "cpp")
    torch.library.opcheck(torch.ops.rla_ext.rla_update_and_entry_fwd.default, args + opts)
    with opcheck_kernel_calls(_OP):
        h_next, s, mean, var, out, z, emean, evar = torch.ops.rla_ext.rla_update_and_entry_fwd(*args, *opts)
        h, y, wo, g, b, _, _, wr, we, ge, be, _, _ = args
        torch.library.opcheck(torch.ops.rla_ext.rla_update_and_entry_bwd.default,
                              (torch.randn_like(h_next), torch.randn_like(out), h, y, wo, g, b, wr, s, mean, var,
                               h_next, we, ge, be, z, emean, evar, True, 1e-5, 1e-3, True, training, "cpp"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    inp0 = make_inputs(2, 5, 3, 6, (4, 4), True, torch.float32, "channels_last")

    def step(inp):
        h_next, out = fused(inp, pool=True, training=True, backend=backend)
        return out.sum((2, 3)).mean() + h_next.square().mean()

    results = []
    for compiled in (False, True):
        inp = clone(inp0)
        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        loss = fn(inp)
        loss.backward()
        results.append([loss.detach()] + [inp[n].grad for n in DIFFERENTIABLE]
                       + [inp["running_var"], inp["entry_running_mean"]])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_cpp_reads_y_once_each_way():
    """The cpp kernel's forward runs one GEMM over y (the stacked weight, C_entry + k outputs); backward
    one dgrad GEMM into y and one weight-gradient pass over y, where the two ops run two of each."""
    _cpp_only()
    # Shapes where every 1x1 conv takes oneDNN's convolution (pixel rows >= channels; see conv1x1_new and
    # weight_grad_by_onednn in csrc/cpu/common.h), so each read of y shows up as one profiled call.
    n, c, k, ce, hw = 2, 40, 4, 12, (5, 5)

    def count_y_convs(fn):
        inp = clone(make_inputs(n, c, k, ce, hw, False, torch.float32, "channels_last"))
        with torch.profiler.profile(record_shapes=True) as prof:
            h_next, out = fn(inp, training=True, backend="cpp")
            (h_next.sum() + out.sum()).backward()
        # The GEMM-like calls that read y (input [n, c, ...]) or write its gradient (output channels c).
        y_shape = [n, c, *hw]
        calls = [e for e in prof.events() if e.name in ("aten::convolution", "aten::convolution_backward",
                                                        "aten::addmm", "aten::mm", "aten::mm_out")]
        return [e.name for e in calls if y_shape in e.input_shapes or any(
            len(s) == 4 and s[0] == c and s[2:] == [1, 1] for s in e.input_shapes[1:2])]

    fused_reads = count_y_convs(fused)
    # forward: the stacked GEMM; backward: the dgrad (oneDNN's backward-data with the stacked weight:
    # rows <= 4c here, see conv1x1_input_grad) and one weight-gradient pass.
    assert sorted(fused_reads) == ["aten::convolution", "aten::convolution_backward",
                                   "aten::convolution_backward"], fused_reads
    two_ops = count_y_convs(composition)
    assert len(two_ops) == 2 * len(fused_reads), two_ops


def _args(**over):
    inp = make_inputs(2, 5, 3, 4, (3, 3), False, torch.float32, "contiguous")
    inp.update(over)
    return inp


@pytest.mark.parametrize("over,exc,match", [
    (dict(entry_weight=torch.randn(4, 7)), ValueError, r"entry_weight: expected 8 input channels \(C \+ k = 5 \+ 3\)"),
    (dict(entry_weight=torch.randn(4, 8, 3, 3)), ValueError, "entry_weight: expected a 1x1 kernel"),
    (dict(entry_weight=torch.randn(4, 8, dtype=torch.float64)), TypeError, "entry_weight: expected dtype"),
    (dict(entry_bn_weight=torch.ones(5)), ValueError, "entry_bn_weight: expected 4 values"),
    (dict(entry_running_var=None), ValueError, "entry_running_mean, entry_running_var: give both or neither"),
    (dict(out_weight=torch.randn(3, 6)), ValueError, "out_weight: expected 5 input channels"),
    (dict(bn_bias=torch.ones(4)), ValueError, "bn_bias: expected 3 values"),
    (dict(h=torch.randn(2, 3, 4, 3)), ValueError, "h: shape"),
    (dict(y=torch.randn(0, 5, 3, 3), h=torch.randn(0, 3, 3, 3)), ValueError, "non-empty"),
    (dict(y=torch.randn(1, 5, 1, 1), h=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, over, exc, match):
    with pytest.raises(exc, match=match):
        fused(_args(**over), training=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options(backend):
    with pytest.raises(TypeError, match="entry_momentum: expected a float"):
        fused(_args(), training=True, entry_momentum=None, backend=backend)
    with pytest.raises(ValueError, match="entry_eps: expected a non-negative value"):
        fused(_args(), training=True, entry_eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="activation"):
        fused(_args(), training=True, activation="gelu", backend=backend)
    with pytest.raises(ValueError, match="entry_running_mean, entry_running_var: required when training=False"):
        fused(_args(entry_running_mean=None, entry_running_var=None), training=False, backend=backend)


def test_cuda_backend_refuses_cpu_tensors():
    """The cuda backend has kernels now; on CPU tensors it is unavailable as every op's cuda backend is."""
    with pytest.raises(rla_ext.BackendUnavailableError, match="'cuda' backend runs on CUDA tensors only"):
        fused(_args(), training=True, backend="cuda")


def test_auto_picks_a_backend_it_has():
    inp = make_inputs(2, 5, 3, 4, (3, 3), False, torch.float64, "contiguous")
    got = fused(clone(inp), training=True, backend="auto")
    ref = composition(clone(inp), training=True, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_autocast_dtype(backend):
    """Under CPU autocast (bfloat16) activations and the three conv weights run in bfloat16, like the two
    ops under autocast; the result is as close to the float64 composition as theirs."""
    if not dtype_supported(backend, "cpu", torch.bfloat16):
        pytest.skip(f"{backend} on CPU does not run bfloat16")
    inp = make_inputs(2, 9, 4, 5, (3, 4), True, torch.float32, "channels_last", seed=11)
    ref64 = composition(clone(inp, torch.float64), pool=True, training=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(clone(inp), pool=True, training=True, backend=backend)
        eager = composition(clone(inp), pool=True, training=True, backend="torch")
    for g, e, r in zip(got, eager, ref64):
        assert g.dtype == e.dtype == torch.bfloat16
        assert_close(g, e, torch.bfloat16, "autocast output", r)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_cpu_isa_variant(fmt):
    """The kernel's hot loops (the shared BatchNorm passes and pooling) under every instruction-set variant
    this CPU runs (csrc/cpu/isa.h), against the composition on the reference."""
    _cpp_only()
    ops = torch.ops.rla_ext
    isas = ("default", "avx2", "avx512")
    start = ops.cpu_isa()
    inp = make_inputs(2, 24, 8, 20, (9, 7), True, torch.float32, fmt, seed=4)
    try:
        for isa in isas[:isas.index(ops.cpu_isa_supported()) + 1]:
            ops.set_cpu_isa(isa)
            compare(inp, "cpp", torch.float32, pool=True, training=True)
    finally:
        ops.set_cpu_isa(start)


def test_eager_fast_path_and_dispatch_modes():
    """Plain eager calls run the kernels without the custom-op dispatcher; a dispatch mode sees the C++
    kernel ops (cpp traces them directly) and not the custom ops; fake tensors go through the kernel ops'
    fake kernels (rla_ext.ops._kernels.eager_fast_path)."""
    _cpp_only()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    inp = make_inputs(2, 6, 4, 5, (3, 4), True, torch.float32, "channels_last")

    def loss(i):
        h_next, out = fused(i, pool=True, training=True, backend="cpp")
        return h_next.sum() + out.sum()

    with torch.profiler.profile() as prof:
        loss(clone(inp)).backward()
    events = {e.name for e in prof.events()}
    assert {f"rla_ext::{_OP}_kernel_fwd", f"rla_ext::{_OP}_kernel_bwd"} <= events
    assert not {f"rla_ext::{_OP}_fwd", f"rla_ext::{_OP}_bwd"} & events

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.name()))
            return func(*args, **(kwargs or {}))

    log = Log()
    with log:
        loss(clone(inp)).backward()
    assert f"rla_ext::{_OP}_kernel_fwd" in log.names and f"rla_ext::{_OP}_kernel_bwd" in log.names
    assert f"rla_ext::{_OP}_fwd" not in log.names and f"rla_ext::{_OP}_bwd" not in log.names

    expected = fused(clone(inp), pool=True, training=True, backend="cpp")
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) if t is not None else None for n, t in inp.items()}
        got = fused(fake, pool=True, training=True, backend="cpp")
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.is_contiguous(memory_format=torch.channels_last)



def _python_and_cpp_paths(monkeypatch, fn):
    """fn() on the C++ autograd path (csrc/autograd.cpp, rla_ext::rla_update_and_entry_autograd), then on the
    Python Function path; asserts which ran each time."""
    from rla_ext.ops import _kernels

    with torch.profiler.profile() as prof:
        got = fn()
    assert f"rla_ext::{_OP}_autograd" in {e.name for e in prof.events()}
    monkeypatch.setattr(_kernels, "CPP_AUTOGRAD_BACKENDS", ())
    with torch.profiler.profile() as prof:
        ref = fn()
    assert f"rla_ext::{_OP}_autograd" not in {e.name for e in prof.events()}
    monkeypatch.undo()
    return got, ref


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "contiguous"), (torch.float32, "channels_last"),
                                       (torch.float64, "contiguous"), (torch.bfloat16, "channels_last")])
def test_cpp_autograd_is_the_python_path_bitwise(monkeypatch, training, pool, dtype, fmt):
    """Both outputs, every gradient and both running-statistics pairs, bit for bit (same kernels, same
    arguments); the last case has fewer pixel rows than C (the per-weight GEMM route)."""
    _cpp_only()
    for case in (CASES[0], CASES[-1]):
        inp = make_inputs(*case, pool, dtype, fmt, seed=3)
        # Distinct momenta and eps, so no BatchNorm's argument can stand in for the other's.
        got, ref = _python_and_cpp_paths(monkeypatch, lambda: run(
            fused, clone(inp), pool=pool, training=training, momentum=0.2, eps=2e-5, entry_momentum=0.05,
            entry_eps=1e-3, backend="cpp"))
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
            assert got[name].stride() == ref[name].stride(), name


def test_cpp_autograd_one_output_in_the_loss_no_grad_and_inference_mode(monkeypatch):
    """Only h_next, or only the entry's output, in the loss (the other output's gradient is zero); the
    forward alone under no_grad and inference_mode (running statistics still updated, nothing recorded)."""
    _cpp_only()
    inp = make_inputs(2, 6, 4, 5, (3, 4), True, torch.float64, "channels_last", seed=5)
    for which in (0, 1):
        def one_output():
            i = clone(inp)
            outs = fused(i, pool=True, training=True, backend="cpp")
            outs[which].sum().backward()
            return {n: t.grad for n, t in i.items() if t is not None and t.requires_grad}

        got, ref = _python_and_cpp_paths(monkeypatch, one_output)
        for name in ref:
            assert torch.equal(got[name], ref[name]), (which, name)
    for context in (torch.no_grad, torch.inference_mode):
        def forward_only():
            with context():
                i = clone(inp)
                return fused(i, pool=True, training=True, backend="cpp"), i["running_var"], i["entry_running_var"]

        (outs, rv, erv), (ref_outs, ref_rv, ref_erv) = _python_and_cpp_paths(monkeypatch, forward_only)
        assert all(o.grad_fn is None for o in outs)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
        assert torch.equal(rv, ref_rv) and torch.equal(erv, ref_erv)
