"""ResNet-18 for CIFAR: the ResNet of He et al. with a 3x3 stride-1 stem and no max-pool.

Paper: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385 (§4.2 for the CIFAR stem).
Reference implementation: https://github.com/kuangliu/pytorch-cifar (models/resnet.py), the CIFAR ResNet-18 of the
sharpness-aware minimization literature. Built from timm's `ResNet` and `BasicBlock`; only the stem differs.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ._base import cifar_cfg, cifar_feature_info, cifar_stem_conv


class CifarResNet(ResNet):
    """timm's `ResNet` with the CIFAR stem: one 3x3 stride-1 convolution and no max-pool, so that 32x32 inputs reach
    the last stage at 4x4.

    Args:
        **kwargs: timm's `ResNet` arguments (block, layers, num_classes, in_chans, drop_rate, ...); its stem options
            (`stem_width`, `stem_type`, `replace_stem_pool`) do not apply.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = cifar_stem_conv(self.in_chans, self.bn1.num_features)
        self.maxpool = nn.Identity()
        self.feature_info = cifar_feature_info(self.feature_info)


default_cfgs = generate_default_cfgs({"cifar_resnet18": cifar_cfg(first_conv="conv1", classifier="fc")})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for CIFAR (kuangliu/pytorch-cifar): 11.2M parameters with 10 classes. Like the reference, the last
    BatchNorm of each block starts at weight 1 (timm's `zero_init_last=False`)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), zero_init_last=False)
    return build_model_with_cfg(CifarResNet, "cifar_resnet18", pretrained, **dict(model_args, **kwargs))
