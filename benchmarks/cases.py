"""One setup function per benchmarked case, shared by the CLI and the pytest-benchmark suites.

A case is a module in training mode plus its inputs and output gradients, built for one
*provider*: ``eager`` (the ``torch`` reference backend), ``compile`` (torch.compile of the
reference), a fused backend name (``cpp``, ``cuda``, ``triton``) or ``compile+<fused backend>``
(torch.compile of the module whose ops run that backend: the fused ops as opaque custom ops inside
Inductor's graph, what a user who compiles a model built with ``backend="cpp"`` gets). An op that
fuses other benchmarked ops (``UNFUSED_OPS``: the block boundary ``rla_update_and_entry``) also has
``unfused+<backend>``: the ops it replaces, called one after the other on that backend, so its table
shows the fusion against the two-op path it replaces on the same backend. Every provider of a case
gets the same seeded data, so the providers differ only in how the op is computed.

Weights are modules' parameters and running statistics their buffers, as in a real network: that
is what lets torch.compile treat them as static (CUDA graphs are skipped for mutated plain inputs).
BatchNorm parameters and statistics stay float32 while activations and conv weights take the
benchmark dtype, the usual mixed-precision arrangement.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import rla_ext
from benchmarks import bytes_model
from benchmarks.shapes import OP_STAGES, Stage

# The ops' modules (rla_ext.ops re-exports the functions under the same names): their FUSED backends.
_OP_3X3 = importlib.import_module("rla_ext.ops.concat_conv3x3_bn_act")
_OP_BOUNDARY = importlib.import_module("rla_ext.ops.rla_update_and_entry")

# Every benchmarked op, in table order; each has its own stage shapes (benchmarks.shapes.OP_STAGES).
OPS = tuple(OP_STAGES)
PASSES = bytes_model.PASSES
EAGER, COMPILE = "eager", "compile"
# `auto`: rla_ext's own choice per op, size and pass (rla_ext/_auto_table.py), what a user gets by
# default; asked for with --providers, not in the default list.
AUTO = "auto"
FUSED_BACKENDS = tuple(b for b in rla_ext.BACKENDS if b != "torch")
COMPILED_FUSED = tuple(f"{COMPILE}+{b}" for b in FUSED_BACKENDS)
# Ops that fuse other benchmarked ops -> the ops they replace, in call order. Their `unfused+<backend>`
# provider runs those ops one after the other on that backend: the baseline the fusion has to beat.
UNFUSED = "unfused"
UNFUSED_OPS: dict[str, tuple[str, ...]] = {"rla_update_and_entry": ("rla_update", "concat_conv_bn_act")}
# Only the backends the fused op has kernels on: elsewhere there is no fused row to compare with.
UNFUSED_PROVIDERS = tuple(f"{UNFUSED}+{b}" for b in _OP_BOUNDARY.FUSED)
PROVIDERS = (EAGER, COMPILE, AUTO) + FUSED_BACKENDS + UNFUSED_PROVIDERS + COMPILED_FUSED


def is_compiled(provider: str) -> bool:
    """Whether a provider runs under torch.compile (``compile`` or ``compile+<backend>``)."""
    return provider == COMPILE or provider.startswith(COMPILE + "+")


def is_unfused(provider: str) -> bool:
    """Whether a provider runs the ops a fused op replaces (``unfused+<backend>``) instead of the op."""
    return provider.startswith(UNFUSED + "+")


def op_providers(op: str, providers: Sequence[str]) -> tuple[str, ...]:
    """The providers of `providers` that apply to `op`: ``unfused+<backend>`` only to ops that fuse
    others (UNFUSED_OPS); every other provider to every op (one that cannot run gives an
    "unavailable" row with its reason)."""
    return tuple(p for p in providers if not is_unfused(p) or op in UNFUSED_OPS)


class CaseUnavailable(RuntimeError):
    """The case cannot run here (backend missing, model not written yet); the message says why."""


def _conv_weight(out_ch: int, in_ch: int, kernel: int = 1) -> nn.Parameter:
    # He init keeps activations O(1) through BN-free paths, so bf16 runs stay finite.
    std = math.sqrt(2.0 / (in_ch * kernel * kernel))
    return nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) * std)


class _BatchNormState(nn.Module):
    """The four per-channel BatchNorm tensors the fused ops take as arguments."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn_weight = nn.Parameter(1.0 + 0.1 * torch.randn(channels))
        self.bn_bias = nn.Parameter(0.1 * torch.randn(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


class ConcatConvBnAct(nn.Module):
    """Op A as a module: relu(bn(conv1x1(cat(x, h)))) through rla_ext.ops with a fixed backend."""

    def __init__(self, channels: int, k: int, out_channels: int, backend: str) -> None:
        super().__init__()
        self.weight = _conv_weight(out_channels, channels + k)
        self.bn = _BatchNormState(out_channels)
        self.backend = backend

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        bn = self.bn
        return rla_ext.ops.concat_conv_bn_act(x, h, self.weight, bn.bn_weight, bn.bn_bias, bn.running_mean,
                                              bn.running_var, training=self.training, backend=self.backend)


class ConcatConv3x3BnAct(nn.Module):
    """The basic block's entry as a module: relu(bn(conv3x3(cat(x, h), stride, padding 1))) with a
    fixed backend (``triton`` runs the reference: the op has no Triton kernels)."""

    def __init__(self, channels: int, k: int, out_channels: int, stride: int, backend: str) -> None:
        super().__init__()
        self.weight = _conv_weight(out_channels, channels + k, 3)
        self.bn = _BatchNormState(out_channels)
        self.stride = stride
        self.backend = backend

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        bn = self.bn
        return rla_ext.ops.concat_conv3x3_bn_act(x, h, self.weight, bn.bn_weight, bn.bn_bias, bn.running_mean,
                                                 bn.running_var, stride=self.stride, training=self.training,
                                                 backend=self.backend)


class RlaUpdate(nn.Module):
    """Op B as a module: rec3x3(tanh(bn(pool?(h) + out1x1(y)))) with a fixed backend."""

    def __init__(self, channels: int, k: int, backend: str, pool: bool = False) -> None:
        super().__init__()
        self.out_weight = _conv_weight(k, channels)
        self.rec_weight = _conv_weight(k, k, 3)
        self.bn = _BatchNormState(k)
        self.backend = backend
        self.pool = pool

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        bn = self.bn
        return rla_ext.ops.rla_update(h, y, self.out_weight, bn.bn_weight, bn.bn_bias, bn.running_mean,
                                      bn.running_var, self.rec_weight, pool=self.pool, training=self.training,
                                      backend=self.backend)


class RlaUpdateAndEntry(nn.Module):
    """Op C, the block boundary, as a module: h_next = rla_update(h, y) and the next block's entry
    relu(bn_e(conv1x1(cat(y, h_next)))) with a fixed backend; forward returns (h_next, entry_out).

    With ``unfused`` it calls ``rla_update`` and then ``concat_conv_bn_act`` on that backend instead of
    the fused op: the same parameters and values, y read by each op.
    """

    def __init__(self, channels: int, k: int, out_channels: int, backend: str, pool: bool = False,
                 unfused: bool = False) -> None:
        super().__init__()
        self.update = RlaUpdate(channels, k, backend, pool)
        self.entry = ConcatConvBnAct(channels, k, out_channels, backend)
        self.backend = backend
        self.pool = pool
        self.unfused = unfused

    def forward(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.unfused:
            h_next = self.update(h, y)
            return h_next, self.entry(y, h_next)
        u, e = self.update, self.entry
        return rla_ext.ops.rla_update_and_entry(
            h, y, u.out_weight, u.bn.bn_weight, u.bn.bn_bias, u.bn.running_mean, u.bn.running_var,
            u.rec_weight, e.weight, e.bn.bn_weight, e.bn.bn_bias, e.bn.running_mean, e.bn.running_var,
            pool=self.pool, training=self.training, backend=self.backend)


def providers(device: torch.device | str, include_interpreted: bool = False) -> list[str]:
    """Providers that can run on `device`: eager, compile, every available fused backend, the
    ``unfused+<backend>`` baselines of those (only fused ops use them: see op_providers), then each
    fused backend compiled (``compile+<backend>``).

    Triton on a CPU only runs through its interpreter, which is a correctness tool, not a
    performance path, so it is left out unless asked for.
    """
    dev = torch.device(device)
    fused = [b for b in rla_ext.available_backends(dev) if b in FUSED_BACKENDS]
    if dev.type == "cpu" and not include_interpreted:
        fused = [b for b in fused if b != "triton"]
    unfused = [p for p in UNFUSED_PROVIDERS if p.removeprefix(UNFUSED + "+") in fused]
    return [EAGER, COMPILE, *fused, *unfused, *(f"{COMPILE}+{b}" for b in fused)]


def check_provider(provider: str, device: torch.device, op: str | None = None) -> str:
    """The rla_ext backend a provider runs on; raises CaseUnavailable with the reason if it cannot
    (for `op`, when given: also where the op has no kernels of that backend, or no unfused form)."""
    if provider in (EAGER, COMPILE):
        return "torch"
    if provider == AUTO:
        return "auto"
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    backend = provider.removeprefix(COMPILE + "+").removeprefix(UNFUSED + "+")
    if is_unfused(provider) and op not in UNFUSED_OPS:  # blocks and models (op None) included
        raise CaseUnavailable(f"{provider} times the ops a fused op replaces, which only "
                              f"{', '.join(UNFUSED_OPS)} has; not {op or 'a block or model'}")
    reason = rla_ext._backend.unavailable_reason(backend, device)
    if reason is not None:
        raise CaseUnavailable(reason)
    return backend


def default_compile_mode(device: torch.device) -> str:
    return "max-autotune" if device.type == "cuda" else "default"


def compile_module(module: nn.Module, device: torch.device, mode: str | None = None) -> Callable[..., object]:
    """torch.compile of `module` from a clean dynamo cache; marks a new step per call under CUDA graphs.

    Resetting dynamo per case keeps earlier cases from using up the recompile limit (after which
    dynamo silently runs eager). Static shapes: each benchmarked shape gets its own kernels.
    """
    import torch._dynamo

    mode = mode or default_compile_mode(device)
    torch._dynamo.reset()
    compiled = torch.compile(module, mode=mode, dynamic=False)
    if device.type != "cuda" or mode not in ("reduce-overhead", "max-autotune"):
        return compiled

    def step(*args: Tensor) -> object:
        # CUDA-graph trees otherwise treat a forward whose backward never ran as still pending.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step


@dataclass
class Case:
    """A ready-to-time case: ``run(pass_)`` gives the zero-argument callable to time."""

    name: str
    provider: str
    label: str
    fn: Callable[..., object]
    inputs: tuple[Tensor, ...]
    params: tuple[Tensor, ...]
    grad_outputs: tuple[Tensor, ...]
    traffic: Callable[[str], bytes_model.Traffic] | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def run(self, pass_: str) -> Callable[[], object]:
        if pass_ not in PASSES:
            raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")
        fn, inputs = self.fn, self.inputs
        if pass_ == "fwd":
            return lambda: fn(*inputs)
        wrt = inputs + self.params
        grads = self.grad_outputs

        def forward_backward() -> object:
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            return torch.autograd.grad(outs, wrt, grads)

        return forward_backward

    def resident_storages(self) -> set[int]:
        """Storage addresses of the inputs and parameters, which exist whether or not the op saves them."""
        return {t.untyped_storage().data_ptr() for t in self.inputs + self.params}


def activation(shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool,
               requires_grad: bool = True) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.randn(*shape, device=device).to(dtype=dtype, memory_format=fmt)
    return t.requires_grad_(requires_grad)


def prepare(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Conv weights in the benchmark dtype, BatchNorm state float32, training mode."""
    module.to(device)
    for p in module.parameters():
        if p.dim() > 1:  # conv weights; 1-D BatchNorm parameters stay float32
            p.data = p.data.to(dtype)
    return module.train()


def _out_size(size: int, stride: int) -> int:
    return -(-size // stride)  # a 3x3 conv with padding 1: ceil(size / stride)


def make_op_case(op: str, stage: Stage, provider: str, *, batch: int, dtype: torch.dtype,
                 device: torch.device | str, channels_last: bool = True, k: int | None = None,
                 compile_mode: str | None = None, seed: int = 0) -> Case:
    """One fused op at one stage shape, training mode, for one provider (k: default the stage's).

    Raises CaseUnavailable (with the reason) where the provider cannot run the op here."""
    device = torch.device(device)
    backend = check_provider(provider, device, op)
    torch.manual_seed(seed)
    k = stage.k if k is None else k
    n, c, s, width = batch, stage.channels, stage.size, stage.width
    meta: dict[str, object] = {"batch": n, "channels": c, "size": s, "width": width, "k": k}
    traffic: Callable[[str], bytes_model.Traffic]
    if op in ("concat_conv_bn_act", "concat_conv3x3_bn_act"):
        # The entry ops: x (n, c, s, s) and h (n, k, s, s) -> (n, width, s / stride, s / stride).
        if op == "concat_conv_bn_act":
            module: nn.Module = ConcatConvBnAct(c, k, width, backend)
            so = s

            def traffic(pass_: str) -> bytes_model.Traffic:
                return bytes_model.concat_conv_bn_act_traffic(n, c, k, width, s * s, dtype, pass_)
        else:
            module = ConcatConv3x3BnAct(c, k, width, stage.stride, backend)
            so = _out_size(s, stage.stride)
            meta["stride"] = stage.stride
            if backend not in _OP_3X3.FUSED + ("torch", "auto"):
                # Recorded in the rows: such a row times the reference, not a kernel of that backend.
                meta["fallback"] = f"{backend} has no kernels of this op: runs the reference"

            def traffic(pass_: str) -> bytes_model.Traffic:
                return bytes_model.concat_conv3x3_bn_act_traffic(n, c, k, width, s, s, dtype, pass_, stage.stride)
        module = prepare(module, dtype, device)
        inputs = (activation((n, c, s, s), dtype, device, channels_last),
                  activation((n, k, s, s), dtype, device, channels_last))
        grad_outs = (activation((n, width, so, so), dtype, device, channels_last, requires_grad=False),)
    elif op == "rla_update":
        module = prepare(RlaUpdate(c, k, backend), dtype, device)
        inputs = (activation((n, k, s, s), dtype, device, channels_last),
                  activation((n, c, s, s), dtype, device, channels_last))
        grad_outs = (activation((n, k, s, s), dtype, device, channels_last, requires_grad=False),)

        def traffic(pass_: str) -> bytes_model.Traffic:
            return bytes_model.rla_update_traffic(n, c, k, s * s, dtype, pass_)
    elif op == "rla_update_and_entry":
        # h (n, k, s, s) and y (n, c, s, s) -> h_next (n, k, s, s) and the entry's out (n, width, s, s).
        unfused = is_unfused(provider)
        module = prepare(RlaUpdateAndEntry(c, k, width, backend, unfused=unfused), dtype, device)
        if unfused:
            meta["composition"] = f"{' then '.join(UNFUSED_OPS[op])}, each on {backend}"
        inputs = (activation((n, k, s, s), dtype, device, channels_last),
                  activation((n, c, s, s), dtype, device, channels_last))
        grad_outs = (activation((n, k, s, s), dtype, device, channels_last, requires_grad=False),
                     activation((n, width, s, s), dtype, device, channels_last, requires_grad=False))

        # Every provider's row counts the fused op's compulsory traffic, the unfused one's too, so the
        # rows' GB/s compare as times do (the two ops' own traffic is larger: y read twice).
        def traffic(pass_: str) -> bytes_model.Traffic:
            return bytes_model.rla_update_and_entry_traffic(n, c, k, width, s * s, dtype, pass_)
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    fn = compile_module(module, device, compile_mode) if is_compiled(provider) else module
    return Case(name=op, provider=provider, label=stage.label, fn=fn, inputs=inputs,
                params=tuple(module.parameters()), grad_outputs=grad_outs, traffic=traffic, meta=meta)
