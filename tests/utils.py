"""Tiny models and data shared by the tests (all offline, all CPU)."""

from __future__ import annotations

import os
import re
import sys

import yaml

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from hf_rwsam import RWSAMConfig, RWSAMTrainer


class TinyMLP(nn.Module):
    """A Trainer-compatible MLP: forward(x, labels) -> {"logits", "loss"}."""

    def __init__(self, in_features=6, hidden=12, num_classes=3, dropout=0.0, batch_norm=False):
        super().__init__()
        layers = [nn.Linear(in_features, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm, Trainer-compatible."""

    def __init__(self, num_classes=3, channels=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.features(pixel_values))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def make_tensors(n=32, in_features=6, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def make_images(n=32, size=6, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def tensor_dataset(x, y, input_name="x", **extra_columns) -> Dataset:
    columns = {input_name: x.tolist(), "labels": y.tolist(), **extra_columns}
    return Dataset.from_dict(columns).with_format("torch")


class SequentialTrainer(RWSAMTrainer):
    """Batches in dataset order, so a reference loop can see the same micro-batches."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def sgd_config(output_dir, **kwargs) -> RWSAMConfig:
    """Plain SGD at a constant learning rate, no clipping or weight decay: the setting of the reference tests."""
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=0.1, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return RWSAMConfig(**defaults)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card."""
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def accuracy(eval_pred):
    """`compute_metrics` for the tests: the fraction of correct argmax predictions."""
    return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def token_dataset(n=8, t=10, vocab=40, seed=0):
    """Sequences of different lengths: the tails are padding, labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, 4 + i % 6 :] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def leave_process_group() -> None:
    """End a torchrun worker: tear the process group down, then leave without the interpreter's teardown. About one
    finished run in 20-50 aborted there on rank 1 ("terminate called without an active exception", a C++ thread
    destroyed while joinable) even after destroy_process_group; everything the tests read must be written before."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
