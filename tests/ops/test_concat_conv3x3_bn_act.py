"""concat_conv3x3_bn_act (the basic-block entry): the fused backend against the `torch` reference and
both against the composition written here (conv2d over torch.cat + batch_norm + relu), running
statistics against nn.BatchNorm2d, gradcheck in float64, the custom ops (opcheck, fake kernels,
torch.compile), the eager fast path, autocast, the empty batch, the synchronised path, and every
validation error."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import rla_ext
from rla_ext.nn._bn_args import bn_args
from rla_ext.ops import concat_conv3x3_bn_act
from rla_ext.ops.concat_conv3x3_bn_act import FUSED as OP_FUSED
from rla_testing import (opcheck_kernel_calls, assert_close, clone_inputs, compare_with_reference, fused_backends, make_entry3x3_inputs,
                         run_op)

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

FUSED = [b for b in fused_backends("cpu") if b in OP_FUSED]  # the op's fused backends that run on the CPU
BACKENDS = ["torch"] + FUSED


def fused_device_params() -> list:
    """(backend, device): the op's fused backends on every device here (cuda on a GPU machine)."""
    params = [(b, d) for d in ("cpu", "cuda") for b in fused_backends(d) if b in OP_FUSED]
    return params or [pytest.param("none", "cpu", marks=pytest.mark.skip(reason="no fused backend of this op"))]
FORMATS = ["contiguous", "channels_last"]
# (N, C, k, C_out, (H, W)): odd sizes, N=1, 1x1 images, primes. The cpp kernel
# (csrc/cpu/concat_conv3x3_bn_act.cpp, conv_over_cat) runs them all as one conv over a transient cat(x, h)
# (the concatenation at most 1 MiB); SEGMENT_CASE takes its other route, two convs over the weight's
# segments (the concatenation 1.5 MiB in bf16 / fp16, 3.1 MiB in fp32, 6.2 MiB in fp64).
CASES = [(2, 8, 4, 6, (7, 5)), (1, 3, 2, 5, (5, 3)), (3, 5, 1, 7, (1, 1))]
SEGMENT_CASE = (2, 60, 40, 7, (63, 64))


def composition(x, h, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, training, momentum=0.1,
                eps=1e-5, activation="relu", backend=None, split=False):
    """The op as eager PyTorch writes it: the concatenation, one conv, BatchNorm, ReLU. `split`: the conv
    as the fused kernels compute it, two convolutions over x's and h's weight columns, summed (what
    RLABasicBlock's entry computed in plain PyTorch)."""
    if split:
        c = x.shape[1]
        z = (F.conv2d(x, weight[:, :c], stride=stride, padding=1)
             + F.conv2d(h, weight[:, c:], stride=stride, padding=1))
    else:
        z = F.conv2d(torch.cat((x, h), 1), weight, stride=stride, padding=1)
    out = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(out) if activation == "relu" else out


def _fmt(fmt: str) -> torch.memory_format:
    return torch.channels_last if fmt == "channels_last" else torch.contiguous_format


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend,device", fused_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_matches_reference(backend, device, dtype, fmt, training, stride, case):
    """Output, every gradient and the running statistics against the `torch` reference."""
    n, c, k, co, hw = case
    inputs = make_entry3x3_inputs(n, c, k, co, hw, dtype, fmt, seed=n * 31 + c + stride, device=device)
    out = compare_with_reference(concat_conv3x3_bn_act, inputs, backend, dtype, stride=stride, training=training,
                                 momentum=0.1, eps=1e-5, activation="relu")
    assert out.shape == (n, co, (hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
    assert out.is_contiguous(memory_format=_fmt(fmt))


@pytest.mark.parametrize("backend,device", fused_device_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_segment_route_matches_reference(backend, device, fmt, training, stride):
    """SEGMENT_CASE in float64 (its 8064-pixel weight-gradient sums are beyond fp32's per-element bar;
    the half-precision test below covers it in bf16 / fp16)."""
    test_fused_matches_reference(backend, device, torch.float64, fmt, training, stride, SEGMENT_CASE)


@pytest.mark.parametrize("backend,device", fused_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", CASES + [SEGMENT_CASE], ids=str)
def test_half_precision_within_twice_eager_error(backend, device, dtype, fmt, training, stride, case):
    """bf16 / fp16: the error of the output, every gradient and the running statistics against the float64
    reference (the composition over the concatenation) is at most twice that of eager PyTorch computing
    the same thing in the same dtype, plus atol (rla_testing.assert_close).

    "The same thing" is the split composition: z = conv(x, W[:, :C]) + conv(h, W[:, C:]) rounds z up to
    three times where one conv over cat(x, h) rounds it once, and where a BN output lies within that
    rounding of 0 the ReLU mask differs from the reference's, moving one gradient element by its full
    size (seen in ~5% of random bf16 cases against the concatenated reference). The CUDA kernels and the
    cpp kernel's segment route reproduce the split composition's z bit for bit, and the cpp kernel's
    route over a transient cat rounds z once, as the reference does, so this bar is about the fused
    kernels' own error."""
    n, c, k, co, hw = case
    inputs = make_entry3x3_inputs(n, c, k, co, hw, dtype, fmt, seed=n * 31 + c + stride, device=device)
    kw = dict(stride=stride, training=training, momentum=0.1, eps=1e-5)
    got = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, **kw)
    eager = run_op(composition, clone_inputs(inputs), split=True, **kw)
    ref64 = run_op(concat_conv3x3_bn_act, clone_inputs(inputs, torch.float64), backend="torch", **kw)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=_fmt(fmt))
    assert_close(got[0], eager[0], dtype, "output", ref64[0])
    for part in (1, 2):
        for name in eager[part]:
            assert_close(got[part][name], eager[part][name], dtype, name, ref64[part][name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_composition_written_here(backend, dtype, fmt, training, stride):
    inputs = make_entry3x3_inputs(2, 6, 3, 5, (7, 5), dtype, fmt, seed=7 + stride)
    kw = dict(stride=stride, training=training, momentum=0.1, eps=1e-5)
    got_out, got_grads, got_stats = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, **kw)
    out, grads, stats = run_op(composition, clone_inputs(inputs), **kw)
    assert_close(got_out, out, dtype, "output")
    for name in grads:
        assert_close(got_grads[name], grads[name], dtype, f"grad of {name}")
    for name in stats:
        assert_close(got_stats[name], stats[name], dtype, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", [True, False])
def test_activation_none_no_affine_no_running_stats_mixed_layouts(backend, affine, running):
    inputs = make_entry3x3_inputs(2, 5, 3, 4, (5, 6), torch.float64, "channels_last", affine=affine)
    if not running:
        inputs["running_mean"] = inputs["running_var"] = None
    inputs["h"] = inputs["h"].contiguous()  # h in another layout than x: the op conforms it to x
    compare_with_reference(concat_conv3x3_bn_act, inputs, backend, torch.float64, stride=2, training=True,
                           momentum=0.3, eps=1e-3, activation="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_semantics_match_nn_batchnorm(backend, momentum):
    """Running statistics (momentum None: the cumulative average, resolved by the module's bookkeeping
    as for the other ops) and the eval output equal nn.BatchNorm2d's over a few steps (float64)."""
    w = make_entry3x3_inputs(3, 4, 2, 5, (5, 5), torch.float64, "contiguous")["weight"]
    ref = torch.nn.BatchNorm2d(5, momentum=momentum).double()
    mine = torch.nn.BatchNorm2d(5, momentum=momentum).double()
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        h = torch.randn(3, 2, 5, 5, dtype=torch.float64)
        expected = F.relu(ref(F.conv2d(torch.cat((x, h), 1), w, stride=2, padding=1)))
        a = bn_args(mine)
        got = concat_conv3x3_bn_act(x, h, w, a.weight, a.bias, a.running_mean, a.running_var, stride=2,
                                    training=a.training, momentum=a.momentum, eps=a.eps, backend=backend)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(mine.running_mean, ref.running_mean)
        torch.testing.assert_close(mine.running_var, ref.running_var)
    ref.eval()
    mine.eval()
    a = bn_args(mine)
    torch.testing.assert_close(
        concat_conv3x3_bn_act(x, h, w, a.weight, a.bias, a.running_mean, a.running_var, stride=2,
                              training=a.training, momentum=a.momentum, eps=a.eps, backend=backend),
        F.relu(ref(F.conv2d(torch.cat((x, h), 1), w, stride=2, padding=1))))


@pytest.mark.parametrize("backend", FUSED)
def test_no_concatenation_is_saved_for_backward(backend):
    """What autograd keeps: x, h, the weight, z and statistics, never a (N, C + k, H, W) tensor."""
    inputs = clone_inputs(make_entry3x3_inputs(2, 6, 3, 5, (6, 6), torch.float32, "channels_last"))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        concat_conv3x3_bn_act(**inputs, training=True, backend=backend)
    assert shapes and (2, 9, 6, 6) not in shapes, shapes


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + fused_device_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(backend, device, fmt, training, stride):
    inp = clone_inputs(make_entry3x3_inputs(2, 2, 2, 3, (3, 4), torch.float64, fmt, device=device))
    names = ["x", "h", "weight", "bn_weight", "bn_bias"]

    def fn(*args):
        kw = dict(zip(names, args))
        # Fresh running stats per call: gradcheck re-runs forward many times.
        return concat_conv3x3_bn_act(**kw, running_mean=inp["running_mean"].detach().clone(),
                                     running_var=inp["running_var"].detach().clone(), stride=stride,
                                     training=training, backend=backend, activation="none")

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


# ------------------------------------------------------------------------------------------- custom ops
def _canonical(fmt: str):
    inp = make_entry3x3_inputs(2, 5, 3, 4, (5, 4), torch.float32, fmt)
    return (inp["x"], inp["h"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
            inp["running_var"])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck_forward(backend, fmt, training, stride):
    x, h, w, g, b, rm, rv = _canonical(fmt)
    torch.library.opcheck(torch.ops.rla_ext.concat_conv3x3_bn_act_fwd.default,
                          (x, h, w, g, b, rm, rv, training, 0.1, 1e-5, True, stride, backend))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck_backward(backend, fmt, stride):
    """The custom ops, and on cpp the C++ kernel ops they call (torch.compile records those directly)."""
    x, h, w, g, b, rm, rv = _canonical(fmt)
    with opcheck_kernel_calls("concat_conv3x3_bn_act") if backend == "cpp" else contextlib.nullcontext():
        out, z, mean, var = torch.ops.rla_ext.concat_conv3x3_bn_act_fwd(x, h, w, g, b, rm, rv, True, 0.1, 1e-5,
                                                                         True, stride, backend)
        torch.library.opcheck(torch.ops.rla_ext.concat_conv3x3_bn_act_bwd.default,
                              (torch.randn_like(out), x, h, w, g, b, z, mean, var, 1e-5, True, True, stride,
                               backend))


def _entry(x, h, a, backend):
    out = concat_conv3x3_bn_act(x, h, a["weight"], a["bn_weight"], a["bn_bias"], a["running_mean"],
                                a["running_var"], stride=2, training=True, backend=backend)
    return out.square().mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    a0 = make_entry3x3_inputs(2, 5, 3, 6, (5, 4), torch.float32, "channels_last")
    results = []
    for compiled in (False, True):
        a = clone_inputs(a0)
        x, h = a.pop("x"), a.pop("h")
        fn = torch.compile(_entry, fullgraph=True, backend="aot_eager") if compiled else _entry
        loss = fn(x, h, a, backend)
        loss.backward()
        results.append((loss.detach(), x.grad, h.grad, a["weight"].grad, a["bn_weight"].grad, a["running_mean"],
                        a["running_var"]))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_eager_fast_path_and_dispatch_modes(backend):
    """Plain eager runs the kernels without the custom-op dispatcher; fake tensors reach the fake kernels."""
    inputs = clone_inputs(make_entry3x3_inputs(2, 6, 4, 5, (5, 4), torch.float32, "channels_last"))
    with torch.profiler.profile() as prof:
        concat_conv3x3_bn_act(**inputs, stride=2, training=True, backend=backend).sum().backward()
    events = {e.name for e in prof.events()}
    assert {"rla_ext::concat_conv3x3_bn_act_kernel_fwd", "rla_ext::concat_conv3x3_bn_act_kernel_bwd"} <= events
    assert not {"rla_ext::concat_conv3x3_bn_act_fwd", "rla_ext::concat_conv3x3_bn_act_bwd"} & events
    real = make_entry3x3_inputs(2, 6, 4, 5, (5, 4), torch.float32, "channels_last")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(t) for k, t in real.items()}
        out = concat_conv3x3_bn_act(**fake, stride=2, training=True, backend=backend)
        assert out.shape == (2, 5, 3, 2) and out.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_bfloat16(backend, fmt, training):
    inputs = make_entry3x3_inputs(3, 12, 4, 10, (7, 5), torch.float32, fmt, seed=3)
    kw = dict(stride=2, training=training, momentum=0.1, eps=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, **kw)
        ref = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend="torch", **kw)
    ref64 = run_op(concat_conv3x3_bn_act, clone_inputs(inputs, torch.float64), backend="torch", **kw)
    assert got[0].dtype == torch.bfloat16
    assert_close(got[0], ref[0], torch.bfloat16, "output", ref64[0])
    for name, g in ref[1].items():
        assert got[1][name].dtype == inputs[name].dtype, name
        assert_close(got[1][name], g, torch.bfloat16, f"grad of {name}", ref64[1][name])
    for name, s in ref[2].items():
        assert got[2][name].dtype == torch.float32
        assert_close(got[2][name], s, torch.bfloat16, name, ref64[2][name])


# ------------------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_as_torch(backend, fmt, training):
    """F.batch_norm on an empty batch: an empty output, the running statistics untouched, empty gradients
    for x and h, zero ones for the parameters."""
    inputs = make_entry3x3_inputs(0, 4, 2, 3, (5, 5), torch.float32, fmt)
    got = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, stride=2, training=training)
    want = run_op(composition, clone_inputs(inputs), stride=2, training=training)
    assert got[0].shape == want[0].shape == (0, 3, 3, 3)
    for part in (1, 2):
        for name, t in want[part].items():
            torch.testing.assert_close(got[part][name], t, msg=name)
    torch.testing.assert_close(got[2]["running_mean"], inputs["running_mean"])


@pytest.mark.parametrize("backend", FUSED)
def test_nan_and_inf_propagate_as_in_the_reference(backend):
    inputs = make_entry3x3_inputs(2, 4, 2, 3, (4, 4), torch.float32, "channels_last")
    x = inputs["x"].clone()
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    inputs["x"] = x
    for training in (True, False):
        got = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, stride=1, training=training)
        ref = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend="torch", stride=1, training=training)
        torch.testing.assert_close(got[0], ref[0], equal_nan=True, rtol=2e-4, atol=2e-5)
        for name in ref[1]:
            torch.testing.assert_close(got[1][name], ref[1][name], equal_nan=True, rtol=2e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_synchronised_path_with_one_rank_is_the_local_op(backend, tmp_path):
    """The synchronised Function (shared with op A) driven directly with a one-rank group: its all-reduces
    are identities, so it must reproduce the local training op bit for bit in float64."""
    import torch.distributed as dist

    from rla_ext.ops import _concat_entry
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        inputs = make_entry3x3_inputs(2, 4, 3, 5, (5, 4), torch.float64, "channels_last")

        def synced(x, h, weight, bn_weight, bn_bias, running_mean, running_var, *, backend):
            return _concat_entry.fused_call("concat_conv3x3_bn_act", (2,), x, h, weight, bn_weight, bn_bias,
                                            running_mean, running_var, True, 0.1, 1e-5, True, backend,
                                            dist.group.WORLD)

        a = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend=backend, stride=2, training=True)
        b = run_op(synced, clone_inputs(inputs), backend=backend)
        torch.testing.assert_close(b[0], a[0], rtol=1e-12, atol=1e-12)
        for part in (1, 2):
            for name in a[part]:
                torch.testing.assert_close(b[part][name], a[part][name], rtol=1e-12, atol=1e-12, msg=name)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- errors
def _bad(**overrides):
    inp = make_entry3x3_inputs(2, 4, 2, 3, (5, 5), torch.float32, "contiguous")
    kw = dict(training=True)
    for key, value in overrides.items():
        (inp if key in inp else kw)[key] = value
    return inp, kw


ERRORS = [
    (dict(x=[1.0]), TypeError, "x"),
    (dict(x=torch.randn(2, 4, 5)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (2, 4, 5, 5))), TypeError, "x"),
    (dict(h=torch.randn(2, 2, 5, 5, dtype=torch.float64)), TypeError, "h"),
    (dict(h=torch.randn(1, 2, 5, 5)), ValueError, "h"),  # batch 1 would broadcast: refused
    (dict(h=torch.randn(2, 2, 5, 4)), ValueError, "h"),
    (dict(weight=torch.randn(3, 5, 3, 3)), ValueError, "weight"),  # C + k mismatch
    (dict(weight=torch.randn(3, 6, 1, 1)), ValueError, "weight"),  # not 3x3
    (dict(weight=torch.randn(3, 6 * 9)), ValueError, "weight"),
    (dict(weight=torch.randn(0, 6, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(3, 6, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=1.0), TypeError, "stride"),
    (dict(stride=(2, 2)), TypeError, "stride"),
    (dict(bn_weight=torch.randn(4)), ValueError, "bn_weight"),
    (dict(bn_bias=torch.randn(3, 1)), ValueError, "bn_bias"),
    (dict(running_mean=torch.randn(5)), ValueError, "running_mean"),
    (dict(running_var=None), ValueError, "running_var"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "running_mean"),
    (dict(training=1), TypeError, "training"),
    (dict(momentum=None), TypeError, "momentum"),  # the module resolves None, as for the other ops
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(backend="numba"), ValueError, "backend"),
    (dict(x=torch.randn(1, 4, 1, 1), h=torch.randn(1, 2, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(x=torch.randn(1, 4, 2, 1), h=torch.randn(1, 2, 2, 1), stride=2), ValueError, "more than 1 value"),
    (dict(x=torch.randn(2, 4, 0, 3), h=torch.randn(2, 2, 0, 3)), ValueError, "non-empty"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,exc,needle", ERRORS, ids=[f"{e.__name__}-{n}" for _, e, n in ERRORS])
def test_errors_name_the_argument(backend, overrides, exc, needle):
    inp, kw = _bad(**overrides)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=needle):
        concat_conv3x3_bn_act(**inp, **kw)


def test_gpu_backends_are_refused_on_cpu_tensors():
    inp, kw = _bad()
    with pytest.raises(rla_ext.BackendUnavailableError, match="cuda"):
        concat_conv3x3_bn_act(**inp, **kw, backend="cuda")


def test_triton_runs_the_reference():
    """"triton" has no kernels of this op (module docstring): it runs the reference, bit for bit."""
    if "triton" not in rla_ext.available_backends("cpu"):
        pytest.skip("triton is not available here")
    inputs = make_entry3x3_inputs(2, 4, 2, 3, (5, 5), torch.float32, "channels_last")
    got = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend="triton", stride=2, training=True)
    want = run_op(concat_conv3x3_bn_act, clone_inputs(inputs), backend="torch", stride=2, training=True)
    assert torch.equal(got[0], want[0])
    for part in (1, 2):
        for name in want[part]:
            assert torch.equal(got[part][name], want[part][name]), name
