"""RLA-DenseNet-BC (ours, docs/MODELS.md): sizes of every registered name, and float64 parity (train
and eval, outputs, running statistics, gradients) with the equations written out independently."""
from __future__ import annotations

import pytest
import torch

from published_rla_variants import randomize_all_
from rla_densenet_formula import RefRLADenseNet
from rla_model_testing import backend_params
from rla_variant_testing import TOL, assert_parity, load_pair, n_params
from rla_ext import models

# (parameters, state_dict entries) at the defaults (ImageNet: 1000 classes, k = 32; CIFAR: 10, k = 16).
SIZES = {
    "rla_densenet121": (8_293_160, 1030), "rla_densenet161": (29_240_296, 1370),
    "rla_densenet169": (14_563_624, 1438), "rla_densenet201": (20_494_632, 1710),
    "rla_densenet_bc100": (815_242, 847), "rla_densenet_bc190": (25_874_510, 1612),
    "rla_densenet_bc250": (15_525_526, 2122),
}
# torchvision's DenseNet-121 has 7,978,856 parameters; RLA adds k input columns to every layer's 1x1
# conv (58 layers x 128 x 32), per-block out (32x32) and rec (32x32x9) convs, per-layer BN(32), bn2,
# and 32 classifier inputs.
RLA_OVER_DENSENET121 = 58 * 128 * 32 + 4 * 32 * 32 + 4 * 32 * 32 * 9 + 58 * 64 + 64 + 32 * 1000


@pytest.mark.parametrize("name", list(SIZES))
def test_sizes(name):
    m = models.get_model(name)
    assert (n_params(m), len(m.state_dict())) == SIZES[name]
    assert getattr(models, name) is models.MODELS[name]


def test_densenet121_is_densenet_plus_rla():
    assert SIZES["rla_densenet121"][0] - RLA_OVER_DENSENET121 == 7_978_856
    m = models.rla_densenet121(num_classes=7)
    assert m.classifier.out_features == 7 and tuple(m.blocks[3][15].conv1.weight.shape) == (128, 992 + 32, 1, 1)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.rla_densenet_cifar(depth=50)


SMALL = {
    "cifar": (lambda b: models.RLADenseNet((2, 3), 4, 8, num_classes=10, rla_channel=8, stem="cifar", backend=b),
              lambda: RefRLADenseNet((2, 3), 4, 8, k=8), 16),
    "imagenet": (lambda b: models.RLADenseNet((2, 1, 2), 4, 8, bn_size=2, num_classes=10, rla_channel=4, backend=b),
                 lambda: RefRLADenseNet((2, 1, 2), 4, 8, bn_size=2, k=4, cifar=False), 32),
}


@pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py
@pytest.mark.parametrize("backend", backend_params(heavy=True))
@pytest.mark.parametrize("arch", list(SMALL))
def test_matches_the_equations(arch, backend):
    build, build_ref, size = SMALL[arch]
    torch.manual_seed(0)
    model, ref = load_pair(build(backend), build_ref(), randomize_all_, seed=1)
    assert_parity(model, ref, torch.randn(2, 3, size, size, dtype=torch.float64))


def test_channels_last_and_registered_cifar_model_runs():
    torch.manual_seed(2)
    model, ref = load_pair(SMALL["cifar"][0](None), SMALL["cifar"][1](), randomize_all_)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref(x), **TOL)
    m = models.rla_densenet_cifar(depth=10, growth_rate=4, rla_channel=4).eval()
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 10)
