"""RW-SAM's sample weights: the Gibbs distribution over per-sample gradient norms.

RW-SAM (Reweighted SAM, arXiv 2509.18001) computes the SAM ascent gradient as ``g = grad(sum_i p_i l_i(x))`` with

    p = softmax(lambda * s),      s_i = n_i / mean_j n_j   (or s_i = n_i),      n_i ~ ||grad l_i(x)||,

so that samples with large gradients, which dominate the small-batch (m-SAM) perturbations, get more say in the
perturbation of the full batch. ``lambda = 0`` is SAM. The norms come from an estimator (`estimators`: ``fd`` or
``exact``); the weights optionally follow a target effective sample size and a cap.
"""

from __future__ import annotations

import math

import torch

from .settings import RwsamNormalize


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
    normalize: RwsamNormalize = "mean",
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
