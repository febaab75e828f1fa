"""`torch_compile=True` (the TrainingArguments field) in every mode: one step compiled equals one step eager.

Compiled kernels reorder float sums, so the two differ by a few ulps (~1e-8 relative after a step of a tiny MLP);
1e-5 leaves room, while a step that lost the perturbation (or the probes' weights) moves the parameters by ~1e-3.
The vmap m-SAM cannot run compiled (torch.func transforms the eager module), nor can the exact estimator's ascent
(its batched backward passes reuse a graph that compiled backward functions free): they run eagerly and say so once.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_rwsam import RWSAMTrainer

from references import EVERY_MODE
from utils import TinyMLP, flat_params, make_tensors, relative_error, sgd_config, tensor_dataset

MODES = {name: {**settings, "sam_rho": 0.3} for name, settings in EVERY_MODE.items()}


def one_step(tmp_path, compiled, settings):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = make_tensors(16, seed=3)
    args = sgd_config(tmp_path, max_steps=1, per_device_train_batch_size=16, torch_compile=compiled, **settings)
    trainer = RWSAMTrainer(model=TinyMLP(), args=args, train_dataset=tensor_dataset(x, y))
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", list(MODES))
def test_one_compiled_step_equals_one_eager_step(tmp_path, name):
    eager = one_step(tmp_path / "eager", False, MODES[name])
    with CaptureLogger(logging.get_logger("hf_rwsam.sharpness")) as captured:
        compiled = one_step(tmp_path / "compiled", True, MODES[name])
    assert hasattr(compiled.model_wrapped, "_orig_mod"), "the Trainer did not compile the model"
    ours, reference = flat_params(compiled.accelerator.unwrap_model(compiled.model)), flat_params(eager.model)
    assert relative_error(ours, reference) <= 1e-5
    sgd = one_step(tmp_path / "sgd", False, {"sam_mode": "none"})
    assert relative_error(ours, flat_params(sgd.model)) > 100 * 1e-5  # the step is sharpness-aware
    notes = {"msam_vmap": "m-SAM's vmap implementation runs the model uncompiled",
             "rwsam_exact": "RW-SAM's exact estimator runs its ascent pass uncompiled"}
    for mode, note in notes.items():
        assert captured.out.count(note) == (1 if name == mode else 0), captured.out
