"""What the experiment scripts share: the data, one training run, a pool of runs, and the summary statistics.

A run trains a fresh model with `RWSAMTrainer` on the training split (labels corrupted when a noise rate is given,
always with noise seed 0, so every method and seed sees the same corrupted labels; symmetric unless
``--noise_type`` says otherwise) and returns its accuracy on the
clean test split, the RW-SAM diagnostics averaged over training (`rwsam/noisy_weight_mass`, `rwsam/ess`,
`rwsam/lambda`) and, on request, ``tr(V)`` and ``tr(H)`` of the training loss at the end (`hf_rwsam.diagnostics`).
Runs go to a pool of ``--workers`` processes with ``--threads`` threads each; on this project's 2 cores, two
one-thread runs of the small CNN finish in about the time of one two-thread run (see experiments/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, model, optimiser and pool flags every experiment takes (defaults: digits, small CNN, b = 64)."""
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--num_channels", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--noise_type", default="symmetric", choices=NOISE_TYPES, help="for the runs with noise")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--from_json", default=None, help="redo the tables and plot of a finished experiment's JSON")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="where the JSON and the plot go")


def finished_or_new(args: argparse.Namespace, make_specs) -> tuple[argparse.Namespace, dict]:
    """``(settings, record)`` of a finished experiment (``--from_json``) or of new runs of ``make_specs(args)``.

    The record holds the command, the settings and every run's result: what the experiment's JSON file stores.
    """
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        return argparse.Namespace(**{**record["settings"], "results_dir": args.results_dir}), record
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "results_dir")}
    return args, {"command": command_line(), "settings": settings, "runs": run_all(args, make_specs(args))}


def save_record(args: argparse.Namespace, name: str, record: dict) -> Path:
    """Write the record to ``<results_dir>/<name>.json``; returns the path of its plot, ``<name>.png``."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    return args.results_dir / f"{name}.png"


_DATA: dict = {}


def load_data(settings: dict, noise_rate: float) -> tuple:
    """Train and clean-test splits, the train split cut to a multiple of the batch size (m-SAM splits every batch)."""
    key = (settings["dataset"], settings["noise_type"], noise_rate)
    if key not in _DATA:
        data_args = DataArguments(
            dataset=settings["dataset"], dataset_path=settings["dataset_path"],
            noise_type=settings["noise_type"] if noise_rate else None, noise_rate=noise_rate or None,
        )
        model_args = ModelArguments(model=settings["model"], image_size=settings["image_size"],
                                    num_channels=settings["num_channels"])
        train, test, class_names, _ = build_datasets(data_args, model_args, seed=0)
        train = train.select(range(len(train) - len(train) % settings["batch_size"]))
        _DATA[key] = train, test, class_names
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
    """Train one model as `spec` says and return its clean-test accuracy, mean diagnostics and wall time."""
    start = time.perf_counter()
    train, test, class_names = load_data(settings, spec.noise_rate)
    set_seed(spec.seed)
    model = create_model(settings["model"], num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                         image_size=settings["image_size"], in_chans=settings["num_channels"])
    with tempfile.TemporaryDirectory() as out:
        config = RWSAMConfig(
            output_dir=out, seed=spec.seed, sam_rho=settings["rho"], num_train_epochs=settings["epochs"],
            per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=512,
            learning_rate=settings["lr"], lr_scheduler_type="cosine", optim="sgd", optim_args="momentum=0.9",
            weight_decay=settings["weight_decay"], eval_strategy="no", save_strategy="no", logging_steps=10,
            report_to="none", disable_tqdm=True, use_cpu=settings["cpu"], **spec.method,
        )
        trainer = image_classification_trainer(model, config, train, test, settings["dataset"])
        trainer.remove_callback(PrinterCallback)  # the logs are read back below, not printed
        trainer.train()
        result = {"accuracy": trainer.evaluate()["eval_accuracy"]}
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
    return "python " + " ".join(sys.argv)
