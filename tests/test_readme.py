"""The README documents every sharpness-aware field of RWSAMConfig and the two set-up commands."""

import dataclasses
import re

import pytest
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


SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
PLACEHOLDER = re.compile(r"^(?P<names>[\w, ]+) = \.\.\.  # your .*$", re.MULTILINE)


def your_objects(tmp_path, names):
    """What a snippet's ``names = ...  # your ...`` line stands for: tiny, offline, CPU."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from utils import TinyMLP, make_tensors, sgd_config, tensor_dataset

    torch.manual_seed(0)
    x, y = make_tensors(n=16, num_classes=2)
    model = TinyMLP(num_classes=2)

    def per_sample_ce(model, inputs):
        return F.cross_entropy(model(inputs["x"])["logits"], inputs["labels"], reduction="none")

    available = {
        "model": model, "train_ds": tensor_dataset(x, y), "eval_ds": tensor_dataset(x[:8], y[:8]),
        "args": sgd_config(tmp_path / "args", sam_mode="rwsam", max_steps=2),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": DataLoader([{"x": x[i], "labels": y[i]} for i in range(16)], batch_size=8),
        "inputs": {"x": x[:8], "labels": y[:8]}, "loss_fn": per_sample_ce,
    }
    missing = set(names) - available.keys()
    assert not missing, f"the README's snippet stands for {missing}, which this test does not make"
    return {name: available[name] for name in names}


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: SNIPPETS[i].splitlines()[0][:40])
def test_every_python_snippet_in_the_readme_runs_as_written(tmp_path, monkeypatch, index):
    """Each ```python block of the README, as printed, with a tiny model, batch or dataset for its one
    ``names = ...  # your ...`` line (where the snippet says: your model here)."""
    snippet = SNIPPETS[index]
    namespace = {}
    for match in PLACEHOLDER.finditer(snippet):
        names = [n.strip() for n in match["names"].split(",")]
        namespace.update(your_objects(tmp_path, names))
    monkeypatch.chdir(tmp_path)
    exec(compile(PLACEHOLDER.sub("", snippet), f"README.md snippet {index}", "exec"), namespace)


def test_readme_per_sample_loss_example_trains_rwsam_on_the_weighted_loss(tmp_path):
    """The README's class-weighted example, as printed: RW-SAM accepts it and trains (2 classes, tiny MLP)."""
    block = next(b for b in SNIPPETS if "per_sample_loss_func" in b)
    namespace = your_objects(tmp_path, ["model", "args", "train_ds"])
    exec(PLACEHOLDER.sub("", block), namespace)
    trainer = namespace["trainer"]
    assert trainer.compute_loss_func is not None and trainer.sharpness_step.per_sample_loss_func is not None
    trainer.train()
    assert trainer.state.global_step == 2
