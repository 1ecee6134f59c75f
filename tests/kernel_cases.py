"""Kernel-level cases of the CUDA kernels (csrc/cuda/): plain-PyTorch compositions of the four kernel
functions, input builders and comparisons.

Shared by tests/csrc/test_cuda_kernels.py (the real kernels, through torch.ops.rla_ext on a GPU) and
tests/csrc/emulate/ (the same sources under the CPU emulator, on CPU tensors). A kernel set is any four
callables with the kernel op signatures (csrc/ops.cpp); the references run in the inputs' dtype and, for
half dtypes, in float64 too (tolerances: rla_testing.assert_close).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from rla_testing import HALF, assert_close

EPS = 1e-5
FORMATS = ("contiguous", "channels_last")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FWD_NAMES = ("out", "pre-BN", "mean", "var")
CCBA_GRADS = ("dx", "dh", "dweight", "dgamma", "dbeta")
UPDATE_DIFF = ("h", "y", "out_weight", "rec_weight", "gamma", "beta")
UPDATE_GRADS = ("dh", "dy", "dout_weight", "drec_weight", "dgamma", "dbeta")
BOUNDARY_FWD_NAMES = ("h_next", "s", "mean", "var", "out", "z", "entry_mean", "entry_var")
BOUNDARY_DIFF = UPDATE_DIFF + ("entry_weight", "entry_gamma", "entry_beta")
BOUNDARY_GRADS = UPDATE_GRADS + ("dentry_weight", "dentry_gamma", "dentry_beta")


class Kernels(NamedTuple):
    ccba_fwd: Callable
    ccba_bwd: Callable
    update_fwd: Callable
    update_bwd: Callable
    boundary_fwd: Callable | None = None  # op C, rla_update_and_entry
    boundary_bwd: Callable | None = None


def dispatcher_kernels() -> Kernels:
    """The registered kernels; the dispatcher picks the CUDA (or CPU) one from the tensors' device."""
    ops = torch.ops.rla_ext
    return Kernels(ops.concat_conv_bn_act_kernel_fwd, ops.concat_conv_bn_act_kernel_bwd, ops.rla_update_kernel_fwd,
                   ops.rla_update_kernel_bwd, ops.rla_update_and_entry_kernel_fwd, ops.rla_update_and_entry_kernel_bwd)


def module_kernels(mod) -> Kernels:
    """The kernels of a module with functions named like those of csrc/cuda/emulate/module.cpp."""
    return Kernels(mod.concat_conv_bn_act_fwd, mod.concat_conv_bn_act_bwd, mod.rla_update_fwd, mod.rla_update_bwd,
                   getattr(mod, "rla_update_and_entry_fwd", None), getattr(mod, "rla_update_and_entry_bwd", None))


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fmt_of(name):
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def kernel_format(primary: torch.Tensor, fmt: str) -> torch.memory_format:
    """The one memory format of a kernel call's activations (the Python layer's rule): channels_last only
    when the primary input is channels_last and not also NCHW-contiguous (a 1x1 image is both)."""
    cl = fmt == "channels_last" and not primary.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def size2(hw) -> tuple[int, int]:
    return (hw, hw) if isinstance(hw, int) else tuple(hw)


def randn(gen, *shape, dtype, device="cuda", fmt=torch.contiguous_format, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype).to(device).contiguous(memory_format=fmt)


def channel(v):
    return v.view(1, -1, 1, 1)


def bn_composition(pre, gamma, beta, mean, var, act):
    """BatchNorm (+activation) as plain ops in the stat dtype; batch stats when mean is None."""
    p = pre.to(gamma.dtype)
    if mean is None:
        mean = p.mean((0, 2, 3))
        var = p.var((0, 2, 3), unbiased=False)
    bn = (p - channel(mean)) * channel(torch.rsqrt(var + EPS)) * channel(gamma) + channel(beta)
    return act(bn).to(pre.dtype), mean, var


# float32 against the float64 reference: at most twice eager float32's error plus this share of the
# reference's magnitude. (Element-wise rtol/atol fails on near-zero sums of ~10^3 terms: a weight
# gradient element of 0.0096 differed by 2.2e-5 between two correct float32 reductions.)
FP32_ATOL = 1e-5


def needs_reference64(dtype) -> bool:
    return dtype in HALF or dtype == torch.float32


def compare(got, ref, ref64, dtype, names):
    for i, name in enumerate(names):
        if dtype == torch.float32 and ref64 is not None:
            assert got[i].shape == ref[i].shape, f"{name}: shape {tuple(got[i].shape)} != {tuple(ref[i].shape)}"
            r64 = ref64[i].double()
            err = (got[i].double() - r64).abs().max().item() if r64.numel() else 0.0
            err_eager = (ref[i].double() - r64).abs().max().item() if r64.numel() else 0.0
            scale = max(r64.abs().max().item() if r64.numel() else 0.0, 1.0)
            assert err <= 2 * err_eager + FP32_ATOL * scale, (
                f"{name}: error {err:.3g} > 2 x eager float32's {err_eager:.3g} + {FP32_ATOL} x {scale:.3g}")
        else:
            assert_close(got[i], ref[i], dtype, name, ref64[i] if ref64 is not None else None)


# ------------------------------------------------------------------------------------------ op A
def ccba_composition(x, h, w, gamma, beta, mean, var, relu):
    z = F.conv2d(torch.cat((x, h), 1), w[:, :, None, None])
    out, m, v = bn_composition(z, gamma, beta, mean, var, torch.relu if relu else (lambda t: t))
    return out, z, m, v


def ccba_inputs(n, c, k, co, hw, dtype, fmt, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    sd = stat_dtype(dtype)
    f = fmt_of(fmt)
    H, W = size2(hw)
    return dict(
        x=randn(g, n, c, H, W, dtype=dtype, device=device, fmt=f),
        h=randn(g, n, k, H, W, dtype=dtype, device=device, fmt=f),
        weight=randn(g, co, c + k, dtype=dtype, device=device, scale=(c + k) ** -0.5),
        gamma=1 + randn(g, co, dtype=sd, device=device, scale=0.3),
        beta=randn(g, co, dtype=sd, device=device, scale=0.2),
        mean=randn(g, co, dtype=sd, device=device, scale=0.1),
        var=(0.5 + torch.rand(co, generator=g, dtype=torch.float64)).to(sd).to(device))


def ccba_reference(inp, training, relu, grad_out, dtype):
    """(out, z, mean, var) and (dx, dh, dweight, dgamma, dbeta) of the composition in `dtype`."""
    leaves = {k: inp[k].detach().to(dtype if k in ("x", "h", "weight") else stat_dtype(dtype)).requires_grad_(
        k in ("x", "h", "weight", "gamma", "beta")) for k in ("x", "h", "weight", "gamma", "beta")}
    mean = None if training else inp["mean"].to(stat_dtype(dtype))
    var = None if training else inp["var"].to(stat_dtype(dtype))
    out, z, m, v = ccba_composition(leaves["x"], leaves["h"], leaves["weight"], leaves["gamma"], leaves["beta"],
                                    mean, var, relu)
    grads = torch.autograd.grad(out, [leaves[k] for k in ("x", "h", "weight", "gamma", "beta")],
                                grad_out.to(dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(leaves[k]) if gr is None else gr
                  for k, gr in zip(("x", "h", "weight", "gamma", "beta"), grads))
    return (out.detach(), z.detach(), m.detach(), v.detach()), grads


def ccba_kernels(inp, training, relu, grad_out, device="cuda", kernels: Kernels | None = None):
    ks = kernels or dispatcher_kernels()
    t = {k: v.to(device) for k, v in inp.items()}
    mean, var = (None, None) if training else (t["mean"], t["var"])
    fwd = ks.ccba_fwd(t["x"], t["h"], t["weight"], t["gamma"], t["beta"], mean, var, EPS, relu)
    out, z, m, v = fwd
    bwd = ks.ccba_bwd(grad_out.to(device), t["x"], t["h"], t["weight"], t["gamma"], t["beta"], z, m, v, EPS, relu,
                      training)
    return fwd, bwd


# ------------------------------------------------------------------------------------------ op B
def update_composition(h, y, wo, gamma, beta, mean, var, wr, pool):
    hp = F.avg_pool2d(h, 2, 2) if pool else h
    s = hp + F.conv2d(y, wo[:, :, None, None])
    a, m, v = bn_composition(s, gamma, beta, mean, var, torch.tanh)
    return F.conv2d(a, wr, padding=1), s, m, v


def update_inputs(n, c, k, hw, pool, dtype, fmt, seed=0, odd_h=False, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    sd = stat_dtype(dtype)
    f = fmt_of(fmt)
    H, W = size2(hw)
    hh, hw_ = (2 * H + (1 if odd_h else 0), 2 * W + (1 if odd_h else 0)) if pool else (H, W)
    h = randn(g, n, k, hh, hw_, dtype=dtype, device=device, fmt=f)
    y = randn(g, n, c, H, W, dtype=dtype, device=device, fmt=f)
    return dict(
        h=h.contiguous(memory_format=kernel_format(y, fmt)), y=y,
        out_weight=randn(g, k, c, dtype=dtype, device=device, scale=c ** -0.5),
        gamma=1 + randn(g, k, dtype=sd, device=device, scale=0.3),
        beta=randn(g, k, dtype=sd, device=device, scale=0.2),
        mean=randn(g, k, dtype=sd, device=device, scale=0.1),
        var=(0.5 + torch.rand(k, generator=g, dtype=torch.float64)).to(sd).to(device),
        rec_weight=randn(g, k, k, 3, 3, dtype=dtype, device=device, scale=(9 * k) ** -0.5))


def update_reference(inp, pool, training, grad_out, dtype):
    sd = stat_dtype(dtype)
    leaves = {k: inp[k].detach().to(sd if k in ("gamma", "beta") else dtype).requires_grad_() for k in UPDATE_DIFF}
    mean = None if training else inp["mean"].to(sd)
    var = None if training else inp["var"].to(sd)
    out, s, m, v = update_composition(leaves["h"], leaves["y"], leaves["out_weight"], leaves["gamma"],
                                      leaves["beta"], mean, var, leaves["rec_weight"], pool)
    grads = torch.autograd.grad(out, [leaves[k] for k in UPDATE_DIFF], grad_out.to(dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(UPDATE_DIFF, grads))
    return (out.detach(), s.detach(), m.detach(), v.detach()), grads


def update_kernels(inp, pool, training, grad_out, device="cuda", kernels: Kernels | None = None):
    ks = kernels or dispatcher_kernels()
    t = {k: v.to(device) for k, v in inp.items()}
    mean, var = (None, None) if training else (t["mean"], t["var"])
    fwd = ks.update_fwd(t["h"], t["y"], t["out_weight"], t["gamma"], t["beta"], mean, var, t["rec_weight"], pool, EPS)
    out, s, m, v = fwd
    bwd = ks.update_bwd(grad_out.to(device), t["h"], t["y"], t["out_weight"], t["gamma"], t["beta"],
                        t["rec_weight"], s, m, v, pool, EPS, training)
    return fwd, bwd


# ------------------------------------------------------------------------------------------ op C
def boundary_inputs(n, c, k, ce, hw, pool, dtype, fmt, seed=0, odd_h=False, device="cuda"):
    """op B's inputs plus the next block's 1x1 entry on (y, h_next): (ce, c + k) weight, BatchNorm vectors."""
    inp = update_inputs(n, c, k, hw, pool, dtype, fmt, seed=seed, odd_h=odd_h, device=device)
    g = torch.Generator().manual_seed(seed + 101)
    sd = stat_dtype(dtype)
    inp.update(
        entry_weight=randn(g, ce, c + k, dtype=dtype, device=device, scale=(c + k) ** -0.5),
        entry_gamma=1 + randn(g, ce, dtype=sd, device=device, scale=0.3),
        entry_beta=randn(g, ce, dtype=sd, device=device, scale=0.2),
        entry_mean=randn(g, ce, dtype=sd, device=device, scale=0.1),
        entry_var=(0.5 + torch.rand(ce, generator=g, dtype=torch.float64)).to(sd).to(device))
    return inp


def boundary_reference(inp, pool, training, relu, grad_h_next, grad_out, dtype):
    """The composition op B then op A on (y, h_next), in `dtype`: the 8 forward results and the 9 grads."""
    sd = stat_dtype(dtype)
    stat_leaf = ("gamma", "beta", "entry_gamma", "entry_beta")
    leaves = {k: inp[k].detach().to(sd if k in stat_leaf else dtype).requires_grad_() for k in BOUNDARY_DIFF}
    stats = [None if training else inp[k].to(sd) for k in ("mean", "var", "entry_mean", "entry_var")]
    h_next, s, m, v = update_composition(leaves["h"], leaves["y"], leaves["out_weight"], leaves["gamma"],
                                         leaves["beta"], stats[0], stats[1], leaves["rec_weight"], pool)
    out, z, em, ev = ccba_composition(leaves["y"], h_next, leaves["entry_weight"], leaves["entry_gamma"],
                                      leaves["entry_beta"], stats[2], stats[3], relu)
    grads = torch.autograd.grad((h_next, out), [leaves[k] for k in BOUNDARY_DIFF],
                                (grad_h_next.to(dtype), grad_out.to(dtype)), allow_unused=True)
    grads = tuple(torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(BOUNDARY_DIFF, grads))
    fwd = tuple(t.detach() for t in (h_next, s, m, v, out, z, em, ev))
    return fwd, grads


def boundary_kernels(inp, pool, training, relu, grad_h_next, grad_out, device="cuda",
                     kernels: Kernels | None = None):
    ks = kernels or dispatcher_kernels()
    t = {k: v.to(device) for k, v in inp.items()}
    st = [None if training else t[k] for k in ("mean", "var", "entry_mean", "entry_var")]
    fwd = ks.boundary_fwd(t["h"], t["y"], t["out_weight"], t["gamma"], t["beta"], st[0], st[1], t["rec_weight"],
                          t["entry_weight"], t["entry_gamma"], t["entry_beta"], st[2], st[3], pool, EPS, EPS, relu)
    h_next, s, m, v, out, z, em, ev = fwd
    bwd = ks.boundary_bwd(grad_h_next.to(device), grad_out.to(device), t["h"], t["y"], t["out_weight"], t["gamma"],
                          t["beta"], t["rec_weight"], s, m, v, h_next, t["entry_weight"], t["entry_gamma"],
                          t["entry_beta"], z, em, ev, pool, EPS, EPS, relu, training)
    return fwd, bwd


# ---------------------------------------------------------------------------------- whole cases
def check_ccba(n, c, k, co, hw, dtype, fmt, training, relu, device="cuda", kernels: Kernels | None = None,
               seed=0):
    """One op A case, forward and backward, against the composition; returns the kernels' results."""
    H, W = size2(hw)
    inp = ccba_inputs(n, c, k, co, (H, W), dtype, fmt, seed=seed, device=device)
    gout = randn(torch.Generator().manual_seed(seed + 7), n, co, H, W, dtype=dtype, device=device, fmt=fmt_of(fmt))
    fwd, bwd = ccba_kernels(inp, training, relu, gout, device, kernels)
    ref_fwd, ref_bwd = ccba_reference(inp, training, relu, gout, dtype)
    r64 = ccba_reference(inp, training, relu, gout, torch.float64) if needs_reference64(dtype) else (None, None)
    compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
    compare(bwd, ref_bwd, r64[1], dtype, CCBA_GRADS)
    # Activations come back in the input's memory format.
    for t in (fwd[0], fwd[1], bwd[0], bwd[1]):
        assert t.is_contiguous(memory_format=kernel_format(inp["x"], fmt)), "an activation lost the input's format"
    return fwd, bwd


def check_update(n, c, k, hw, pool, dtype, fmt, training, odd_h=False, device="cuda",
                 kernels: Kernels | None = None, seed=0):
    """One op B case, forward and backward, against the composition; returns the kernels' results."""
    H, W = size2(hw)
    inp = update_inputs(n, c, k, (H, W), pool, dtype, fmt, seed=seed, odd_h=odd_h, device=device)
    gout = randn(torch.Generator().manual_seed(seed + 7), n, k, H, W, dtype=dtype, device=device, fmt=fmt_of(fmt))
    fwd, bwd = update_kernels(inp, pool, training, gout, device, kernels)
    ref_fwd, ref_bwd = update_reference(inp, pool, training, gout, dtype)
    r64 = update_reference(inp, pool, training, gout, torch.float64) if needs_reference64(dtype) else (None, None)
    compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
    compare(bwd, ref_bwd, r64[1], dtype, UPDATE_GRADS)
    for t in (fwd[0], fwd[1], bwd[0], bwd[1]):
        assert t.is_contiguous(memory_format=kernel_format(inp["y"], fmt)), "an activation lost the input's format"
    if pool and odd_h:
        # Floor mode: the last row/column of h never reaches the output, so its gradient is exactly zero.
        dh = bwd[0]
        assert torch.all(dh[:, :, -1, :] == 0) and torch.all(dh[:, :, :, -1] == 0)
    return fwd, bwd


def check_boundary(n, c, k, ce, hw, pool, dtype, fmt, training, relu=True, odd_h=False, device="cuda",
                   kernels: Kernels | None = None, seed=0):
    """One op C case, forward and backward, against the composition of op B and op A."""
    H, W = size2(hw)
    inp = boundary_inputs(n, c, k, ce, (H, W), pool, dtype, fmt, seed=seed, odd_h=odd_h, device=device)
    g = torch.Generator().manual_seed(seed + 7)
    gh = randn(g, n, k, H, W, dtype=dtype, device=device, fmt=fmt_of(fmt))
    go = randn(g, n, ce, H, W, dtype=dtype, device=device, fmt=fmt_of(fmt))
    fwd, bwd = boundary_kernels(inp, pool, training, relu, gh, go, device, kernels)
    ref_fwd, ref_bwd = boundary_reference(inp, pool, training, relu, gh, go, dtype)
    r64 = (boundary_reference(inp, pool, training, relu, gh, go, torch.float64) if needs_reference64(dtype)
           else (None, None))
    compare(fwd, ref_fwd, r64[0], dtype, BOUNDARY_FWD_NAMES)
    compare(bwd, ref_bwd, r64[1], dtype, BOUNDARY_GRADS)
    fmt_y = kernel_format(inp["y"], fmt)
    for t in (fwd[0], fwd[1], fwd[4], fwd[5], bwd[0], bwd[1]):
        assert t.is_contiguous(memory_format=fmt_y), "an activation lost the input's format"
    if pool and odd_h:
        assert torch.all(bwd[0][:, :, -1, :] == 0) and torch.all(bwd[0][:, :, :, -1] == 0)
    return fwd, bwd
