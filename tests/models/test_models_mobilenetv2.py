"""The released RLA-MobileNetV2 / dsRLA-MobileNetV2: sizes, names, the shared recurrent conv, and
float64 parity (train and eval, outputs, running statistics, gradients) with an independent
statement of the math, dropout included."""
from __future__ import annotations

import pytest
import torch

from published_rla_variants import RefMobileNetV2, randomize_all_
from rla_model_testing import backend_params
from rla_variant_testing import TOL, assert_parity, load_pair, n_params
from rla_ext import models
from rla_ext.nn import convert_sync_batchnorm

# Released parameter counts (1000 classes); state_dict: 416 entries, 433 with ECA.
RELEASED = {
    "rla_mobilenetv2": 3_633_096, "rla_mobilenetv2_eca": 3_633_127,
    "rla_mobilenetv2_k6": 3_527_510, "rla_mobilenetv2_k6_eca": 3_527_541,
    "rla_mobilenetv2_k12": 3_550_796, "rla_mobilenetv2_k12_eca": 3_550_827,
    "rla_mobilenetv2_k24": 3_599_312, "rla_mobilenetv2_k24_eca": 3_599_343,
    "rla_mobilenetv2_k32": 3_633_096, "rla_mobilenetv2_k32_eca": 3_633_127,
    "dsrla_mobilenetv2": 3_624_168, "dsrla_mobilenetv2_eca": 3_624_199,
    "dsrla_mobilenetv2_k6": 3_527_240, "dsrla_mobilenetv2_k6_eca": 3_527_271,
    "dsrla_mobilenetv2_k12": 3_549_608, "dsrla_mobilenetv2_k12_eca": 3_549_639,
    "dsrla_mobilenetv2_k24": 3_594_344, "dsrla_mobilenetv2_k24_eca": 3_594_375,
    "dsrla_mobilenetv2_k32": 3_624_168, "dsrla_mobilenetv2_k32_eca": 3_624_199,
}


def test_released_sizes():
    for name, count in RELEASED.items():
        m = models.get_model(name)
        assert n_params(m) == count, name
        assert len(m.state_dict()) == (433 if name.endswith("_eca") else 416), name
        assert getattr(models, name) is models.MODELS[name]
    assert models.dsrla_mobilenetv2_k32(num_classes=7).classifier[1].out_features == 7


def test_one_recurrent_conv_shared_by_every_stage():
    for name, attr, groups in (("rla_mobilenetv2", "recurrent_convs", 1),
                               ("dsrla_mobilenetv2", "recurrent_dsconvs", 32)):
        m = models.get_model(name)
        recs = getattr(m, attr)
        assert len(recs) == 5 and all(r is recs[0] for r in recs) and recs[0].groups == groups
        assert all(m.recurrent_conv(j) is recs[0] for j in range(7))
        sd = m.state_dict()
        assert sum(k.startswith(attr + ".") for k in sd) == 5
        assert len(m.conv_outs) == 7 and [len(b) for b in m.stage_bns] == [1, 2, 3, 4, 3, 3, 1]


def test_released_layout():
    sd = models.rla_mobilenetv2_k12_eca().state_dict()
    for key, shape in {"conv1.0.weight": (32, 3, 3, 3), "stages.0.0.conv.0.0.weight": (44, 1, 3, 3),
                       "stages.1.0.conv1x1.0.weight": (96, 16, 1, 1), "stages.1.0.conv.1.weight": (24, 108, 1, 1),
                       "stages.1.0.conv.3.conv.weight": (1, 1, 1), "stages.5.0.conv.3.conv.weight": (1, 1, 3),
                       "conv_outs.6.weight": (12, 320, 1, 1), "conv2.0.weight": (1280, 332, 1, 1),
                       "bn2.running_mean": (12,), "classifier.1.weight": (1000, 1280)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert "stages.0.0.conv1x1.0.weight" not in sd
    assert isinstance(models.rla_mobilenetv2().classifier[0], torch.nn.Dropout)


SETTING = [[1, 8, 1, 1], [2, 8, 2, 2], [2, 16, 2, 2], [2, 24, 1, 1], [2, 96, 1, 2]]


@pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py
@pytest.mark.parametrize("backend", backend_params(heavy=True))
@pytest.mark.parametrize("ds,eca", [(False, False), (True, True)], ids=["rla", "dsrla_eca"])
def test_matches_independent_math(ds, eca, backend):
    cls = models.dsRLA_MobileNetV2 if ds else models.RLA_MobileNetV2
    torch.manual_seed(0)
    model, ref = load_pair(cls(10, 0.5, 8, SETTING, ECA=eca, backend=backend),
                           RefMobileNetV2(SETTING, 10, 0.5, 8, eca=eca, ds=ds), randomize_all_, seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_parity(model, ref, x)


def test_dropout_draws_from_the_global_generator():
    torch.manual_seed(3)
    m = models.RLA_MobileNetV2(10, 0.5, 8, SETTING).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(4)
    a = m(x)
    torch.manual_seed(4)
    b = m(x)
    torch.manual_seed(5)
    c = m(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_synchronised_norms_take_the_concatenating_path():
    """With SyncBatchNorm2d (no process group here: local statistics) the depthwise entry falls back
    to the released concatenation; results are unchanged."""
    torch.manual_seed(6)
    model, ref = load_pair(models.dsRLA_MobileNetV2(10, 0.5, 8, SETTING),
                           RefMobileNetV2(SETTING, 10, 0.5, 8, ds=True), randomize_all_, seed=2)
    model = convert_sync_batchnorm(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        ref.train(training)
        torch.manual_seed(0)
        out = model(x)
        torch.manual_seed(0)
        torch.testing.assert_close(out, ref(x), **TOL)


def test_channels_last():
    torch.manual_seed(7)
    model, ref = load_pair(models.RLA_MobileNetV2(10, 0.5, 8, SETTING), RefMobileNetV2(SETTING, 10, 0.5, 8),
                           randomize_all_)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref(x), **TOL)


def test_released_format_checkpoint_loads_strictly():
    """A checkpoint in the released layout (DataParallel prefixes, the 5 recurrent-conv entries) loads
    with strict=True through load_published."""
    torch.manual_seed(8)
    table = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    ref = randomize_all_(RefMobileNetV2(table, 1000, 1.0, 32, ds=True), 3)
    ckpt = {"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 1}
    m = models.load_published(ckpt, "dsrla_mobilenetv2_k32")
    torch.testing.assert_close(m.recurrent_dsconvs[4].weight, ref.recurrent_dsconvs[0].weight)
    torch.testing.assert_close(m.stage_bns[5][2].running_var, ref.stage_bns[5][2].running_var)
    with pytest.raises(models.CheckpointMismatchError):
        models.load_published(ckpt, "rla_mobilenetv2_k32")
