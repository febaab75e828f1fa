"""RW-SAM's finite-difference estimator of per-sample gradient norms (the paper's): one no-grad forward per probe.

For ``q = 1..Q``, a Rademacher vector ``z_q`` in ``{-1, +1}^d``, ``u_q = z_q / sqrt(d)``, and

    D_iq = (l_i(x + h u_q) - l_i(x)) / h,        n_i^2 = d * mean_q D_iq^2,

unbiased for ``||grad l_i||^2`` as ``h -> 0`` (``E[(z . g)^2] = ||g||^2``). The probes replay the ascent's random
numbers, run with BatchNorm in batch-statistics mode without updating its running statistics, and in fp32 (under
bf16 autocast the weights are rounded to 8 bits of mantissa in every matmul, which either hides a step ``h`` or
swamps it: benchmarks/fd_step.py). The signs come from a generator seeded by (seed, optimizer step, micro-step,
process rank), so a resumed run draws the same probes. Both the probes and the weighted ascent gradient
``grad sum_i p_i l_i`` (one backward) differentiate the per-sample losses as computed on the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..context import StepContext
from ..perturb import swapped_parameters
from ..settings import SharpnessSettings
from ..state import frozen_running_stats

logger = logging.getLogger(__name__)


FD_STEP_PER_COORDINATE = 1e-3
"""The default finite-difference step moves every coordinate by ``+-1e-3``: ``h = 1e-3 * sqrt(d)`` along ``u``.

Chosen by measurement against exact norms (``benchmarks/fd_step.py``, table in ``benchmarks/RESULTS.md``; the
small-model sweep is also a test, ``tests/test_rwsam.py::test_default_fd_step_is_in_the_flat_region``). In fp32 the
error is flat over several decades of ``h`` and rises at both ends (rounding in ``l(x + h u) - l(x)`` on the left,
curvature on the right). A fixed ``h`` cannot serve every model: the flat region of a 123-parameter MLP is
``h`` in [1e-4, 1] and that of timm's resnet18 (11.2M) is ``h`` in [1e-3, 10], best near 3. Scaling with ``sqrt(d)``
(h = 0.011 and 3.3) lands in both.
"""


def default_fd_step(num_params: int) -> float:
    """``h = FD_STEP_PER_COORDINATE * sqrt(d)``."""
    return FD_STEP_PER_COORDINATE * math.sqrt(num_params)


def rademacher_seed(seed: int, global_step: int, micro_step: int, rank: int) -> int:
    """A 63-bit generator seed from (seed, global step, micro-step, process rank): resumed runs draw the same probes."""
    return int(np.random.SeedSequence([seed, global_step, micro_step, rank]).generate_state(2, np.uint64)[0] >> 1)


_FLOAT32_SIGN = -(2**31)  # int32 with only bit 31 set
_FLOAT32_ONE = 0x3F800000  # the bits of 1.0f


def _laid_out_like(chunk: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`chunk` (``p.numel()`` numbers) seen with `p`'s shape and strides (channels-last weights stay channels-last, so
    the forward and the gradient keep their memory format)."""
    if p.is_contiguous() or not p.is_non_overlapping_and_dense():
        return chunk.view(p.shape)
    return chunk.as_strided(p.shape, p.stride())


class _SignGroup:
    """The parameters of one (device, dtype), their buffers, and the buffers' views shaped like them."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        device, dtype = params[0].device, params[0].dtype
        n = sum(p.numel() for p in params)
        num_words = (n + 31) // 32
        self.words = torch.empty((num_words, 1), dtype=torch.int32, device=device)
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)
        self.bits = torch.empty((num_words, 32), dtype=torch.int32, device=device)
        self.signs = self.bits.view(torch.float32).view(-1)  # +-1.0 once the bits are set
        self.values = self.signs[:n] if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=device)
        self.views = [_laid_out_like(v, p) for v, p in zip(self.values.split([p.numel() for p in params]), params)]


class RademacherDirections:
    """``x + alpha z`` for every parameter at once, ``z`` uniform in ``{-1, +1}^d``, in buffers kept between calls.

    The parameters are grouped by device and dtype, and each group draws its signs in one piece: ``d / 32`` random
    int32 words, bit ``k`` of each shifted into the float32 sign bit and OR-ed with the bits of 1.0, which is ``+-1.0``
    without arithmetic (on a 2-core CPU ~8x faster than ``bernoulli_``). Per call and group: randint, shift, and, or,
    scale, and one ``torch._foreach_add_`` of ``x``, six kernels whatever the number of parameter tensors (drawing
    tensor by tensor took ~13 per tensor, 800 for resnet18). ``alpha * z`` is exact, so in fp32 the result equals
    ``x.add(z, alpha=alpha)`` bit for bit. The buffers (``d`` numbers, and ``d / 32`` words) and their views shaped
    like the parameters are made on the first call and reused while the parameters keep their shapes and dtypes.
    The list of parameters handed in again (the same object, not edited in place) is taken to hold the same ones.
    """

    def __init__(self):
        self._params: Sequence[torch.Tensor] | None = None  # the last call's list, and its length then
        self._length = 0
        self._layout: list[tuple] | None = None
        self._members: list[list[int]] = []  # group g holds the parameters params[i] for i in _members[g]
        self._groups: list[_SignGroup] = []

    def _arrange(self, params: Sequence[torch.Tensor]) -> None:
        """Groups `params` and lays the buffers out like them, unless they are the last call's list. The step hands
        the same list Q + 1 times a step (``ctx.params.tensors``), and from step to step as long as the host finds the
        same parameters on the same storage, with the same shapes (`LocalParameters.same_as`: a change of dtype or
        device moves the storage); FSDP's shards are a new list every step. The list is held here, so no other list
        can take its identity."""
        if params is self._params and len(params) == self._length:
            return
        layout = [(p.shape, p.dtype, p.device) for p in params]
        if layout != self._layout:
            keys = list(dict.fromkeys((p.device, p.dtype) for p in params))
            self._members = [[i for i, p in enumerate(params) if (p.device, p.dtype) == key] for key in keys]
            self._groups = [_SignGroup([params[i] for i in members]) for members in self._members]
            self._layout = layout
        for group, members in zip(self._groups, self._members):
            group.params = [params[i] for i in members]
        self._params, self._length = params, len(params)

    def storage(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The buffers' views laid out like `params`: free for other values between draws (RW-SAM puts ``x + e`` there,
        so that the buffers take the place of the perturbation's own memory rather than adding to it)."""
        self._arrange(params)
        return self._views()

    def _views(self) -> list[torch.Tensor]:
        views = [None] * sum(len(members) for members in self._members)
        for group, members in zip(self._groups, self._members):
            for i, view in zip(members, group.views):
                views[i] = view
        return views

    @torch.no_grad()
    def shifted(self, params: Sequence[torch.Tensor], alpha: float, generator: torch.Generator | None = None):
        """``x + alpha z`` for a fresh ``z``, as views of the buffers laid out like `params` (valid until the next
        call). `generator` draws the signs (on its own device; other groups' words are copied over)."""
        self._arrange(params)
        for group in self._groups:
            device = group.words.device if generator is None else generator.device
            if device == group.words.device:
                torch.randint(-(2**31), 2**31, group.words.shape, generator=generator, out=group.words)
            else:
                group.words.copy_(torch.randint(-(2**31), 2**31, group.words.shape, dtype=torch.int32, device=device,
                                                generator=generator))
            torch.bitwise_left_shift(group.words, group.shifts, out=group.bits)
            group.bits.bitwise_and_(_FLOAT32_SIGN).bitwise_or_(_FLOAT32_ONE)
            if group.values.dtype == torch.float32:
                group.values.mul_(alpha)
            else:
                group.values.copy_(group.signs[: group.values.numel()]).mul_(alpha)
            torch._foreach_add_(group.views, group.params)
        return self._views()


@torch.no_grad()
def fd_probe_losses(
    per_sample_losses_at: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    num_probes: int = 1,
    fd_step: float | None = None,
    generator: torch.Generator | None = None,
    num_coordinates: int | None = None,
    assign=swapped_parameters,
    directions: RademacherDirections | None = None,
) -> torch.Tensor:
    """Per-sample losses at ``x + h u_q`` for ``q = 1..Q``: the probes of the finite-difference estimator.

    Args:
        per_sample_losses_at (`Callable[[], Tensor]`): runs the batch through the model at its current parameters and
            returns the per-sample losses ``[b]``. The caller makes it replay the clean pass's randomness and freeze
            BatchNorm running statistics.
        params (`Sequence[Tensor]`): the parameters ``x`` (all of them: ``d`` is their total size); they hold
            ``x + h u_q`` during probe ``q`` and exactly ``x`` afterwards (see `assign`).
        num_probes (`int`): ``Q``.
        fd_step (`float`, *optional*): ``h``; defaults to `default_fd_step`.
        generator (`torch.Generator`, *optional*): draws the Rademacher vectors ``z_q``.
        num_coordinates (`int`, *optional*): ``d``, when `params` are one process's shards of a larger model (each
            process then draws the signs of its own shard); defaults to the size of `params`.
        assign (`Callable`): how the parameters hold ``x + h u_q``: `swapped_parameters` or, for sharded parameters,
            `written_parameters`.
        directions (`RademacherDirections`, *optional*): draws ``x + h u_q``; pass the same one every step to reuse
            its buffers.

    Returns:
        `Tensor`: ``[Q, b]`` fp32.
    """
    d = sum(p.numel() for p in params) if num_coordinates is None else num_coordinates
    alpha = (default_fd_step(d) if fd_step is None else fd_step) / math.sqrt(d)
    directions = directions if directions is not None else RademacherDirections()
    probes = []
    for _ in range(num_probes):
        with assign(params, directions.shifted(params, alpha, generator)):
            probes.append(per_sample_losses_at().float())
    return torch.stack(probes)


def fd_norms(
    probe_losses: torch.Tensor, clean_losses: torch.Tensor, num_params: int, fd_step: float | None = None
) -> torch.Tensor:
    """``n_i = sqrt(d * mean_q D_iq^2)`` with ``D_iq = (l_i(x + h u_q) - l_i(x)) / h``, in fp32.

    Args:
        probe_losses (`Tensor`): ``[Q, b]`` from `fd_probe_losses`.
        clean_losses (`Tensor`): ``l_i(x)``, ``[b]``.
        num_params (`int`): ``d``.
        fd_step (`float`, *optional*): the ``h`` the probes used.
    """
    h = default_fd_step(num_params) if fd_step is None else fd_step
    slopes = (probe_losses - clean_losses.detach().float()) / h
    return (slopes.square().mean(0) * num_params).sqrt()



class FiniteDifferenceNorms:
    """The ``fd`` estimator: `rwsam_num_probes` probes at ``x + h u_q``, taken before the ascent's forward.

    Args:
        settings (`SharpnessSettings`): ``rwsam_num_probes`` and ``rwsam_fd_step``.
    """

    def __init__(self, settings: SharpnessSettings):
        self.settings = settings
        self.directions = RademacherDirections()  # the probes' buffers, kept from step to step
        self._checked = False
        self._probes: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None

    def forward(self, ctx: StepContext, losses_of: Callable) -> tuple:
        """The probes, then the ascent's forward: ``(loss, outputs)`` of ``ctx.loss_fn`` at ``x``. `losses_of`
        turns outputs into per-sample losses."""
        if not self._checked:
            self._check(ctx)

        @torch.no_grad()
        def per_sample_losses():
            with ctx.rng.replay(), frozen_running_stats(ctx.bn_modules), ctx.host.full_precision(ctx.model):
                _, outputs = ctx.loss_fn(ctx.model, ctx.inputs, return_outputs=True)
                return losses_of(outputs)

        s, params = self.settings, ctx.params
        self._probes = fd_probe_losses(per_sample_losses, params.tensors, s.rwsam_num_probes, s.rwsam_fd_step,
                                       self._generator(ctx), num_coordinates=params.numel, assign=params.assign,
                                       directions=self.directions)
        # Under mixed precision the slopes need an fp32 reference at x too; in fp32 the ascent's losses are it.
        self._reference = per_sample_losses() if ctx.host.mixed_precision(ctx.model) else None
        return ctx.loss_fn(ctx.model, ctx.inputs, return_outputs=True)

    def norms(self, ctx: StepContext, losses: torch.Tensor) -> torch.Tensor:
        clean = losses if self._reference is None else self._reference
        norms = fd_norms(self._probes, clean, ctx.params.numel, self.settings.rwsam_fd_step)
        self._probes = self._reference = None
        return norms

    def weighted_gradient(self, ctx: StepContext, weights: torch.Tensor, losses: torch.Tensor) -> list[torch.Tensor]:
        """``grad sum_i p_i l_i`` by one backward (times the loss scale under fp16)."""
        return ctx.params.gradient(ctx.host.scale((weights * losses).sum()))

    def storage(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The probes' buffers, free between steps: RW-SAM puts ``x + e`` there, so that they take the place of the
        perturbation's own memory rather than add to it."""
        return self.directions.storage(params)

    def parameters_registered(self) -> contextlib.AbstractContextManager:
        """The probes swap the parameters' values, not the parameters (`original_parameters` puts ``x`` back)."""
        return contextlib.nullcontext()

    def _generator(self, ctx: StepContext) -> torch.Generator:
        """Seeded from (seed, optimizer step, micro-step, rank), so a resumed run draws the same probes."""
        if ctx.generator is not None:
            return ctx.generator
        generator = torch.Generator(device=ctx.params.tensors[0].device)
        generator.manual_seed(rademacher_seed(ctx.seed, *ctx.step_index, ctx.host.process_index))
        return generator

    def _check(self, ctx: StepContext) -> None:
        """Once: refuses a step ``h`` the parameters' precision cannot resolve, and warns where the parameters
        themselves are bf16/fp16 (then the probes cannot run in fp32).

        A probe moves every coordinate by ``h / sqrt(d)``, and a weight of the typical (root-mean-square) size
        ``||x|| / sqrt(d)`` moves by that only if the move is at least ``u`` times the weight (``u``: the unit
        roundoff, 2^-24 in fp32; a shorter move rounds to nothing or to a whole spacing): ``h >= u ||x||``
        (`SharpnessSettings.rwsam_fd_step`)."""
        s, params = self.settings, ctx.params
        if any(t.dtype in (torch.bfloat16, torch.float16) for t in params.tensors):
            logger.warning(
                "RW-SAM fd: the parameters themselves are bf16/fp16, so the probes cannot run in fp32, and their "
                "rounding hides or swamps the finite-difference step (benchmarks/fd_step.py). Keep fp32 weights "
                "(mixed precision through autocast) or use rwsam_estimator='exact'."
            )
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
        self._checked = True
