"""tr(V) and Hutchinson's tr(H) against plain references on a tiny MLP (eval mode, no BatchNorm coupling)."""

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_rwsam.diagnostics import gradient_noise_trace, hessian_trace

from utils import TinyMLP, make_tensors


def per_sample_ce(model, inputs):
    return F.cross_entropy(model(inputs["x"])["logits"], inputs["labels"], reduction="none")


def _setup():
    torch.manual_seed(0)
    model = TinyMLP(in_features=4, hidden=5, num_classes=3).double().eval()
    x, y = make_tensors(24, in_features=4, seed=2)
    batches = [{"x": x[:10].double(), "labels": y[:10]}, {"x": x[10:].double(), "labels": y[10:]}]
    return model, x.double(), y, batches


def test_gradient_noise_trace_equals_the_per_sample_gradient_covariance():
    model, x, y, batches = _setup()
    params = list(model.parameters())
    grads = []
    for i in range(len(y)):  # one backward per sample
        loss = F.cross_entropy(model(x[i : i + 1])["logits"], y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)
    expected = float((g - g.mean(0)).square().sum(1).mean())  # tr of the covariance with 1/N
    assert math.isclose(gradient_noise_trace(model, batches, per_sample_ce, chunk_size=7), expected, rel_tol=1e-9)


def test_hutchinson_hessian_trace_agrees_with_the_exact_trace_within_its_standard_error():
    model, x, y, batches = _setup()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(theta):
        chunks, offset = {}, 0
        for name, shape in zip(names, shapes):
            chunks[name] = theta[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return F.cross_entropy(functional_call(model, chunks, (x,))["logits"], y)

    hessian = torch.autograd.functional.hessian(mean_loss, flat)
    exact = float(hessian.trace())
    # Rademacher Hutchinson: Var[v^T H v] = 2 * sum_{i != j} H_ij^2, so the mean of Q probes has this std.
    off_diagonal = hessian - torch.diag(hessian.diagonal())
    probes = 400
    std = math.sqrt(2 * float(off_diagonal.square().sum()) / probes)
    estimate = hessian_trace(model, batches, per_sample_ce, num_probes=probes, generator=torch.Generator().manual_seed(0))
    assert abs(estimate - exact) <= 4 * std, (estimate, exact, std)
    assert std < 0.2 * abs(exact)  # the check is informative: the tolerance is small against the trace itself
