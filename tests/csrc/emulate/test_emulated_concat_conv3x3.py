"""The CUDA kernels of the basic-block entry (csrc/cuda/concat_conv3x3_bn_act.cu) under the CPU emulator,
against the CPU kernels (csrc/cpu/concat_conv3x3_bn_act.cpp, checked against the reference in
tests/ops/test_concat_conv3x3_bn_act.py). The CUDA kernels compute z by two ATen convolutions over the
weight's segments; the CPU kernel, at these small shapes, by one over a transient cat (conv_over_cat). In
float32 / float64 the two differ by summation order only; in half dtypes z differs by a rounding, which
moves a ReLU mask wherever a BN output lies within it of 0 (one gradient element by its full size), so
half dtypes run with the identity activation and the ReLU's masks are checked in float32 / float64.
Every dtype, both memory formats, training and eval, stride 1 and 2, odd sizes, ReLU and identity,
in-order and shuffled schedules."""
from __future__ import annotations

import pytest
import torch

from rla_testing import HALF, assert_close

EPS = 1e-5
# (N, C, k, C_out, (H, W)): odd sizes; C_out not a multiple of 32; M = N * H * W spans several chunks.
SHAPES = [(3, 9, 5, 37, (9, 7)), (2, 5, 3, 5, (1, 1)), (4, 15, 8, 40, (13, 17))]
NAMES = ("out", "z", "mean", "var", "dx", "dh", "dweight", "dgamma", "dbeta")


def _inputs(n, c, k, co, hw, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    def rnd(*s, dt=dtype, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dt)

    x = rnd(n, c, *hw).contiguous(memory_format=mf)
    # The kernel contract's one format: channels_last only where x is not also NCHW-contiguous.
    kf = torch.channels_last if fmt == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    return dict(x=x.contiguous(memory_format=kf), h=rnd(n, k, *hw).contiguous(memory_format=kf),
                weight=rnd(co, c + k, 3, 3, scale=(9 * (c + k)) ** -0.5), gamma=1 + rnd(co, dt=sd, scale=0.3),
                beta=rnd(co, dt=sd, scale=0.2), mean=rnd(co, dt=sd, scale=0.1),
                var=(0.5 + torch.rand(co, generator=g, dtype=torch.float64)).to(sd)), kf


def _run(fwd, bwd, t, stride, training, relu, seed):
    mean, var = (None, None) if training else (t["mean"], t["var"])
    out, z, m, v = fwd(t["x"], t["h"], t["weight"], t["gamma"], t["beta"], mean, var, stride, EPS, relu)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    go = go.to(out.dtype).contiguous(memory_format=torch.channels_last if not out.is_contiguous() else
                                     torch.contiguous_format)
    grads = bwd(go, t["x"], t["h"], t["weight"], t["gamma"], t["beta"], z, m, v, stride, EPS, relu, training)
    return (out, z, m, v, *grads)


@pytest.mark.parametrize("schedule", ["shuffled", "inorder"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_emulated_cuda_matches_cpu_kernels(emulated, schedule, shape, dtype, fmt, training, stride):
    from rla_ext import _C  # noqa: F401  (registers the CPU kernels)

    relu = stride == 1 and dtype not in HALF  # both activations, without doubling the matrix; see the docstring
    seed = sum(shape[:4]) + stride
    t, kf = _inputs(*shape, dtype, fmt, seed=seed)
    cpu = torch.ops.rla_ext
    got = _run(emulated.concat_conv3x3_bn_act_fwd, emulated.concat_conv3x3_bn_act_bwd, t, stride, training, relu,
               seed)
    want = _run(cpu.concat_conv3x3_bn_act_kernel_fwd, cpu.concat_conv3x3_bn_act_kernel_bwd, t, stride, training,
                relu, seed)
    want64 = None
    if dtype in HALF:
        t64 = {k: v.double() for k, v in t.items()}
        want64 = _run(cpu.concat_conv3x3_bn_act_kernel_fwd, cpu.concat_conv3x3_bn_act_kernel_bwd, t64, stride,
                      training, relu, seed)
    for i, name in enumerate(NAMES):
        assert_close(got[i], want[i], dtype, name, want64[i] if want64 is not None else None)
    for i in (0, 1, 4, 5):  # activations come back in the inputs' memory format
        assert got[i].is_contiguous(memory_format=kf), NAMES[i]
