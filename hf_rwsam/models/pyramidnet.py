"""PyramidNet for CIFAR, with basic blocks and additive widening.

Paper: `Deep Pyramidal Residual Networks` - https://arxiv.org/abs/1610.02915 (Han et al. 2017).
Reference implementation: https://github.com/dyhan0920/PyramidNet-PyTorch (PyramidNet.py, `bottleneck=False`).
PyramidNet-110 with alpha = 270 and basic blocks has 28.3M parameters (the paper's Table 4).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import accumulate

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._base import ConvNet, cifar_cfg


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN with a parameter-free shortcut: 2x2 average pooling when strided, zero-padded to
    the wider output (the paper's Fig. 6(d) and §3.2).

    Args:
        in_chs (`int`): input channels.
        out_chs (`int`): output channels, at least `in_chs`.
        stride (`int`): stride of the first convolution.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.conv1 = create_conv2d(in_chs, out_chs, 3, stride=stride)
        self.norm2 = BatchNormAct2d(out_chs)
        self.conv2 = create_conv2d(out_chs, out_chs, 3)
        self.norm3 = nn.BatchNorm2d(out_chs)
        # ceil_mode keeps the shortcut the size of the strided convolution's output on odd inputs
        self.downsample = nn.AvgPool2d(2, ceil_mode=True) if stride > 1 else nn.Identity()
        self.extra_chs = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm3(self.conv2(self.norm2(self.conv1(self.norm1(x)))))
        return out + F.pad(self.downsample(x), (0, 0, 0, 0, 0, self.extra_chs))


class PyramidNet(ConvNet):
    """PyramidNet-`depth` with widening `alpha`: a 3x3 stride-1 stem convolution of 16 channels and BN, three stages of
    (depth - 2) / 6 `PyramidBasicBlock`s (strides 1, 2, 2) whose width grows by alpha / (3n) after every block, from
    16 to 16 + alpha, then BN-ReLU, global pooling and the classifier.

    Args:
        depth (`int`): the number of layers, 6n + 2.
        alpha (`float`): the total widening.
        in_chans (`int`): the input channels.
        **kwargs: `ConvNet`'s num_classes, global_pool and drop_rate.
    """

    def __init__(self, depth: int = 110, alpha: float = 270, in_chans: int = 3, **kwargs):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"PyramidNet `depth` must be 6n + 2 with n >= 1, got {depth}.")
        n = (depth - 2) // 6
        # widths rounded block by block from the running float sum, as in the reference implementation
        widths = [round(w) for w in accumulate([alpha / (3 * n)] * (3 * n), initial=16.0)]
        blocks = [PyramidBasicBlock(widths[i], widths[i + 1], stride=2 if i in (n, 2 * n) else 1) for i in range(3 * n)]
        super().__init__(
            stem=nn.Sequential(OrderedDict(conv=create_conv2d(in_chans, 16, 3), norm=nn.BatchNorm2d(16))),
            stages=nn.Sequential(*(nn.Sequential(*blocks[i : i + n]) for i in range(0, 3 * n, n))),
            norm=BatchNormAct2d(widths[-1]),
            num_features=widths[-1],
            in_chans=in_chans,
            **kwargs,
        )


default_cfgs = generate_default_cfgs(
    {"cifar_pyramidnet110_a270": cifar_cfg(first_conv="stem.conv", classifier="head.fc")}
)


@register_model
def cifar_pyramidnet110_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 (basic blocks), alpha = 270, for CIFAR: 28.3M parameters in the paper's Table 4 (28.5M with 10
    classes counted in the reference implementation); `depth` and `alpha` select other basic-block PyramidNets."""
    model_args = dict(depth=110, alpha=270)
    return build_model_with_cfg(PyramidNet, "cifar_pyramidnet110_a270", pretrained, **dict(model_args, **kwargs))
