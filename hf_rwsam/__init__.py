"""hf-rwsam: sharpness-aware training (SAM, ASAM, m-SAM, RW-SAM) for the Hugging Face Trainer."""

from . import models  # noqa: F401  (registers the CIFAR architectures in timm)
from .config import RWSAMConfig
from .sharpness import SharpnessAwareStep, SharpnessSettings
from .sharpness.reweight import gibbs_weights, sample_grad_norms
from .trainer import RWSAMTrainer, SharpnessAwareMixin

__version__ = "0.1.0.dev0"

__all__ = [
    "RWSAMConfig",
    "RWSAMTrainer",
    "SharpnessAwareMixin",
    "SharpnessAwareStep",
    "SharpnessSettings",
    "gibbs_weights",
    "sample_grad_norms",
]
