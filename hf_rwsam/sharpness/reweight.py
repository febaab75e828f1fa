"""RW-SAM's sample weights: per-sample gradient norms and the Gibbs distribution over them.

RW-SAM (Reweighted SAM, arXiv 2509.18001) computes the SAM ascent gradient as ``g = grad(sum_i p_i l_i(x))`` with

    p = softmax(lambda * s),      s_i = n_i / mean_j n_j   (or s_i = n_i),      n_i ~ ||grad l_i(x)||,

so that samples with large gradients, which dominate the small-batch (m-SAM) perturbations, get more say in the
perturbation of the full batch. ``lambda = 0`` is SAM.

Two estimators of ``n_i``:

* ``fd`` (the paper's): ``n_i^2 = d * mean_q D_iq^2`` with ``D_iq = (l_i(x + h u_q) - l_i(x)) / h``,
  ``u_q = z_q / sqrt(d)`` and ``z_q`` Rademacher in ``{-1, +1}^d``. Since ``E[(z.g)^2] = ||g||^2``, this is unbiased
  for ``||grad l_i||^2`` as ``h -> 0``. Cost: one no-grad forward per probe.
* ``exact``: true per-sample gradient norms from one backward and the layers' inputs and output gradients (`ghost`);
  parameters no layer rule covers, and models whose BatchNorm couples the samples, by batched backward passes.

Both differentiate the per-sample losses *as computed on the batch*: with BatchNorm in training mode, ``l_i``
depends on the whole batch through its statistics, and both estimators see that dependence.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .ghost import PerSampleGradients
from .perturb import swapped_parameters
from .state import RNGReplay, frozen_running_stats, running_stat_modules


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
    """

    def __init__(self):
        self._layout: list[tuple] | None = None
        self._members: list[list[int]] = []  # group g holds the parameters params[i] for i in _members[g]
        self._groups: list[_SignGroup] = []

    def _arrange(self, params: Sequence[torch.Tensor]) -> None:
        layout = [(p.shape, p.dtype, p.device) for p in params]
        if layout != self._layout:
            keys = list(dict.fromkeys((p.device, p.dtype) for p in params))
            self._members = [[i for i, p in enumerate(params) if (p.device, p.dtype) == key] for key in keys]
            self._groups = [_SignGroup([params[i] for i in members]) for members in self._members]
            self._layout = layout
        for group, members in zip(self._groups, self._members):
            group.params = [params[i] for i in members]

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


def sample_grad_norms(
    model: nn.Module,
    inputs: dict,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    method: str = "fd",
    num_probes: int = 1,
    fd_step: float | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Per-sample gradient norms ``n_i ~ ||grad l_i(x)||`` of a model on a batch, without any Trainer.

    The model is used in whatever mode it is in and left as it was: randomness (dropout) is replayed so every probe
    sees the clean pass's random numbers, BatchNorm running statistics are not updated, and the parameters are
    restored bit-exactly.

    Args:
        model (`nn.Module`): the model; all parameters with ``requires_grad`` count.
        inputs (`dict`): the batch.
        loss_fn (`Callable`): ``loss_fn(model, inputs) -> Tensor[b]`` of per-sample losses.
        method (`str`): ``"fd"`` (finite differences, `num_probes` extra forwards) or ``"exact"``.
        num_probes (`int`): probes ``Q`` for ``"fd"``.
        fd_step (`float`, *optional*): ``h`` for ``"fd"``; defaults to `default_fd_step`.
        generator (`torch.Generator`, *optional*): draws the Rademacher probes.
        chunk_size (`int`): samples per batched backward for ``"exact"``.

    Returns:
        `Tensor`: ``[b]`` fp32 norms.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    if method not in ("fd", "exact"):
        raise ValueError(f"method={method!r} is not supported; choose 'fd' or 'exact'.")
    bn_modules = running_stat_modules(model)
    if method == "exact":
        b = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        per_sample = PerSampleGradients(model, params, chunk_size)
        with frozen_running_stats(bn_modules), per_sample.recording(b):
            losses = loss_fn(model, inputs)
        return per_sample.norms(losses)
    rng = RNGReplay(device)

    def probe_losses():
        with rng.replay(), frozen_running_stats(bn_modules):
            return loss_fn(model, inputs)

    probes = fd_probe_losses(probe_losses, params, num_probes, fd_step, generator)
    with torch.no_grad(), frozen_running_stats(bn_modules):  # the clean pass, with the probes' random numbers
        clean = loss_fn(model, inputs)
    return fd_norms(probes, clean, sum(p.numel() for p in params), fd_step)


def effective_sample_size(p: torch.Tensor) -> torch.Tensor:
    """``(sum p)^2 / sum p^2``, from 1 (one sample has all the weight) to ``b`` (uniform)."""
    return p.sum(-1).square() / p.square().sum(-1)


def _lambda_for_target_ess(scores: torch.Tensor, target: float, grid: int = 128, rounds: int = 3) -> torch.Tensor:
    """The ``lambda >= 0`` with ``ESS(softmax(lambda * s)) = target * b``, by grid refinement in log-space.

    ESS falls monotonically from ``b`` at ``lambda = 0`` to the number of tied maxima as ``lambda -> inf`` (its
    log-derivative is ``2 (E_p[s] - E_{p^2}[s]) <= 0``). Each round evaluates a grid of lambdas in one batched
    softmax and keeps the bracketing cell: no host synchronisation, a dozen kernel launches. Targets outside the
    reachable range are clamped: a target of 1 gives ``lambda = 0`` (SAM); one below the limit gives the largest
    lambda of the search range (``1e6 / (max s - min s)``).
    """
    b = scores.shape[-1]
    spread = (scores.max() - scores.min()).clamp_min(torch.finfo(scores.dtype).tiny)
    goal = target * b
    lo = torch.full((), -12.0, dtype=scores.dtype, device=scores.device)  # log10(lambda * spread)
    hi = torch.full((), 6.0, dtype=scores.dtype, device=scores.device)
    steps = torch.linspace(0.0, 1.0, grid, dtype=scores.dtype, device=scores.device)
    for _ in range(rounds):
        log_lams = lo + (hi - lo) * steps
        ess = effective_sample_size(torch.softmax((10.0**log_lams / spread)[:, None] * scores, dim=-1))
        cell = ((ess >= goal).sum() - 1).clamp(0, grid - 2)  # ess[cell] >= goal > ess[cell + 1]
        lo, hi = log_lams[cell], log_lams[cell + 1]
    lam = 10.0 ** ((lo + hi) / 2) / spread
    return torch.where(torch.as_tensor(goal >= b * (1 - 1e-6), device=scores.device), torch.zeros_like(lam), lam)


def _cap_weights(log_p: torch.Tensor, cap: float) -> torch.Tensor:
    """The distribution ``min(cap, alpha * p)`` summing to 1: iterative capping and renormalisation, in closed form.

    Sort ``p`` descending; if the ``k`` largest are capped, the others scale by ``alpha_k = (1 - k cap) / sum_rest``;
    ``k`` is the smallest count for which the largest uncapped weight stays under the cap after scaling. Worked in
    log space from ``log p``: peaked weights have tails that are subnormal (or zero) in fp32 but matter after scaling.
    """
    b = log_p.shape[-1]
    sorted_lp, order = torch.sort(log_p, descending=True)
    k = torch.arange(b + 1, device=log_p.device)
    minus_inf = sorted_lp.new_full((1,), -math.inf)
    log_rest = torch.cat([torch.logcumsumexp(sorted_lp.flip(-1), -1).flip(-1), minus_inf])  # log sum p[k:]
    log_alpha = torch.log((1 - k * cap).clamp_min(0)) - log_rest
    largest_uncapped = torch.cat([sorted_lp, minus_inf])
    feasible = (log_alpha + largest_uncapped <= math.log(cap) + 1e-6) | (k == b)
    k_star = feasible.int().argmax()  # the first feasible k
    capped = torch.where(k[:b] < k_star, torch.full_like(sorted_lp, cap), torch.exp(log_alpha[k_star] + sorted_lp))
    return torch.empty_like(capped).scatter_(-1, order, capped)


def gibbs_weights(
    norms: torch.Tensor,
    lam: float = 1.0,
    normalize: str = "mean",
    target_ess: float | None = None,
    max_weight: float | None = None,
    return_lambda: bool = False,
):
    """RW-SAM's Gibbs distribution over per-sample gradient norms.

    ``p = softmax(lambda * s)`` with ``s = n / mean(n)`` (``normalize="mean"``, scale-free lambda) or ``s = n``
    (``"none"``, the paper's raw form). Computed in fp32.

    Args:
        norms (`Tensor`): ``n``, shape ``[b]``.
        lam (`float`): ``lambda >= 0``; 0 gives the uniform distribution (SAM). Ignored when `target_ess` is set.
        normalize (`str`): ``"mean"`` or ``"none"``.
        target_ess (`float`, *optional*): in (0, 1]; choose lambda so the effective sample size
            ``(sum p)^2 / sum p^2`` is ``target_ess * b`` (clamped where unattainable).
        max_weight (`float`, *optional*): ``c >= 1``; cap every ``p_i`` at ``c / b``, renormalising the rest. Applied
            after lambda is chosen, so the ESS can only grow. None or ``inf``: no cap.
        return_lambda (`bool`): also return the lambda used (a 0-dim tensor).

    Returns:
        `Tensor` ``[b]`` summing to 1 (and the lambda if asked).
    """
    if normalize not in ("mean", "none"):
        raise ValueError(f"normalize={normalize!r} is not supported; choose 'mean' or 'none'.")
    n = norms.detach().float()
    b = n.shape[-1]
    scores = n / n.mean().clamp_min(torch.finfo(n.dtype).tiny) if normalize == "mean" else n
    if target_ess is not None:
        lam_t = _lambda_for_target_ess(scores, target_ess)
    else:
        lam_t = torch.tensor(float(lam), device=n.device)
    logits = lam_t * scores
    uncapped = max_weight is None or math.isinf(max_weight)
    p = torch.softmax(logits, dim=-1) if uncapped else _cap_weights(logits.log_softmax(-1), max_weight / b)
    return (p, lam_t) if return_lambda else p
