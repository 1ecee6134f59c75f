"""Every model family at an odd input size (33x47) with ``pool_mode="ceil"``: it runs forward and
backward on torch and cpp with the right output shapes, the fused backend agrees with the reference,
the published default still refuses the size, and ceil mode changes nothing where floor mode runs."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext import models
from rla_model_testing import backend_params, kernel_problem

SIZE = (33, 47)
MOBILE = [[1, 8, 1, 1], [2, 8, 1, 2], [2, 16, 1, 2]]

# name -> (constructor(backend, **options), spatial size of the final features at 33x47 in ceil mode)
ARCHS = {
    "bottleneck": (lambda b, **kw: models.RLAResNet([1, 1, 1, 1], 10, 4, widths=(4, 4, 4, 4), backend=b, **kw),
                   (2, 2)),
    "basic_cifar": (lambda b, **kw: models.rla_resnet_cifar(8, 10, 4, widths=(4, 8, 8), backend=b, **kw),
                    (9, 12)),
    "shared_se": (lambda b, **kw: models.RLAResNet([1, 3], 10, 4, widths=(4, 8), shared_blocks=True, se=True,
                                                reduction=4, backend=b, **kw), (5, 6)),
    "gru": (lambda b, **kw: models.RLAgru_ResNet((1, 1, 1), 10, 4, widths=(4, 4, 4), backend=b, **kw), (3, 3)),
    "lstm": (lambda b, **kw: models.RLAlstm_ResNet((1, 1), 10, 4, widths=(4, 8), backend=b, **kw), (5, 6)),
    "mobilenetv2": (lambda b, **kw: models.RLA_MobileNetV2(10, 0.25, 4, MOBILE, backend=b, **kw), (5, 6)),
    "dsmobilenetv2": (lambda b, **kw: models.dsRLA_MobileNetV2(10, 0.25, 4, MOBILE, backend=b, **kw), (5, 6)),
    "densenet": (lambda b, **kw: models.RLADenseNet((1, 1, 1), 4, 8, bn_size=2, num_classes=10, rla_channel=4,
                                                 backend=b, **kw), (3, 3)),
    "densenet_cifar": (lambda b, **kw: models.RLADenseNet((1, 1), 4, 8, bn_size=2, num_classes=10, rla_channel=4,
                                                       stem="cifar", backend=b, **kw), (17, 24)),
    "detection": (lambda b, **kw: models.RLA_ResNet(layers=(1, 1, 1, 1), rla_channel=4, widths=(4, 4, 4, 4),
                                                 norm_eval=False, backend=b, **kw), (2, 2)),
}
DETECTION_SIZES = [(9, 12), (5, 6), (3, 3), (2, 2)]
BACKENDS = [p for p in backend_params(heavy=True) if p.id != "triton"]


def build(arch, backend, mode=None, dtype=torch.float32, seed=0):
    """The model in training mode; mode None: the constructor's default pool_mode."""
    torch.manual_seed(seed)
    kw = {} if mode is None else dict(pool_mode=mode)
    return ARCHS[arch][0](backend, **kw).to(dtype).train()


def outputs(arch, model, x):
    """The model's outputs as a tuple, and the final features' spatial sizes (x_T, and h_T if any)."""
    torch.manual_seed(3)  # the MobileNetV2 head's dropout draws from the global generator
    if arch == "detection":
        out = model(x)
        return out, [tuple(o.shape[2:]) for o in out]
    feats = model.forward_features(x)
    return (model.forward_head(*feats),), [tuple(f.shape[2:]) for f in feats]


def loss_of(outs):
    g = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_odd_size_runs_forward_and_backward(arch, backend):
    model = build(arch, backend, "ceil")
    x = torch.randn(2, 3, *SIZE, requires_grad=True)
    outs, sizes = outputs(arch, model, x)
    if arch == "detection":
        assert sizes == DETECTION_SIZES
        assert [o.shape[1] for o in outs] == model.out_channels_list
    else:
        assert outs[0].shape == (2, 10)
        assert set(sizes) == {ARCHS[arch][1]}
    loss_of(outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if arch != "detection":  # the backbone drops the last state, so its last RLA pieces get no gradient
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_matches_reference_at_odd_size(arch):
    """cpp against the torch backend in float64 at 33x47: outputs, input and parameter gradients."""
    if "cpp" not in rla_ext.available_backends("cpu") or kernel_problem("cpp"):
        pytest.skip("the cpp backend is not available here")
    results = []
    for backend in ("torch", "cpp"):
        model = build(arch, backend, "ceil", torch.float64)
        x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        outs, _ = outputs(arch, model, x)
        loss_of(outs).backward()
        results.append((outs, x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (o_ref, gx_ref, gp_ref), (o_got, gx_got, gp_got) = results
    tol = dict(rtol=1e-7, atol=1e-9)
    for a, b in zip(o_got, o_ref):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(gx_got, gx_ref, **tol)
    for name, g in gp_ref.items():
        if g is None:
            assert gp_got[name] is None, name
        else:
            torch.testing.assert_close(gp_got[name], g, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_keeps_published_behaviour(arch):
    """The default is the published floor pooling: odd sizes raise the same ValueError as before.
    DenseNet pools its features and its state with the same transition pool, so it runs in floor mode
    too (at the floor sizes)."""
    model = build(arch, "torch")
    assert model.pool_mode == "floor"
    x = torch.randn(2, 3, *SIZE)
    if arch.startswith("densenet"):
        _, sizes = outputs(arch, model, x)
        assert set(sizes) == {(2, 3) if arch == "densenet" else (16, 23)}
        return
    with pytest.raises(ValueError, match="does not match y|multiples of 32"):
        outputs(arch, model, x)


def test_named_constructors_take_the_option():
    assert models.get_model("rla_resnet20").pool_mode == "floor"
    assert models.get_model("rla_resnet20", pool_mode="ceil").pool_mode == "ceil"
    assert models.get_model("rla_resnet50", widths=(4, 4, 4, 4), pool_mode="ceil").pool_mode == "ceil"
    assert models.get_model("rlagru_resnet50", widths=(4, 4, 4, 4), pool_mode="ceil").pool_mode == "ceil"
    assert models.get_model("dsrla_mobilenetv2_k6", width_mult=0.25, pool_mode="ceil").pool_mode == "ceil"
    dense = models.get_model("rla_densenet_cifar", depth=10, pool_mode="ceil")
    assert dense.pool_mode == "ceil" and all(t.pool_mode == "ceil" for t in dense.transitions)
    for bad in ("round", True, None):
        with pytest.raises(ValueError, match="pool_mode"):
            models.RLAResNet([1], 10, 4, widths=(4,), pool_mode=bad)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ceil_equals_floor_where_floor_runs(arch):
    """At 32x32 every pooled side is even: ceil mode gives the published numbers, with the same
    state_dict (checkpoints load either way)."""
    floor, ceil = build(arch, "torch"), build(arch, "torch", "ceil")
    assert list(floor.state_dict()) == list(ceil.state_dict())
    ceil.load_state_dict(floor.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(outputs(arch, floor, x)[0], outputs(arch, ceil, x)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
