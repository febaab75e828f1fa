"""`SharpnessAwareMixin` on TRL's `SFTTrainer` (the `hf-rwsam[trl]` extra), with a tiny GPT-2 built from a config.

* ``sam_mode="none"`` is SFTTrainer bit for bit (parameters, losses, token counts);
* ``sam_mode="sam"`` perturbs along the gradient of SFT's own loss and descends with SFT's own step (at rho = 0 it is
  SFTTrainer bit for bit), counting SFT's tokens and metrics once per batch, not once per pass;
* RW-SAM is refused with a clear error at construction: SFT returns no differentiable outputs to split per sample.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset

trl = pytest.importorskip("trl")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_rwsam import SharpnessAwareMixin, SharpnessSettings  # noqa: E402

from utils import flat_params, relative_error  # noqa: E402


@dataclass
class RWSAMSFTConfig(SharpnessSettings, SFTConfig):
    """SFTConfig with the sharpness-aware fields, as the README shows (settings first: SFT keeps its defaults)."""


class RWSAMSFTTrainer(SharpnessAwareMixin, SFTTrainer):
    pass


CHARS = list("abcdefghijklmnopqrstuvwxyz ")
TEXTS = ["hello world", "sharp minima", "flat valley here", "abc def"]
STEPS, LR, RHO = 3, 0.1, 0.05


def tokenizer():
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(CHARS) + 2, n_positions=32, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def settings(tmp_path, **kwargs):
    return dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=len(TEXTS), report_to="none",
                use_cpu=True, logging_steps=1, max_length=32, learning_rate=LR, lr_scheduler_type="constant",
                optim="sgd", weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", disable_tqdm=True, seed=0,
                **kwargs)


def train(trainer_cls, args, model):
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                          processing_class=tokenizer())
    trainer.train()
    return trainer


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_combined_config_keeps_sfts_defaults(tmp_path):
    ours, theirs = RWSAMSFTConfig(output_dir=str(tmp_path), use_cpu=True), SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in ("learning_rate", "gradient_checkpointing", "logging_steps", "bf16", "max_length", "loss_type"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_combined_config_is_checked_against_its_training_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"RWSAMSFTConfig\.msam_micro_batch_size=3 .*per_device_train_batch_size=4"):
        args = RWSAMSFTConfig(**settings(tmp_path), sam_mode="msam", msam_micro_batch_size=3)
        RWSAMSFTTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                        processing_class=tokenizer())


def test_mode_none_is_sft_trainer_bit_for_bit(tmp_path):
    model = tiny_gpt2()
    plain = train(SFTTrainer, SFTConfig(**settings(tmp_path / "plain")), copy.deepcopy(model))
    ours = train(RWSAMSFTTrainer, RWSAMSFTConfig(**settings(tmp_path / "ours"), sam_mode="none"), copy.deepcopy(model))
    assert torch.equal(flat_params(ours.model), flat_params(plain.model))
    assert logged(ours, "loss") == logged(plain, "loss")
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens")


class FirstGradient(TrainerCallback):
    """The gradient of SFT's loss on its one batch, taken by a plain SFTTrainer as its first step begins (inside
    `train()`, which sets the model up for training: outside it the gradient differs by ~0.3%)."""

    def __init__(self, trainer):
        self.trainer, self.g = trainer, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.g is None:
            trainer = self.trainer
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(TEXTS))])
            num_items = (batch["labels"] != -100).sum()
            counts = copy.deepcopy((trainer._metrics, trainer._total_train_tokens))  # compute_loss counts tokens
            loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items)
            trainer._metrics, trainer._total_train_tokens = counts
            self.g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])


class FirstPerturbationRecorded(RWSAMSFTTrainer):
    """Keeps the parameters the first descent pass runs at, ``x + e``."""

    perturbed = None

    def _descent(self, model, *args, **kwargs):
        if self.perturbed is None:
            self.perturbed = flat_params(model)
        return super()._descent(model, *args, **kwargs)


def test_sam_ascends_along_sfts_loss_and_descends_with_sfts_own_step(tmp_path):
    """The perturbation is rho g / ||g|| with g the gradient of SFT's loss (taken by a plain SFTTrainer's
    compute_loss), and at rho = 0 the step is SFT's own, bit for bit, token counts and metrics included
    (the ascent pass calls SFT's compute_loss too, but leaves no trace)."""
    model = tiny_gpt2()
    ours = train(FirstPerturbationRecorded, RWSAMSFTConfig(**settings(tmp_path / "ours"), sam_mode="sam", sam_rho=RHO),
                 copy.deepcopy(model))
    plain = SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(**settings(tmp_path / "plain")),
                       train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer())
    first = FirstGradient(plain)
    plain.add_callback(first)
    plain.train()
    e = ours.perturbed - flat_params(model)
    # fp32 gradients of the same loss through the same fused head: ~1e-7 relative
    assert relative_error(e, RHO * first.g / first.g.norm()) <= 1e-5

    at_zero = train(RWSAMSFTTrainer, RWSAMSFTConfig(**settings(tmp_path / "zero"), sam_mode="sam", sam_rho=0.0),
                    copy.deepcopy(model))
    assert torch.equal(flat_params(at_zero.model), flat_params(plain.model))
    for key in ("loss", "num_tokens", "mean_token_accuracy", "entropy"):
        assert logged(at_zero, key) == logged(plain, key), key
    # and with rho > 0 the step is a different one (the perturbation moved the descent)
    assert not torch.equal(flat_params(ours.model), flat_params(plain.model))
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens")


@pytest.mark.parametrize("per_sample", [False, True], ids=["built-in", "per_sample_loss_func"])
def test_rwsam_with_sft_is_refused_clearly_at_construction(tmp_path, per_sample):
    """SFT's compute_loss(return_outputs=True) recomputes its outputs under no_grad: RW-SAM is refused when the
    trainer is built (it was refused by the first step of `train()`), whoever computes the per-sample losses."""
    args = RWSAMSFTConfig(**settings(tmp_path), sam_mode="rwsam")
    kwargs = {"per_sample_loss_func": lambda outputs, labels: outputs.logits.sum((1, 2))} if per_sample else {}
    with pytest.raises(ValueError, match=r"RWSAMSFTTrainer: RW-SAM needs the per-sample losses .* with their gradient"
                                         r".*SFTTrainer.*no_grad.*sam_mode='sam' or 'msam'"):
        RWSAMSFTTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                        processing_class=tokenizer(), **kwargs)
