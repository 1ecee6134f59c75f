"""float64 on a GPU, in plain ATen math.

The Triton releases this backend supports (3.6-3.8) do not all lower tl.dot for fp64 operands on
NVIDIA GPUs, so that single case is computed here; every other dtype, and fp64 under Triton's
interpreter, runs the Triton kernels. Same contract and same formulas as the kernels: no cat of
(x, h), batch statistics from the pre-BN values, dz from the closed-form BN backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ch(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def _stats(z: torch.Tensor):
    return z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)


def _bn_grad(g, z, mean, var, gamma, eps, training):
    rstd = torch.rsqrt(var + eps)
    xhat = (z - _ch(mean)) * _ch(rstd)
    dbeta = g.sum(dim=(0, 2, 3))
    dgamma = (g * xhat).sum(dim=(0, 2, 3))
    if training:
        m = z.shape[0] * z.shape[2] * z.shape[3]
        g = g - _ch(dbeta / m) - xhat * _ch(dgamma / m)
    return g * _ch(gamma * rstd), dgamma, dbeta


def _fmt(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def concat_conv_bn_act_forward(x, h, weight, gamma, beta, mean, var, eps, relu):
    c = x.shape[1]
    z = F.conv2d(x, weight[:, :c, None, None]) + F.conv2d(h, weight[:, c:, None, None])
    if mean is None:
        mean, var = _stats(z)
    else:
        mean, var = mean.clone(), var.clone()
    out = (z - _ch(mean)) * _ch(gamma * torch.rsqrt(var + eps)) + _ch(beta)
    if relu:
        out = out.clamp_min(0)
    fmt = _fmt(x)
    return out.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt), mean, var


def concat_conv_bn_act_backward(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu, training):
    c = x.shape[1]
    g = grad_out
    if relu:
        pre = (z - _ch(mean)) * _ch(gamma * torch.rsqrt(var + eps)) + _ch(beta)
        # torch.relu's backward: zero where the output is <= 0, so a NaN output passes the gradient.
        g = torch.where(pre <= 0, torch.zeros_like(g), g)
    dz, dgamma, dbeta = _bn_grad(g, z, mean, var, gamma, eps, training)
    fmt = _fmt(x)
    dx = F.conv2d(dz, weight[:, :c].t()[:, :, None, None]).contiguous(memory_format=fmt)
    dh = F.conv2d(dz, weight[:, c:].t()[:, :, None, None]).contiguous(memory_format=fmt)
    dw = torch.cat((torch.einsum("nohw,nchw->oc", dz, x), torch.einsum("nohw,nchw->oc", dz, h)), dim=1)
    return dx, dh, dw.contiguous(), dgamma, dbeta


def _act(s, mean, var, gamma, beta, eps):
    return torch.tanh((s - _ch(mean)) * _ch(gamma * torch.rsqrt(var + eps)) + _ch(beta))


def rla_update_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool, eps):
    hp = F.avg_pool2d(h, 2, 2) if pool else h
    s = hp + F.conv2d(y, out_weight[:, :, None, None])
    if mean is None:
        mean, var = _stats(s)
    else:
        mean, var = mean.clone(), var.clone()
    out = F.conv2d(_act(s, mean, var, gamma, beta, eps), rec_weight, padding=1)
    fmt = _fmt(y)
    return out.contiguous(memory_format=fmt), s.contiguous(memory_format=fmt), mean, var


def rla_update_backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, pool, eps,
                        training):
    a = _act(s, mean, var, gamma, beta, eps)
    da = torch.nn.grad.conv2d_input(a.shape, rec_weight, grad_out, padding=1)
    drec = torch.nn.grad.conv2d_weight(a, rec_weight.shape, grad_out, padding=1)
    ds, dgamma, dbeta = _bn_grad(da * (1 - a * a), s, mean, var, gamma, eps, training)
    fmt = _fmt(y)
    dy = F.conv2d(ds, out_weight.t()[:, :, None, None]).contiguous(memory_format=fmt)
    dw = torch.einsum("nkhw,nchw->kc", ds, y).contiguous()
    if pool:
        dh = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        hy, wy = s.shape[2], s.shape[3]
        dh[:, :, :2 * hy, :2 * wy] = ds.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) * 0.25
    else:
        dh = ds
    return dh.contiguous(memory_format=fmt), dy, dw, drec.contiguous(), dgamma, dbeta


def rla_update_and_entry_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, entry_weight,
                                 entry_gamma, entry_beta, entry_mean, entry_var, pool, eps, entry_eps, relu):
    h_next, s, mean, var = rla_update_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool, eps)
    out, z, emean, evar = concat_conv_bn_act_forward(y, h_next, entry_weight, entry_gamma, entry_beta,
                                                     entry_mean, entry_var, entry_eps, relu)
    return h_next, s, mean, var, out, z, emean, evar


def rla_update_and_entry_backward(grad_h_next, grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean,
                                  var, h_next, entry_weight, entry_gamma, entry_beta, z, entry_mean,
                                  entry_var, pool, eps, entry_eps, relu, training):
    dy_e, dh_next, dwe, dgamma_e, dbeta_e = concat_conv_bn_act_backward(
        grad_out, y, h_next, entry_weight, entry_gamma, entry_beta, z, entry_mean, entry_var, entry_eps, relu,
        training)
    dh, dy, dw_out, drec, dgamma, dbeta = rla_update_backward(
        grad_h_next + dh_next, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, pool, eps, training)
    return dh, dy + dy_e, dw_out, drec, dgamma, dbeta, dwe, dgamma_e, dbeta_e
