"""The label-issue report (`hf_rwsam.label_issues`, ``RWSAMConfig(report_label_issues=True)``).

Each example's index must reach the training step through the Trainer's shuffling, gradient accumulation and two DDP
processes, so that every example is scored once per epoch with its own scores; the report is checked against a
plain reference computed from the margins the step produced; the CSV and `label_issues()` hold the same rows; and
keeping the report changes no weight of the training.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, default_data_collator
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_rwsam import RWSAMConfig, RWSAMTrainer
from hf_rwsam.columns import INDEX_COLUMN
from hf_rwsam.data import ExampleIndexed, collate_images
from hf_rwsam.label_issues import LABEL_ISSUES_CSV, THRESHOLD, LabelIssueReport
from hf_rwsam.losses import classification_margins
from hf_rwsam.sharpness.step import SampleScores

from utils import TinyMLP, flat_params, front_matter, make_tensors, sgd_config, tensor_dataset

N = 24
NOISY = [i % 3 == 0 for i in range(N)]


class RecordingTrainer(RWSAMTrainer):
    """Records, per micro-batch in order: the example indices, the inputs the step trained on, and its margins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        index, x = inputs[INDEX_COLUMN].tolist(), inputs["x"].clone()
        loss = super().training_step(model, inputs, num_items_in_batch)
        scores = self.sharpness_step.sample_scores
        self.records.append({"index": index, "x": x, "margins": scores.margins.double().clone()})
        return loss


class PredictionRecorder(RWSAMTrainer):
    """Records, per example, the class a plain forward predicts at x on its latest visit (before the step: the
    model's weights are x then; without dropout the step's own forward at x has the same logits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.predicted = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        with torch.no_grad():
            predicted = model(inputs["x"])["logits"].argmax(1)
        self.predicted.update(zip(inputs[INDEX_COLUMN].tolist(), predicted.tolist()))
        return super().training_step(model, inputs, num_items_in_batch)


def dataset(noisy=True):
    x, y = make_tensors(N, seed=3)
    return x, y, tensor_dataset(x, y, **({"is_noisy": NOISY} if noisy else {}))


def trained(tmp_path, trainer_class=RecordingTrainer, noisy=True, dropout=0.2, **config):
    x, y, data = dataset(noisy)
    torch.manual_seed(0)
    settings = dict(sam_mode="rwsam", report_label_issues=True, per_device_train_batch_size=4, num_train_epochs=2)
    trainer = trainer_class(model=TinyMLP(dropout=dropout), args=sgd_config(tmp_path, **{**settings, **config}),
                            train_dataset=data)
    trainer.train()
    return trainer, x, y


def reference_scores(records_per_process, n):
    """The report's definition, written plainly: -sum_v t_v^8 m_iv / sum_v t_v^8, t_v the 1-based micro-batch count
    of the process that made visit v (processes step in lockstep)."""
    weighted, weights = [0.0] * n, [0.0] * n
    for records in records_per_process:
        for t, record in enumerate(records, start=1):
            for i, m in zip(record["index"], record["margins"]):
                weighted[i] += -t**8 * float(m)
                weights[i] += t**8
    return np.array([w / v if v else math.nan for w, v in zip(weighted, weights)])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_example_is_scored_once_per_epoch_with_its_own_row_through_shuffling(tmp_path, accumulation):
    trainer, x, y = trained(tmp_path, gradient_accumulation_steps=accumulation)
    records = trainer.records
    assert len(records) == 2 * N // 4  # micro-batches of 4, two epochs
    order = [i for record in records for i in record["index"]]
    first, second = order[:N], order[N:]
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))  # each example once per epoch
    assert first != sorted(first) and first != second  # the Trainer shuffled, differently each epoch
    for record in records:  # the index names the row the step trained on
        assert torch.equal(record["x"], x[record["index"]])

    report = trainer.label_issues()
    assert sorted(report["index"]) == list(range(N))
    assert set(report["visits"]) == {2}
    by_index = {row["index"]: row for row in report}
    expected = reference_scores([records], N)
    for i in range(N):
        assert by_index[i]["score"] == pytest.approx(expected[i], rel=1e-12, abs=1e-12)  # float64 sums, reordered
        assert by_index[i]["label"] == int(y[i])
        assert by_index[i]["is_noisy"] == NOISY[i]
        assert by_index[i]["flagged"] == (expected[i] > THRESHOLD)
    # the prediction at the last visit is the given label exactly when its margin there was positive
    last_margin = {i: float(m) for record in records for i, m in zip(record["index"], record["margins"])}
    for i in range(N):
        assert (by_index[i]["prediction"] == by_index[i]["label"]) == (last_margin[i] > 0), i


def test_the_prediction_is_the_argmax_of_a_plain_forward_at_the_last_visit(tmp_path):
    trainer, _, _ = trained(tmp_path, PredictionRecorder, dropout=0.0)
    report = trainer.label_issues()
    assert dict(zip(report["index"], report["prediction"])) == trainer.predicted
    assert any(p != label for p, label in zip(report["prediction"], report["label"]))  # runner-ups among them


def test_the_prediction_from_margin_and_runner_up_is_the_argmax_ties_included():
    """Hand-made logits whose given label ties with other classes on either side, against `torch.argmax`."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [3.0, 3.0, 3.0],
                           [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, -1.0, 2.0]])
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 0, 1])
    margins, runner_up = classification_margins(logits, labels)
    report = LabelIssueReport(len(labels))
    report.update(range(len(labels)), SampleScores(torch.zeros(8), torch.ones(8), torch.ones(8) / 8, margins,
                                                   runner_up), labels)
    assert (margins == 0).sum() == 5 and (margins > 0).sum() == 1 and (margins < 0).sum() == 2  # every case
    assert report.predictions.tolist() == logits.argmax(1).tolist()


def test_label_issues_and_the_csv_agree_most_suspicious_first(tmp_path):
    trainer, _, _ = trained(tmp_path)
    report = trainer.label_issues()
    with open(tmp_path / LABEL_ISSUES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.column_names == ["index", "score", "label", "prediction", "flagged", "visits",
                                                    "is_noisy"]
    assert len(rows) == len(report) == N
    for row, expected in zip(rows, report):
        assert int(row["index"]) == expected["index"]
        assert float(row["score"]) == expected["score"]  # written with full precision
        for name in ("label", "prediction", "visits"):
            assert int(row[name]) == expected[name]
        for name in ("flagged", "is_noisy"):
            assert row[name] == str(expected[name])
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("estimator", ["fd", "exact"])
def test_keeping_the_report_changes_no_weight(tmp_path, estimator):
    """Shuffling, dropout, fd probes, accumulation: the parameters are bit-identical with and without the report."""
    config = dict(rwsam_estimator=estimator, rwsam_num_probes=2, gradient_accumulation_steps=2)
    with_report, _, _ = trained(tmp_path / "on", RWSAMTrainer, **config)
    without, _, _ = trained(tmp_path / "off", RWSAMTrainer, report_label_issues=False, **config)
    assert torch.equal(flat_params(with_report.model), flat_params(without.model))
    shorter, _, _ = trained(tmp_path / "short", RWSAMTrainer, report_label_issues=False, num_train_epochs=1, **config)
    assert not torch.equal(flat_params(shorter.model), flat_params(without.model))  # the comparison can fail
    assert not (tmp_path / "off" / LABEL_ISSUES_CSV).exists()
    with pytest.raises(ValueError, match="report_label_issues=True"):
        without.label_issues()


def test_auroc_is_logged_every_epoch_when_the_data_mark_their_corrupted_labels(tmp_path, monkeypatch):
    """... and without such marks, the epochs' ends merge nothing (a merge is a collective: several all-gathers)."""
    merges, merged = [], LabelIssueReport.merged

    def counted(self, gather):
        merges.append(self.updates)
        return merged(self, gather)

    monkeypatch.setattr(LabelIssueReport, "merged", counted)
    trainer, _, _ = trained(tmp_path)
    assert merges == [6, 12, 12]  # the two epochs' ends (6 micro-batches each), then the report's at the end
    logged = [e for e in trainer.state.log_history if "label_issues/auroc" in e]
    assert [e["epoch"] for e in logged] == [1.0, 2.0]
    report = trainer.label_issues()
    scores, noisy = np.array(report["score"]), np.array(report["is_noisy"])
    # the AUROC written plainly: the fraction of (corrupted, clean) pairs ranked right, ties counting one half
    pairs = [(s > c) + 0.5 * (s == c) for s in scores[noisy] for c in scores[~noisy]]
    assert logged[-1]["label_issues/auroc"] == pytest.approx(np.mean(pairs), abs=1e-12)

    merges.clear()
    quiet, _, _ = trained(tmp_path / "no_record", noisy=False)
    assert merges == [12]  # only the report's at the end
    assert not any("label_issues/auroc" in e for e in quiet.state.log_history)
    assert "is_noisy" not in quiet.label_issues().column_names


def test_the_model_card_says_how_many_look_mislabeled_and_how_the_threshold_was_chosen(tmp_path):
    trainer, _, _ = trained(tmp_path)
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    front_matter(card)  # still valid
    section = card.split("## Label issues\n", 1)[1].split("\n## ", 1)[0]
    flagged = sum(trainer.label_issues()["flagged"])
    assert f"{flagged} of the {N} training examples" in section
    assert "score is above\n0," in section and "chosen on separate noisy runs" in section
    assert "AUROC is" in section and LABEL_ISSUES_CSV in section
    plain = RWSAMTrainer(model=TinyMLP(), args=sgd_config(tmp_path / "plain", sam_mode="rwsam"),
                         train_dataset=dataset()[2])
    plain.save_model()
    assert "## Label issues" not in (tmp_path / "plain" / "README.md").read_text()


def resume_config(tmp_path, **kwargs):
    return sgd_config(tmp_path, sam_mode="rwsam", report_label_issues=True, per_device_train_batch_size=4,
                      save_strategy="steps", save_steps=4, save_only_model=False, **kwargs)


def test_a_resumed_run_reports_the_whole_training(tmp_path):
    """8 steps straight == 4 steps, checkpoint, resume for 4 more: the same report, visits and all."""
    _, _, data = dataset()

    def run(folder, max_steps, resume=None):
        torch.manual_seed(0)
        trainer = RWSAMTrainer(model=TinyMLP(), args=resume_config(tmp_path / folder, max_steps=max_steps),
                               train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.label_issues().to_dict()

    straight = run("a", 8)
    run("b", 4)
    resumed = run("b", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert resumed == straight
    assert sum(resumed["visits"]) == 8 * 4

    # a report saved before visits were weighted by t^8 (no step_power, weights t) is not continued: it restarts
    path = tmp_path / "b" / "checkpoint-4" / "label_issues_state.pt"
    state = torch.load(path, weights_only=True)
    del state["step_power"]
    torch.save(state, path)
    with CaptureLogger(logging.get_logger("hf_rwsam.trainer")) as captured:
        restarted = run("b", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert "weighs visits by t^1, this version by t^8: the report starts again" in captured.out
    assert sum(restarted["visits"]) == 4 * 4  # the 4 steps after the resume only


def test_index_column_passes_through_the_collators():
    rows = ExampleIndexed([{"x": [float(i), 1.0], "labels": i % 2} for i in range(4)])
    batch = default_data_collator([rows[i] for i in (3, 1)])
    assert batch[INDEX_COLUMN].tolist() == [3, 1] and batch["x"][:, 0].tolist() == [3.0, 1.0]

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 5},
                                                                                   unk_token="<pad>")),
                                        pad_token="<pad>")
    texts = ExampleIndexed([{"input_ids": [5, 5, 5][: 1 + i % 3], "labels": i % 2} for i in range(4)])
    padded = DataCollatorWithPadding(tokenizer)([texts[i] for i in (2, 0, 1)])
    assert padded[INDEX_COLUMN].tolist() == [2, 0, 1] and padded["input_ids"].shape == (3, 3)

    images = ExampleIndexed([{"pixel_values": torch.zeros(1, 2, 2), "label": 1} for _ in range(3)])
    assert collate_images(images.__getitems__([2, 0]))[INDEX_COLUMN].tolist() == [2, 0]


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"x": torch.zeros(6), "labels": torch.tensor(0)}


def test_refused_by_name_where_it_cannot_work(tmp_path):
    with pytest.raises(ValueError, match=r"RWSAMConfig\.report_label_issues=True is invalid: .*sam_mode='sam'"):
        RWSAMConfig(output_dir=str(tmp_path), sam_mode="sam", report_label_issues=True, use_cpu=True)
    with pytest.raises(ValueError, match=r"RWSAMConfig\.report_label_issues='maybe' is invalid"):
        RWSAMConfig(output_dir=str(tmp_path), report_label_issues="maybe", use_cpu=True)
    assert RWSAMConfig(output_dir=str(tmp_path), report_label_issues="true", use_cpu=True).report_label_issues is True

    with pytest.raises(ValueError, match="map-style training set"):
        RWSAMTrainer(model=TinyMLP(), args=sgd_config(tmp_path, sam_mode="rwsam", report_label_issues=True,
                                                      max_steps=1), train_dataset=Stream())
    with pytest.raises(ValueError, match="column 'example_index'"):
        ExampleIndexed([{"x": 1, INDEX_COLUMN: 0}])[0]


def test_report_merges_processes_and_rejects_what_is_not_one_micro_batch():
    """Two reports as two processes' (gather = stacking them), against the plain reference."""
    scores = [SampleScores(torch.zeros(2), torch.ones(2), torch.full((2,), 0.5), torch.tensor(m), torch.tensor(r))
              for m, r in (([1.0, -2.0], [0, 0]), ([0.5, 3.0], [1, 2]), ([-1.0, 4.0], [2, 0]), ([2.0, 2.0], [1, 1]))]
    a, b = LabelIssueReport(4), LabelIssueReport(4)
    a.update([0, 1], scores[0], torch.tensor([1, 2]))
    b.update([2, 3], scores[1], torch.tensor([0, 0]))
    a.update([3, 0], scores[2], torch.tensor([0, 1]))
    b.update([1, 2], scores[3], torch.tensor([2, 0]))
    records = [[{"index": [0, 1], "margins": [1.0, -2.0]}, {"index": [3, 0], "margins": [-1.0, 4.0]}],
               [{"index": [2, 3], "margins": [0.5, 3.0]}, {"index": [1, 2], "margins": [2.0, 2.0]}]]
    for report in (a, b):

        def gather(values, report=report):  # this process's field, concatenated over the processes in order
            name = next(field for field, value in vars(report).items() if value is values)
            return torch.cat([getattr(a, name), getattr(b, name)])

        merged = report.merged(gather)
        np.testing.assert_allclose(merged.scores(), reference_scores(records, 4), rtol=1e-15)
        assert merged.visits.tolist() == [2, 2, 2, 2]
        # each example's latest visit (step 2 everywhere): the label where its margin is positive, else the runner-up
        assert merged.predictions.tolist() == [1, 2, 0, 2]
        assert merged.labels.tolist() == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="3 indices but 2 margins"):
        a.update([0, 1, 2], scores[0], torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match=r"positions in the training set, 0 \.\. 3; got 2 \.\. 4"):
        a.update([2, 4], scores[0], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="needs a classifier"):
        a.update([0, 1], SampleScores(torch.zeros(2), torch.ones(2), torch.ones(2) / 2, None, None),
                 torch.tensor([1, 2]))


def test_a_saved_report_continues_from_copies_and_refuses_another_step_weighting():
    """A resumed report goes on from the saved sums (a later update leaves the saved tensors as they were), and a
    report saved with visits weighted by another power of the step (as before the t^8 weighting) is refused."""
    scores = SampleScores(torch.zeros(2), torch.ones(2), torch.full((2,), 0.5), torch.tensor([1.0, -2.0]),
                          torch.tensor([0, 0]))
    report = LabelIssueReport(3)
    report.update([0, 1], scores, torch.tensor([1, 2]))
    state = report.state_dict()
    saved = {name: value.clone() for name, value in state.items() if isinstance(value, torch.Tensor)}
    resumed = LabelIssueReport(3)
    resumed.load_state_dict(state)
    resumed.update([1, 2], scores, torch.tensor([2, 0]))  # step 2: weight 2^8
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    # -sum_v t^8 m / sum_v t^8 written out: example 1 has m = -2 at step 1 and m = 1 at step 2, the others one visit
    expected = {0: -1.0, 1: (1**8 * 2.0 - 2**8 * 1.0) / (1**8 + 2**8), 2: 2.0}
    np.testing.assert_allclose(resumed.scores(), [expected[i] for i in range(3)], rtol=1e-15)
    with pytest.raises(ValueError, match=r"weighs a visit at step t by t\^1, this version by t\^8"):
        LabelIssueReport(3).load_state_dict({k: v for k, v in state.items() if k != "step_power"})


def test_an_update_leaves_the_report_on_the_margins_device_and_reads_nothing_back():
    """The meta device stands in for an accelerator: its tensors hold no values, so reading one back (a range check,
    a copy to the CPU) fails there. After the first update (indices from the CPU, as a plain loop's, checked there),
    updates with the device's indices run there; a report loaded from its CPU state moves back on its next update."""
    meta = torch.device("meta")

    def scores(b):
        return SampleScores(*(torch.zeros(b, device=meta) for _ in range(4)),
                            torch.zeros(b, dtype=torch.int64, device=meta))

    def devices(report):
        return {value.device for value in vars(report).values() if isinstance(value, torch.Tensor)}

    labels = torch.zeros(2, dtype=torch.int64, device=meta)
    report = LabelIssueReport(4)
    report.update([0, 1], scores(2), labels)
    assert devices(report) == {meta}
    report.update(torch.tensor([2, 3], device=meta), scores(2), labels, noisy=torch.ones(2, device=meta))
    assert devices(report) == {meta} and report.updates == 2

    restored = LabelIssueReport(4)
    restored.load_state_dict(LabelIssueReport(4).state_dict())
    assert devices(restored) == {torch.device("cpu")}
    restored.update([1, 2], scores(2), labels)
    assert devices(restored) == {meta}


# ---------------------------------------------------------------------------------------------------------- DDP

WORKER = Path(__file__).parent / "distributed" / "label_issues_worker.py"


@pytest.mark.distributed  # starts two processes
def test_two_ddp_processes_score_every_example_once_per_epoch(tmp_path):
    samples, per_device, epochs = 16, 4, 2
    out = tmp_path / "result.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    payload = json.dumps({"out": str(out), "samples": samples, "per_device": per_device, "epochs": epochs})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(WORKER), payload],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    records, x, y = result["records"], result["x"], result["y"]
    per_epoch = samples // (2 * per_device)  # micro-batches per process per epoch
    assert [len(r) for r in records] == [epochs * per_epoch] * 2
    for epoch in range(epochs):
        seen = [i for process in records for record in process[epoch * per_epoch:(epoch + 1) * per_epoch]
                for i in record["index"]]
        assert sorted(seen) == list(range(samples))  # the two processes together: every example once
    first_epoch = [i for record in records[0][:per_epoch] for i in record["index"]]
    assert first_epoch != sorted(first_epoch)  # shuffled
    for process in records:
        for record in process:
            assert torch.allclose(torch.tensor(record["x"]), x[record["index"]])

    report = result["report"]
    assert sorted(report["index"]) == list(range(samples)) and set(report["visits"]) == {epochs}
    expected = reference_scores(records, samples)
    for i, score, label, noisy in zip(report["index"], report["score"], report["label"], report["is_noisy"]):
        assert score == pytest.approx(expected[i], rel=1e-12, abs=1e-12)
        assert label == int(y[i]) and noisy == result["noisy"][i]
    assert report["score"] == sorted(report["score"], reverse=True)
    with open(Path(result["output_dir"]) / LABEL_ISSUES_CSV, newline="") as f:  # written once, by process 0
        assert [int(row["index"]) for row in csv.DictReader(f)] == report["index"]
    assert [e["epoch"] for e in result["log_history"] if "label_issues/auroc" in e] == [1.0, 2.0]
