"""A small BatchNorm CNN for demos and tests on a CPU (the 8x8 digits, for instance).

A plain VGG-style stack (`Very Deep Convolutional Networks for Large-Scale Image Recognition` -
https://arxiv.org/abs/1409.1556) of conv3x3-BN-ReLU layers (BatchNorm: https://arxiv.org/abs/1502.03167) with global
average pooling, so that it takes any input size; its BatchNorm layers exercise SAM's handling of running statistics.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._base import ConvNet, cifar_cfg


class SmallCnn(ConvNet):
    """conv3x3-BN-ReLU layers of `widths` channels, all but the first with stride 2, then global pooling and the
    classifier: about 24k parameters with the default widths and 10 classes.

    Args:
        widths (`tuple[int, ...]`): the channels of each layer.
        in_chans (`int`): the input channels.
        **kwargs: `ConvNet`'s num_classes, global_pool and drop_rate.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_chans: int = 3, **kwargs):
        super().__init__(
            stem=ConvNormAct(in_chans, widths[0], 3),
            stages=nn.Sequential(*(ConvNormAct(c_in, c_out, 3, stride=2) for c_in, c_out in zip(widths, widths[1:]))),
            norm=nn.Identity(),
            num_features=widths[-1],
            in_chans=in_chans,
            **kwargs,
        )


default_cfgs = generate_default_cfgs(
    {"small_cnn": cifar_cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="stem.conv", classifier="head.fc")}
)


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCnn:
    """The small CNN, widths (16, 32, 64); no pretrained weights."""
    return build_model_with_cfg(SmallCnn, "small_cnn", pretrained, **kwargs)
