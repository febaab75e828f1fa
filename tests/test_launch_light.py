"""The step is launch-light: ATen operators dispatched per step (each at most one kernel launch on a GPU), counted on the
CPU with `benchmarks/profiling.py` on timm's resnet18 (62 parameter tensors), as benchmarks/step_time.py does.

Targets (the GPU step is launch-bound for small and mid-sized models):
* one finite-difference probe costs at most one forward + 40 operators (drawing the signs tensor by tensor cost
  ~13 per tensor, 800 here);
* a SAM step costs at most 2 SGD steps + 30 operators.
These are counts, not timings: they do not depend on the machine.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.profiling import count_aten_ops
from hf_rwsam import RWSAMConfig, RWSAMTrainer


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = timm.create_model("resnet18", num_classes=10)

    def forward(self, pixel_values, labels=None):
        logits = self.body(pixel_values)
        return {"logits": logits, "loss": None if labels is None else F.cross_entropy(logits, labels)}


def optimizer_step(tmp_path, model, batch, **settings):
    """One optimizer step of RWSAMTrainer (its training_step, SGD's step, zero_grad), warmed up once."""
    args = RWSAMConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", optim="sgd",
                       max_grad_norm=0.0, use_cpu=True, learning_rate=1e-3, **settings)
    trainer = RWSAMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1

    def step():
        trainer.training_step(trainer.model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step()
    return step


def test_probes_and_sam_steps_are_launch_light(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    assert sum(1 for _ in model.parameters()) == 62
    batch = {"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.randint(0, 10, (8,))}

    def ops(**settings):
        return count_aten_ops(optimizer_step(tmp_path, model, batch, **settings)).total

    with torch.no_grad():
        forward = count_aten_ops(lambda: model(**batch)).total  # a training-mode forward with its loss
    sgd, sam = ops(sam_mode="none"), ops(sam_mode="sam")
    q1, q4 = ops(sam_mode="rwsam", rwsam_num_probes=1), ops(sam_mode="rwsam", rwsam_num_probes=4)
    per_probe = (q4 - q1) / 3
    assert per_probe <= forward + 40, (per_probe, forward)
    assert sam <= 2 * sgd + 30, (sam, sgd)
    # everything RW-SAM adds to SAM with one probe (the probe, per-sample losses, Gibbs weights, diagnostics)
    assert q1 - sam <= forward + 40, (q1, sam, forward)
