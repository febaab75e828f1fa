"""CIFAR architectures of the sharpness-aware minimization literature, registered in timm, and `create_model`.

Importing this package (`import hf_rwsam` has it imported as soon as timm is) registers `cifar_resnet18`, `cifar_wrn28_10`,
`cifar_pyramidnet110_a270`, `small_cnn` and `small_cnn_gn` in timm, so that `timm.create_model` and transformers'
`TimmWrapperForImageClassification` (hence `AutoModelForImageClassification.from_pretrained`) build them.
"""

from ._base import ConvNet
from .cifar_resnet import CifarResNet, cifar_resnet18
from .pyramidnet import PyramidBasicBlock, PyramidNet, cifar_pyramidnet110_a270
from .small_cnn import SmallCnn, small_cnn, small_cnn_gn
from .wide_resnet import WideResNet, cifar_wrn28_10

__all__ = [
    "CifarResNet",
    "ConvNet",
    "PyramidBasicBlock",
    "PyramidNet",
    "SmallCnn",
    "WideResNet",
    "cifar_pyramidnet110_a270",
    "cifar_resnet18",
    "cifar_wrn28_10",
    "create_model",
    "small_cnn",
    "small_cnn_gn",
]


def __getattr__(name: str):
    """`create_model` loads on first use: it needs transformers, the registrations above only timm (they run when
    timm is imported, transformers' own timm wrapper included)."""
    if name == "create_model":
        from .factory import create_model

        return create_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
