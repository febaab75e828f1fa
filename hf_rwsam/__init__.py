"""hf-rwsam: sharpness-aware training (SAM, ASAM, m-SAM, RW-SAM) for the Hugging Face Trainer.

The names below load on first use (PEP 562), so that ``import hf_rwsam.sharpness`` (the step engine, torch only)
loads neither transformers nor timm, datasets or torchvision. hf-rwsam's architectures are registered in timm as soon
as timm is loaded (`_timm_registration`), so ``import hf_rwsam`` before ``AutoModelForImageClassification
.from_pretrained`` or ``timm.create_model`` builds them as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._timm_registration import register_when_timm_is_imported

__version__ = "0.1.0.dev0"

register_when_timm_is_imported()

_LAZY = {
    "RWSAMConfig": ".config",
    "RWSAMTrainer": ".trainer",
    "SharpnessAwareMixin": ".trainer",
    "SharpnessAwareStep": ".sharpness",
    "SharpnessSettings": ".sharpness",
    "gibbs_weights": ".sharpness",
    "register_norm_rule": ".sharpness",
    "sample_grad_norms": ".sharpness",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .config import RWSAMConfig
    from .sharpness import SharpnessAwareStep, SharpnessSettings, gibbs_weights, register_norm_rule, sample_grad_norms
    from .trainer import RWSAMTrainer, SharpnessAwareMixin


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
