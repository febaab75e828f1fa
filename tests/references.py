"""The independent references the tests compare the step against, written plainly from docs/ALGORITHMS.md, once.

* `pytorch_optimizer_sam`: the peer library's two-step SAM (ASAM) around plain SGD.
* `msam_reference`: sequential m-SAM (tml-epfl/understanding-sam) with plain SGD.
* `reference_rwsam` / `reference_rwsam_gradient`: RW-SAM with exact per-sample norms by one backward per sample.
* `ref_gibbs` and its parts: RW-SAM's weights in float64 (plain softmax, bisection for a target ESS, iterative cap).
* `loop_grad_norms`, `per_sample_ce`: per-sample gradient norms by a loop of backward calls.
* `EVERY_MODE`: one setting of each sharpness-aware mode, for the tests that run them all.

Everything works on the tests' tiny models (`utils.TinyMLP`: ``model(x)["logits"]``, ``model(x, labels=y)["loss"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_optimizer import SAM
from torch.nn.modules.batchnorm import _BatchNorm

EVERY_MODE = {
    "sam": dict(sam_mode="sam"),
    "asam": dict(sam_mode="sam", sam_adaptive=True),
    "msam_loop": dict(sam_mode="msam", msam_micro_batch_size=4, msam_implementation="loop"),
    "msam_vmap": dict(sam_mode="msam", msam_micro_batch_size=4, msam_implementation="vmap"),
    "rwsam_fd": dict(sam_mode="rwsam", rwsam_num_probes=2),
    "rwsam_exact": dict(sam_mode="rwsam", rwsam_estimator="exact", rwsam_target_ess=0.5),
}
"""One setting of each mode (m-SAM's micro-batch of 4 divides the tests' batches of 8)."""


def mean_ce(model, x, y):
    return F.cross_entropy(model(x)["logits"], y)


def ce_of_outputs(outputs, labels):
    """Per-sample cross-entropy from a model's outputs, ``[b]``."""
    return F.cross_entropy(outputs["logits"], labels, reduction="none")


def per_sample_ce(model, inputs):
    """The loss_fn of `sample_grad_norms`: per-sample cross-entropy, ``[b]``."""
    return F.cross_entropy(model(inputs["x"])["logits"], inputs["labels"], reduction="none")


# --------------------------------------------------------------------------------------------------------- SAM


def pytorch_optimizer_sam(model, x, y, rho, lr, steps, adaptive=False, loss_of=mean_ce):
    """pytorch_optimizer's SAM (ASAM with ``adaptive``) around plain SGD (momentum 0, no weight decay), stepping on
    ``loss_of(model, x, y)`` for `steps` steps on one batch. In place."""
    model.train()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=0.0,
                    weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        optimizer.second_step(zero_grad=True)
    return model


# ------------------------------------------------------------------------------------------------------- m-SAM


def msam_reference(model, x, y, m, rho, lr, steps, group_loss=None, freeze_bn_in_descent=True):
    """Sequential m-SAM with plain SGD, on the same batch every step. In place.

    Each group ``G_j`` of `m` consecutive samples ascends along its own gradient, and the step's gradient is the sum of
    the groups' descent gradients at ``x + e_j`` of `group_loss(model, x_j, y_j)`, the group's share of the step's loss
    (default: its mean cross-entropy over ``k = b / m``, so that the step is the groups' mean). BatchNorm: ascent
    forwards use the group's statistics and update the running ones; descent forwards leave them frozen
    (``freeze_bn_in_descent=False`` is a deliberately wrong variant, to show a comparison can fail).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    k = y.shape[0] // m
    group_loss = group_loss or (lambda model, xg, yg: mean_ce(model, xg, yg) / k)
    for _ in range(steps):
        step_grad = [torch.zeros_like(p) for p in params]
        for j in range(k):
            xg, yg = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
            g = torch.autograd.grad(group_loss(model, xg, yg), params)
            norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g)).float()
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(rho * t / norm)
            frozen = [b for b in model.modules() if isinstance(b, _BatchNorm)] if freeze_bn_in_descent else []
            for bn in frozen:
                bn.track_running_stats = False
            try:
                descent = torch.autograd.grad(group_loss(model, xg, yg), params)
            finally:
                for bn in frozen:
                    bn.track_running_stats = True
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
            for acc, t in zip(step_grad, descent):
                acc.add_(t)
        with torch.no_grad():
            for p, t in zip(params, step_grad):
                p.sub_(lr * t)
    return model


# ------------------------------------------------------------------------------------------------------ RW-SAM


def loop_grad_norms(model, x, y):
    """``||grad l_i||`` by one forward and backward per sample (no BatchNorm, so l_i depends on sample i only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1])["logits"], y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    return torch.stack(norms)


def loop_grad_matrix(model, x, y):
    """Per-sample gradients as rows of a float64 ``[b, d]`` matrix, by a loop of backward calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1])["logits"], y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    return torch.stack(rows)


def ref_scores(n, normalize):
    n = n.double()
    return n / n.mean() if normalize == "mean" else n


def ref_ess_fraction(p):
    p = p.double()
    return float(p.sum() ** 2 / p.square().sum() / p.numel())


def ref_lambda_for_ess(scores, target):
    """lambda >= 0 with ESS(softmax(lambda * s)) = target * b, by plain bisection in float64 (ESS falls with lambda)."""
    scores = scores.double()
    if target >= 1:
        return 0.0

    def ess(lam):
        return ref_ess_fraction(torch.softmax(lam * scores, 0))

    lo, hi = 0.0, 1.0
    while ess(hi) > target and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(mid) > target else (lo, mid)
    return (lo + hi) / 2


def ref_cap(p, c):
    """The plain iterative cap: clip at c/b, renormalise the uncapped ones to the remaining mass, repeat."""
    p = p.double().clone()
    b = p.numel()
    cap = c / b
    capped = torch.zeros(b, dtype=torch.bool)
    while True:
        over = (p > cap) & ~capped
        if not over.any():
            return p
        capped |= over
        p[capped] = cap
        free = ~capped
        if free.any():
            p[free] = p[free] * (1 - cap * capped.sum()) / p[free].sum()


def ref_gibbs(n, lam=1.0, normalize="mean", target_ess=None, max_weight=None):
    """RW-SAM's weights from docs/ALGORITHMS.md, float64."""
    s = ref_scores(n, normalize)
    if target_ess is not None:
        lam = ref_lambda_for_ess(s, target_ess)
    p = torch.softmax(lam * s, 0)
    if max_weight is not None:
        p = ref_cap(p, max_weight)
    return p


def reference_rwsam_gradient(model, x, y, rho, weights_fn, per_sample=ce_of_outputs, loss=mean_ce):
    """One RW-SAM step's descent gradient: exact per-sample norms ``||grad l_i||`` (one backward of each sample's loss
    through the batch's forward; no BatchNorm), weights ``weights_fn(norms)``, ascent on ``sum_i p_i l_i``, the
    gradient of `loss` at ``x + e``; the parameters are put back."""
    params = list(model.parameters())
    losses = per_sample(model(x), y)
    norms = torch.stack([
        torch.sqrt(sum(g.double().square().sum() for g in torch.autograd.grad(losses[i], params, retain_graph=True)))
        for i in range(len(y))
    ])
    p = weights_fn(norms).float()
    g = torch.autograd.grad((p * per_sample(model(x), y)).sum(), params)
    g_norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    saved = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q, gi in zip(params, g):
            q.add_(rho * gi / g_norm)
    descent = torch.autograd.grad(loss(model, x, y), params)
    with torch.no_grad():
        for q, q0 in zip(params, saved):
            q.copy_(q0)
    return descent


def reference_rwsam(model, x, y, steps, lr, rho, weights_fn, per_sample=ce_of_outputs, loss=mean_ce):
    """RW-SAM with plain SGD on one batch (`reference_rwsam_gradient` per step). In place."""
    model.train()
    for _ in range(steps):
        descent = reference_rwsam_gradient(model, x, y, rho, weights_fn, per_sample, loss)
        with torch.no_grad():
            for q, gi in zip(model.parameters(), descent):
                q.sub_(lr * gi)
    return model
