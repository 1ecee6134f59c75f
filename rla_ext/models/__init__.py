"""RLA-Net models on the fused ops, with the released checkpoints' parameter names.

ImageNet (224x224): rla_resnet{50,101,152}, rla_ecanet{50,101,152} (= rla_resnet*_eca),
rla_senet{50,101,152}, rla_resnext{50,101}_32x4d[_se|_eca]. CIFAR size (32x32):
rla_resnet{20,32,44,56,110} (basic blocks), rla_resnet{29,47,164}_bottleneck, rla_resnet_cifar.
No-RLA floor: plain_resnet50. Loading: load_published(path_or_state_dict, arch).
Released aggregation-cell variants: rlagru_resnet{50,101}[_eca], rlalstm_resnet50 (RLAgru_ResNet,
RLAlstm_ResNet). Released MobileNetV2 variants: {rla,dsrla}_mobilenetv2[_k6|_k12|_k24|_k32][_eca]
(RLA_MobileNetV2, dsRLA_MobileNetV2). Detection: RLA_ResNet (the released backbone, per-stage features),
rla_resnet_fpn_backbone (under a torchvision FPN, for FasterRCNN / RetinaNet / MaskRCNN).
RLA-DenseNet-BC (ours, docs/MODELS.md): rla_densenet{121,161,169,201}, CIFAR rla_densenet_bc{100,190,250},
rla_densenet_cifar (RLADenseNet).
"""
from rla_ext.models.checkpoint import CheckpointMismatchError, explain_mismatch, load_published
from rla_ext.models.detection import RLA_ResNet, RLAResNetFPN, rla_resnet_fpn_backbone
from rla_ext.models.plain import PlainResNet, plain_resnet50
from rla_ext.models.rla_resnet import RLAResNet
from rla_ext.models.rla_recurrent import RLAgru_ResNet, RLAlstm_ResNet
from rla_ext.models.rla_mobilenetv2 import RLA_MobileNetV2, dsRLA_MobileNetV2
from rla_ext.models.rla_densenet import RLADenseNet
from rla_ext.models.zoo import ECA_KERNELS, MODELS, get_model, list_models, rla_resnet_cifar
from rla_ext.models.zoo import (  # noqa: F401  (registered constructors)
    rla_ecanet50, rla_ecanet101, rla_ecanet152, rla_resnet20, rla_resnet29_bottleneck, rla_resnet32,
    rla_resnet44, rla_resnet47_bottleneck, rla_resnet50, rla_resnet56, rla_resnet101, rla_resnet110,
    rla_resnet152, rla_resnet164_bottleneck, rla_resnext50_32x4d, rla_resnext50_32x4d_eca,
    rla_resnext50_32x4d_se, rla_resnext101_32x4d, rla_resnext101_32x4d_eca, rla_resnext101_32x4d_se,
    rla_senet50, rla_senet101, rla_senet152,
)

_FAMILY_CONSTRUCTORS = [n for n in MODELS if n.startswith(("rlagru_", "rlalstm_", "rla_mobilenetv2", "dsrla_mobilenetv2",
                                                          "rla_densenet"))]
globals().update({n: MODELS[n] for n in _FAMILY_CONSTRUCTORS})

rla_resnet50_eca = rla_ecanet50
rla_resnet101_eca = rla_ecanet101
rla_resnet152_eca = rla_ecanet152

__all__ = ["RLAResNet", "PlainResNet", "plain_resnet50", "load_published", "explain_mismatch",
           "CheckpointMismatchError", "get_model", "list_models", "MODELS", "ECA_KERNELS", "rla_resnet_cifar",
           "rla_resnet50", "rla_resnet101", "rla_resnet152", "rla_ecanet50", "rla_ecanet101", "rla_ecanet152",
           "rla_resnet50_eca", "rla_resnet101_eca", "rla_resnet152_eca", "rla_senet50", "rla_senet101",
           "rla_senet152", "rla_resnext50_32x4d", "rla_resnext50_32x4d_se", "rla_resnext50_32x4d_eca",
           "rla_resnext101_32x4d", "rla_resnext101_32x4d_se", "rla_resnext101_32x4d_eca", "rla_resnet20",
           "rla_resnet32", "rla_resnet44", "rla_resnet56", "rla_resnet110", "rla_resnet29_bottleneck",
           "rla_resnet47_bottleneck", "rla_resnet164_bottleneck", "RLAgru_ResNet", "RLAlstm_ResNet",
           "RLA_MobileNetV2", "dsRLA_MobileNetV2", "RLADenseNet", "RLA_ResNet", "RLAResNetFPN",
           "rla_resnet_fpn_backbone",
           *_FAMILY_CONSTRUCTORS]
