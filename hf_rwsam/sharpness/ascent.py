"""The ascent of a sharpness-aware step: the loss at ``x`` and the gradient ``g`` the perturbation follows.

* `LossAscent` (SAM, ASAM, each m-SAM group): ``g = grad L(x)``, on the loop's own loss.
* `ReweightedAscent` (RW-SAM, arXiv 2509.18001): ``g = grad sum_i p_i l_i(x)`` with Gibbs weights
  ``p = softmax(lambda * s)`` over per-sample gradient norms ``n_i`` (`estimators`: ``fd`` or ``exact``), on per-sample
  losses whose mean is ``L`` (`sample_losses`); ``lambda = 0`` is SAM.

`ascent_for` maps the settings to one of them, once, when the step is built. Each returns the gradient of this
process's objective, times the host's loss scale under fp16; the step unscales it and, in the ``global`` scope, reduces
it over processes (`sums_over_processes`: RW-SAM's weights are normalised over the global batch, so its gradients add
up; SAM's average).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..losses import classification_margins
from .context import RunningMeans, StepContext
from .estimators import ESTIMATORS, NormEstimator
from .reweight import effective_sample_size, gibbs_weights
from .sample_losses import PerSampleLosses
from .settings import SharpnessSettings


@dataclass
class SampleScores:
    """What an RW-SAM step knows of each sample of its micro-batch (this process's rows, in the batch's order), all
    ``[b]`` and detached: the per-sample loss at ``x``, the gradient norm estimate ``n_i``, the Gibbs weight ``p_i``
    (fp32) and, for classifiers, the margin of the given label's logit over the largest other one (fp32) and that
    other class, the runner-up (int64), from the forward at ``x`` (`hf_rwsam.losses.classification_margins`; both None
    otherwise). The predicted class is the given label where the margin is positive, the runner-up where negative."""

    losses: torch.Tensor
    norms: torch.Tensor
    weights: torch.Tensor
    margins: torch.Tensor | None
    runner_up: torch.Tensor | None = None


class LossAscent:
    """SAM's ascent: the gradient of the loop's own loss."""

    sums_over_processes = False

    def gradient(self, ctx: StepContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(L(x), grad L(x))``; the gradient times the loss scale."""
        loss = ctx.loss_fn(ctx.model, ctx.inputs)
        return loss, ctx.params.gradient(ctx.host.scale(loss))

    def storage(self, params) -> None:
        """No buffers of its own to hold ``x + e`` (the perturbation's memory holds it)."""
        return None

    @contextlib.contextmanager
    def parameters_registered(self) -> Iterator[None]:
        yield


class ReweightedAscent:
    """RW-SAM's ascent: per-sample losses weighted by Gibbs weights over their gradient norms.

    Args:
        settings (`SharpnessSettings`): ``rwsam_*``, and the scope (the ``global`` one weights the global batch).
        losses (`PerSampleLosses`): the rule giving one loss per sample, checked on the first step.
        estimator (`NormEstimator`): the per-sample gradient norm estimator.
        metrics (`RunningMeans`): where the diagnostics go (``rwsam/ess``, ``rwsam/max_weight``, ``rwsam/lambda``,
            ``rwsam/noisy_weight_mass``).
    """

    sums_over_processes = True

    def __init__(self, settings: SharpnessSettings, losses: PerSampleLosses, estimator: NormEstimator,
                 metrics: RunningMeans):
        self.settings, self.losses, self.estimator, self.metrics = settings, losses, estimator, metrics
        self.scores: SampleScores | None = None

    def gradient(self, ctx: StepContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(L(x), grad sum_i p_i l_i(x))`` for this process's samples; the gradient times the loss scale."""
        s, estimator = self.settings, self.estimator
        value, outputs = estimator.forward(ctx, lambda outputs: self.losses.of(outputs, ctx.inputs))
        losses = self.losses.of(outputs, ctx.inputs)
        if not losses.requires_grad:
            raise ValueError(
                "RW-SAM needs the per-sample losses of the ascent pass with their gradient, and these carry none: the "
                "loss function returned outputs computed without autograd (TRL's SFTTrainer, for one, recomputes them "
                "under no_grad when asked for outputs). Use sam_mode='sam' or 'msam' with this trainer."
            )
        self.losses.check(ctx, outputs, losses, value)
        margins, runner_up = classification_margins(outputs, self.losses.labels(ctx.inputs)) or (None, None)
        del outputs
        norms = self._gathered(ctx, estimator.norms(ctx, losses))
        weights, lam = gibbs_weights(norms, s.rwsam_lambda, s.rwsam_normalize, s.rwsam_target_ess, s.rwsam_max_weight,
                                     return_lambda=True)
        self._log(ctx, weights, lam)
        weights = self._local(ctx, weights)
        self.scores = SampleScores(losses.detach(), self._local(ctx, norms), weights, margins, runner_up)
        # the loss detached: the ascent's graph (kept by the exact estimator) is freed before the descent allocates
        return value.detach(), estimator.weighted_gradient(ctx, weights, losses)

    def storage(self, params) -> list[torch.Tensor] | None:
        """Buffers laid out like `params`, free between steps, to hold ``x + e`` (the fd probes': RW-SAM's peak memory
        then stays SAM's), or None."""
        return self.estimator.storage(params)

    def parameters_registered(self) -> contextlib.AbstractContextManager:
        """Where the estimator swaps parameters for copies meanwhile, the parameters back in place inside the block."""
        return self.estimator.parameters_registered()

    def _log(self, ctx: StepContext, weights: torch.Tensor, lam: torch.Tensor) -> None:
        b = weights.shape[0]
        self.metrics.add("rwsam/ess", effective_sample_size(weights) / b)
        self.metrics.add("rwsam/max_weight", weights.max() * b)
        self.metrics.add("rwsam/lambda", lam)
        if ctx.noisy is not None:
            noisy = self._gathered(ctx, torch.as_tensor(ctx.noisy, device=weights.device).float())
            self.metrics.add("rwsam/noisy_weight_mass", (weights * noisy).sum())

    def _global(self, ctx: StepContext) -> bool:
        return self.settings.sam_perturbation_scope == "global" and ctx.host.num_processes > 1

    def _gathered(self, ctx: StepContext, values: torch.Tensor) -> torch.Tensor:
        """All processes' values (global scope: the weights run over the global batch) or this process's."""
        return ctx.host.gather(values) if self._global(ctx) else values

    def _local(self, ctx: StepContext, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of values `_gathered` gathered."""
        if not self._global(ctx):
            return values
        b = values.shape[0] // ctx.host.num_processes
        return values[ctx.host.process_index * b : (ctx.host.process_index + 1) * b]


def ascent_for(settings: SharpnessSettings, losses: PerSampleLosses, metrics: RunningMeans):
    """The ascent `settings` ask for: RW-SAM's with its estimator, or SAM's loss ascent."""
    if settings.sam_mode == "rwsam":
        return ReweightedAscent(settings, losses, ESTIMATORS[settings.rwsam_estimator](settings), metrics)
    return LossAscent()
