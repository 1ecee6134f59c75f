"""load_published: released-style checkpoints ('state_dict', 'module.' prefixes) and mismatch reports."""
from __future__ import annotations

import pytest
import torch

from published_rla import randomize_
from rla_ext import models


def _fabricated_release(model: torch.nn.Module) -> dict:
    # The shape of a released file: training metadata around DataParallel-prefixed weights.
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 100, "arch": "rla_resnet50", "best_acc1": torch.tensor(77.2), "state_dict": sd}


def test_load_published_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = randomize_(models.rla_resnet50()).eval()
    path = tmp_path / "rla_resnet50.pth.tar"
    torch.save(_fabricated_release(src), path)
    loaded = models.load_published(path, "rla_resnet50")
    assert not loaded.training
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))


def test_load_published_accepts_plain_and_instance():
    src = models.rla_resnet20(10, 8)
    dst = models.rla_resnet20(10, 8)
    out = models.load_published(src.state_dict(), dst)
    assert out is dst


def test_mismatch_explains_missing_eca_layers():
    ckpt = _fabricated_release(models.rla_ecanet50())
    with pytest.raises(models.CheckpointMismatchError) as err:
        models.load_published(ckpt, "rla_resnet50")
    msg = str(err.value)
    assert "unexpected in the checkpoint (16)" in msg
    assert "stages.0.0.eca.conv.weight" in msg
    assert "rla_ecanet50" in msg


def test_mismatch_explains_shapes_and_missing():
    sd = models.rla_resnet20(10, 8).state_dict()
    del sd["stage_bns.1.2.running_var"]
    with pytest.raises(models.CheckpointMismatchError) as err:
        models.load_published(sd, "rla_resnet20", num_classes=100, rla_channel=8)
    msg = str(err.value)
    assert "missing from the checkpoint (1)" in msg and "stage_bns.1.2.running_var" in msg
    assert "fc.weight: checkpoint (10, 72) vs model (100, 72)" in msg
    assert "num_classes" in msg


def test_rejects_non_state_dict():
    with pytest.raises(TypeError, match="state_dict"):
        models.load_published({"epoch": 3}, "rla_resnet20")
