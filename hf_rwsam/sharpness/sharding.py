"""Where the step reads and writes the parameters: whole on every process, or FSDP2 shards.

A sharpness-aware step needs five things from the parameters: the ascent gradient of an objective (without touching
``.grad``), the norm ``||T g||`` over the whole model, a way to hold other values for a while (``x + e``, the probes),
a way to hold ``x`` again meanwhile (a save made during the step writes ``x``: `original_values`) and ``d``, the
model's size. `LocalParameters` serves parameters every process holds whole (one process, DDP);
`ShardedParameters` serves FSDP2, where each process holds a shard of every parameter.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .perturb import global_norm, swapped_parameters, written_parameters
from .state import restored

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded parameters
    DTensor = ()


def sharded_step_problems(settings) -> list[str]:
    """What a step on FSDP2 shards cannot do with these `SharpnessSettings`; empty when all is fine.

    Each process holds a shard of every parameter, so the only perturbation there is is the global one, and anything
    that needs whole parameters on one process (m-SAM's groups, the exact estimator's layer rules) is out.
    """
    problems = []
    if settings.sam_perturbation_scope != "global":
        problems.append(
            f"sam_perturbation_scope={settings.sam_perturbation_scope!r} (each process holds only a shard of every "
            "parameter, so the perturbation is the global one: set sam_perturbation_scope='global')"
        )
    if settings.sam_mode == "msam":
        problems.append("sam_mode='msam' (per-group perturbations of sharded parameters; RW-SAM mimics m-SAM)")
    if settings.sam_mode == "rwsam" and settings.rwsam_estimator == "exact":
        problems.append("rwsam_estimator='exact' (its per-sample gradients need whole parameters)")
    return problems


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def require_trainable_parameters(model: nn.Module) -> None:
    """A sharpness-aware step perturbs and trains the parameters with ``requires_grad``: a model with none is refused
    by name (rather than failing inside autograd with "`inputs` to grad() cannot be empty")."""
    if not any(p.requires_grad for p in model.parameters()):
        count = sum(1 for _ in model.parameters())
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (all {count} have requires_grad=False): a "
            "sharpness-aware step perturbs and trains the trainable ones. Unfreeze what should train "
            "(`requires_grad_(True)`), or check that the trainable layers (a new head, PEFT adapters) were added."
        )


def is_sharded(params) -> bool:
    return any(isinstance(p, DTensor) for p in params)


class LocalParameters:
    """Parameters each process holds whole: gradients by `torch.autograd.grad`, values held by swapping storage."""

    sharded = False

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.tensors = params  # what the perturbation is computed on and written to
        self.numel = sum(p.numel() for p in params)
        self._originals = [p.data for p in params]

    def same_as(self, params: list[nn.Parameter]) -> bool:
        """Whether `params` are these parameters, on the same storage (no ATen op: kept from step to step)."""
        return len(params) == len(self.params) and all(
            p is q and p.data_ptr() == o.data_ptr() and p.shape == o.shape
            for p, q, o in zip(params, self.params, self._originals)
        )

    def assign(self, params, values):
        """`swapped_parameters` with the parameters' own storage kept from construction (see `same_as`)."""
        return swapped_parameters(params, values, self._originals if params is self.tensors else None)

    def original_values(self) -> contextlib.AbstractContextManager:
        """The parameters on their own storage, ``x``, inside the block, whatever they hold meanwhile; as before
        after it."""
        return swapped_parameters(self.tensors, self._originals)

    def gradient(self, objective: torch.Tensor) -> list[torch.Tensor]:
        """``grad(objective)`` with respect to every parameter (zeros for unused ones); ``.grad`` is not touched."""
        return list(torch.autograd.grad(objective, self.params, materialize_grads=True))

    def norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return global_norm(tensors)


class ShardedParameters:
    """FSDP2's shards: each process perturbs its own shard of every parameter with the global perturbation.

    * The sharded parameters are not in the autograd graph (their all-gathered copies are), so the ascent gradient
      comes from FSDP's own backward, which reduce-scatters the mean over processes into ``.grad``; the gradient
      already there (accumulated descent gradients) is set aside meanwhile and put back.
    * ``||T g||`` is the square root of the squared shard norms summed over processes (`reduce_sum`).
    * The local shards are views of the buffer FSDP all-gathers from, so new values are written into them
      (`written_parameters`, restored bit-exactly from a copy, which `original_values` writes back meanwhile), and
      every FSDP module is resharded after each write: a module that keeps its gathered parameters after a forward
      (the root does) would otherwise run the next forward on the old values.

    Args:
        model (`nn.Module`): the FSDP2 model (its FSDP modules are resharded after every write).
        params (`list`): its trainable parameters, all DTensors.
        reduce_sum (`Callable`): sums a tensor over processes.
    """

    sharded = True

    def __init__(self, model: nn.Module, params: list[nn.Parameter], reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        from torch.distributed.fsdp import FSDPModule

        if not all(isinstance(p, DTensor) for p in params):
            raise ValueError(
                "FSDP: some trainable parameters are not sharded (FSDP ignored_modules?); a sharded sharpness-aware "
                "step needs FSDP to shard all of them."
            )
        self.params = params
        with torch.no_grad():
            self.tensors = [p.to_local() for p in params]
        self.numel = sum(p.numel() for p in params)  # d of the whole model: a DTensor counts all its shards
        self._reduce_sum = reduce_sum
        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self._x: list[torch.Tensor] | None = None  # copies of the shards at x while they hold other values

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()

    @contextlib.contextmanager
    def assign(self, params, values) -> Iterator[None]:
        """`written_parameters`, resharding after every write, with the copies of ``x`` kept for `original_values`."""
        with torch.no_grad():
            x = [p.detach().clone() for p in params]

        def forget():
            self._x = None

        with restored(forget):
            self._x = x
            with written_parameters(params, values, self._reshard, originals=x):
                yield

    def original_values(self) -> contextlib.AbstractContextManager:
        """The shards at ``x`` inside the block, whatever they hold meanwhile; as before after it."""
        return contextlib.nullcontext() if self._x is None else written_parameters(self.tensors, self._x, self._reshard)

    def gradient(self, objective: torch.Tensor) -> list[torch.Tensor]:
        """This process's shard of ``grad(objective)`` averaged over processes."""
        kept = [p.grad for p in self.params]

        def put_back():
            for p, grad in zip(self.params, kept):
                p.grad = grad

        with restored(put_back):
            for p in self.params:
                p.grad = None
            objective.backward()
            return [torch.zeros_like(t) if p.grad is None else p.grad.to_local()
                    for p, t in zip(self.params, self.tensors)]

    def norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self._reduce_sum(global_norm(tensors).square()).sqrt()
