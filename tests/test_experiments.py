"""The experiment scripts end to end on 11 steps (one logging window of 10): every run reports what the tables
need, and a finished record redoes the same tables (`--from_json`)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def run_script(name, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_label_noise_reports_accuracy_noisy_weight_and_traces_and_replays_from_its_record(tmp_path):
    out = run_script("label_noise.py", "--epochs", "0.5", "--seeds", "1", "--noise_rates", "0,0.4",
                     "--methods", "SGD,RW-SAM fd Q=1", "--workers", "1", "--results_dir", str(tmp_path))
    record = json.loads((tmp_path / "label_noise_digits.json").read_text())
    assert (tmp_path / "label_noise_digits.png").stat().st_size > 0
    runs = {(r["label"], r["noise_rate"]): r for r in record["runs"]}
    assert set(runs) == {("SGD", 0.0), ("SGD", 0.4), ("RW-SAM fd Q=1", 0.0), ("RW-SAM fd Q=1", 0.4)}
    for run in record["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
    # the weight on corrupted samples is RW-SAM's, and only where labels were corrupted
    assert 0.0 < runs[("RW-SAM fd Q=1", 0.4)]["rwsam/noisy_weight_mass"] < 1.0
    assert "rwsam/noisy_weight_mass" not in runs[("SGD", 0.4)]
    assert "rwsam/noisy_weight_mass" not in runs[("RW-SAM fd Q=1", 0.0)]
    # tr(V) and tr(H) at the end of the clean runs only
    for label in ("SGD", "RW-SAM fd Q=1"):
        assert runs[(label, 0.0)]["trace_V"] > 0 and math.isfinite(runs[(label, 0.0)]["trace_H"])
        assert "trace_V" not in runs[(label, 0.4)]
    tables = out[out.index("Clean test accuracy"):]
    replayed = run_script("label_noise.py", "--from_json", str(tmp_path / "label_noise_digits.json"),
                          "--results_dir", str(tmp_path / "again"))
    assert replayed[replayed.index("Clean test accuracy"):] == tables
