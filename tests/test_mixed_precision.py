"""Mixed precision as users run it: `training_step` called outside `train()` (custom loops, subclasses, benchmarks)
on a model the Accelerator has or has not prepared, in bf16 autocast on the CPU, in every mode.

The model records the dtype of an activation at every call: the ascent and descent run as the Trainer runs them
(bf16 once the Accelerator has wrapped the forward in autocast, fp32 before), RW-SAM's finite-difference probes always
in fp32 (bf16 rounding hides or swamps any fd step, benchmarks/fd_step.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_rwsam import RWSAMConfig, RWSAMTrainer

from references import EVERY_MODE
from utils import TinyMLP, make_tensors

MODES = [(settings["sam_mode"], {k: v for k, v in settings.items() if k != "sam_mode"}) for settings in EVERY_MODE.values()]
IDS = list(EVERY_MODE)


class DtypeRecordingMLP(TinyMLP):
    """Records the dtype of its hidden activation at every forward (with or without gradient)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []
        self.net[0].register_forward_hook(lambda module, args, out: self.seen.append((out.dtype, torch.is_grad_enabled())))


def _trainer(tmp_path, mode, extra):
    torch.manual_seed(0)
    args = RWSAMConfig(output_dir=str(tmp_path), sam_mode=mode, bf16=True, use_cpu=True, report_to="none",
                       per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", **extra)
    trainer = RWSAMTrainer(model=DtypeRecordingMLP(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the Trainer's own training_step reads it too
    return trainer


def _step(trainer, model):
    x, y = make_tensors(8)
    trainer.model.seen.clear()
    loss = trainer.training_step(model, {"x": x, "labels": y})
    assert math.isfinite(float(loss))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.model.parameters())
    return trainer.model.seen


@pytest.mark.parametrize("mode, extra", MODES, ids=IDS)
def test_training_step_before_train_in_bf16(tmp_path, mode, extra):
    """Not prepared: no autocast wraps the forward, so every pass runs in fp32, and nothing fails for lack of the
    wrapper (RW-SAM's probes used to read Accelerate's `_original_forward` and raised AttributeError)."""
    trainer = _trainer(tmp_path, mode, extra)
    seen = _step(trainer, trainer.model)
    assert {dtype for dtype, _ in seen} == {torch.float32}, seen


@pytest.mark.parametrize("mode, extra", MODES, ids=IDS)
def test_training_step_on_the_prepared_model_runs_bf16_with_fp32_probes(tmp_path, mode, extra):
    """Prepared as `train()` prepares it: the ascent and descent forwards run in bf16; the probes (no gradient) in
    fp32."""
    trainer = _trainer(tmp_path, mode, extra)
    model = trainer.accelerator.prepare(trainer.model)
    seen = _step(trainer, model)
    with_grad = {dtype for dtype, grad in seen if grad}
    without_grad = [dtype for dtype, grad in seen if not grad]
    assert with_grad == {torch.bfloat16}, seen
    if mode == "rwsam" and extra.get("rwsam_estimator") != "exact":
        # 2 probes, and the fp32 reference at x the slopes need under mixed precision
        assert without_grad == [torch.float32] * 3, seen
    else:
        assert without_grad == [], seen
