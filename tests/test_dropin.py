"""Trainer behaviours a drop-in must keep, found by running transformers' own Trainer tests against RWSAMTrainer
(`tests/trainer/test_trainer.py`, with `Trainer` swapped): models with NumPy noise, a diverging run, a seed changed
after construction, a forward that reassigns a buffer. Each is checked here on a tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_rwsam import RWSAMTrainer

from utils import SequentialTrainer, TinyMLP, flat_params, make_tensors, relative_error, sgd_config, tensor_dataset


class NumpyNoiseMLP(TinyMLP):
    """Adds NumPy noise to its logits (as transformers' RegressionRandomPreTrainedModel does), and takes the Trainer's
    loss kwargs (so the Trainer passes num_items_in_batch, and RW-SAM checks its per-sample losses with a second
    forward)."""

    def forward(self, x, labels=None, **kwargs):
        logits = self.net(x) + torch.from_numpy(np.random.rand(*x.shape[:1], 3).astype("float32"))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _train(model, tmp_path, x, y, **config):
    trainer = RWSAMTrainer(model=model, args=sgd_config(tmp_path, **config), train_dataset=tensor_dataset(x, y))
    trainer.train()
    return trainer


def test_rwsam_replays_numpy_noise_in_every_pass(tmp_path):
    """Without NumPy's state replayed the first-step check compared two different noises and refused the model."""
    torch.manual_seed(0)
    x, y = make_tensors(16)
    trainer = _train(NumpyNoiseMLP(), tmp_path, x, y, sam_mode="rwsam", max_steps=2)
    assert trainer.state.global_step == 2


def test_sam_descent_sees_the_ascents_numpy_noise(tmp_path):
    """SAM with rho = 0 is SGD exactly, also for a model drawing NumPy noise: the descent replays the ascent's numbers
    and the step leaves NumPy's generator where one forward leaves it."""
    x, y = make_tensors(8)
    torch.manual_seed(0)
    model = NumpyNoiseMLP()
    sam = _train(copy.deepcopy(model), tmp_path / "sam", x, y, sam_mode="sam", sam_rho=0.0, max_steps=3)
    sgd = _train(copy.deepcopy(model), tmp_path / "sgd", x, y, sam_mode="none", max_steps=3)
    assert torch.equal(flat_params(sam.model), flat_params(sgd.model))


def test_a_diverging_run_goes_on_as_the_trainer_does(tmp_path):
    """lr = 1e9 makes the loss inf/nan within a few steps: the Trainer keeps training (logging_nan_inf_filter), and so
    does RW-SAM (the per-sample check waits for a finite loss, non-finite perturbations are skipped)."""
    torch.manual_seed(0)
    x, y = make_tensors(16)
    trainer = _train(TinyMLP(), tmp_path, x, y, sam_mode="rwsam", learning_rate=1e9, max_steps=6,
                     per_device_train_batch_size=4)
    assert trainer.state.global_step == 6


def test_the_probes_follow_a_seed_changed_after_construction(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(16)
    # one batch of all 16 samples: the data order cannot matter, only the probes' seed does
    settings = dict(sam_mode="rwsam", rwsam_lambda=4.0, max_steps=3, per_device_train_batch_size=16)

    def run(path, construction_seed, seed):
        trainer = RWSAMTrainer(model=copy.deepcopy(model), args=sgd_config(path, seed=construction_seed, **settings),
                               train_dataset=tensor_dataset(x, y))
        trainer.args.seed = seed
        trainer.train()
        return flat_params(trainer.model)

    changed = run(tmp_path / "a", 1, 314)
    # (the samples' order within the batch follows the seed at construction: sums in another order, ~1e-7)
    assert relative_error(changed, run(tmp_path / "b", 314, 314)) <= 1e-6
    assert relative_error(changed, run(tmp_path / "c", 1, 1)) > 1e-4  # the seed does change the probes


class BufferAssigningMLP(TinyMLP):
    """Reassigns a buffer in its forward (a step counter, as transformers' test models do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, labels=None):
        self.calls = self.calls + 1
        return super().forward(x, labels)


def test_msam_auto_falls_back_to_the_loop_for_a_forward_that_reassigns_a_buffer(tmp_path):
    torch.manual_seed(0)
    x, y = make_tensors(16)
    settings = dict(sam_mode="msam", msam_micro_batch_size=2, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = _train(BufferAssigningMLP(), tmp_path / "auto", x, y, **settings)
    assert trainer.sharpness_step.msam.vmap_ok is False
    assert not torch._C._functorch.is_batchedtensor(trainer.model.calls)  # no batched tensor escaped: it saved
    assert (tmp_path / "auto" / "checkpoint-2" / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"msam_implementation='vmap'.*BufferAssigningMLP.*buffers \['calls'\]"):
        _train(BufferAssigningMLP(), tmp_path / "vmap", x, y, msam_implementation="vmap", **settings)


class ItemCountingMLP(TinyMLP):
    """Takes the Trainer's loss kwargs and divides its summed loss by num_items_in_batch (as transformers' heads do)."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = (F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
                           if num_items_in_batch is not None else F.cross_entropy(logits, labels))
        return out


class MeanWithKwargsMLP(TinyMLP):
    """Takes the Trainer's loss kwargs but returns a mean regardless (transformers' regression and multi-label
    heads do so): the Trainer leaves it undivided by the accumulation steps."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


@pytest.mark.parametrize("model_cls", [TinyMLP, ItemCountingMLP, MeanWithKwargsMLP])
def test_msam_at_rho_zero_is_the_plain_step_whatever_the_loss_normalisation(tmp_path, model_cls):
    """m-SAM's k groups at rho = 0 are the micro-batch's plain gradient, split: the same update as sam_mode='none',
    whether the loss is a mean the Trainer divides by the accumulation steps, one that divides by num_items_in_batch,
    or a mean the Trainer takes as already normalised (there each group must count 1/k: it counted k times before)."""
    x, y = make_tensors(16)
    settings = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = model_cls()
    plain = _train(copy.deepcopy(model), tmp_path / "none", x, y, sam_mode="none", **settings)
    msam = _train(copy.deepcopy(model), tmp_path / "msam", x, y, sam_mode="msam", msam_micro_batch_size=2, sam_rho=0.0,
                  msam_implementation="loop", **settings)
    assert relative_error(flat_params(msam.model), flat_params(plain.model)) <= 1e-6
    assert not torch.equal(flat_params(plain.model), flat_params(model))
    losses = [h["loss"] for h in msam.state.log_history if "loss" in h and "train_runtime" not in h]
    assert losses == pytest.approx([h["loss"] for h in plain.state.log_history if "loss" in h and
                                    "train_runtime" not in h], rel=1e-5)


def test_sharpness_is_logged_in_the_trainers_loss_units(tmp_path):
    """The same objective, normalised by num_items_in_batch over the accumulation window or as a per-micro-batch
    mean: the logged loss and sam/sharpness agree (the latter used to shrink by the accumulation steps)."""
    x, y = make_tensors(16)
    settings = dict(sam_mode="sam", sam_rho=0.5, max_steps=1, gradient_accumulation_steps=4,
                    per_device_train_batch_size=4, learning_rate=0.0)
    logs = {}
    for model_cls in (TinyMLP, ItemCountingMLP):
        torch.manual_seed(0)
        trainer = SequentialTrainer(model=model_cls(), args=sgd_config(tmp_path / model_cls.__name__, **settings),
                                    train_dataset=tensor_dataset(x, y))
        trainer.train()
        logs[model_cls] = next(h for h in trainer.state.log_history if "sam/sharpness" in h)
    for key in ("loss", "sam/sharpness"):
        assert logs[ItemCountingMLP][key] == pytest.approx(logs[TinyMLP][key], rel=1e-5), key
    assert logs[TinyMLP]["sam/sharpness"] > 0


def test_a_causal_lm_subclass_shifts_its_labels(tmp_path):
    """The per-sample rule shifts labels for causal LMs known by a parent class too (a subclass, a PEFT wrapper)."""
    from transformers import GPT2LMHeadModel

    from utils import tiny_gpt2, token_dataset

    class MyLM(GPT2LMHeadModel):
        pass

    torch.manual_seed(0)
    model = MyLM(tiny_gpt2().config)
    trainer = RWSAMTrainer(model=model, args=sgd_config(tmp_path, sam_mode="rwsam", max_steps=2,
                                                        per_device_train_batch_size=4), train_dataset=token_dataset())
    trainer.train()  # the first step checks the per-sample losses against the model's own (shifted) loss
    assert trainer.state.global_step == 2
