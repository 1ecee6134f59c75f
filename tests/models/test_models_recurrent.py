"""The released ConvGRU / ConvLSTM RLA-ResNets: sizes, names, released quirks, and float64 parity
(train and eval, outputs, running statistics, gradients) with an independent statement of the math."""
from __future__ import annotations

import pytest
import torch

from published_rla_variants import RefCellResNet, randomize_all_
from rla_model_testing import backend_params
from rla_variant_testing import assert_parity, load_pair, n_params
from rla_ext import models

# Released parameter counts and state_dict sizes (1000 classes, k = 32).
RELEASED = {
    "rlagru_resnet50": (26_056_104, 444),
    "rlagru_resnet50_eca": (26_056_190, 460),
    "rlagru_resnet101": (45_188_584, 835),
    "rlagru_resnet101_eca": (45_188_755, 868),
    "rlalstm_resnet50": (26_128_680, 408),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_sizes(name):
    m = models.get_model(name)
    assert (n_params(m), len(m.state_dict())) == RELEASED[name]
    assert name in models.list_models() and getattr(models, name) is models.MODELS[name]
    assert models.get_model(name, num_classes=7).fc.out_features == 7


def test_released_layout_and_quirks():
    gru = models.rlagru_resnet50()
    sd = gru.state_dict()
    assert "bn2.weight" not in sd and tuple(gru.fc.weight.shape) == (1000, 2048 + 32)
    for key, shape in {"recurrent_convs.0.gate_conv.weight": (64, 64, 3, 3), "recurrent_convs.0.gate_conv.bias": (64,),
                       "recurrent_convs.3.output_conv.weight": (32, 64, 3, 3),
                       "recurrent_convs.2.reset_gate_norm.weight": (32,), "conv_outs.3.weight": (32, 2048, 1, 1),
                       "stage_bns.2.5.running_var": (32,)}.items():
        assert tuple(sd[key].shape) == shape, key
    cell = gru.recurrent_convs[1]
    assert all(n.eps == 1e-6 and n.num_groups == 1 for n in (cell.reset_gate_norm, cell.update_gate_norm,
                                                               cell.output_norm))
    assert all(not b.bn3.weight.detach().any() for s in gru.stages for b in s)   # zero_init_last_bn default
    lstm = models.rlalstm_resnet50().state_dict()
    assert tuple(lstm["recurrent_convs.0.conv.weight"].shape) == (128, 64, 3, 3)
    assert "recurrent_convs.0.conv.bias" not in lstm
    eca = models.rlagru_resnet50_eca().state_dict()
    assert [eca[f"stages.{s}.0.eca.conv.weight"].shape[-1] for s in range(4)] == [5, 5, 5, 7]


def test_rla_channel_is_honoured():
    m = models.rlagru_resnet50(10, rla_channel=8)
    assert m.recurrent_convs[0].gate_conv.weight.shape[:2] == (16, 16)
    assert m.fc.in_features == 2048 + 8


SMALL = {
    "gru": (lambda b: models.RLAgru_ResNet((2, 1), 10, 8, widths=(16, 32), backend=b),
            lambda: RefCellResNet((2, 1), 10, 8, "gru", widths=(16, 32))),
    "gru_eca": (lambda b: models.RLAgru_ResNet((1, 1, 1), 10, 8, eca=(3, 5, 5), widths=(8, 16, 16), backend=b),
                lambda: RefCellResNet((1, 1, 1), 10, 8, "gru", eca=[3, 5, 5], widths=(8, 16, 16))),
    "lstm": (lambda b: models.RLAlstm_ResNet((1, 2), 10, 8, widths=(16, 32), backend=b),
             lambda: RefCellResNet((1, 2), 10, 8, "lstm", widths=(16, 32))),
}


@pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py
@pytest.mark.parametrize("backend", backend_params(heavy=True))
@pytest.mark.parametrize("arch", list(SMALL))
def test_matches_independent_math(arch, backend):
    build, build_ref = SMALL[arch]
    torch.manual_seed(0)
    model, ref = load_pair(build(backend), build_ref(), randomize_all_, seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_parity(model, ref, x)


def test_channels_last_and_sizes_not_multiple_of_32():
    torch.manual_seed(2)
    model, ref = load_pair(SMALL["lstm"][0](None), SMALL["lstm"][1](), randomize_all_)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref(x), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="multiples of 32"):
        models.RLAgru_ResNet((1, 1, 1), 10, 8, widths=(8, 8, 8))(torch.randn(1, 3, 40, 40))
