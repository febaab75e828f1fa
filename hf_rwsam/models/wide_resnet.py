"""Wide Residual Networks (WRN-d-k) for CIFAR, built from timm's pre-activation `ResNetV2` and `PreActBasic` block.

Paper: `Wide Residual Networks` - https://arxiv.org/abs/1605.07146 (Zagoruyko & Komodakis 2016).
Reference implementations: https://github.com/szagoruyko/wide-residual-networks and
https://github.com/xternalz/WideResNet-pytorch. WRN-28-10 is the CIFAR model of `Sharpness-Aware Minimization for
Efficiently Improving Generalization` - https://arxiv.org/abs/2010.01412 (Foret et al. 2021).
"""

from __future__ import annotations

from collections import OrderedDict

from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnetv2 import ResNetV2
from torch import nn

from ._base import cifar_cfg, cifar_feature_info, cifar_stem_conv


class WideResNet(ResNetV2):
    """WRN-`depth`-`widen_factor`: a 3x3 stride-1 stem convolution of 16 channels, three stages of (depth - 4) / 6
    pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of 16k, 32k and 64k channels with strides 1, 2, 2 and
    1x1-convolution shortcuts where the shape changes, then BN-ReLU, global pooling and the classifier.

    Args:
        depth (`int`): the number of layers, 6n + 4.
        widen_factor (`int`): k, the width multiplier.
        block_drop_rate (`float`): dropout between the two convolutions of every block (0.3 in the paper's dropout
            runs, none in the SAM paper's).
        **kwargs: timm's `ResNetV2` arguments: num_classes, in_chans, global_pool, drop_rate (dropout before the
            classifier), drop_path_rate.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, block_drop_rate: float = 0.0, **kwargs):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet `depth` must be 6n + 4 with n >= 1, got {depth}.")
        n = (depth - 4) // 6
        super().__init__(
            layers=(n, n, n),
            channels=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
            stem_chs=16,
            basic=True,
            bottle_ratio=1.0,
            conv_layer=create_conv2d,
            norm_layer=BatchNormAct2d,
            **kwargs,
        )
        self.stem = nn.Sequential(OrderedDict(conv=cifar_stem_conv(self.in_chans, 16)))
        self.feature_info = cifar_feature_info(self.feature_info)
        if block_drop_rate:
            # BatchNormAct2d drops between its BN and ReLU, the same as after the ReLU (ReLU(m * x) = m * ReLU(x) for a
            # mask m >= 0): the paper's BN-ReLU-dropout-conv.
            for stage in self.stages:
                for block in stage.blocks:
                    block.norm2.drop = nn.Dropout(block_drop_rate)


default_cfgs = generate_default_cfgs({"cifar_wrn28_10": cifar_cfg(first_conv="stem.conv", classifier="head.fc")})


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 for CIFAR: 36.5M parameters with 10 classes; `depth` and `widen_factor` select other WRNs."""
    model_args = dict(depth=28, widen_factor=10)
    return build_model_with_cfg(WideResNet, "cifar_wrn28_10", pretrained, **dict(model_args, **kwargs))
