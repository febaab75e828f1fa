"""RW-SAM's per-sample losses: the rule that gives them from the model's outputs, and its check.

The contract (docs/ALGORITHMS.md): ``mean_i l_i(x) = L(x)``, the loss being optimised, so that ``lambda = 0`` is SAM
on the user's objective. The rule is the user's `per_sample_loss_func` or the built-in one
(`hf_rwsam.losses.per_sample_loss`); either is checked once, on the first step, against the loss: their mean must be
the loss, and they must not be negative where the loss is not. Every process reaches the same verdict.
"""

from __future__ import annotations

import torch

from ..losses import PER_SAMPLE_LOSS_EXAMPLE, PerSampleLossFunc, model_logits, per_sample_loss
from .context import StepContext, batch_size
from .state import frozen_running_stats


class PerSampleLosses:
    """One loss per sample from the model's outputs, checked on the first step.

    Args:
        per_sample_loss_func (`Callable`, *optional*): ``(outputs, labels) -> Tensor[b]``, the user's rule.
        default (`Callable`, *optional*): the built-in rule used without one (`hf_rwsam.losses.per_sample_loss`, the
            problem type inferred, unless the host gives it).
        label_names (`tuple`): the batch keys holding the labels.
    """

    def __init__(self, per_sample_loss_func: PerSampleLossFunc | None = None, default: PerSampleLossFunc | None = None,
                 label_names: tuple[str, ...] = ("labels",)):
        self.per_sample_loss_func = per_sample_loss_func
        self.default_per_sample_loss = default or per_sample_loss
        self.label_names = tuple(label_names)
        self.checked = False

    def of(self, outputs, inputs) -> torch.Tensor:
        """The per-sample losses ``[b]``, fp32, from the model's outputs on `inputs`."""
        labels = self.labels(inputs)
        rule = self.per_sample_loss_func or self.default_per_sample_loss
        losses = rule(outputs, labels)
        if not (isinstance(losses, torch.Tensor) and losses.dim() == 1 and losses.shape[0] == batch_size(inputs)):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"per_sample_loss_func must return one loss per sample, a Tensor of shape [{batch_size(inputs)}]; got "
                f"{shape}."
            )
        return losses.float()

    def check(self, ctx: StepContext, outputs, losses: torch.Tensor, value: torch.Tensor) -> None:
        """The per-sample losses (the built-in rule's or `per_sample_loss_func`'s) must average to the loss being
        optimised, and not be negative where that loss is not (checked once, on the first step): otherwise RW-SAM would
        perturb along another objective than the one the loop descends (``-l_i`` along the opposite one)."""
        if self.checked:
            return
        if ctx.reference_loss_fn is not None:  # the loss in per-micro-batch units, at x, with the ascent's random numbers
            with torch.no_grad(), ctx.rng.replay(), frozen_running_stats(ctx.bn_modules):
                value = ctx.reference_loss_fn(ctx.model, ctx.inputs)
        mean, value, smallest = losses.detach().mean(), value.detach().float(), losses.detach().min()
        rtol = 1e-3 if ctx.host.mixed_precision(ctx.model) else 1e-4  # reduction order only: ~1e-7 relative in fp32
        finite = torch.isfinite(mean) & torch.isfinite(value)
        disagrees = finite & ~torch.isclose(mean, value, rtol=rtol, atol=1e-6)
        negative = finite & (smallest < 0) & (value >= 0)
        # [processes with nothing to compare (a diverged step, say), processes where the losses disagree, processes
        # with negative losses]: every process reaches the same verdict (one refusing alone would leave the others
        # waiting in a collective)
        verdict = torch.stack([~finite, disagrees, negative]).float()
        unchecked, failed, negatives = (float(v) for v in ctx.host.reduce([verdict], "sum")[0])
        if unchecked:
            return  # checked again on the next step
        if not failed and not negatives:
            self.checked = True
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
        shift = self._label_shift_hint(outputs, ctx.inputs, value, rtol, users)
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
        labels = self.labels(inputs)
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

    def labels(self, inputs) -> torch.Tensor:
        """The batch's labels (the first of `label_names` it holds)."""
        name = next((n for n in self.label_names if n in inputs), None)
        if name is None:
            raise ValueError(
                f"RW-SAM needs labels in the batch (looked for {list(self.label_names)}) for its per-sample losses."
            )
        return inputs[name]
