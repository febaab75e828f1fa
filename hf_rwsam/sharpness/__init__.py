"""The sharpness-aware algorithms, independent of the Trainer: a model, a batch and a loss function in, gradients out."""

from .msam import split_batch, vmap_msam_step
from .perturb import global_norm, perturbed, sam_perturbation, swapped_parameters, written_parameters
from .reweight import effective_sample_size, exact_sample_grad_norms, gibbs_weights, sample_grad_norms
from .state import RNGReplay, frozen_running_stats, running_stat_modules

__all__ = [
    "RNGReplay",
    "effective_sample_size",
    "exact_sample_grad_norms",
    "frozen_running_stats",
    "gibbs_weights",
    "global_norm",
    "perturbed",
    "running_stat_modules",
    "sam_perturbation",
    "sample_grad_norms",
    "split_batch",
    "swapped_parameters",
    "vmap_msam_step",
    "written_parameters",
]
