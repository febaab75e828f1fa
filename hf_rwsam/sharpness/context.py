"""What one call of the step works on (`StepContext`), and the diagnostics it reports (`RunningMeans`).

The step derives a few things from a micro-batch once (the parameters as the host holds them, the random-number state
the extra passes replay, the BatchNorm layers whose statistics they freeze) and hands them down in one object to the
ascent, the norm estimators and m-SAM, instead of passing each on its own.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .host import TorchHost
from .sharding import LocalParameters, ShardedParameters
from .state import RNGReplay

LossFunc = Callable[..., Any]
"""``loss_fn(model, inputs, return_outputs=False)``: the loss, or ``(loss, outputs)`` (the Trainer's `compute_loss`)."""


def batch_size(inputs: dict) -> int:
    """``b``: the leading size of the batch's first tensor with a dimension."""
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


@dataclass
class StepContext:
    """One call of the step on one micro-batch (or one m-SAM group).

    Attributes:
        model: the model as the loop calls it (DDP- or Accelerate-wrapped, or compiled).
        inputs: the micro-batch, labels included (the ``is_noisy`` column taken out: see `noisy`).
        loss_fn: the loss being optimised, ``loss_fn(model, inputs, return_outputs=False)``.
        host: what the loop lends (backward, ``no_sync``, collectives, grad scaler).
        params: the trainable parameters as the host holds them (whole, or FSDP2 shards).
        rng: the random-number state before the ascent, which every extra pass replays.
        bn_modules: the layers whose running statistics the extra passes leave as they are.
        noisy: the batch's ``is_noisy`` column, for RW-SAM's diagnostics (None without one).
        reference_loss_fn: the loss in per-micro-batch units, where `loss_fn`'s are other (the Trainer's token counts
            over an accumulation window), to check per-sample losses against.
        step_index: (optimizer step, micro-step within it), which seeds RW-SAM's probes.
        seed: the run's seed, which seeds them too.
        generator: draws the probes instead, when given (`sample_grad_norms`).
    """

    model: nn.Module
    inputs: dict
    loss_fn: LossFunc
    host: TorchHost
    params: LocalParameters | ShardedParameters
    rng: RNGReplay
    bn_modules: list[nn.Module]
    noisy: torch.Tensor | None = None
    reference_loss_fn: LossFunc | None = None
    step_index: tuple[int, int] = (0, 0)
    seed: int = 0
    generator: torch.Generator | None = None

    @property
    def batch_size(self) -> int:
        return batch_size(self.inputs)


class RunningMeans:
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
