"""SAM and ASAM in `RWSAMTrainer` against independent references.

* `sam_mode="sam"` (and ASAM with ``eta = 0``) against `pytorch_optimizer.SAM` wrapping `torch.optim.SGD`, step for
  step on a fixed batch;
* `sam_mode="none"` against a plain `transformers.Trainer`, bit for bit;
* a check that the comparison can fail: a reference with another rho (or plain SGD) is far outside the tolerance.

Tolerance: everything runs in fp32 on CPU. The trainer and the reference compute the same formulas in a different
order (per-sample losses then mean vs the fused mean cross-entropy, `_foreach_norm` vs `get_global_gradient_norm`,
pytorch_optimizer's ``+1e-12`` on a norm of order 1, the batch possibly permuted by the Trainer's sampler), so every
step differs by a few ulps, ~1e-7 relative. Over 5 steps of a smooth, well-conditioned tiny MLP at lr 0.1 this stays
~1e-7 to 1e-6; 1e-5 leaves a margin while a wrong rho, a missing perturbation or a wrong ASAM scale moves the
parameters by >= 1e-3 relative (checked by `test_reference_comparison_can_fail`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hf_rwsam import RWSAMTrainer

from references import pytorch_optimizer_sam
from utils import TinyMLP, flat_params, make_tensors, relative_error, sgd_config, tensor_dataset

TOL = 1e-5
LR = 0.1
STEPS = 5
BATCH = 8


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyMLP(dropout=0.0, batch_norm=False).float()


def _one_batch_data(b=BATCH, seed=1):
    return make_tensors(n=b, seed=seed)


def _train_with_trainer(model, x, y, tmp_path, **config):
    """`RWSAMTrainer` on a dataset that is exactly one batch, so every step sees the same `b` samples."""
    args = sgd_config(
        tmp_path / "trainer", per_device_train_batch_size=len(y), learning_rate=LR, max_steps=STEPS, **config
    )
    trainer = RWSAMTrainer(model=model, args=args, train_dataset=tensor_dataset(x, y))
    trainer.train()
    return trainer


def _assert_plain_sgd(trainer):
    """The Trainer's optimizer is SGD with the settings the reference assumes (no momentum, no weight decay...)."""
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    assert isinstance(inner, torch.optim.SGD), type(inner)
    for group in inner.param_groups:
        assert group["momentum"] == 0
        assert group["dampening"] == 0
        assert group["weight_decay"] == 0
        assert not group["nesterov"]
        assert not group.get("maximize", False)
        assert group["lr"] == pytest.approx(LR, rel=0, abs=0)  # constant schedule: still the initial lr


def _pytorch_optimizer_sam(model, x, y, rho, adaptive, steps=STEPS):
    """The reference: pytorch_optimizer's two-step SAM around torch.optim.SGD (momentum 0, no weight decay)."""
    return pytorch_optimizer_sam(model, x, y, rho, LR, steps, adaptive)


def _plain_sgd(model, x, y, steps=STEPS):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x)["logits"], y).backward()
        optimizer.step()
    return model


SAM_CASES = [
    pytest.param(False, 0.05, id="sam-rho0.05"),
    pytest.param(False, 0.3, id="sam-rho0.3"),
    pytest.param(True, 0.1, id="asam-rho0.1"),
    pytest.param(True, 1.0, id="asam-rho1.0"),
]


@pytest.mark.parametrize("adaptive, rho", SAM_CASES)
def test_sam_and_asam_match_pytorch_optimizer(tmp_path, adaptive, rho):
    x, y = _one_batch_data()
    model = _model()
    reference = _pytorch_optimizer_sam(copy.deepcopy(model), x, y, rho, adaptive)
    trainer = _train_with_trainer(
        copy.deepcopy(model), x, y, tmp_path, sam_mode="sam", sam_rho=rho, sam_adaptive=adaptive, sam_adaptive_eta=0.0
    )
    assert trainer.state.global_step == STEPS
    _assert_plain_sgd(trainer)
    ours = flat_params(trainer.model)
    assert not torch.equal(ours, flat_params(model)), "training did not move the parameters"
    err = relative_error(ours, flat_params(reference))
    assert err <= TOL, f"relative parameter error vs pytorch_optimizer.SAM: {err:.3e}"


@pytest.mark.parametrize("adaptive, rho", [SAM_CASES[0], SAM_CASES[2]])
def test_reference_comparison_can_fail(tmp_path, adaptive, rho):
    """The same comparison against a reference with another rho, or with no perturbation, is far above TOL."""
    x, y = _one_batch_data()
    model = _model()
    trainer = _train_with_trainer(
        copy.deepcopy(model), x, y, tmp_path, sam_mode="sam", sam_rho=rho, sam_adaptive=adaptive, sam_adaptive_eta=0.0
    )
    ours = flat_params(trainer.model)
    other_rho = flat_params(_pytorch_optimizer_sam(copy.deepcopy(model), x, y, 2 * rho, adaptive))
    other_kind = flat_params(_pytorch_optimizer_sam(copy.deepcopy(model), x, y, rho, not adaptive))
    sgd = flat_params(_plain_sgd(copy.deepcopy(model), x, y))
    for name, wrong in (("2 * rho", other_rho), ("SAM <-> ASAM", other_kind), ("plain SGD", sgd)):
        err = relative_error(ours, wrong)
        assert err > 100 * TOL, f"against the wrong reference ({name}) the error is only {err:.3e}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_mode_none_is_the_plain_trainer(tmp_path, accumulation):
    """`sam_mode="none"` is bit for bit the Trainer: same seed, same shuffling, same updates."""
    x, y = make_tensors(n=32, seed=2)
    dataset = tensor_dataset(x, y)
    model = _model()
    settings = dict(
        per_device_train_batch_size=8, gradient_accumulation_steps=accumulation, learning_rate=LR,
        lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, max_steps=6,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=3,
        dataloader_num_workers=0,
    )
    plain = Trainer(
        model=copy.deepcopy(model), args=TrainingArguments(output_dir=str(tmp_path / "plain"), **settings),
        train_dataset=dataset,
    )
    plain.train()
    ours = RWSAMTrainer(
        model=copy.deepcopy(model),
        args=sgd_config(tmp_path / "ours", sam_mode="none", **settings),
        train_dataset=dataset,
    )
    ours.train()
    assert ours.state.global_step == plain.state.global_step == 6
    moved = flat_params(plain.model)
    assert not torch.equal(moved, flat_params(model))
    for (name, a), (_, b) in zip(ours.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs from the plain Trainer's"
    # The logged training losses are the Trainer's too.
    losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in ours.state.log_history if "loss" in h]
