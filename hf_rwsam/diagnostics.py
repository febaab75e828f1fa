"""End-of-training diagnostics: the trace of the gradient-noise covariance and of the Hessian.

The RW-SAM paper (arXiv 2509.18001) explains m-sharpness by the gradient noise: SAM's perturbation on small batches
adds a penalty on the variance of per-sample gradients, and it reports ``tr(V)`` at the end of training (CIFAR:
SGD 572 > SAM 198 > RW-SAM 178). Both functions take batches and a per-sample loss, like `sample_grad_norms`:
``loss_fn(model, inputs) -> Tensor[b]``, and leave the model's mode to the caller (``model.eval()`` makes per-sample
losses independent of the batch through BatchNorm, which is what these definitions assume).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .sharpness.ghost import PerSampleGradients


def gradient_noise_trace(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    chunk_size: int = 32,
) -> float:
    """``tr(V) = mean_i ||g_i||^2 - ||mean_i g_i||^2`` over every sample of `batches`, ``g_i = grad l_i(x)``.

    The per-sample gradients' covariance trace (with the 1/N normalisation), from exact per-sample gradient norms and
    the summed gradient, both from one backward per batch (`PerSampleGradients`; its batched estimator, with
    ``chunk_size`` samples per batched backward, for what its layer rules do not cover).

    Args:
        model (`nn.Module`): the model; its trainable parameters define the gradients.
        batches (`Iterable[dict]`): the samples, as input dicts.
        loss_fn (`Callable`): per-sample losses ``[b]``.
        chunk_size (`int`): samples per batched backward.

    Returns:
        `float`: ``tr(V)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sum_sq_norms, count = 0.0, 0
    grad_sum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    per_sample = PerSampleGradients(model, params, chunk_size)
    for inputs in batches:
        b = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        with per_sample.recording(b):
            losses = loss_fn(model, inputs)
        sum_sq_norms += float(per_sample.norms(losses).double().square().sum())
        count += losses.shape[0]
        for total, g in zip(grad_sum, per_sample.weighted_gradient(torch.ones_like(losses))):
            total += g.double()
    mean_grad_sq = sum(float(t.square().sum()) for t in grad_sum) / count**2
    return sum_sq_norms / count - mean_grad_sq


def hessian_trace(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    num_probes: int = 32,
    generator: torch.Generator | None = None,
) -> float:
    """Hutchinson's estimate ``tr(H) ~ mean_q v_q^T H v_q``, ``v_q`` Rademacher, ``H`` the Hessian of the mean loss.

    Each probe costs one Hessian-vector product (double backward) per batch; the batches' losses are weighted by
    their sizes so ``H`` is the Hessian of the mean loss over all samples. Unbiased; its variance falls as
    ``1 / num_probes``.

    Args:
        model (`nn.Module`): the model; its trainable parameters define ``H``.
        batches (`Iterable[dict]`): the samples (iterated once per probe: pass a list, not a generator).
        loss_fn (`Callable`): per-sample losses ``[b]``.
        num_probes (`int`): Rademacher probes.
        generator (`torch.Generator`, *optional*): draws the probes.

    Returns:
        `float`: the estimate of ``tr(H)``.
    """
    batches = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        total = sum(loss_fn(model, inputs).shape[0] for inputs in batches)
    estimates = []
    for _ in range(num_probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype).mul_(2).sub_(1) for p in params]
        quad = 0.0
        for inputs in batches:
            loss = loss_fn(model, inputs).sum() / total
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=v, materialize_grads=True)
            quad += float(sum((h * u).sum() for h, u in zip(hv, v)))
        estimates.append(quad)
    return sum(estimates) / num_probes
