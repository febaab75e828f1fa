"""The README documents every sharpness-aware field of RWSAMConfig and the two set-up commands."""

import dataclasses
import re
from pathlib import Path

from transformers import TrainingArguments

from hf_rwsam import RWSAMConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_table_lists_every_rwsam_config_field_with_its_default():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, re.MULTILINE))
    for f in dataclasses.fields(RWSAMConfig):
        if f.name not in base:
            assert f.name in rows, f"README's RWSAMConfig table misses {f.name}"
            assert rows[f.name] == repr(f.default), f"README says {f.name} defaults to {rows[f.name]}"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_readme_per_sample_loss_example_trains_rwsam_on_the_weighted_loss(tmp_path):
    """The README's class-weighted example runs as printed: RW-SAM accepts it and trains (2 classes, tiny MLP)."""
    import torch

    from utils import TinyMLP, make_tensors, sgd_config, tensor_dataset

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.DOTALL) if "per_sample_loss_func" in b)
    x, y = make_tensors(n=8, num_classes=2)
    torch.manual_seed(0)
    namespace = {"torch": torch, "model": TinyMLP(num_classes=2), "train_ds": tensor_dataset(x, y),
                 "args": sgd_config(tmp_path, sam_mode="rwsam", max_steps=2)}
    exec("from hf_rwsam import RWSAMTrainer\n" + block, namespace)
    trainer = namespace["trainer"]
    assert trainer.compute_loss_func is not None and trainer.sharpness_step.per_sample_loss_func is not None
    trainer.train()
    assert trainer.state.global_step == 2
