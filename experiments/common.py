"""What the experiment scripts share: their flags, the run store, a pool of runs, hyperparameter selection followed by
fresh seeds, and the experiment's record (``--from_json`` redoes its tables and plots).

Runs (`loop.train_run`) use the package's step directly on tensors preloaded once (`tensors`), with no augmentation.
Every finished run is appended to a run store (``--run_store``, JSON lines keyed by everything that decides the run),
so an interrupted experiment resumes where it stopped, and experiments that share runs (the m-sharpness sweep and the
label-noise experiment at 40% noise) train them once. The store is a cache; the experiment's record
(``<results_dir>/<name>.json``) is what the tables and plots are computed from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).parent))
from loop import TRAINING_FIELDS, RunSpec, splits_for, train_run  # noqa: E402
from selection import Tuned, choose, score  # noqa: E402

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results" / "2026-12-05"
RUN_STORE = ROOT / "outputs" / "experiments" / "runs.jsonl"
NOISE_TYPES = ("symmetric", "asymmetric")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, model, optimiser, selection and pool flags every experiment takes."""
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--image_size", type=int, default=8, help="8 is the digits' native size")
    parser.add_argument("--model", default="small_cnn_gn", choices=["small_cnn_gn", "small_cnn"],
                        help="small_cnn_gn (GroupNorm: exact per-sample norms in one backward), small_cnn (BatchNorm)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40,
                        help="enough for SGD to memorise >= 80%% of the noisy training labels (checked and printed)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD momentum 0.9, cosine to 0 per step")
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--validation_fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=8, help="fresh seeds 0 .. seeds-1 at the chosen values")
    parser.add_argument("--selection_seeds", default="100,101", help="the seeds of the selection runs")
    parser.add_argument("--tie_images", type=float, default=1.0,
                        help="candidates within this many validation images (mean over selection seeds) are tied")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--from_json", default=None, help="redo the tables and plots of a finished experiment's JSON")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="where the JSON and the plots go")
    parser.add_argument("--run_store", type=Path, default=RUN_STORE, help="finished runs, to resume and share")


def sgd() -> dict:
    return {"sam_mode": "none"}


def sam(rho: float = 0.05) -> dict:
    return {"sam_mode": "sam", "sam_rho": rho}


def rwsam(estimator: str, rho: float = 0.05, lam: float = 1.0) -> dict:
    """RW-SAM with one probe (``fd``) or exact per-sample norms."""
    return {"sam_mode": "rwsam", "sam_rho": rho, "rwsam_lambda": lam, "rwsam_estimator": estimator,
            **({"rwsam_num_probes": 1} if estimator == "fd" else {})}


def msam(m: int, rho: float = 0.05) -> dict:
    """m-SAM, all groups at once with torch.func (the same step as the loop over groups, 3x faster here at m = 4)."""
    return {"sam_mode": "msam", "sam_rho": rho, "msam_micro_batch_size": m, "msam_implementation": "vmap"}


def floats(values: str) -> list[float]:
    return [float(x) for x in values.split(",")]


def parse_noise(values: str) -> list[tuple[str, float]]:
    """``"symmetric:0.4,asymmetric:0.4"`` -> ``[("symmetric", 0.4), ("asymmetric", 0.4)]``."""
    settings = []
    for item in values.split(","):
        noise_type, _, rate = item.partition(":")
        if noise_type not in NOISE_TYPES or not rate:
            raise ValueError(f"--noise: {item!r} must be TYPE:RATE with TYPE in {NOISE_TYPES}, e.g. symmetric:0.4")
        settings.append((noise_type, float(rate)))
    return settings


def noise_name(noise: tuple[str, float] | list) -> str:
    noise_type, rate = noise
    return f"{'sym' if noise_type == 'symmetric' else 'asym'} {rate:.0%}"


def training_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in TRAINING_FIELDS}


class RunStore:
    """Finished runs, one JSON line each (``{"key": ..., "result": ...}``), appended as they finish."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.results: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.results[entry["key"]] = entry["result"]

    def add(self, key: str, result: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
        self.results[key] = result


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.set_verbosity_error()


def run_all(args: argparse.Namespace, specs: list[RunSpec]) -> list[dict]:
    """Every run of `specs`, from the store when it holds it, else trained (in this process with ``--workers 1``, in a
    pool otherwise) and stored; returns their results in the order of `specs`, each with its spec's fields."""
    settings = training_settings(args)
    store = RunStore(args.run_store)
    keys = [json.dumps(spec.key(settings), sort_keys=True) for spec in specs]
    todo = {key: spec for key, spec in zip(keys, specs) if key not in store.results}

    def finished(key: str, result: dict, progress) -> None:
        store.add(key, result)
        spec = todo[key]
        noise = noise_name((spec.noise_type, spec.noise_rate))
        progress.write(f"{time.strftime('%H:%M:%S')} {spec.label:<14s} {noise} "
                       f"seed {spec.seed:<3d} {json.dumps(spec.method)}: val {result['val_accuracy_best']:.4f} "
                       f"(epoch {result['best_epoch']}), test {result['accuracy_best_val']:.4f} / final "
                       f"{result['accuracy']:.4f} ({result['seconds']:.0f} s)")
        progress.update()

    with tqdm(total=len(todo), desc="runs", mininterval=30) as progress:
        if args.workers == 1:
            _init_worker(args.threads)
            for key, spec in todo.items():
                finished(key, train_run(settings, spec), progress)
        elif todo:
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(args.threads,)) as pool:
                futures = {pool.submit(train_run, settings, spec): key for key, spec in todo.items()}
                for future in as_completed(futures):
                    finished(futures[future], future.result(), progress)
    return [{**store.results[key], "key": key, "label": spec.label, "seed": spec.seed, "method": spec.method,
             "noise_type": spec.noise_type, "noise_rate": spec.noise_rate} for key, spec in zip(keys, specs)]


def tune_and_run(args: argparse.Namespace, methods: list[Tuned], noises: list[tuple[str, float]]) -> dict:
    """Choose every method's hyperparameters per noise setting on the validation split (`selection`), then train
    ``args.seeds`` fresh seeds at the chosen values.

    Returns the record's ``selection`` (per method and noise: every stage's candidates, scores and decision),
    ``chosen`` (``"label|type:rate" -> method fields``) and ``runs`` (the final runs, with their histories).
    """
    selection_seeds = [int(s) for s in args.selection_seeds.split(",")]
    if set(selection_seeds) & set(range(args.seeds)):
        raise ValueError(f"--selection_seeds {selection_seeds} overlap the final seeds 0..{args.seeds - 1}.")
    validation_size = len(splits_for(training_settings(args), *noises[0]).validation)
    chosen = {(t.label, noise): dict(t.method) for t in methods for noise in noises}
    stages: dict = {(t.label, noise): [] for t in methods for noise in noises}
    seconds: dict = {}  # every distinct run's (wall, CPU) seconds: the experiment's cost on one worker
    for stage in range(max((len(t.grids) for t in methods), default=0)):
        candidates = []  # (label, noise, field, value, spec)
        for t in methods:
            if stage < len(t.grids):
                name, values = t.grids[stage]
                for noise in noises:
                    for value in values:
                        for seed in selection_seeds:
                            spec = RunSpec(t.label, seed, {**chosen[(t.label, noise)], name: value}, *noise)
                            candidates.append((t.label, noise, name, value, spec))
        results = run_all(args, [spec for *_, spec in candidates])
        seconds.update((r["key"], (r["seconds"], r.get("cpu_seconds"))) for r in results)
        grouped: dict = {}
        for (label, noise, name, value, _), result in zip(candidates, results):
            grouped.setdefault((label, noise, name), {}).setdefault(value, []).append(result)
        for (label, noise, name), by_value in grouped.items():
            scores = {value: score(runs, validation_size) for value, runs in by_value.items()}
            decision = choose(scores, name, args.tie_images)
            chosen[(label, noise)][name] = decision["value"]
            stages[(label, noise)].append({
                "field": name, **decision,
                "candidates": [{"value": value, "score": scores[value],
                                "val_accuracy_best": {r["seed"]: r["val_accuracy_best"] for r in runs},
                                "best_epoch": {r["seed"]: r["best_epoch"] for r in runs}}
                               for value, runs in by_value.items()],
            })
    finals = [RunSpec(t.label, seed, chosen[(t.label, noise)], *noise)
              for noise in noises for seed in range(args.seeds) for t in methods]
    runs = run_all(args, finals)
    seconds.update((r["key"], (r["seconds"], r.get("cpu_seconds"))) for r in runs)
    return {
        "selection": [{"label": label, "noise": list(noise), "stages": entries}
                      for (label, noise), entries in stages.items() if entries],
        "chosen": {f"{label}|{noise[0]}:{noise[1]}": method for (label, noise), method in chosen.items()},
        "validation_size": validation_size,
        "runs": runs,
        "run_seconds": seconds,
    }


def finished_or_new(args: argparse.Namespace, experiment) -> tuple[argparse.Namespace, dict]:
    """``(settings, record)`` of a finished experiment (``--from_json``) or of a new one, ``experiment(args)``.

    The record holds the command, the settings, the wall time and what `experiment` returns: what the experiment's
    JSON file stores.
    """
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        return argparse.Namespace(**{**record["settings"], "results_dir": args.results_dir,
                                     "from_json": args.from_json}), record
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "results_dir", "run_store")}
    record = {"command": command_line(), "settings": settings, **experiment(args)}
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    if "run_seconds" in record:  # the runs' own times, whether this command trained them or found them in the store
        times = list(record.pop("run_seconds").values())
        record["compute_seconds"] = round(sum(wall for wall, _ in times), 1)
        if all(cpu is not None for _, cpu in times):
            record["cpu_seconds"] = round(sum(cpu for _, cpu in times), 1)
    return args, record


def timing(record: dict) -> str:
    """``wall 95 min; runs 90 min (CPU 48 min)`` of a record: the command's wall time, the sum of its runs' wall times
    (what one worker takes with an empty run store) and of their CPU times."""
    parts = []
    if "wall_seconds" in record:
        parts.append(f"command wall time {record['wall_seconds'] / 60:.0f} min")
    if "compute_seconds" in record:
        parts.append(f"runs {record['compute_seconds'] / 60:.0f} min")
    if "cpu_seconds" in record:
        parts.append(f"CPU {record['cpu_seconds'] / 60:.0f} min")
    return "; ".join(parts)


def save_record(args: argparse.Namespace, name: str, record: dict) -> Path:
    """Write the record to ``<results_dir>/<name>.json`` (unless it was read from there); returns ``results_dir``."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{name}.json"
    if not (getattr(args, "from_json", None) and Path(args.from_json).resolve() == path.resolve()):
        path.write_text(json.dumps(record, separators=(",", ":")))  # compact: the records hold every epoch
    return args.results_dir


def command_line() -> str:
    return "python " + shlex.join(sys.argv)
