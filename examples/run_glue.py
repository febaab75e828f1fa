#!/usr/bin/env python
"""Fine-tune a pretrained text encoder on a GLUE task with SAM / ASAM / m-SAM / RW-SAM, optionally under label noise.

In the style of transformers' examples/pytorch/text-classification/run_glue.py:

    accelerate launch examples/run_glue.py --task_name sst2 --model_name_or_path google-bert/bert-base-cased \\
        --sam_mode rwsam --sam_rho 0.05 --learning_rate 2e-5 --num_train_epochs 3 --per_device_train_batch_size 32 \\
        --eval_strategy epoch --output_dir out/sst2-rwsam

The data is the Hub's `nyu-mll/glue` (configuration `--task_name`), or a local copy of it (`--dataset_path`): a
directory written by `DatasetDict.save_to_disk`, or one of data files named after their splits (``train.csv``,
``validation-00000-of-00001.parquet``, ...; csv, json, jsonl or parquet) with the GLUE columns, or a download of the
whole repository (``hf download nyu-mll/glue --repo-type dataset --local-dir DIR``, one folder per task). The model is
evaluated on the task's validation split (MNLI: ``validation_matched``) with the task's GLUE metrics: accuracy, plus
F1 (MRPC, QQP) or Matthews' correlation (CoLA); Pearson and Spearman correlations for the regression task STS-B.
Arguments: `ModelArguments`, `DataArguments` and `hf_rwsam.RWSAMConfig`, from flags or a JSON/YAML settings file; the
outputs (model, tokenizer, model card, `*_results.json`, training-curve plot) are those of
`train_image_classification.py`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, DatasetDict, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetNotFoundError
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)
from transformers.utils import logging

from finetune_vit import ModelUnavailableError, load_pretrained
from hf_rwsam import RWSAMConfig, RWSAMTrainer
from hf_rwsam.data import NOISE_TYPES, DataUnavailableError, add_label_noise, label_noise_info
from hf_rwsam.data.noise import CLEAN_LABEL_COLUMN
from train_image_classification import base_model_card, parse_arguments, train_evaluate_save

GLUE_REPO = "nyu-mll/glue"

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
"""The text columns of each task, as in transformers' run_glue.py."""

LABEL_NAMES = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "wnli": ["not_entailment", "entailment"],
}
"""The class names of `nyu-mll/glue`'s label column, for local copies that store bare integers (csv, json)."""

EVAL_SPLITS = {"mnli": "validation_matched"}
DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="google-bert/bert-base-cased",
        metadata={"help": "A Hub model id or a local directory holding a model for sequence classification."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "The tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache the downloaded checkpoint."})
    revision: str = field(default="main", metadata={"help": "The checkpoint's branch, tag or commit."})


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": f"The GLUE task: {', '.join(TASK_TO_KEYS)}."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A local copy of nyu-mll/glue: a save_to_disk directory, a directory of csv/json/parquet "
                  "files named after their splits, or a download of the whole repository."},
    )
    eval_split: str | None = field(default=None, metadata={"help": "Default: 'validation' ('validation_matched')."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    noise_type: str | None = field(
        default=None, metadata={"help": f"Label noise on the training split: {NOISE_TYPES[:3]} (not for stsb)."}
    )
    noise_rate: float | None = field(default=None, metadata={"help": "Noise rate in [0, 1]."})
    noise_seed: int = field(default=0, metadata={"help": "Seed of the synthetic label noise."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation samples."})

    def __post_init__(self):
        if self.task_name not in TASK_TO_KEYS:
            raise ValueError(f"--task_name {self.task_name!r} is not a GLUE task: choose one of {list(TASK_TO_KEYS)}.")


def load_glue(task: str, path: str | None, cache_dir: str | None = None) -> DatasetDict:
    """The task's splits from the Hub or from a local copy (see the module docstring)."""
    if path is None:
        try:
            return load_dataset(GLUE_REPO, task, cache_dir=cache_dir)
        except (ConnectionError, DatasetNotFoundError) as err:
            raise DataUnavailableError(
                f"Could not load GLUE {task!r} ({GLUE_REPO!r} on the Hub): {err}. With network access, allow "
                "downloads (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE or set them to 0). Without it, copy the data "
                f"here (`hf download {GLUE_REPO} --repo-type dataset --local-dir DIR`, or "
                f"`datasets.load_dataset({GLUE_REPO!r}, {task!r}).save_to_disk(DIR)`) and pass --dataset_path DIR."
            ) from err
    if not os.path.isdir(path):
        raise ValueError(f"--dataset_path {path!r} is not a directory.")
    if os.path.isdir(os.path.join(path, task)):  # the whole repository: one folder per task
        path = os.path.join(path, task)
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return load_from_disk(path)
    data_files: dict[str, list[str]] = {}
    builders = set()
    for file in sorted(Path(path).iterdir()):
        if file.suffix in DATA_FILE_BUILDERS:
            data_files.setdefault(SHARD_SUFFIX.sub("", file.stem), []).append(str(file))
            builders.add(DATA_FILE_BUILDERS[file.suffix])
    if len(builders) != 1:
        raise ValueError(
            f"--dataset_path {path!r} must hold a save_to_disk dataset or data files of one format (csv, json, jsonl "
            f"or parquet) named after their splits; found {sorted(builders) or 'none'}."
        )
    return load_dataset(builders.pop(), data_files=data_files, cache_dir=cache_dir)


def with_glue_labels(dataset, task: str):
    """The label column as `nyu-mll/glue` types it: `ClassLabel` with the task's names, float for STS-B."""
    feature = dataset.features.get("label")
    if feature is None:
        raise ValueError(f"The {task!r} data has no 'label' column; it has {dataset.column_names}.")
    if task == "stsb":
        return dataset if feature == Value("float32") else dataset.cast_column("label", Value("float32"))
    if isinstance(feature, ClassLabel):
        return dataset
    return dataset.cast_column("label", ClassLabel(names=LABEL_NAMES[task]))


def build_datasets(data_args: DataArguments):
    """The training split (with label noise if asked) and the evaluation split, labels typed."""
    splits = load_glue(data_args.task_name, data_args.dataset_path)
    eval_split = data_args.eval_split or EVAL_SPLITS.get(data_args.task_name, "validation")
    for split in ("train", eval_split):
        if split not in splits:
            raise ValueError(f"The {data_args.task_name!r} data has no {split!r} split; it has {list(splits)}.")
    train, evaluation = (with_glue_labels(splits[s], data_args.task_name) for s in ("train", eval_split))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    if data_args.noise_type:
        train = add_label_noise(train, data_args.noise_type, data_args.noise_rate, seed=data_args.noise_seed)
    return train, evaluation


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics from the model's logits ([n, C], or [n, 1] for STS-B) and the references."""
    if task == "stsb":
        scores = predictions.reshape(-1)
        return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}
    predicted = np.argmax(predictions, axis=-1)
    metrics = {"accuracy": float(accuracy_score(labels, predicted))}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predicted, zero_division=0.0))
    if task == "cola":
        metrics["matthews_correlation"] = float(matthews_corrcoef(labels, predicted))
    return metrics


class GlueCollator(DataCollatorWithPadding):
    """Pads the tokenized examples; the ``clean_label`` of label noise (kept for the model card) is not an input."""

    def __call__(self, features):
        return super().__call__([{k: v for k, v in f.items() if k != CLEAN_LABEL_COLUMN} for f in features])


def main(argv: list[str]) -> dict:
    try:
        model_args, data_args, training_args = parse_arguments(argv, (ModelArguments, DataArguments, RWSAMConfig))
        train, evaluation = build_datasets(data_args)
        task = data_args.task_name
        label_names = None if task == "stsb" else train.features["label"].names
        num_labels = 1 if label_names is None else len(label_names)
        labels = {} if label_names is None else {
            "id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}
        }
        hub = {"cache_dir": model_args.cache_dir, "revision": model_args.revision}
        config = load_pretrained(
            AutoConfig, model_args.model_name_or_path, num_labels=num_labels, finetuning_task=task, **labels, **hub
        )
        tokenizer = load_pretrained(AutoTokenizer, model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    except (DataUnavailableError, ModelUnavailableError, ValueError) as err:  # one line, saying what to do
        sys.exit(f"error: {err}")
    if training_args.should_log:
        logging.set_verbosity_info()
    set_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True, **hub
    )
    text_keys = [key for key in TASK_TO_KEYS[task] if key is not None]

    def tokenize(batch):
        return tokenizer(*(batch[key] for key in text_keys), truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="tokenization"):
        train, evaluation = (
            ds.map(tokenize, batched=True, remove_columns=[c for c in ds.column_names if c in (*text_keys, "idx")])
            for ds in (train, evaluation)
        )
    noise = label_noise_info(train)

    def compute_metrics(prediction):
        return glue_metrics(task, prediction.predictions, prediction.label_ids)

    trainer = RWSAMTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=GlueCollator(tokenizer), compute_metrics=compute_metrics, dataset_name=GLUE_REPO,
    )
    base_model = model_args.model_name_or_path
    card = {"tags": ["text-classification", "glue", task], **base_model_card(base_model)}
    return train_evaluate_save(trainer, f"{os.path.basename(base_model.rstrip('/'))} on GLUE {task}", noise, **card)


if __name__ == "__main__":
    main(sys.argv[1:])
