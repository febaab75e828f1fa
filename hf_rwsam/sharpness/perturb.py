"""The SAM perturbation: ascent direction, ASAM scaling, and a save/perturb/restore context.

SAM (Foret et al., 2021, arXiv 2010.01412) evaluates the descent gradient at ``x + e`` with

    e = rho * T^2 g / ||T g||,      T = |x| + eta  (ASAM, Kwon et al., 2021, arXiv 2102.11600)  or  T = 1  (SAM),

where ``g`` is the ascent gradient and the norm runs over all parameters jointly, in fp32. With ``eta = 0`` this is
exactly the ASAM of davda54/sam and pytorch_optimizer (which add 1e-12 to the norm; we skip the perturbation
instead when the norm is zero or not finite).

Everything works on lists of tensors with ``torch._foreach_*`` kernels: one kernel launch per operation for the whole
model, and no parameter-sized allocation per step beyond the ascent gradient, which is turned into ``e`` and then
into ``x + e`` in place. The parameters are not copied: they are pointed at ``x + e`` for the descent pass and back
at their untouched original storage afterwards (`swapped_parameters`). Only FSDP's shards, which are views of the
buffer FSDP all-gathers from, are written in place and restored from a copy (`written_parameters`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .state import restored


@dataclass
class Perturbation:
    """The result of `sam_perturbation`: ``e`` (the ascent gradient's storage, overwritten) and its diagnostics."""

    e: list[torch.Tensor]
    ascent_grad_norm: torch.Tensor  # ||T g||, fp32 scalar
    skipped: bool  # the norm was zero or not finite, so e == 0


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fp32 2-norm of all `tensors` taken as one vector (on the first tensor's device)."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    if len({n.device for n in norms}) > 1:  # a model spread over several devices
        norms = [n.to(norms[0].device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def _scale_(tensors: list[torch.Tensor], factor: torch.Tensor) -> None:
    """``t *= factor`` for every tensor, `factor` a 0-dim tensor (copied to each device the tensors are on)."""
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        torch._foreach_mul_(tensors, factor.to(device=tensors[0].device, dtype=tensors[0].dtype))
        return
    for device in devices:
        group = [t for t in tensors if t.device == device]
        torch._foreach_mul_(group, factor.to(device=device, dtype=group[0].dtype))


@torch.no_grad()
def sam_perturbation(
    params: Sequence[torch.Tensor],
    grads: list[torch.Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
    norm_fn=global_norm,
) -> Perturbation:
    """Turn the ascent gradient `grads` (overwritten in place) into the SAM/ASAM perturbation ``e``.

    Args:
        params (`Sequence[torch.Tensor]`): the parameters ``x``, needed for the ASAM scale ``T = |x| + eta``.
        grads (`list[torch.Tensor]`): the ascent gradient ``g``, one tensor per parameter; becomes ``e``.
        rho (`float`): the radius of the perturbation.
        adaptive (`bool`): ASAM when True.
        eta (`float`): ASAM's offset.
        norm_fn (`Callable`): computes ``||T g||`` from a list of tensors (a sharded model passes the global norm).

    Returns:
        `Perturbation`: ``e = rho * T^2 g / ||T g||``, or zeros if ``||T g||`` is zero or not finite.
    """
    if adaptive:
        scale = torch._foreach_abs(list(params))
        if eta:
            torch._foreach_add_(scale, eta)
        torch._foreach_mul_(grads, scale)  # T g
    norm = norm_fn(grads)
    # One host synchronisation per step (the Trainer's nan/inf loss filter makes one anyway).
    skipped = not bool(torch.isfinite(norm)) or float(norm) == 0.0
    if skipped:
        torch._foreach_zero_(grads)
    else:
        if adaptive:
            torch._foreach_mul_(grads, scale)  # T^2 g
        _scale_(grads, rho / norm)
    return Perturbation(e=grads, ascent_grad_norm=norm, skipped=skipped)


@contextlib.contextmanager
def swapped_parameters(
    params: Sequence[torch.Tensor], values: Sequence[torch.Tensor], originals: Sequence[torch.Tensor] | None = None
) -> Iterator[None]:
    """`params` hold `values` inside the block and their own storage again after it, also when the block raises or is
    interrupted (`restored`).

    The storage is swapped (``p.data = v``), not copied: restoring is bit-exact by construction and costs no pass
    over the parameters, and nothing needs saving. Each value must match its parameter's shape, dtype and device.
    `originals` are the parameters' own storage (``p.data``, which dispatches one ``detach`` per parameter when read:
    `LocalParameters` keeps them from step to step).
    """
    originals = [p.data for p in params] if originals is None else originals

    def restore():
        for p, original in zip(params, originals):
            p.data = original

    with restored(restore):
        for p, v in zip(params, values):
            p.data = v
        yield


@contextlib.contextmanager
def written_parameters(
    params: Sequence[torch.Tensor], values: Sequence[torch.Tensor], after_write: Callable[[], None] | None = None,
    originals: Sequence[torch.Tensor] | None = None,
) -> Iterator[None]:
    """`params` hold `values` inside the block, copied into their own storage, and their original values after it.

    For parameters whose storage something else reads: FSDP's local shards are views of the flat buffer it
    all-gathers from, so pointing them at new storage (`swapped_parameters`) would not change what the forward sees.
    The originals are saved first (one copy of the local shard, or `originals`, copies the caller made) and copied
    back, bit-exact, also when the block raises or is interrupted (`restored`). `after_write` runs after each write
    (FSDP: drop the unsharded copies, so the next forward gathers the new values).
    """
    if originals is None:
        with torch.no_grad():
            originals = [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            torch._foreach_copy_(list(params), list(originals))
        if after_write is not None:
            after_write()

    with restored(restore):
        with torch.no_grad():
            torch._foreach_copy_(list(params), list(values))
        if after_write is not None:
            after_write()
        yield


@contextlib.contextmanager
def perturbed(
    params: Sequence[torch.Tensor], e: list[torch.Tensor], assign=swapped_parameters,
    storage: list[torch.Tensor] | None = None,
) -> Iterator[None]:
    """Parameters at ``x + e`` inside the block, exactly ``x`` afterwards, also when the block raises or is interrupted.

    `e` is consumed: ``x + e`` is written into its storage (one pass over the parameters), or into `storage` (tensors
    laid out like `params`, e.g. buffers already kept for RW-SAM's probes; `e` is then emptied, so its memory is freed
    before the block), which the parameters then hold through `assign`: `swapped_parameters` (default: no copy, the
    storage of ``x`` is kept aside untouched) or `written_parameters` (sharded parameters).
    """
    with torch.no_grad():
        if storage is None:
            torch._foreach_add_(e, list(params))
            storage = e
        else:
            torch._foreach_copy_(storage, list(params))
            torch._foreach_add_(storage, e)
            e.clear()
    with assign(params, storage):
        yield
