"""`SharpnessAwareStep`: one SAM / ASAM / m-SAM / RW-SAM step, in any training loop (ALGORITHMS.md).

The loop hands the step a micro-batch, its loss function and (optionally) its own descent; the step goes down and
never back up:

1. ascent at ``x``, without gradient sync: ``g = grad L(x)`` on the loop's own loss (SAM, ASAM, each m-SAM group),
   or RW-SAM's ``g = grad sum_i p_i l_i(x)`` with Gibbs weights ``p`` over per-sample gradient norms (`reweight`:
   ``Q`` finite-difference probes, or exact norms) and per-sample losses whose mean is ``L``;
2. ``e = rho T^2 g / ||T g||`` (`perturb`);  3. the parameters move to ``x + e`` (`perturb.perturbed`);
4. descent at ``x + e``: the loop's backward (its accumulation scaling, AMP scaler, DDP sync), with the ascent's
   random numbers replayed and BatchNorm running statistics frozen (`state`);
5. ``x`` restored bit-exactly, also on error;  6. the clean loss ``L(x)`` returned, diagnostics kept for the log.

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
import logging
from dataclasses import dataclass
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..columns import NOISE_COLUMN
from ..losses import PER_SAMPLE_LOSS_EXAMPLE, PerSampleLossFunc, classification_margins, model_logits, per_sample_loss
from .host import TorchHost
from .msam import batch_size, split_batch, vmap_msam_step
from .perturb import perturbed, sam_perturbation
from .ghost import PerSampleGradients
from .reweight import (
    RademacherDirections,
    default_fd_step,
    effective_sample_size,
    fd_norms,
    fd_probe_losses,
    gibbs_weights,
    rademacher_seed,
)
from .settings import SharpnessSettings
from .sharding import require_trainable_parameters, sharded_step_problems
from .state import RNGReplay, frozen_running_stats, restored, running_stat_modules

logger = logging.getLogger(__name__)

LossFunc = Callable[..., Any]
"""``loss_fn(model, inputs, return_outputs=False)``: the loss, or ``(loss, outputs)`` (the Trainer's `compute_loss`)."""
DescentFunc = Callable[..., torch.Tensor]
"""``descent(inputs, share, loss=None)``: backpropagate ``loss_fn`` at the perturbed weights as ``1 / share`` of the
step (or backpropagate `loss`, computed already) and return that loss, detached."""


class _RunningMeans:
    """Diagnostics accumulated on device between two logs (no host synchronisation per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        self.sums[name] = self.sums[name] + value.to(self.sums[name].device) if name in self.sums else value.clone()
        self.counts[name] += 1

    def pop(self) -> dict[str, torch.Tensor]:
        means = {name: total / self.counts[name] for name, total in self.sums.items()}
        self.sums, self.counts = {}, defaultdict(int)
        return means


@dataclass
class SampleScores:
    """What an RW-SAM step knows of each sample of its micro-batch (this process's rows, in the batch's order), all
    fp32 ``[b]`` and detached: the per-sample loss at ``x``, the gradient norm estimate ``n_i``, the Gibbs weight
    ``p_i`` and, for classifiers, the margin of the given label's logit over the largest other one (None otherwise)."""

    losses: torch.Tensor
    norms: torch.Tensor
    weights: torch.Tensor
    margins: torch.Tensor | None


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
            None (default: `hf_rwsam.losses.per_sample_loss` with the problem type inferred); checked on the first
            RW-SAM step against the loss function.
        label_names (`tuple`): the batch keys holding the labels.
        seed (`int`): seeds RW-SAM's probes with the step index and the process rank.

    Call it as ``step(model, inputs, loss_fn, descent=None, *, global_step=None, reference_loss_fn=None)``: see
    `__call__`. `pop_metrics` returns the diagnostics averaged since the last call. A save made during a step (from a
    signal handler, or a callback in the descent) goes inside ``with step.original_parameters():`` to write ``x``.
    After each RW-SAM micro-batch, `sample_scores` holds its samples' losses, norm estimates, weights and margins
    (`SampleScores`), for a loop that reports on individual samples (mislabeled ones, say).
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
        self.per_sample_loss_func = per_sample_loss_func
        self.default_per_sample_loss = default_per_sample_loss or per_sample_loss
        self.label_names = tuple(label_names)
        self.seed = seed
        self._metrics = _RunningMeans()
        self._per_sample_losses_checked = False
        self._msam_vmap_ok: bool | None = None  # decided on the first m-SAM step under "auto"
        self._warned_vmap_uncompiled = False
        self._warned_exact_uncompiled = False
        self._exact_pass: PerSampleGradients | None = None
        self.sample_scores: SampleScores | None = None  # the last RW-SAM micro-batch's, for per-sample reports
        self._sharding_checked = False
        self._warned_low_precision_probes = False
        self._fd_step_checked = False
        self._step_index = (-1, 0)  # (global step, micro-step within it), seeds the probes
        self._calls = 0
        self._directions = RademacherDirections()  # the probes' buffers, kept from step to step
        self._parameters_in_step = None  # the parameters while a step may hold them away from x
        if settings.sam_mode == "msam" and settings.msam_implementation == "vmap" and self.host.num_processes > 1:
            raise settings.refuse(
                "msam_implementation", "vmap", "it bypasses the DDP forward, so it runs on one process only; choose "
                "'loop' or 'auto'"
            )

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
            reference_loss_fn (`Callable`, *optional*): the loss to check the built-in per-sample losses against,
                when `loss_fn`'s is normalised differently (the Trainer's token counts over the accumulation window).
            msam_vmap_unavailable (`str`, *optional*): why the vmap m-SAM cannot serve this batch (the loop's descent
                cannot take its loss): ``"auto"`` then runs the loop, ``"vmap"`` raises with this reason.

        Returns:
            `Tensor`: the clean loss ``L(x)`` as `loss_fn` computes it (m-SAM: the mean over the groups), detached.
        """
        inputs = dict(inputs)
        noisy = inputs.pop(NOISE_COLUMN, None)
        self._advance(global_step)
        descent = descent or self._default_descent(model, loss_fn)
        mode = self.settings.sam_mode
        if mode == "none":
            return descent(inputs, 1)
        require_trainable_parameters(model)
        grad_enabled = torch.is_grad_enabled()

        def restore():
            self._parameters_in_step = None
            # Python cannot keep an interrupt from landing between a `with torch.no_grad():` block and the call that
            # ends it (PEP 419), which would leave gradients off for good: the mode is put back as the step found it.
            torch.set_grad_enabled(grad_enabled)

        with restored(restore):
            if mode == "msam":
                return self._msam_step(model, inputs, loss_fn, descent, msam_vmap_unavailable)
            return self._sam_step(model, inputs, loss_fn, descent, noisy=noisy, reference_loss_fn=reference_loss_fn)

    @contextlib.contextmanager
    def original_parameters(self) -> Iterator[None]:
        """The parameters hold ``x`` inside the block, also while the step holds them elsewhere (``x + e`` during the
        descent, ``x + h u`` during RW-SAM's probes), and what they held before after it: a save made during the step
        (a signal handler's, a callback's in the descent) writes ``x``. Outside a step it changes nothing."""
        params, exact = self._parameters_in_step, self._exact_pass
        with contextlib.nullcontext() if params is None else params.original_values(), \
                contextlib.nullcontext() if exact is None else exact.parameters_registered():
            yield

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """The diagnostics averaged over the steps since the last call (device tensors, this process only)."""
        return self._metrics.pop()

    def _sam_step(self, model, inputs, loss_fn, descent, share=1, noisy=None, reference_loss_fn=None):
        """One SAM / ASAM / RW-SAM step on `inputs`, whose descent counts for ``1 / share`` of the step."""
        s = self.settings
        params = self._parameters_in_step = self.host.parameters(model)  # what `original_parameters` puts back at x
        if params.sharded and not self._sharding_checked:
            problems = sharded_step_problems(s)
            if problems:
                raise ValueError(f"{type(s).__name__} on FSDP2 shards: {'; '.join(problems)}.")
            self._sharding_checked = True
        bn_modules = running_stat_modules(model)
        rng = RNGReplay({t.device for t in params.tensors})
        reweight = s.sam_mode == "rwsam"
        # FSDP's ascent gradient is its own reduce-scatter (the global scope), so only DDP skips the gradient sync
        with contextlib.nullcontext() if params.sharded else self.host.no_sync(model):
            if reweight:
                loss, grads = self._rwsam_ascent(model, inputs, loss_fn, params, rng, bn_modules, noisy,
                                                 reference_loss_fn)
            else:
                loss = loss_fn(model, inputs)
                grads = params.gradient(self._scaled(loss))
            grads = self._ascent_gradient(grads, params, summed_over_processes=reweight)
        perturbation = sam_perturbation(params.tensors, grads, s.sam_rho, s.sam_adaptive, s.sam_adaptive_eta,
                                        norm_fn=params.norm)
        self._metrics.add("sam/ascent_grad_norm", perturbation.ascent_grad_norm)
        self._metrics.add("sam/skipped_perturbations", float(perturbation.skipped))
        del grads  # they are perturbation.e, which `perturbed` turns into x + e
        # RW-SAM's probe buffers hold x + e, in place of the perturbation's own memory: its peak stays SAM's
        storage = self._directions.storage(params.tensors) if reweight and s.rwsam_estimator == "fd" else None
        with perturbed(params.tensors, perturbation.e, params.assign, storage), rng.replay(), \
                frozen_running_stats(bn_modules):
            perturbed_loss = descent(inputs, share)
        clean = loss.detach()
        self._metrics.add("sam/sharpness", perturbed_loss.detach().float() - clean.float())
        return clean

    def _rwsam_ascent(self, model, inputs, loss_fn, params, rng, bn_modules, noisy, reference_loss_fn):
        """RW-SAM's ascent pass: the loss at ``x`` and ``grad sum_i p_i l_i`` (this process's share of it, times the
        loss scale), with Gibbs weights ``p`` over per-sample gradient norms (fd probes, or exact norms)."""
        s = self.settings
        exact = s.rwsam_estimator == "exact"
        if not exact:
            if not self._warned_low_precision_probes and any(t.dtype in (torch.bfloat16, torch.float16)
                                                              for t in params.tensors):
                logger.warning(
                    "RW-SAM fd: the parameters themselves are bf16/fp16, so the probes cannot run in fp32, and their "
                    "rounding hides or swamps the finite-difference step (benchmarks/fd_step.py). Keep fp32 weights "
                    "(mixed precision through autocast) or use rwsam_estimator='exact'."
                )
                self._warned_low_precision_probes = True
            if not self._fd_step_checked:
                self._check_fd_step(params)
            probe_losses = self._probe_function(model, inputs, loss_fn, rng, bn_modules)
            probes = fd_probe_losses(probe_losses, params.tensors, s.rwsam_num_probes, s.rwsam_fd_step,
                                     self._probe_generator(params.tensors[0].device), num_coordinates=params.numel,
                                     assign=params.assign, directions=self._directions)
            # Under mixed precision the slopes need an fp32 reference at x too; in fp32 the ascent's losses are it.
            fd_reference = probe_losses() if self.host.mixed_precision(model) else None
        forward_model = self._eager_for_exact_norms(model)
        if exact:
            per_sample = self._per_sample_gradients(forward_model, params)
            value, outputs = per_sample.record(lambda: loss_fn(forward_model, inputs, return_outputs=True),
                                               batch_size(inputs), rng.replay)
        else:
            value, outputs = loss_fn(forward_model, inputs, return_outputs=True)
        losses = self._per_sample_losses(outputs, inputs)
        if not losses.requires_grad:
            raise ValueError(
                "RW-SAM needs the per-sample losses of the ascent pass with their gradient, and these carry none: the "
                "loss function returned outputs computed without autograd (TRL's SFTTrainer, for one, recomputes them "
                "under no_grad when asked for outputs). Use sam_mode='sam' or 'msam' with this trainer."
            )
        if not self._per_sample_losses_checked:
            self._check_per_sample_losses(model, inputs, outputs, losses, value, reference_loss_fn, rng, bn_modules)
        margins = classification_margins(outputs, self._labels(inputs))
        del outputs
        if exact:
            norms = per_sample.norms(losses, self._loss_scale())
        else:
            norms = fd_norms(probes, losses if fd_reference is None else fd_reference, params.numel, s.rwsam_fd_step)
        norms = self._gather_for_scope(norms)
        weights, lam = gibbs_weights(norms, s.rwsam_lambda, s.rwsam_normalize, s.rwsam_target_ess, s.rwsam_max_weight,
                                     return_lambda=True)
        self._log_weights(weights, lam, noisy)
        weights = self._local_slice(weights)
        self.sample_scores = SampleScores(losses.detach(), self._local_slice(norms), weights, margins)
        if exact:
            # detached: the ascent's graph (kept for the batched estimator) is freed before the descent allocates
            return value.detach(), per_sample.weighted_gradient(weights)
        return value, params.gradient(self._scaled((weights * losses).sum()))

    def _check_fd_step(self, params) -> None:
        """Refuses, once, a finite-difference step the parameters' precision cannot resolve. A probe moves every
        coordinate by ``h / sqrt(d)``, and a weight of the typical (root-mean-square) size ``||x|| / sqrt(d)`` moves by
        that only if the move is at least ``u`` times the weight (``u``: the unit roundoff, 2^-24 in fp32; a shorter
        move rounds to nothing or to a whole spacing): ``h >= u ||x||`` (`SharpnessSettings.rwsam_fd_step`)."""
        s = self.settings
        h = default_fd_step(params.numel) if s.rwsam_fd_step is None else s.rwsam_fd_step
        dtype = max((t.dtype for t in params.tensors), key=lambda dt: torch.finfo(dt).eps)
        u = torch.finfo(dtype).eps / 2
        with torch.no_grad():
            norm = float(params.norm(params.tensors))
        if h < u * norm:
            raise s.refuse(
                "rwsam_fd_step", s.rwsam_fd_step,
                f"the probes' step h = {h:.3g}{' (the default 1e-3 * sqrt(d))' if s.rwsam_fd_step is None else ''} "
                f"moves each of the d = {params.numel} coordinates by h / sqrt(d) = {h / params.numel ** 0.5:.3g}, "
                f"which {dtype} cannot resolve for weights of typical size ||x|| / sqrt(d) = "
                f"{norm / params.numel ** 0.5:.3g} (a move shorter than {u:.3g} times a weight rounds to nothing or to "
                f"a whole spacing); choose h >= {u:.3g} * ||x|| = {u * norm:.3g}"
            )
        self._fd_step_checked = True

    def _per_sample_gradients(self, model, params) -> PerSampleGradients:
        """The exact estimator's pass over `model`'s layers, kept from step to step while the model and its parameters
        stay the same (the layouts it proved serve every later step)."""
        model = self.host.unwrap(model)
        kept = self._exact_pass
        if kept is None or kept.model is not model or len(kept.params) != len(params.params) or any(
                p is not q for p, q in zip(kept.params, params.params)):
            kept = self._exact_pass = PerSampleGradients(model, params.params, self.settings.rwsam_exact_chunk_size)
        return kept

    def _eager_for_exact_norms(self, model):
        """The model for RW-SAM's ascent pass: with the exact estimator, a compiled model's eager module (its layers'
        hooks keep their inputs and output gradients, which compiled graphs do not expose)."""
        if self.settings.rwsam_estimator != "exact" or not hasattr(model, "_orig_mod"):
            return model
        if not self._warned_exact_uncompiled:
            logger.warning("RW-SAM's exact estimator runs its ascent pass uncompiled (it reads every layer's inputs and "
                           "output gradients); the descent runs compiled, and with dropout it draws other masks than "
                           "the ascent (compiled code draws its random numbers its own way). The 'fd' estimator runs "
                           "compiled throughout.")
            self._warned_exact_uncompiled = True
        return model._orig_mod

    def _msam_step(self, model, inputs, loss_fn, descent, vmap_unavailable=None):
        s = self.settings
        b = batch_size(inputs)
        if b % s.msam_micro_batch_size:
            raise ValueError(
                f"{type(s).__name__}.msam_micro_batch_size={s.msam_micro_batch_size} does not divide this batch of {b} "
                "samples (set dataloader_drop_last=True when the dataset size is not a multiple of the batch size)."
            )
        k = b // s.msam_micro_batch_size
        if self._use_msam_vmap(model, k, vmap_unavailable):
            clean = self._msam_vmap_step(model, inputs, loss_fn, descent, k)
            if clean is not None:
                return clean
        total = 0.0
        for j, group in enumerate(split_batch(inputs, k)):
            with contextlib.nullcontext() if j == k - 1 else self.host.no_sync(model):
                total = total + self._sam_step(model, group, loss_fn, descent, share=k)
        return total / k

    def _msam_vmap_step(self, model, inputs, loss_fn, descent, k) -> torch.Tensor | None:
        """All groups at once (`vmap_msam_step`); None when torch.func cannot run the model and "auto" falls back."""
        s = self.settings
        explicit = s.msam_implementation == "vmap"
        unwrapped = self.host.unwrap(model)
        if hasattr(model, "_orig_mod") and not self._warned_vmap_uncompiled:
            logger.warning("m-SAM's vmap implementation runs the model uncompiled: torch.func transforms the eager module "
                           "(msam_implementation='loop' runs the compiled one).")
            self._warned_vmap_uncompiled = True
        try:
            with self.host.no_sync(model):
                result = vmap_msam_step(unwrapped, inputs, loss_fn, k, s.sam_rho, s.sam_adaptive, s.sam_adaptive_eta,
                                        running_stat_modules(model))
        except Exception as err:  # noqa: BLE001 -- any failure of torch.func on this model means "use the loop"
            if self._msam_vmap_ok:
                raise
            self._raise_the_loss_own_error(model, inputs, loss_fn, k)
            if explicit:
                raise ValueError(
                    f"{type(s).__name__}.msam_implementation='vmap': torch.func cannot run "
                    f"{type(unwrapped).__name__} ({type(err).__name__}: {err}); choose msam_implementation='loop' "
                    "(groups one after another) or 'auto' (vmap where it runs, else the loop)."
                ) from err
            logger.warning(
                f"m-SAM: torch.func cannot run {type(unwrapped).__name__} ({err!r}); using the loop implementation."
            )
            self._msam_vmap_ok = False
            return None
        perturbed_loss = descent(inputs, 1, loss=result.descent_objective)
        result.update_running_stats()
        self._msam_vmap_ok = True
        for norm in result.ascent_grad_norms:
            self._metrics.add("sam/ascent_grad_norm", norm)
        self._metrics.add("sam/skipped_perturbations", result.skipped.mean())
        clean = result.clean_losses.mean()
        self._metrics.add("sam/sharpness", perturbed_loss.detach().float() - clean.float())
        return clean

    def _raise_the_loss_own_error(self, model, inputs, loss_fn, k) -> None:
        """After the vmap m-SAM failed on its first step: runs `loss_fn` once plainly on the first group (no gradient,
        BatchNorm statistics frozen, the random numbers replayed), and if it raises there too, raises that error, the
        loss's own (the user's code), rather than reporting that torch.func cannot run the model."""
        rng = RNGReplay({p.device for p in model.parameters()})
        try:
            with torch.no_grad(), rng.replay(), frozen_running_stats(running_stat_modules(model)):
                loss_fn(model, split_batch(inputs, k)[0])
        except Exception as own:  # noqa: BLE001 -- whatever it is, it is the loss's, and it goes on as it came
            raise own from None

    def _use_msam_vmap(self, model, k, unavailable=None) -> bool:
        impl = self.settings.msam_implementation
        if unavailable is None and self.host.grad_scaler is not None:
            unavailable = "its per-group gradients are taken without fp16's loss scale (they could underflow)"
        if unavailable is None and self.host.num_processes > 1:
            unavailable = "it bypasses the DDP forward, so it runs on one process only"
        if unavailable is not None:
            if impl == "vmap":
                raise self.settings.refuse("msam_implementation", impl, f"{unavailable}; choose 'loop' or 'auto'")
            return False
        if impl != "auto":
            return impl == "vmap"
        if self._msam_vmap_ok is False:
            return False
        params = [p for p in model.parameters() if p.requires_grad]
        extra_mb = 2 * k * sum(p.numel() * p.element_size() for p in params) / 2**20
        return extra_mb <= self.settings.msam_vmap_max_memory_mb

    # ------------------------------------------------------------------ pieces of the step

    def _default_descent(self, model, loss_fn) -> DescentFunc:
        def descent(inputs, share, loss=None):
            if loss is None:
                loss = loss_fn(model, inputs)
            self.host.backward(loss / share if share != 1 else loss)
            return loss.detach()

        return descent

    def _probe_function(self, model, inputs, loss_fn, rng, bn_modules) -> Callable[[], torch.Tensor]:
        """Per-sample losses at the current parameters for the finite-difference probes: the same call of the model
        as the ascent's (through `loss_fn`), without gradient, with the ascent's random numbers, BatchNorm statistics
        frozen, and in fp32: under bf16 autocast the weights are rounded to 8 bits of mantissa in every matmul, which
        either hides a step ``h`` or swamps it (benchmarks/fd_step.py: mean relative error >= 0.66 at every h on
        resnet18, against 0.08 in fp32)."""

        @torch.no_grad()
        def per_sample_losses():
            with rng.replay(), frozen_running_stats(bn_modules), self.host.full_precision(model):
                _, outputs = loss_fn(model, inputs, return_outputs=True)
                return self._per_sample_losses(outputs, inputs)

        return per_sample_losses

    def _scaled(self, objective: torch.Tensor) -> torch.Tensor:
        """Under fp16 the ascent gradient is taken on the scaled objective (`_ascent_gradient` unscales it)."""
        scaler = self.host.grad_scaler
        return objective if scaler is None else scaler.scale(objective)

    def _loss_scale(self) -> float:
        scaler = self.host.grad_scaler
        return 1.0 if scaler is None else float(scaler.get_scale())

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
            torch._foreach_mul_(grads, 1.0 / self._loss_scale())
        return grads

    def _per_sample_losses(self, outputs, inputs) -> torch.Tensor:
        labels = self._labels(inputs)
        rule = self.per_sample_loss_func or self.default_per_sample_loss
        losses = rule(outputs, labels)
        if not (isinstance(losses, torch.Tensor) and losses.dim() == 1 and losses.shape[0] == batch_size(inputs)):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"per_sample_loss_func must return one loss per sample, a Tensor of shape [{batch_size(inputs)}]; got "
                f"{shape}."
            )
        return losses.float()

    def _check_per_sample_losses(self, model, inputs, outputs, losses, value, reference_loss_fn, rng, bn_modules):
        """The per-sample losses (the built-in rule's or `per_sample_loss_func`'s) must average to the loss being
        optimised, and not be negative where that loss is not (checked once, on the first step): otherwise RW-SAM would
        perturb along another objective than the one the loop descends (``-l_i`` along the opposite one)."""
        if reference_loss_fn is not None:  # the loss in per-micro-batch units, at x, with the ascent's random numbers
            with torch.no_grad(), rng.replay(), frozen_running_stats(bn_modules):
                value = reference_loss_fn(model, inputs)
        mean, value, smallest = losses.detach().mean(), value.detach().float(), losses.detach().min()
        rtol = 1e-3 if self.host.mixed_precision(model) else 1e-4  # reduction order only: ~1e-7 relative in fp32
        finite = torch.isfinite(mean) & torch.isfinite(value)
        disagrees = finite & ~torch.isclose(mean, value, rtol=rtol, atol=1e-6)
        negative = finite & (smallest < 0) & (value >= 0)
        # [processes with nothing to compare (a diverged step, say), processes where the losses disagree, processes
        # with negative losses]: every process reaches the same verdict (one refusing alone would leave the others
        # waiting in a collective)
        verdict = torch.stack([~finite, disagrees, negative]).float()
        unchecked, failed, negatives = (float(v) for v in self.host.reduce([verdict], "sum")[0])
        if unchecked:
            return  # checked again on the next step
        if not failed and not negatives:
            self._per_sample_losses_checked = True
            return
        users = self.per_sample_loss_func is not None
        rule = ("per_sample_loss_func" if users else "the built-in per-sample rule (cross-entropy, BCE or MSE on the "
                "model's logits, from hf_rwsam.losses.per_sample_loss)")
        elsewhere = "" if bool(disagrees | negative) else " on this process, and another process's are not"
        if negatives:
            raise ValueError(
                f"RW-SAM weights one loss per sample, and {rule} returned negative ones (the smallest is "
                f"{smallest.item():.6g}{elsewhere}) where the loss being optimised is {value.item():.6g} >= 0: "
                "per-sample losses are >= 0 and average to the loss (a function returning -l_i turns RW-SAM's ascent "
                "into a descent)."
            )
        problem = f"their mean is {mean.item():.6g} where the loss being optimised is {value.item():.6g}{elsewhere}"
        shift = self._label_shift_hint(outputs, inputs, value, rtol, users)
        if users:
            advice = ("Its losses must average to the loss the loss function returns: a class-weighted loss needs its "
                      "weights, normalised as the loss normalises them; an auxiliary term (a router loss) its share "
                      "per sample")
        else:
            advice = ("The loss has terms the rule does not know (a custom or class-weighted loss, compute_loss_func, "
                      "an auxiliary loss such as a mixture-of-experts router loss). Pass "
                      "`per_sample_loss_func(outputs, labels) -> Tensor[b]` whose mean is your loss")
        raise ValueError(
            f"RW-SAM weights one loss per sample, and {rule} does not reproduce this loss: {problem}. "
            + (shift or f"{advice}; for example, for a class-weighted cross-entropy:\n\n{PER_SAMPLE_LOSS_EXAMPLE}")
        )

    def _label_shift_hint(self, outputs, inputs, value, rtol, users) -> str:
        """If the built-in token-level rule with shifted labels (position t predicts token t + 1: a causal LM's loss)
        reproduces the loss, the advice to shift them; else empty."""
        labels = self._labels(inputs)
        try:
            logits = model_logits(outputs)
        except ValueError:  # outputs the built-in rule cannot read
            return ""
        if not (labels.dim() == 2 and logits.dim() == 3 and logits.shape[:2] == labels.shape):
            return ""
        with torch.no_grad():
            shifted = per_sample_loss(outputs, labels, shift_labels=True).mean()
        if not bool(torch.isclose(shifted, value, rtol=rtol, atol=1e-6)):
            return ""
        built_in = ("`SharpnessAwareStep(..., default_per_sample_loss=functools.partial("
                    "hf_rwsam.losses.per_sample_loss, shift_labels=True))` (RWSAMTrainer detects transformers' causal "
                    "LMs itself)")
        return (
            f"The built-in rule with shifted labels reproduces it ({shifted.item():.6g}): the model predicts token "
            "t + 1 at position t (a causal language model), so "
            + (f"shift the labels as the loss does, or leave per_sample_loss_func out and use {built_in}." if users
               else f"set shift_labels=True: {built_in}.")
        )

    def _labels(self, inputs) -> torch.Tensor:
        name = next((n for n in self.label_names if n in inputs), None)
        if name is None:
            raise ValueError(
                f"RW-SAM needs labels in the batch (looked for {list(self.label_names)}) for its per-sample losses."
            )
        return inputs[name]

    def _log_weights(self, weights, lam, noisy):
        b = weights.shape[0]
        self._metrics.add("rwsam/ess", effective_sample_size(weights) / b)
        self._metrics.add("rwsam/max_weight", weights.max() * b)
        self._metrics.add("rwsam/lambda", lam)
        if noisy is not None:
            noisy = self._gather_for_scope(torch.as_tensor(noisy, device=weights.device).float())
            self._metrics.add("rwsam/noisy_weight_mass", (weights * noisy).sum())

    def _global(self) -> bool:
        return self.settings.sam_perturbation_scope == "global" and self.host.num_processes > 1

    def _gather_for_scope(self, values: torch.Tensor) -> torch.Tensor:
        """All processes' values (global scope) or this process's (device scope)."""
        return self.host.gather(values) if self._global() else values

    def _local_slice(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of values gathered by `_gather_for_scope`."""
        if not self._global():
            return values
        b = values.shape[0] // self.host.num_processes
        return values[self.host.process_index * b : (self.host.process_index + 1) * b]

    def _advance(self, global_step: int | None) -> None:
        if global_step is None:
            global_step = self._calls
        self._calls += 1
        step, micro = self._step_index
        self._step_index = (global_step, micro + 1 if step == global_step else 0)

    def _probe_generator(self, device) -> torch.Generator:
        """Seeded from (seed, global step, micro-step, rank), so a resumed run draws the same probes."""
        generator = torch.Generator(device=device)
        step, micro = self._step_index
        generator.manual_seed(rademacher_seed(self.seed, step, micro, self.host.process_index))
        return generator

