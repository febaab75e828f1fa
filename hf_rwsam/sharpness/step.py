"""`SharpnessAwareStep`: one SAM / ASAM / m-SAM / RW-SAM step, in any training loop (docs/ALGORITHMS.md).

The loop hands the step a micro-batch, its loss function and (optionally) its own descent; the step goes down and
never back up:

1. ascent at ``x``, without gradient sync (`ascent`): ``g = grad L(x)`` on the loop's own loss (SAM, ASAM, each m-SAM
   group, `msam`), or RW-SAM's ``g = grad sum_i p_i l_i(x)`` with Gibbs weights over per-sample gradient norms
   (`estimators`) and per-sample losses whose mean is ``L`` (`sample_losses`);
2. ``e = rho T^2 g / ||T g||`` (`perturb`);  3. the parameters move to ``x + e`` (`perturb.perturbed`);
4. descent at ``x + e``: the loop's backward (its accumulation scaling, AMP scaler, DDP sync), with the ascent's
   random numbers replayed and BatchNorm running statistics frozen (`state`);
5. ``x`` restored bit-exactly, also on error or interrupt;  6. the clean loss ``L(x)`` returned, diagnostics kept.

The descent gradient is left in ``.grad`` for the loop's clipping, optimizer and scheduler. What belongs to the loop
(backward, ``no_sync``, collectives, the grad scaler, fp32 forwards, FSDP's shards) comes from a host object
(`host.TorchHost`, `host.AccelerateHost`).

Example, a plain PyTorch loop::

    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", sam_rho=0.05))

    def loss_fn(model, batch, return_outputs=False):
        outputs = model(**batch)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    for batch in loader:
        loss = step(model, batch, loss_fn)  # .grad now holds the descent gradient
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..columns import NOISE_COLUMN
from ..losses import PerSampleLossFunc
from .ascent import LossAscent, ReweightedAscent, SampleScores, ascent_for
from .context import LossFunc, RunningMeans, StepContext
from .host import TorchHost
from .msam import MicroBatchSAM
from .perturb import perturbed, sam_perturbation
from .sample_losses import PerSampleLosses
from .settings import SharpnessSettings
from .sharding import require_trainable_parameters, sharded_step_problems
from .state import RNGReplay, frozen_running_stats, restored, running_stat_modules

DescentFunc = Callable[..., torch.Tensor]
"""``descent(inputs, share, loss=None)``: backpropagate ``loss_fn`` at the perturbed weights as ``1 / share`` of the
step (or backpropagate `loss`, computed already) and return that loss, detached."""


class SharpnessAwareStep:
    """One sharpness-aware training step on a micro-batch, for any loop.

    Args:
        settings (`SharpnessSettings`): the mode and its settings (an `RWSAMConfig` is one).
        host (`TorchHost`, *optional*): what the loop lends (backward, ``no_sync``, collectives, grad scaler);
            defaults to a plain single-process `TorchHost`.
        per_sample_loss_func (`Callable`, *optional*): ``(outputs, labels) -> Tensor[b]``, the per-sample losses
            RW-SAM weights, whose mean must be the loss; checked on the first RW-SAM step against the loss function,
            as the built-in rule is.
        default_per_sample_loss (`Callable`, *optional*): the built-in rule used when `per_sample_loss_func` is
            None (default: `hf_rwsam.losses.per_sample_loss` with the problem type inferred).
        label_names (`tuple`): the batch keys holding the labels.
        seed (`int`): seeds RW-SAM's probes with the step index and the process rank.

    Call it as ``step(model, inputs, loss_fn, descent=None, *, global_step=None, reference_loss_fn=None)``: see
    `__call__`. `pop_metrics` returns the diagnostics averaged since the last call. A save made during a step (from a
    signal handler, or a callback in the descent) goes inside ``with step.original_parameters():`` to write ``x``.
    After each RW-SAM micro-batch, `sample_scores` holds its samples' losses, norm estimates, weights, margins and
    runner-up classes (`SampleScores`), for a loop that reports on individual samples (mislabeled ones, say).
    """

    def __init__(
        self,
        settings: SharpnessSettings,
        host: TorchHost | None = None,
        per_sample_loss_func: PerSampleLossFunc | None = None,
        default_per_sample_loss: PerSampleLossFunc | None = None,
        label_names: tuple[str, ...] = ("labels",),
        seed: int = 0,
    ):
        self.settings = settings
        self.host = host if host is not None else TorchHost()
        self.seed = seed
        self.metrics = RunningMeans()
        self.per_sample_losses = PerSampleLosses(per_sample_loss_func, default_per_sample_loss, label_names)
        self.ascent: LossAscent | ReweightedAscent = ascent_for(settings, self.per_sample_losses, self.metrics)
        self.msam = MicroBatchSAM(settings, self.host, self.metrics) if settings.sam_mode == "msam" else None
        self._step_index = (-1, 0)  # (global step, micro-step within it), seeds the probes
        self._calls = 0
        self._parameters_in_step = None  # the parameters while a step may hold them away from x

    @property
    def per_sample_loss_func(self) -> PerSampleLossFunc | None:
        return self.per_sample_losses.per_sample_loss_func

    @property
    def sample_scores(self) -> SampleScores | None:
        """The last RW-SAM micro-batch's per-sample losses, norms, weights, margins and runner-ups (None before, or in
        SAM)."""
        return getattr(self.ascent, "scores", None)

    # ------------------------------------------------------------------ the step

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        loss_fn: LossFunc,
        descent: DescentFunc | None = None,
        *,
        global_step: int | None = None,
        reference_loss_fn: LossFunc | None = None,
        msam_vmap_unavailable: str | None = None,
    ) -> torch.Tensor:
        """One step on `inputs`; afterwards ``.grad`` holds (has accumulated) the descent gradient.

        Args:
            model (`nn.Module`): the model, as the loop calls it (DDP- or Accelerate-wrapped), in training mode.
            inputs (`Mapping`): the micro-batch, labels included (an ``is_noisy`` column is taken out and only
                used for RW-SAM's diagnostics).
            loss_fn (`Callable`): ``loss_fn(model, inputs, return_outputs=False)``: the loss being optimised
                (with ``return_outputs``, ``(loss, outputs)``). Every pass calls the model through it.
            descent (`Callable`, *optional*): ``descent(inputs, share, loss=None) -> Tensor``: the loop's own
                forward and backward at the perturbed weights, counting for ``1 / share`` of the step (or the
                backward of `loss`, computed already by the vmap m-SAM), returning ``loss_fn``'s loss. Default:
                ``host.backward(loss_fn(model, inputs) / share)``.
            global_step (`int`, *optional*): the optimizer step, so that RW-SAM's probes are drawn again identically
                after a resume; by default the step counts its own calls.
            reference_loss_fn (`Callable`, *optional*): the loss to check the per-sample losses against, when
                `loss_fn`'s is normalised differently (the Trainer's token counts over the accumulation window).
            msam_vmap_unavailable (`str`, *optional*): why the vmap m-SAM cannot serve this batch (the loop's descent
                cannot take its loss): ``"auto"`` then runs the loop, ``"vmap"`` raises with this reason.

        Returns:
            `Tensor`: the clean loss ``L(x)`` as `loss_fn` computes it (m-SAM: the mean over the groups), detached.
        """
        inputs = dict(inputs)
        noisy = inputs.pop(NOISE_COLUMN, None)
        self._advance(global_step)
        descent = descent or self._default_descent(model, loss_fn)
        if self.settings.sam_mode == "none":
            return descent(inputs, 1)
        require_trainable_parameters(model)
        grad_enabled = torch.is_grad_enabled()

        def restore():
            self._parameters_in_step = None
            # Python cannot keep an interrupt from landing between a `with torch.no_grad():` block and the call that
            # ends it (PEP 419), which would leave gradients off for good: the mode is put back as the step found it.
            torch.set_grad_enabled(grad_enabled)

        with restored(restore):
            ctx = self._context(model, inputs, loss_fn, noisy, reference_loss_fn)
            if self.msam is not None:
                return self.msam(ctx, descent, lambda group, k: self._sam_step(
                    self._group_context(ctx, group), descent, share=k), msam_vmap_unavailable)
            return self._sam_step(ctx, descent)

    @contextlib.contextmanager
    def original_parameters(self) -> Iterator[None]:
        """The parameters hold ``x`` inside the block, also while the step holds them elsewhere (``x + e`` during the
        descent, ``x + h u`` during RW-SAM's probes, per-sample copies during the exact estimator's forward), and
        what they held before after it: a save made during the step writes ``x``. Outside a step it changes
        nothing."""
        params = self._parameters_in_step
        with contextlib.nullcontext() if params is None else params.original_values(), \
                self.ascent.parameters_registered():
            yield

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """The diagnostics averaged over the steps since the last call (device tensors, this process only)."""
        return self.metrics.pop()

    def _context(self, model, inputs, loss_fn, noisy=None, reference_loss_fn=None) -> StepContext:
        """What one call works on; the parameters are the ones `original_parameters` puts back at ``x``."""
        params = self._parameters_in_step = self.host.parameters(model)
        if params.sharded:
            problems = sharded_step_problems(self.settings)
            if problems:
                raise ValueError(f"{type(self.settings).__name__} on FSDP2 shards: {'; '.join(problems)}.")
        return StepContext(model, inputs, loss_fn, self.host, params, RNGReplay({t.device for t in params.tensors}),
                           running_stat_modules(model), noisy, reference_loss_fn, self._step_index, self.seed)

    @staticmethod
    def _group_context(ctx: StepContext, group: dict) -> StepContext:
        """An m-SAM group's context: the call's, with the group's inputs and the random-number state before the
        group's own ascent (no ``is_noisy`` diagnostics or reference loss: those are RW-SAM's)."""
        return dataclasses.replace(ctx, inputs=group, rng=RNGReplay(ctx.rng.devices), noisy=None,
                                   reference_loss_fn=None)

    def _sam_step(self, ctx: StepContext, descent: DescentFunc, share: int = 1) -> torch.Tensor:
        """One SAM / ASAM / RW-SAM step on ``ctx.inputs``, whose descent counts for ``1 / share`` of the step."""
        s, params = self.settings, ctx.params
        # FSDP's ascent gradient is its own reduce-scatter (the global scope), so only DDP skips the gradient sync
        with contextlib.nullcontext() if params.sharded else self.host.no_sync(ctx.model):
            loss, grads = self.ascent.gradient(ctx)
            grads = self._ascent_gradient(grads, params, self.ascent.sums_over_processes)
        perturbation = sam_perturbation(params.tensors, grads, s.sam_rho, s.sam_adaptive, s.sam_adaptive_eta,
                                        norm_fn=params.norm)
        self.metrics.add("sam/ascent_grad_norm", perturbation.ascent_grad_norm)
        self.metrics.add("sam/skipped_perturbations", float(perturbation.skipped))
        del grads  # they are perturbation.e, which `perturbed` turns into x + e
        with perturbed(params.tensors, perturbation.e, params.assign, self.ascent.storage(params.tensors)), \
                ctx.rng.replay(), frozen_running_stats(ctx.bn_modules):
            perturbed_loss = descent(ctx.inputs, share)
        clean = loss.detach()
        self.metrics.add("sam/sharpness", perturbed_loss.detach().float() - clean.float())
        return clean

    def _ascent_gradient(self, grads, params, summed_over_processes=False):
        """The ascent gradient of this step from this process's (scaled) gradient: unscaled, and with the ``global``
        scope averaged (or, for RW-SAM's globally normalised weights, summed) over processes. Under FSDP it is this
        process's shard of that gradient (FSDP's backward averaged it already)."""
        num_processes = self.host.num_processes
        if params.sharded:
            if summed_over_processes:
                torch._foreach_mul_(grads, float(num_processes))
        elif self.settings.sam_perturbation_scope == "global" and num_processes > 1:
            grads = self.host.reduce(grads, "sum" if summed_over_processes else "mean")
        if self.host.grad_scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.host.loss_scale)
        return grads

    def _default_descent(self, model, loss_fn) -> DescentFunc:
        def descent(inputs, share, loss=None):
            if loss is None:
                loss = loss_fn(model, inputs)
            self.host.backward(loss / share if share != 1 else loss)
            return loss.detach()

        return descent

    def _advance(self, global_step: int | None) -> None:
        if global_step is None:
            global_step = self._calls
        self._calls += 1
        step, micro = self._step_index
        self._step_index = (global_step, micro + 1 if step == global_step else 0)
