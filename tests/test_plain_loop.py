"""examples/plain_accelerate_loop.py: every mode in a plain Accelerate loop on the embedded digits, end to end.

In-process for each mode (the printed clean-test accuracy is checked against the saved model, recomputed here), and
once under ``torchrun --nproc_per_node 2`` (two gloo processes on the CPU, RW-SAM with the global scope).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification

import hf_rwsam  # noqa: F401  (registers small_cnn in timm, to load the saved model)
from hf_rwsam.data import collate_images, load_image_dataset, prepare_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ACCURACY_LINE = re.compile(r"final clean-test accuracy: ([0-9.]+) \(sam_mode=(\w+), (\d+) steps, (\d+) process")

MODES = {
    "none": ["--sam_mode", "none"],
    "sam": ["--sam_mode", "sam"],
    "asam": ["--sam_mode", "sam", "--sam_adaptive", "true", "--sam_rho", "0.5"],
    "msam": ["--sam_mode", "msam", "--msam_micro_batch_size", "16", "--msam_implementation", "loop"],
    "rwsam_fd": ["--sam_mode", "rwsam", "--rwsam_num_probes", "2", "--rwsam_target_ess", "0.5", "--noise_rate", "0.4"],
    "rwsam_exact": ["--sam_mode", "rwsam", "--rwsam_estimator", "exact", "--rwsam_lambda", "2"],
}


@pytest.fixture(scope="module")
def loop_script():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import plain_accelerate_loop
    finally:
        sys.path.remove(str(EXAMPLES))
    return plain_accelerate_loop


def recomputed_accuracy(output_dir: Path) -> float:
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    test = prepare_dataset(load_image_dataset("digits")["test"], "digits", train=False, image_size=16, num_channels=1)
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=256, collate_fn=collate_images):
            correct += int((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test)


@pytest.mark.slow  # 30 steps of each mode through the script
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_and_prints_the_clean_test_accuracy(loop_script, tmp_path, capsys, mode):
    out = tmp_path / "out"
    accuracy = loop_script.main([*MODES[mode], "--max_steps", "30", "--learning_rate", "0.2", "--logging_steps", "10",
                                 "--output_dir", str(out)])
    printed = capsys.readouterr().out
    match = ACCURACY_LINE.search(printed)
    assert match, printed
    assert float(match.group(1)) == pytest.approx(accuracy, abs=5e-5)
    assert match.group(2) == MODES[mode][1] and match.group(3) == "30" and match.group(4) == "1"
    # the saved model is the trained one: its accuracy on the clean test split is the printed one
    assert recomputed_accuracy(out) == pytest.approx(accuracy, abs=1e-9)
    assert accuracy > 0.2, "30 steps of SGD with momentum on digits should be well above chance (0.1)"


@pytest.mark.distributed
def test_two_processes_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "plain_accelerate_loop.py"), "--sam_mode", "rwsam", "--sam_perturbation_scope", "global",
         "--max_steps", "8", "--logging_steps", "4", "--batch_size", "32", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = ACCURACY_LINE.findall(proc.stdout)
    assert len(lines) == 1, proc.stdout  # printed once, by the main process
    accuracy, mode, steps, processes = lines[0]
    assert (mode, steps, processes) == ("rwsam", "8", "2")
    assert float(accuracy) == pytest.approx(recomputed_accuracy(tmp_path / "out"), abs=5e-5)
