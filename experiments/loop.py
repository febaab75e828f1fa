"""One training run of the experiments: the package's own engine, `hf_rwsam.sharpness.SharpnessAwareStep`, in a lean
loop over preloaded tensors, with every split evaluated after every epoch.

Why not `RWSAMTrainer`: without augmentation there is nothing to decode per epoch, and at 8x8 a SAM step takes about
9 ms on one core, so the Trainer's DataLoader, callbacks and per-epoch evaluation loop would cost as much as the
training. The step is the same object the Trainer calls (`SharpnessAwareStep`); the optimiser and schedule are the
Trainer's defaults of the earlier runs: SGD with momentum 0.9, weight decay on every parameter but the biases (the
Trainer's rule for these models), the learning rate decayed per step on a cosine to 0 without warmup.

Each epoch shuffles the training split (generator seeded with the run's seed) and takes full batches of
``batch_size`` (m-SAM splits every batch into groups of m); then the model, in eval mode, predicts every image of the
three splits once. Per epoch the run records:

- ``val_accuracy``: against the noisy validation labels (what selection and early stopping see);
- ``test_accuracy``: against the clean test labels;
- ``memorised``: the fraction of the corrupted training samples predicted as their corrupted label;
- ``corrected``: the fraction of the corrupted training samples predicted as their clean label;
- ``train_clean_accuracy``: accuracy on the training samples whose label is clean;
- the step's diagnostics averaged over the epoch (RW-SAM: ``rwsam/noisy_weight_mass``, the Gibbs weight on corrupted
  samples, beside ``noisy_share``, the corrupted share of the batches, which uniform weights would give).

The early-stopped model is the epoch of the highest noisy-validation accuracy (the earliest of equal ones):
``accuracy_best_val`` is its clean-test accuracy, ``accuracy`` the final model's.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from hf_rwsam.models import create_model
from hf_rwsam.sharpness import SharpnessAwareStep, SharpnessSettings
from tensors import Split, Splits, load_splits

TRAINING_FIELDS = ("dataset", "image_size", "model", "batch_size", "epochs", "lr", "weight_decay",
                   "validation_fraction")
"""The experiment settings that decide a run, besides its `RunSpec`."""
HISTORY = ("val_accuracy", "test_accuracy", "memorised", "corrected", "train_clean_accuracy")
DIAGNOSTICS = ("rwsam/noisy_weight_mass", "rwsam/ess", "rwsam/lambda", "sam/sharpness", "noisy_share")
EVAL_BATCH = 1024


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method's label, its `SharpnessSettings` fields, a seed and the label noise."""

    label: str
    seed: int
    method: dict = field(hash=False)
    noise_type: str = "symmetric"
    noise_rate: float = 0.0

    def key(self, settings: dict) -> dict:
        """Everything that decides the run's result: its identity in the run store."""
        return {**{name: settings[name] for name in TRAINING_FIELDS}, "method": self.method, "seed": self.seed,
                "noise_type": self.noise_type if self.noise_rate else None, "noise_rate": self.noise_rate}


_SPLITS: dict = {}


def splits_for(settings: dict, noise_type: str, noise_rate: float) -> Splits:
    """`tensors.load_splits`, once per process and label noise."""
    key = (settings["dataset"], settings["image_size"], noise_type, noise_rate, settings["validation_fraction"])
    if key not in _SPLITS:
        _SPLITS[key] = load_splits(*key)
    return _SPLITS[key]


def loss_fn(model, inputs: dict, return_outputs: bool = False):
    """The mean cross-entropy, with the signature `SharpnessAwareStep` calls (RW-SAM reads the per-sample losses from
    ``outputs["logits"]`` and the labels)."""
    outputs = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
    return (outputs.loss, outputs) if return_outputs else outputs.loss


@torch.no_grad()
def predict(model, x: torch.Tensor) -> torch.Tensor:
    """The predicted classes of `x`, in eval mode (BatchNorm with its running statistics)."""
    model.eval()
    return torch.cat([model(pixel_values=x[i:i + EVAL_BATCH]).logits.argmax(-1) for i in range(0, len(x), EVAL_BATCH)])


def epoch_metrics(model, splits: Splits) -> dict:
    """The per-epoch record of the module docstring, from one prediction of every image."""
    train, val, test = (predict(model, s.x) for s in (splits.train, splits.validation, splits.test))
    noisy, clean = splits.train.noisy, ~splits.train.noisy

    def rate(hits: torch.Tensor) -> float:
        return float(hits.float().mean())

    metrics = {
        "val_accuracy": rate(val == splits.validation.y),
        "test_accuracy": rate(test == splits.test.y),
        "train_clean_accuracy": rate(train[clean] == splits.train.y[clean]),
    }
    if noisy.any():
        metrics["memorised"] = rate(train[noisy] == splits.train.y[noisy])
        metrics["corrected"] = rate(train[noisy] == splits.train.clean[noisy])
    return metrics


def build(settings: dict, spec: RunSpec) -> tuple:
    """The model (seeded by the run's seed), its optimiser, the cosine schedule and the sharpness-aware step."""
    set_seed(spec.seed)
    model = create_model(settings["model"], num_labels=10, image_size=settings["image_size"], in_chans=1)
    decay = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    no_decay = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": settings["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=settings["lr"], momentum=0.9)
    total = settings["epochs"] * steps_per_epoch(settings, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    return model, optimizer, schedule, SharpnessAwareStep(SharpnessSettings(**spec.method), seed=spec.seed)


def steps_per_epoch(settings: dict, spec: RunSpec) -> int:
    return len(splits_for(settings, spec.noise_type, spec.noise_rate).train) // settings["batch_size"]


def train_run(settings: dict, spec: RunSpec) -> dict:
    """Train one model as `spec` says; returns its per-epoch ``history`` and the summary of the module docstring."""
    start, cpu_start = time.perf_counter(), time.process_time()
    splits = splits_for(settings, spec.noise_type, spec.noise_rate)
    model, optimizer, schedule, step = build(settings, spec)
    order = torch.Generator().manual_seed(spec.seed)
    b, n_steps = settings["batch_size"], steps_per_epoch(settings, spec)
    history: dict = {name: [] for name in HISTORY + DIAGNOSTICS}
    global_step = 0
    for _ in range(settings["epochs"]):
        permutation = torch.randperm(len(splits.train), generator=order)
        noisy_share = []
        for i in range(n_steps):
            batch = splits.train.batch(permutation[i * b:(i + 1) * b])
            noisy_share.append(batch["is_noisy"].float().mean())
            model.train()
            step(model, batch, loss_fn, global_step=global_step)  # .grad holds the descent gradient
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
        diagnostics = {name: float(v) for name, v in step.pop_metrics().items()}
        diagnostics["noisy_share"] = float(torch.stack(noisy_share).mean())
        for name, value in {**epoch_metrics(model, splits), **diagnostics}.items():
            if name in history:
                history[name].append(round(value, 6))
    result = summarise_history(history, time.perf_counter() - start)
    result["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    return result


def summarise_history(history: dict, seconds: float) -> dict:
    """The run's summary from its per-epoch history: the final model, the early-stopped one, the diagnostics' means
    over training."""
    history = {name: values for name, values in history.items() if values}
    val = history["val_accuracy"]
    best = val.index(max(val))  # the earliest of equal validation accuracies
    result = {
        "accuracy": history["test_accuracy"][-1],
        "accuracy_best_val": history["test_accuracy"][best],
        "val_accuracy": val[-1],
        "val_accuracy_best": val[best],
        "best_epoch": best + 1,
        "seconds": round(seconds, 2),
        "history": history,
    }
    if "memorised" in history:
        result["memorised"], result["memorised_best_val"] = history["memorised"][-1], history["memorised"][best]
    for name in DIAGNOSTICS:
        if name in history:
            result[name] = statistics.mean(history[name])
    return result
