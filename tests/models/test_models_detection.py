"""The released detection backbone RLA_ResNet (per-stage features, frozen_stages, norm_eval) and the
torchvision recipe: an FPN backbone under FasterRCNN and RetinaNet, one training step and inference."""
from __future__ import annotations

import pytest
import torch

from published_rla import randomize_
from rla_ext import models
from rla_ext.models import RLA_ResNet

SMALL = dict(layers=[1, 2, 1, 1], rla_channel=8, widths=(8, 16, 16, 32))


def test_released_size_and_names():
    m = RLA_ResNet(layers=[3, 4, 6, 3])
    cls = models.rla_resnet50()
    assert sum(p.numel() for p in m.parameters()) == 23_789_632   # RLA-ResNet-50 without bn2 and fc
    assert set(m.state_dict()) == {k for k in cls.state_dict() if not k.startswith(("bn2.", "fc."))}
    assert m.out_channels_list == [256, 512, 1024, 2048]
    assert all(not b.bn3.weight.detach().any() for s in m.stages for b in s)   # zero_init_last_bn default


def test_stage_features_are_the_classifier_network_features():
    torch.manual_seed(0)
    cls = randomize_(models.RLAResNet(SMALL["layers"], 10, 8, widths=SMALL["widths"]).double(), 1)
    det = RLA_ResNet(**SMALL, norm_eval=False).double()
    det.init_weights({"state_dict": {"module." + k: v for k, v in cls.state_dict().items()}})
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        det.train(training)
        cls.train(training)
        feats = det(x)
        assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
        torch.testing.assert_close(feats[-1], cls.forward_features(x)[0], rtol=1e-7, atol=1e-9)
    det.out_indices = (1, 3)
    assert len(det(x)) == 2
    with pytest.raises(models.CheckpointMismatchError):
        det.init_weights(models.rla_resnet50().state_dict())


def test_frozen_stages_and_norm_eval():
    m = RLA_ResNet(**SMALL, frozen_stages=2, norm_eval=False).train()
    frozen = ("conv1.", "bn1.", "stages.0.", "stages.1.", "stage_bns.0.", "stage_bns.1.", "conv_outs.0.",
              "conv_outs.1.", "recurrent_convs.0.", "recurrent_convs.1.")
    for name, p in m.named_parameters():
        assert p.requires_grad != name.startswith(frozen), name
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert mod.training != (name + ".").startswith(frozen), name
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 3, 64, 64)).__getitem__(-1).sum().backward()
    after = m.state_dict()
    for k in (k for k in before if k.endswith("running_mean")):   # frozen BNs keep their statistics
        assert torch.equal(before[k], after[k]) == k.startswith(frozen), k
    for n, p in m.named_parameters():
        if n.startswith(frozen):
            assert p.grad is None, n
        elif n.startswith(("stages.", "conv_outs.2.", "recurrent_convs.2.")):
            assert p.grad is not None, n   # (the last stage's final update feeds no returned feature)
    m2 = RLA_ResNet(**SMALL, norm_eval=True).train()
    assert not any(b.training for b in m2.modules() if isinstance(b, torch.nn.BatchNorm2d))
    assert m2.stages[0][0].training
    with pytest.raises(ValueError, match="style"):
        RLA_ResNet(**SMALL, style="caffe")
    with pytest.raises(ValueError, match="out_indices"):
        RLA_ResNet(**SMALL, out_indices=(4,))


def _images_and_targets(n: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        xy = torch.rand(2, 2, generator=g) * size / 2
        wh = 8 + torch.rand(2, 2, generator=g) * size / 3
        targets.append({"boxes": torch.cat((xy, xy + wh), 1).clamp(max=size - 1), "labels": torch.tensor([1, 2])})
    return images, targets


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_torchvision_detector_trains_and_infers(detector):
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed (pip install torchvision)")
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    assert tv.__version__
    common = dict(min_size=64, max_size=64)
    if detector == "faster_rcnn":
        backbone = models.rla_resnet_fpn_backbone(out_channels=32, frozen_stages=1, **SMALL)
        model = FasterRCNN(backbone, num_classes=3, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                           rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, box_batch_size_per_image=16,
                           representation_size=64, **common)
    else:
        backbone = models.rla_resnet_fpn_backbone(out_channels=32, out_indices=(1, 2, 3),
                                                  extra_blocks=LastLevelP6P7(32, 32), frozen_stages=1, **SMALL)
        model = RetinaNet(backbone, num_classes=3, **common)
    images, targets = _images_and_targets()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    frozen = backbone.body.stages[0][0].conv1.weight.clone()
    stats = backbone.body.stage_bns[2][0].running_mean.clone()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert backbone.body.stages[2][0].conv1.weight.grad is not None
    opt.step()
    assert torch.equal(backbone.body.stages[0][0].conv1.weight, frozen)       # frozen_stages=1
    assert torch.equal(backbone.body.stage_bns[2][0].running_mean, stats)     # norm_eval=True
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(set(o) >= {"boxes", "labels", "scores"} for o in out)
    assert all(o["boxes"].shape[-1] == 4 and o["boxes"].shape[0] == o["scores"].shape[0] for o in out)
