"""Model cards: what `render_model_card` writes, and the README.md `RWSAMTrainer` leaves in every saved folder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from transformers import TrainerState

from hf_rwsam import RWSAMConfig, RWSAMTrainer
from hf_rwsam.cards import render_model_card
from hf_rwsam.data import add_label_noise

from utils import TinyMLP, accuracy, front_matter, make_tensors, sgd_config, tensor_dataset

SAM_FIELDS = [f.name for f in dataclasses.fields(RWSAMConfig) if f.name.startswith(("sam_", "msam_", "rwsam_"))]
NON_DEFAULT_SAM = dict(
    sam_mode="rwsam", sam_rho=0.123, sam_adaptive=True, sam_adaptive_eta=0.02, rwsam_lambda=0.7,
    rwsam_estimator="exact", rwsam_num_probes=3, rwsam_fd_step=0.004, rwsam_normalize="none", rwsam_target_ess=0.5,
    rwsam_max_weight=4.0, rwsam_exact_chunk_size=7,
)
NOISE = {
    "noise_type": "symmetric", "rate": 0.4, "realized_rate": 0.3875, "num_classes": 3,
    "transition_matrix": [[0.6, 0.25, 0.15], [0.2, 0.6, 0.2], [0.125, 0.375, 0.5]],
}
LOG_HISTORY = [
    {"eval_loss": 1.2, "eval_accuracy": 0.5, "eval_runtime": 0.3, "epoch": 1.0, "step": 4},
    {"loss": 0.9, "learning_rate": 0.1, "epoch": 2.0, "step": 8},
    {"eval_loss": 0.7, "eval_accuracy": 0.8125, "eval_runtime": 0.2, "eval_samples_per_second": 80.0,
     "epoch": 2.0, "step": 8},
    {"train_runtime": 3.0, "train_loss": 1.0, "epoch": 2.0, "step": 8},
]


def render(tmp_path, log_history=LOG_HISTORY, noise_info=NOISE, model_class="TimmWrapperForImageClassification",
           **kwargs):
    args = RWSAMConfig(
        output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, optim="sgd", num_train_epochs=2, seed=1234, report_to="none", use_cpu=True,
        **{**NON_DEFAULT_SAM, **kwargs},
    )
    state = TrainerState(global_step=8, epoch=2.0, log_history=log_history)
    return render_model_card(
        args, state, model_name="tiny", model_class=model_class, repo_id="user/tiny", dataset_name="uoft-cs/cifar10",
        noise_info=noise_info, tags=["my-tag"],
    )


def table(card: str, heading: str) -> dict[str, str]:
    """The two-column table under ``### heading``: first cell (backticks stripped) -> second cell."""
    section = card.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return {name.strip().strip("`"): value.strip().strip("`") for name, value in rows}


def test_card_lists_every_sharpness_setting_with_its_value(tmp_path):
    settings = table(render(tmp_path), "Sharpness-aware settings")
    assert sorted(settings) == sorted(SAM_FIELDS)
    expected = {
        "sam_mode": "rwsam", "sam_rho": "0.123", "sam_adaptive": "True", "sam_adaptive_eta": "0.02",
        "rwsam_lambda": "0.7", "rwsam_estimator": "exact", "rwsam_num_probes": "3", "rwsam_fd_step": "0.004",
        "rwsam_normalize": "none", "rwsam_target_ess": "0.5", "rwsam_max_weight": "4.0",
        "rwsam_exact_chunk_size": "7", "msam_micro_batch_size": "None",
    }
    assert {name: settings[name] for name in expected} == expected


def test_card_lists_the_usual_training_settings(tmp_path):
    card = render(tmp_path)
    settings = table(card, "Optimisation")
    expected = {
        "learning_rate": "0.1", "per_device_train_batch_size": "16", "gradient_accumulation_steps": "2",
        "total_train_batch_size": "32", "optim": "sgd", "num_train_epochs": "2", "seed": "1234",
    }
    assert {name: settings[name] for name in expected} == expected
    assert "Optimizer steps: 8 (2.00 epochs)" in card


def test_card_describes_the_label_noise(tmp_path):
    card = render(tmp_path)
    assert "| Noise type | `symmetric` |" in card
    assert "| Nominal rate | 40.00% |" in card
    assert "| Realised rate | 38.75%" in card
    # the transition matrix, one row per clean class
    assert "| **0** | 0.600 | 0.250 | 0.150 |" in card
    assert "| **2** | 0.125 | 0.375 | 0.500 |" in card


def test_card_leaves_out_the_matrix_of_many_classes_and_says_when_there_is_no_noise(tmp_path):
    many = {**NOISE, "num_classes": 21, "transition_matrix": np.eye(21).tolist()}
    card = render(tmp_path, noise_info=many)
    assert "| Realised rate | 38.75%" in card
    assert "transition matrix" not in card and "| **0** |" not in card
    assert "No label-noise record" in render(tmp_path, noise_info=None)


def test_front_matter_has_the_hub_metadata_and_the_latest_accuracy(tmp_path):
    card = render(tmp_path)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification"
    assert set(meta["tags"]) == {"hf-rwsam", "sharpness-aware-minimization", "rwsam", "image-classification", "my-tag"}
    assert meta["datasets"] == ["uoft-cs/cifar10"]
    assert meta["metrics"] == ["accuracy"]
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert entry["name"] == "tiny"
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["type"] == "uoft-cs/cifar10"
    assert result["metrics"] == [{"type": "accuracy", "value": 0.8125}]  # the last evaluation, not the first
    assert "| eval_accuracy | 0.8125 |" in card and "| eval_loss | 0.7000 |" in card
    assert "eval_runtime" not in card and "eval_samples_per_second" not in card


def test_without_evaluation_there_is_no_model_index(tmp_path):
    card = render(tmp_path, log_history=[{"loss": 0.9, "epoch": 1.0, "step": 4}])
    assert "model-index" not in front_matter(card)
    assert "No evaluation was logged." in card


def test_plain_trainer_step_is_not_tagged_sharpness_aware(tmp_path):
    meta = front_matter(render(tmp_path, sam_mode="none"))
    assert "sharpness-aware-minimization" not in meta["tags"] and "none" not in meta["tags"]


def test_card_cites_the_paper_and_shows_how_to_load(tmp_path):
    card = render(tmp_path)
    bibtex = card.split("```bibtex\n", 1)[1].split("```", 1)[0]
    assert bibtex.startswith("@inproceedings{")
    for text in (
        "Unveiling m-Sharpness Through the Structure of Stochastic Gradient Noise",
        "Luo, Haocheng and Harandi, Mehrtash and Phung, Dinh and Le, Trung",
        "2025", "2509.18001", "Neural Information Processing Systems",
    ):
        assert text in bibtex
    assert "\nimport hf_rwsam " in card
    assert 'AutoModelForImageClassification.from_pretrained("user/tiny")' in card
    # a model outside transformers is loaded from its state dict
    plain = render(tmp_path, model_class="TinyMLP")
    assert "from_pretrained" not in plain and "load_state_dict" in plain


# --------------------------------------------------------------------------------------------- the Trainer


def noisy_dataset(n=32, seed=0) -> Dataset:
    x, y = make_tensors(n=n, seed=seed)
    features = Features({"x": Sequence(Value("float32")), "label": ClassLabel(num_classes=3)})
    clean = Dataset.from_dict({"x": x.tolist(), "label": y.tolist()}, features=features)
    return add_label_noise(clean, noise_type="symmetric", rate=0.25, seed=0).with_format("torch")


def test_trainer_writes_the_card_in_every_checkpoint_and_final_save(tmp_path):
    train = noisy_dataset()
    args = sgd_config(
        tmp_path / "out", sam_mode="rwsam", rwsam_lambda=0.7, max_steps=2, save_strategy="steps", save_steps=1,
        eval_strategy="steps", eval_steps=1,
    )
    trainer = RWSAMTrainer(
        model=TinyMLP(), args=args, train_dataset=train, eval_dataset=noisy_dataset(n=16, seed=1),
        compute_metrics=accuracy, dataset_name="user/toy-digits",
    )
    trainer.train()
    trainer.save_model()

    columns = train.with_format("numpy")[:]
    realised = float(np.mean(columns["label"] != columns["clean_label"]))
    assert 0 < realised < 1
    evals = {entry["step"]: entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry}
    for folder, step in ((tmp_path / "out" / "checkpoint-1", 1), (tmp_path / "out" / "checkpoint-2", 2),
                         (tmp_path / "out", 2)):
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert table(card, "Sharpness-aware settings")["rwsam_lambda"] == "0.7"
        assert f"Optimizer steps: {step} " in card
        assert f"| Realised rate | {100 * realised:.2f}%" in card
        meta = front_matter(card)
        assert meta["datasets"] == ["user/toy-digits"]
        assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(evals[step])


def test_sequence_classifiers_get_the_text_classification_task_and_loader(tmp_path):
    card = render(tmp_path, model_class="BertForSequenceClassification")
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-classification"
    assert "text-classification" in meta["tags"] and "image-classification" not in meta["tags"]
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained" in card


def test_metrics_metadata_lists_what_was_evaluated(tmp_path):
    """Only the loss evaluated: no `metrics` claimed; accuracy evaluated: `accuracy` (the loss is the objective)."""
    loss_only = [{"eval_loss": 0.7, "eval_runtime": 0.2, "epoch": 1.0, "step": 4}]
    meta = front_matter(render(tmp_path, log_history=loss_only))
    assert "metrics" not in meta
    assert "| eval_loss | 0.7000 |" in render(tmp_path, log_history=loss_only)
    assert front_matter(render(tmp_path))["metrics"] == ["accuracy"]


def test_timm_note_only_for_timm_models_and_local_datasets_named_in_the_text(tmp_path):
    assert "import hf_rwsam" in render(tmp_path)  # a TimmWrapperForImageClassification needs the registration
    bert = render(tmp_path, model_class="BertForSequenceClassification")
    assert "import hf_rwsam" not in bert and "timm" not in bert
    args = RWSAMConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    card = render_model_card(args, TrainerState(), model_name="m", model_class="TinyMLP", repo_id="m",
                             dataset_name="digits")
    assert "Dataset: `digits`." in card and "datasets" not in front_matter(card)  # not a Hub id: text only


def test_two_trainers_saving_into_one_folder_always_leave_a_whole_card(tmp_path):
    """Two trainers write cards (and save) into one folder from two threads while a third reads README.md: every
    write succeeds (with one staging name for all writes, one writer's rename moved the other's file away:
    FileNotFoundError), every read is a whole card, and no staging file is left."""
    import threading

    x, y = make_tensors(8)
    folder = tmp_path / "shared"
    trainers = [RWSAMTrainer(model=TinyMLP(), args=sgd_config(folder, sam_mode=mode, max_steps=1),
                             train_dataset=tensor_dataset(x, y)) for mode in ("sam", "rwsam")]
    folder.mkdir(exist_ok=True)
    trainers[0].create_model_card()
    wholes = {(folder / "README.md").read_text(encoding="utf-8")}
    trainers[1].create_model_card()
    wholes.add((folder / "README.md").read_text(encoding="utf-8"))
    assert len(wholes) == 2  # the two trainers' cards differ (their sam_mode)
    errors, reads, done = [], [], threading.Event()

    def write(trainer):
        try:
            for i in range(60):
                trainer.create_model_card() if i % 10 else trainer.save_model()
        except Exception as err:  # noqa: BLE001 -- collected for the assertion
            errors.append(err)

    def read():
        while not done.is_set():
            reads.append((folder / "README.md").read_text(encoding="utf-8"))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(trainer,)) for trainer in trainers]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert not errors, errors[:3]
    assert reads and all(card in wholes for card in reads), "a reader saw a card that is not whole"
    assert not [p.name for p in folder.iterdir() if p.name.startswith("_")]


def test_a_card_write_that_fails_leaves_no_staging_file(tmp_path, monkeypatch):
    import hf_rwsam.trainer

    x, y = make_tensors(8)
    trainer = RWSAMTrainer(model=TinyMLP(), args=sgd_config(tmp_path, max_steps=1), train_dataset=tensor_dataset(x, y))

    def fails(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(hf_rwsam.trainer.os, "replace", fails)
    with pytest.raises(OSError, match="disk full"):
        trainer.create_model_card()
    assert [p.name for p in tmp_path.iterdir()] == []
