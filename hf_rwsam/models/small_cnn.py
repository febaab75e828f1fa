"""A small CNN for demos, tests and experiments on a CPU (the 8x8 digits, for instance).

A plain VGG-style stack (`Very Deep Convolutional Networks for Large-Scale Image Recognition` -
https://arxiv.org/abs/1409.1556) of conv3x3-norm-ReLU layers with global average pooling, so that it takes any input
size. `small_cnn` normalises with BatchNorm (https://arxiv.org/abs/1502.03167), which exercises SAM's handling of
running statistics; `small_cnn_gn` with GroupNorm (https://arxiv.org/abs/1803.08494), which keeps every sample's
loss its own, so that per-sample gradients (RW-SAM's exact estimator, tr(V)) are defined and take one backward.
"""

from __future__ import annotations

from timm.layers import ConvNormAct, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._base import ConvNet, cifar_cfg


def conv_norm_relu(c_in: int, c_out: int, stride: int, norm: str) -> nn.Module:
    """conv3x3, then BatchNorm (timm's fused BN-ReLU) or GroupNorm with 8 groups, then ReLU."""
    if norm == "batch":
        return ConvNormAct(c_in, c_out, 3, stride=stride)
    return nn.Sequential(create_conv2d(c_in, c_out, 3, stride=stride), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class SmallCnn(ConvNet):
    """conv3x3-norm-ReLU layers of `widths` channels, all but the first with stride 2, then global pooling and the
    classifier: about 24k parameters with the default widths and 10 classes.

    Args:
        widths (`tuple[int, ...]`): the channels of each layer.
        in_chans (`int`): the input channels.
        norm (`str`): ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm, 8 groups).
        **kwargs: `ConvNet`'s num_classes, global_pool and drop_rate.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_chans: int = 3, norm: str = "batch", **kwargs):
        if norm not in ("batch", "group"):
            raise ValueError(f"SmallCnn: norm={norm!r} is not supported; choose 'batch' or 'group'.")
        super().__init__(
            stem=conv_norm_relu(in_chans, widths[0], 1, norm),
            stages=nn.Sequential(*(conv_norm_relu(c_in, c_out, 2, norm) for c_in, c_out in zip(widths, widths[1:]))),
            norm=nn.Identity(),
            num_features=widths[-1],
            in_chans=in_chans,
            **kwargs,
        )


default_cfgs = generate_default_cfgs({
    "small_cnn": cifar_cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="stem.conv", classifier="head.fc"),
    "small_cnn_gn": cifar_cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="stem.0", classifier="head.fc"),
})


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCnn:
    """The small CNN, widths (16, 32, 64); no pretrained weights."""
    return build_model_with_cfg(SmallCnn, "small_cnn", pretrained, **kwargs)


@register_model
def small_cnn_gn(pretrained: bool = False, **kwargs) -> SmallCnn:
    """The small CNN with GroupNorm (8 groups) instead of BatchNorm; no pretrained weights."""
    return build_model_with_cfg(SmallCnn, "small_cnn_gn", pretrained, norm="group", **kwargs)
