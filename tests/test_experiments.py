"""The experiment scripts end to end on one epoch: hyperparameters chosen on the validation split only (the argmax of
the selection runs' validation accuracy, from seeds the final runs do not use), final runs that report what the tables
need, and a finished record that redoes the same tables (`--from_json`)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def run_script(name, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_label_noise_tunes_on_validation_reports_final_and_best_val_and_replays(tmp_path):
    out = run_script("label_noise.py", "--epochs", "1", "--seeds", "1", "--noise_rates", "0,0.4",
                     "--methods", "SGD,RW-SAM fd Q=1", "--rhos", "0.02,0.1", "--lambdas", "3", "--workers", "1",
                     "--results_dir", str(tmp_path))
    record = json.loads((tmp_path / "label_noise_digits.json").read_text())
    assert (tmp_path / "label_noise_digits.png").stat().st_size > 0

    # Selection: RW-SAM's 2 rho, then lambda 3 at the better one, per noise rate, all on the selection seed; SGD
    # tunes nothing. The chosen values are the argmax of the validation accuracy (not of the test accuracy).
    selection = record["selection"]
    assert {r["seed"] for r in selection} == {100} and {r["label"] for r in selection} == {"RW-SAM fd Q=1"}
    for rate in (0.0, 0.4):
        runs = [r for r in selection if r["noise_rate"] == rate]
        first_two = sorted((r["method"]["sam_rho"], r["method"]["rwsam_lambda"]) for r in runs[:2])
        assert first_two == [(0.02, 1.0), (0.1, 1.0)]
        first = max(runs[:2], key=lambda r: r["val_accuracy"])
        assert runs[2]["method"] == {**first["method"], "rwsam_lambda": 3.0}
        best = max(runs, key=lambda r: r["val_accuracy"])
        assert record["chosen"][f"RW-SAM fd Q=1|{rate}"] == best["method"]
        for r in runs:
            assert 0.0 <= r["val_accuracy"] <= 1.0

    # Final runs: seed 0 at the chosen values, test accuracy of the final model and of the best validation epoch
    runs = {(r["label"], r["noise_rate"]): r for r in record["runs"]}
    assert set(runs) == {("SGD", 0.0), ("SGD", 0.4), ("RW-SAM fd Q=1", 0.0), ("RW-SAM fd Q=1", 0.4)}
    for run in record["runs"]:
        assert run["seed"] == 0
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["accuracy_best_val"] <= 1.0
    assert 0.0 < runs[("RW-SAM fd Q=1", 0.4)]["rwsam/noisy_weight_mass"] < 1.0
    assert "rwsam/noisy_weight_mass" not in runs[("SGD", 0.4)]
    assert "rwsam/noisy_weight_mass" not in runs[("RW-SAM fd Q=1", 0.0)]
    for label in ("SGD", "RW-SAM fd Q=1"):  # tr(V) and tr(H) at the end of the clean runs only
        assert runs[(label, 0.0)]["trace_V"] > 0 and math.isfinite(runs[(label, 0.0)]["trace_H"])
        assert "trace_V" not in runs[(label, 0.4)]
    assert "| RW-SAM fd Q=1 | rho=" in out  # the chosen values' table

    tables = out[out.index("Clean test accuracy"):]
    replayed = run_script("label_noise.py", "--from_json", str(tmp_path / "label_noise_digits.json"),
                          "--results_dir", str(tmp_path / "again"))
    assert replayed[replayed.index("Clean test accuracy"):] == tables


@pytest.mark.slow  # runs the experiment end to end (about a minute)
def test_label_issues_scores_every_method_against_the_corrupted_labels_and_replays(tmp_path):
    """experiments/label_issues.py on digits, one noise, one epoch: every method scores every example, the metrics
    are the plain definitions (AUROC as the fraction of (corrupted, clean) pairs ordered right, precision among the K
    top scores), cleanlab's cost is its five folds', and the record redoes the same table."""
    import numpy as np

    import importlib.util

    spec = importlib.util.spec_from_file_location("label_issues_experiment", EXPERIMENTS / "label_issues.py")
    label_issues = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_issues)

    out = run_script("label_issues.py", "--datasets", "digits", "--noises", "asym40", "--epochs", "1",
                     "--short_epochs", "1", "--seeds", "1", "--workers", "1", "--results_dir", str(tmp_path))
    record = json.loads((tmp_path / "label_issues.json").read_text())
    assert (tmp_path / "label_issues.png").stat().st_size > 0 and not (tmp_path / "label_issues.partial.json").exists()
    results = record["results"]
    assert sorted(r["kind"] for r in results) == ["fold"] * 5 + ["report"] * 2 + ["sgd"]

    folds = [r for r in results if r["kind"] == "fold"]
    held_out = sorted(i for r in folds for i in r["held_out"])
    assert held_out == list(range(1797))  # cleanlab: every example predicted once, by a model that did not train on it

    settings = record["settings"]
    data = label_issues.noisy_dataset(settings, "digits", label_issues.NOISES["asym40"], 0)
    noisy = np.asarray(data["is_noisy"])
    assert 0 < noisy.sum() < len(noisy)

    def plain_auroc(scores):
        scores = np.asarray(scores)
        bad, good = scores[noisy], scores[~noisy]
        return ((bad[:, None] > good[None, :]).mean() + 0.5 * (bad[:, None] == good[None, :]).mean())

    rows = label_issues.evaluate(settings, results)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == set(label_issues.METHODS)
    report = next(r for r in results if r["kind"] == "report" and r["estimator"] == "fd")
    k = int(noisy.sum())
    top = np.argsort(-np.asarray(report["scores"]))[:k]
    assert by_method["RW-SAM fd report"]["auroc"] == pytest.approx(plain_auroc(report["scores"]), abs=1e-9)
    assert by_method["RW-SAM fd report"]["precision_at_k"] == pytest.approx(noisy[top].mean())
    sgd = next(r for r in results if r["kind"] == "sgd")
    assert by_method["AUM"]["auroc"] == pytest.approx(plain_auroc(sgd["aum_scores"]), abs=1e-9)
    assert by_method["small loss"]["auroc"] == pytest.approx(plain_auroc(sgd["small_loss_scores"]), abs=1e-9)
    cleanlab = by_method["cleanlab (5-fold CV)"]
    assert cleanlab["cpu_s"] == pytest.approx(sum(r["cpu_s"] + r["inference_cpu_s"] for r in folds))
    assert by_method["RW-SAM fd report"]["cost_vs_cleanlab"] == pytest.approx(report["cpu_s"] / cleanlab["cpu_s"])

    table = out[out.index("| data |"):]
    replayed = run_script("label_issues.py", "--from_json", str(tmp_path / "label_issues.json"),
                          "--results_dir", str(tmp_path / "again"))
    assert replayed[replayed.index("| data |"):] == table
