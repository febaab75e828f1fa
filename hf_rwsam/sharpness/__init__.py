"""The sharpness-aware step, independent of the Trainer: a model, a batch, a loss function and a host loop's hooks in,
the descent gradient in ``.grad`` out. Nothing here imports transformers."""

from .ascent import SampleScores
from .estimators import ESTIMATORS, sample_grad_norms
from .ghost import PerSampleGradients, exact_sample_grad_norms
from .host import AccelerateHost, TorchHost
from .msam import split_batch, vmap_msam_step
from .norm_rules import register_norm_rule
from .perturb import global_norm, perturbed, sam_perturbation, swapped_parameters, written_parameters
from .reweight import effective_sample_size, gibbs_weights
from .settings import SharpnessSettings
from .state import RNGReplay, frozen_running_stats, running_stat_modules
from .step import SharpnessAwareStep

__all__ = [
    "ESTIMATORS",
    "AccelerateHost",
    "PerSampleGradients",
    "RNGReplay",
    "SampleScores",
    "SharpnessAwareStep",
    "SharpnessSettings",
    "TorchHost",
    "effective_sample_size",
    "exact_sample_grad_norms",
    "frozen_running_stats",
    "gibbs_weights",
    "global_norm",
    "perturbed",
    "register_norm_rule",
    "running_stat_modules",
    "sam_perturbation",
    "sample_grad_norms",
    "split_batch",
    "swapped_parameters",
    "vmap_msam_step",
    "written_parameters",
]
