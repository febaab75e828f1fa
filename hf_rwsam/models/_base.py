"""Pieces shared by the CIFAR architectures: their timm default config, the CIFAR stem and a timm-style base model."""

from __future__ import annotations

import torch
from timm.layers import ClassifierHead, create_conv2d
from timm.models._manipulate import checkpoint_seq
from torch import nn

# Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_cfg(**kwargs) -> dict:
    """The timm default config of a CIFAR model: no pretrained weights, 10 classes, 32x32 RGB inputs used uncropped."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        **kwargs,
    }


def cifar_stem_conv(in_chans: int, out_chs: int) -> nn.Conv2d:
    """The 3x3 stride-1 stem convolution of the CIFAR ResNets (He et al. 2016, §4.2), Kaiming-initialised as in timm."""
    conv = create_conv2d(in_chans, out_chs, 3)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def cifar_feature_info(feature_info: list[dict]) -> list[dict]:
    """timm's `feature_info` once the ImageNet stem (stride-2 conv, stride-2 pooling) gives way to `cifar_stem_conv`."""
    return [dict(info, reduction=max(info["reduction"] // 4, 1)) for info in feature_info]


class ConvNet(nn.Module):
    """A stem, a sequence of stages, a final norm and timm's `ClassifierHead`, behind timm's model interface.

    The models of this package that timm has no class for derive from it, so that `timm.create_model` and transformers'
    `TimmWrapperForImageClassification` / `TimmWrapperModel` (which call `forward_features`, `forward_head` and
    `set_grad_checkpointing`) can build and run them.

    Args:
        stem (`nn.Module`): the layers before the first stage.
        stages (`nn.Sequential`): the stages, each checkpointed as a whole under gradient checkpointing.
        norm (`nn.Module`): applied to the output of the last stage (`nn.Identity` for none).
        num_features (`int`): the channels out of `norm`, the classifier's input.
        num_classes (`int`): the classifier's outputs; 0 for none (`forward` then returns the pooled features).
        in_chans (`int`): the input channels (the stem must take them).
        global_pool (`str`): timm's pooling type: "avg", "max", "avgmax", "catavgmax" or "" for none.
        drop_rate (`float`): dropout before the classifier.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: nn.Sequential,
        norm: nn.Module,
        num_features: int,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = stem
        self.stages = stages
        self.norm = norm
        self.num_features = num_features
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.head_hidden_size = self.head.num_features
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
