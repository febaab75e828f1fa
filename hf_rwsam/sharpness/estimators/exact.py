"""RW-SAM's exact estimator: true per-sample gradient norms and the weighted ascent gradient from the ascent's one
backward (`hf_rwsam.sharpness.ghost`: per-layer rules proven per layout, the batched estimator for the rest).

The pass over the model's layers is kept from step to step while the model and its parameters stay the same: the
layouts its first step proved serve every later one. A compiled model's ascent runs on its eager module (hooks do not
reach into compiled graphs).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from ..context import StepContext
from ..ghost import PerSampleGradients
from ..settings import SharpnessSettings

logger = logging.getLogger(__name__)


class ExactNorms:
    """The ``exact`` estimator.

    Args:
        settings (`SharpnessSettings`): ``rwsam_exact_chunk_size``, the samples per batched backward for what the
            rules do not cover.
    """

    def __init__(self, settings: SharpnessSettings):
        self.settings = settings
        self.per_sample: PerSampleGradients | None = None
        self._warned_uncompiled = False

    def forward(self, ctx: StepContext, losses_of: Callable) -> tuple:
        """The ascent's forward, its layers recorded: ``(loss, outputs)`` of ``ctx.loss_fn`` at ``x``."""
        model = self._eager(ctx.model)
        per_sample = self._pass(ctx)
        return per_sample.record(lambda: ctx.loss_fn(model, ctx.inputs, return_outputs=True), ctx.batch_size,
                                 ctx.rng.replay)

    def norms(self, ctx: StepContext, losses: torch.Tensor) -> torch.Tensor:
        return self.per_sample.norms(losses, ctx.host.loss_scale)

    def weighted_gradient(self, ctx: StepContext, weights: torch.Tensor, losses: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i p_i grad l_i`` from the recorded layers (times the loss scale under fp16)."""
        return self.per_sample.weighted_gradient(weights)

    def storage(self, params) -> None:
        """No buffers of its own to hold ``x + e``."""
        return None

    @contextlib.contextmanager
    def parameters_registered(self) -> Iterator[None]:
        """The model's own parameters in their modules inside the block (see `PerSampleGradients`)."""
        with contextlib.nullcontext() if self.per_sample is None else self.per_sample.parameters_registered():
            yield

    def _pass(self, ctx: StepContext) -> PerSampleGradients:
        model, params = ctx.host.unwrap(ctx.model), ctx.params.params
        kept = self.per_sample
        if kept is None or kept.model is not model or len(kept.params) != len(params) or any(
                p is not q for p, q in zip(kept.params, params)):
            kept = self.per_sample = PerSampleGradients(model, params, self.settings.rwsam_exact_chunk_size)
        return kept

    def _eager(self, model):
        """A compiled model's eager module (its layers' hooks keep their inputs and output gradients, which compiled
        graphs do not expose); the model itself otherwise."""
        if not hasattr(model, "_orig_mod"):
            return model
        if not self._warned_uncompiled:
            logger.warning("RW-SAM's exact estimator runs its ascent pass uncompiled (it reads every layer's inputs and "
                           "output gradients); the descent runs compiled, and with dropout it draws other masks than "
                           "the ascent (compiled code draws its random numbers its own way). The 'fd' estimator runs "
                           "compiled throughout.")
            self._warned_uncompiled = True
        return model._orig_mod
