"""What the experiment scripts share: the data, one training run, hyperparameter selection, a pool of runs, and the
summary statistics.

A run trains a fresh model with `RWSAMTrainer` on the training split (labels corrupted when a noise rate is given,
always with noise seed 0, so every method and seed sees the same corrupted labels; symmetric unless ``--noise_type``
says otherwise). A validation split is carved from it first (``--validation_fraction``, the same samples for every
run), its labels as noisy as the training labels, as a user's would be. The run evaluates on the validation split and
on the clean test split after every epoch and reports the final model's clean-test accuracy (``accuracy``), that of
the epoch best on the noisy validation split (``accuracy_best_val``), the final validation accuracy, the RW-SAM
diagnostics averaged over training (`rwsam/noisy_weight_mass`, `rwsam/ess`, `rwsam/lambda`) and, on request, ``tr(V)``
and ``tr(H)`` of the training loss at the end (`hf_rwsam.diagnostics`).

Hyperparameters are chosen on the validation split only (`Tuned`, `tune_and_run`): one seed (``--selection_seed``,
none of the final ones) per candidate, the final validation accuracy decides, then ``--seeds`` fresh seeds train at
the chosen values. Runs go to a pool of ``--workers`` processes with ``--threads`` threads each; on this project's 2
cores, two one-thread runs of the small CNN finish in about the time of one two-thread run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PrinterCallback, set_seed
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from train_image_classification import DataArguments, ModelArguments, build_datasets, image_classification_trainer  # noqa: E402

from hf_rwsam import RWSAMConfig  # noqa: E402
from hf_rwsam.data import NOISE_TYPES, collate_images  # noqa: E402
from hf_rwsam.diagnostics import gradient_noise_trace, hessian_trace  # noqa: E402
from hf_rwsam.models import create_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOGGED_DIAGNOSTICS = ("rwsam/noisy_weight_mass", "rwsam/ess", "rwsam/lambda")


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method (its `RWSAMConfig` fields), a seed and a label-noise rate."""

    label: str
    seed: int
    method: dict = field(hash=False)
    noise_rate: float = 0.0
    diagnostics: bool = False


@dataclass(frozen=True)
class Tuned:
    """A method whose hyperparameters are chosen on the validation split, one grid after another.

    Every value of the first grid is tried with the method's other fields, then every new value of the second grid at
    the best of the first, and so on (a coordinate search: RW-SAM's 5 rho and 2 more lambdas take 7 runs, not 15).

    Args:
        label (`str`): the method's name in the tables.
        method (`dict`): its `RWSAMConfig` fields, the grids' starting values included.
        grids (`tuple`): ``(field, values)`` pairs, searched in this order.
    """

    label: str
    method: dict = field(hash=False)
    grids: tuple = ()


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, model, optimiser and pool flags every experiment takes (defaults: digits, small CNN, b = 64)."""
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--model", default="small_cnn",
                        help="small_cnn (BatchNorm); small_cnn_gn (GroupNorm) gives RW-SAM exact its one-backward norms "
                             "but trains far slower on digits (experiments/RESULTS.md)")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--num_channels", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=0.05, help="rho of the methods that do not tune it")
    parser.add_argument("--rhos", default="0.01,0.02,0.05,0.1,0.2", help="the rho grid of the tuned methods")
    parser.add_argument("--validation_fraction", type=float, default=0.2,
                        help="of the training split, for hyperparameter selection and the best-checkpoint figures")
    parser.add_argument("--selection_seed", type=int, default=100, help="the seed of the selection runs")
    parser.add_argument("--noise_type", default="symmetric", choices=NOISE_TYPES, help="for the runs with noise")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--from_json", default=None, help="redo the tables and plot of a finished experiment's JSON")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="where the JSON and the plot go")


def finished_or_new(args: argparse.Namespace, experiment) -> tuple[argparse.Namespace, dict]:
    """``(settings, record)`` of a finished experiment (``--from_json``) or of a new one, ``experiment(args)`` (a dict
    with the final ``runs``, and what else it records: the selection runs, the chosen values).

    The record holds the command, the settings and every run's result: what the experiment's JSON file stores.
    """
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        return argparse.Namespace(**{**record["settings"], "results_dir": args.results_dir}), record
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "results_dir")}
    return args, {"command": command_line(), "settings": settings, **experiment(args)}


def save_record(args: argparse.Namespace, name: str, record: dict) -> Path:
    """Write the record to ``<results_dir>/<name>.json``; returns the path of its plot, ``<name>.png``."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    return args.results_dir / f"{name}.png"


_DATA: dict = {}


def load_data(settings: dict, noise_rate: float) -> tuple:
    """Train, validation and clean-test splits: the validation split carved at random (seed 0) from the noisy training
    split, the train split cut to a multiple of the batch size (m-SAM splits every batch)."""
    key = (settings["dataset"], settings["noise_type"], noise_rate)
    if key not in _DATA:
        data_args = DataArguments(
            dataset=settings["dataset"], dataset_path=settings["dataset_path"],
            noise_type=settings["noise_type"] if noise_rate else None, noise_rate=noise_rate or None,
        )
        model_args = ModelArguments(model=settings["model"], image_size=settings["image_size"],
                                    num_channels=settings["num_channels"])
        train, test, class_names, _ = build_datasets(data_args, model_args, seed=0)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = int(settings.get("validation_fraction", 0.0) * len(train))
        validation = train.select(order[:n_val]) if n_val else None
        train = train.select(sorted(order[n_val:]))
        train = train.select(range(len(train) - len(train) % settings["batch_size"]))
        _DATA[key] = train, validation, test, class_names
    return _DATA[key]


def per_sample_cross_entropy(model, inputs: dict) -> torch.Tensor:
    return F.cross_entropy(model(pixel_values=inputs["pixel_values"]).logits, inputs["labels"], reduction="none")


def loss_curvature(model, dataset, batch_size: int = 32, num_probes: int = 32) -> dict:
    """``tr(V)`` and Hutchinson ``tr(H)`` of the cross-entropy over `dataset` (its own labels), in eval mode.

    Batches of `batch_size` = the per-sample norms' chunk: each batched backward then runs over its own chunk only.
    """
    batches = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batches.append({"pixel_values": batch["pixel_values"], "labels": batch["labels"]})
    model.eval()
    generator = torch.Generator().manual_seed(0)
    return {
        "trace_V": gradient_noise_trace(model, batches, per_sample_cross_entropy),
        "trace_H": hessian_trace(model, batches, per_sample_cross_entropy, num_probes=num_probes, generator=generator),
    }


def train_run(settings: dict, spec: RunSpec) -> dict:
    """Train one model as `spec` says; return its clean-test accuracy (final, and at the epoch best on validation),
    its validation accuracy, mean diagnostics and wall time."""
    start = time.perf_counter()
    train, validation, test, class_names = load_data(settings, spec.noise_rate)
    set_seed(spec.seed)
    model = create_model(settings["model"], num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                         image_size=settings["image_size"], in_chans=settings["num_channels"])
    evaluated = {"val": validation, "test": test} if validation is not None else test
    with tempfile.TemporaryDirectory() as out:
        method = {"sam_rho": settings["rho"], **spec.method} if spec.method.get("sam_mode") != "none" else spec.method
        config = RWSAMConfig(
            output_dir=out, seed=spec.seed, num_train_epochs=settings["epochs"],
            per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=512,
            learning_rate=settings["lr"], lr_scheduler_type="cosine", optim="sgd", optim_args="momentum=0.9",
            weight_decay=settings["weight_decay"], eval_strategy="epoch" if validation is not None else "no",
            save_strategy="no", logging_steps=10, report_to="none", disable_tqdm=True, use_cpu=settings["cpu"],
            **method,
        )
        trainer = image_classification_trainer(model, config, train, evaluated, settings["dataset"])
        trainer.remove_callback(PrinterCallback)  # the logs are read back below, not printed
        trainer.train()
        result = {"accuracy": trainer.evaluate(test, metric_key_prefix="final")["final_accuracy"]}
        if validation is not None:
            result["val_accuracy"] = trainer.evaluate(validation, metric_key_prefix="final")["final_accuracy"]
            log = trainer.state.log_history  # one entry per evaluated split and epoch
            epochs = [e for e in log if "eval_val_accuracy" in e]
            tests = {e["step"]: e["eval_test_accuracy"] for e in log if "eval_test_accuracy" in e}
            if epochs:  # the checkpoint a user would keep: best on the noisy validation split (first of ties)
                best = max(epochs, key=lambda e: e["eval_val_accuracy"])
                result["accuracy_best_val"] = tests[best["step"]]
                result["best_val_epoch"] = best["epoch"]
    for name in LOGGED_DIAGNOSTICS:
        logged = [entry[name] for entry in trainer.state.log_history if name in entry]
        if logged:
            result[name] = statistics.mean(logged)
    if spec.diagnostics:
        result.update(loss_curvature(trainer.model, train))
    result["seconds"] = time.perf_counter() - start
    return result


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.set_verbosity_error()


def run_all(args: argparse.Namespace, specs: list[RunSpec]) -> list[dict]:
    """Every run of `specs` in a pool of `args.workers` processes; returns their results in the order of `specs`."""
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    results: list[dict | None] = [None] * len(specs)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args.threads,)) as pool:
        futures = {pool.submit(train_run, settings, spec): i for i, spec in enumerate(specs)}
        with tqdm(total=len(specs), desc="runs") as progress:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = {**future.result(), "label": specs[i].label, "seed": specs[i].seed,
                              "noise_rate": specs[i].noise_rate}
                progress.write(f"{specs[i].label:<18s} noise {specs[i].noise_rate:.1f} seed {specs[i].seed}: "
                               f"accuracy {results[i]['accuracy']:.4f} ({results[i]['seconds']:.0f} s)")
                progress.update()
    return results


def tune_and_run(args: argparse.Namespace, methods: list[Tuned], noise_rates: list[float],
                 diagnostics=lambda rate: False) -> dict:
    """Choose every method's hyperparameters for every noise rate on the validation split, then train ``args.seeds``
    fresh seeds at the chosen values. Returns the record: ``selection`` (every candidate's run), ``chosen``
    (``"label|rate" -> method fields``) and ``runs`` (the final runs)."""
    chosen = {(t.label, rate): dict(t.method) for t in methods for rate in noise_rates}
    best: dict = {}
    selection = []
    for stage in range(max((len(t.grids) for t in methods), default=0)):
        specs = []
        for t in methods:
            if stage >= len(t.grids):
                continue
            name, values = t.grids[stage]
            for rate in noise_rates:
                tried = {json.dumps(r["method"], sort_keys=True) for r in selection
                         if r["label"] == t.label and r["noise_rate"] == rate}
                for value in values:
                    candidate = {**chosen[(t.label, rate)], name: value}
                    if json.dumps(candidate, sort_keys=True) not in tried:
                        specs.append(RunSpec(t.label, args.selection_seed, candidate, rate))
        results = run_all(args, specs)
        for spec, result in zip(specs, results):
            selection.append({**result, "method": spec.method})
        for t in methods:  # the best so far, over this stage's candidates and the runs before
            for rate in noise_rates:
                runs = [r for r in selection if r["label"] == t.label and r["noise_rate"] == rate]
                if runs:
                    top = max(runs, key=lambda r: r["val_accuracy"])
                    chosen[(t.label, rate)], best[(t.label, rate)] = dict(top["method"]), top["val_accuracy"]
    finals = [RunSpec(t.label, seed, chosen[(t.label, rate)], rate, diagnostics=diagnostics(rate))
              for rate in noise_rates for seed in range(args.seeds) for t in methods]
    return {"selection": selection, "chosen": {f"{label}|{rate}": method for (label, rate), method in chosen.items()},
            "tuned": {t.label: [name for name, _ in t.grids] for t in methods}, "runs": run_all(args, finals)}


def chosen_values(record: dict, label: str, rate: float) -> str:
    """The hyperparameters chosen for `label` at `rate` (those it tunes), for the tables: ``rho=0.05, lambda=2``."""
    method = record["chosen"].get(f"{label}|{rate}", {})
    return ", ".join(f"{name.split('_')[-1]}={method[name]:g}" for name in record["tuned"].get(label, []))


def summarise(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values themselves."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def group(results: list[dict], metric: str, *keys: str) -> dict:
    """``{(key values...): summarise(metric over the seeds)}`` for the results that report `metric`."""
    grouped: dict = {}
    for result in results:
        if metric in result:
            grouped.setdefault(tuple(result[k] for k in keys), []).append(result[metric])
    return {key: summarise(values) for key, values in grouped.items()}


def command_line() -> str:
    return "python " + shlex.join(sys.argv)
