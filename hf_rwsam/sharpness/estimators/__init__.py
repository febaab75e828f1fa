"""Per-sample gradient norm estimators for RW-SAM: ``n_i ~ ||grad l_i(x)||`` and the weighted ascent gradient
``sum_i p_i grad l_i(x)``, one file each (`fd`: finite differences, the paper's; `exact`: from the ascent's one
backward). `ESTIMATORS` maps ``rwsam_estimator`` to its class; a new estimator is a class with the three methods of
`NormEstimator`, in a file of its own, registered here (and named in `settings.RwsamEstimator`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
from torch import nn

from ..context import StepContext
from ..host import TorchHost
from ..settings import RwsamEstimator, SharpnessSettings
from ..state import RNGReplay, frozen_running_stats, running_stat_modules
from .exact import ExactNorms
from .fd import FiniteDifferenceNorms, default_fd_step, fd_norms, fd_probe_losses

__all__ = ["ESTIMATORS", "ExactNorms", "FiniteDifferenceNorms", "NormEstimator", "default_fd_step", "fd_norms",
           "fd_probe_losses", "sample_grad_norms"]


class NormEstimator(Protocol):
    """What RW-SAM's ascent asks of an estimator, in this order, once per micro-batch."""

    def __init__(self, settings: SharpnessSettings): ...

    def forward(self, ctx: StepContext, losses_of: Callable) -> tuple:
        """Runs the ascent's forward at ``x`` (``ctx.loss_fn`` with outputs) and returns ``(loss, outputs)``, doing
        whatever the estimator needs around it; `losses_of(outputs)` gives per-sample losses."""

    def norms(self, ctx: StepContext, losses: torch.Tensor) -> torch.Tensor:
        """``n_i``, fp32 ``[b]``, for this process's samples, from the forward's per-sample `losses`."""

    def weighted_gradient(self, ctx: StepContext, weights: torch.Tensor, losses: torch.Tensor) -> list[torch.Tensor]:
        """``grad sum_i p_i l_i`` for every parameter of ``ctx.params`` (times the host's loss scale)."""

    def storage(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Buffers laid out like `params` that the step may fill with ``x + e`` until the next call, or None."""

    def parameters_registered(self) -> contextlib.AbstractContextManager:
        """A context in which the model's modules hold its own parameters, where the estimator swapped them."""


ESTIMATORS: dict[str, type] = {"fd": FiniteDifferenceNorms, "exact": ExactNorms}


def sample_grad_norms(
    model: nn.Module,
    inputs: dict,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    method: RwsamEstimator = "fd",
    num_probes: int = 1,
    fd_step: float | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Per-sample gradient norms ``n_i ~ ||grad l_i(x)||`` of a model on a batch, without any Trainer, by the
    estimators RW-SAM's step uses.

    The model is used in whatever mode it is in and left as it was: randomness (dropout) is replayed so every pass
    sees the same random numbers, BatchNorm running statistics are not updated, and the parameters are restored
    bit-exactly.

    Args:
        model (`nn.Module`): the model; all parameters with ``requires_grad`` count.
        inputs (`dict`): the batch.
        loss_fn (`Callable`): ``loss_fn(model, inputs) -> Tensor[b]`` of per-sample losses.
        method (`str`): ``"fd"`` (finite differences, `num_probes` extra forwards) or ``"exact"``.
        num_probes (`int`): probes ``Q`` for ``"fd"``.
        fd_step (`float`, *optional*): ``h`` for ``"fd"``; defaults to `default_fd_step`.
        generator (`torch.Generator`, *optional*): draws the Rademacher probes.
        chunk_size (`int`): samples per batched backward, for what ``"exact"``'s layer rules do not cover.

    Returns:
        `Tensor`: ``[b]`` fp32 norms.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"method={method!r} is not supported; choose one of {tuple(ESTIMATORS)}.")
    settings = SharpnessSettings(sam_mode="rwsam", rwsam_estimator=method, rwsam_num_probes=num_probes,
                                 rwsam_fd_step=fd_step, rwsam_exact_chunk_size=chunk_size)
    host = TorchHost()
    params = host.parameters(model)
    bn_modules = running_stat_modules(model)

    def per_sample_loss_fn(model, batch, return_outputs=False):  # per-sample losses are the outputs
        losses = loss_fn(model, batch)
        return (losses.mean(), losses) if return_outputs else losses.mean()

    ctx = StepContext(model, dict(inputs), per_sample_loss_fn, host, params, RNGReplay(params.tensors[0].device),
                      bn_modules, generator=generator)
    estimator = ESTIMATORS[method](settings)
    with frozen_running_stats(bn_modules):
        _, losses = estimator.forward(ctx, lambda outputs: outputs.float())
        return estimator.norms(ctx, losses.float()).detach()
