#!/usr/bin/env python
"""Train an image classifier with SAM / ASAM / m-SAM / RW-SAM, optionally under label noise.

In the style of transformers' examples/pytorch/image-classification/run_image_classification.py:

    accelerate launch examples/train_image_classification.py --dataset cifar100 --model cifar_resnet18 \\
        --sam_mode rwsam --noise_type symmetric --noise_rate 0.4 --output_dir out/cifar100-rwsam ...
    python examples/train_image_classification.py examples/configs/cifar10_resnet18_rwsam.yaml --num_train_epochs 1

Arguments are those of `ModelArguments`, `DataArguments` and `hf_rwsam.RWSAMConfig` (every `TrainingArguments`
field), from the command line, or from a JSON/YAML file whose settings later flags override. Accuracy is measured on the clean test split every epoch;
the model, its card, `*_results.json` and a plot of the training curves go to `--output_dir`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
import yaml
from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

from hf_rwsam import RWSAMConfig, RWSAMTrainer
from hf_rwsam.data import (
    NOISE_TYPES,
    DataUnavailableError,
    add_label_noise,
    collate_images,
    label_noise_info,
    load_image_dataset,
    prepare_dataset,
)
from hf_rwsam.data.loading import HUB_DATASETS
from hf_rwsam.models import create_model
from hf_rwsam.plotting import plot_training

logger = logging.get_logger(__name__)
ACCURACY = str(Path(__file__).parent / "metrics" / "accuracy.py")


@dataclass
class ModelArguments:
    model: str = field(
        default="cifar_resnet18",
        metadata={"help": "A timm architecture: cifar_resnet18, cifar_wrn28_10, cifar_pyramidnet110_a270, small_cnn, "
                  "or any timm name (e.g. resnet50)."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input side; the dataset's default if unset."})
    num_channels: int = field(default=3, metadata={"help": "Input channels: 3, or 1 for grayscale data (digits)."})
    model_args: str | None = field(default=None, metadata={"help": "JSON of extra timm.create_model arguments."})


@dataclass
class DataArguments:
    dataset: str = field(
        default="cifar10",
        metadata={"help": "digits (offline), cifar10, cifar100, imagenet-1k, or a local image folder."},
    )
    dataset_path: str | None = field(default=None, metadata={"help": "A local copy of the named Hub dataset."})
    eval_split: str | None = field(default=None, metadata={"help": "Default: 'test', else 'validation'."})
    noise_type: str | None = field(default=None, metadata={"help": f"Label noise on the training split: {NOISE_TYPES}."})
    noise_rate: float | None = field(default=None, metadata={"help": "Noise rate in [0, 1] (synthetic types)."})
    noise_seed: int = field(default=0, metadata={"help": "Seed of the synthetic label noise."})
    human_labels_path: str | None = field(default=None, metadata={"help": "CIFAR-N label file (CIFAR-10_human.pt)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation samples."})


class OneLineErrorParser(HfArgumentParser):
    """Bad flags end the script with one line saying what is wrong, not argparse's page-long usage."""

    def error(self, message):
        sys.exit(f"error: {message} (run with --help for the accepted arguments)")


def parse_arguments(argv: list[str], dataclass_types=(ModelArguments, DataArguments, RWSAMConfig)) -> tuple:
    """Flags, or a JSON/YAML file of settings followed by flags that override it, parsed into `dataclass_types`
    (by default this script's `ModelArguments`, `DataArguments` and `RWSAMConfig`; the other examples pass theirs).
    A setting written as null (``rwsam_fd_step: null``) is None, as in `HfArgumentParser.parse_yaml_file`."""
    parser = OneLineErrorParser(dataclass_types)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0]) as f:
            settings = yaml.safe_load(f)  # JSON is YAML
        flags, nulls = [], {}
        for key, value in settings.items():
            if value is None:  # a flag cannot say None: it becomes the field's default, which flags may override
                if not any(action.dest == key for action in parser._actions):
                    parser.error(f"{argv[0]}: unknown setting {key!r}")
                nulls[key] = None
            else:
                flags += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
        parser.set_defaults(**nulls)
        argv = flags + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def build_datasets(data_args: DataArguments, model_args: ModelArguments, seed: int):
    splits = load_image_dataset(data_args.dataset, path=data_args.dataset_path)
    eval_split = data_args.eval_split or ("test" if "test" in splits else "validation")
    train, test = splits["train"], splits[eval_split]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    if data_args.noise_type:
        train = add_label_noise(
            train, data_args.noise_type, data_args.noise_rate, seed=data_args.noise_seed,
            human_labels_path=data_args.human_labels_path,
        )
    noise = label_noise_info(train)
    prepared = {
        split: prepare_dataset(ds, data_args.dataset, train=split == "train", image_size=model_args.image_size,
                               num_channels=model_args.num_channels)
        for split, ds in (("train", train), ("test", test))
    }
    return prepared["train"], prepared["test"], train.features["label"].names, noise


def train_evaluate_save(trainer: RWSAMTrainer, subject: str, noise: dict | None = None, **card_kwargs) -> dict:
    """What every example does once its trainer is built: train, save the model (its card comes with it), log and
    save the train / eval metrics and the state, push if asked, plot the training curves and say where it all is.

    Args:
        trainer (`RWSAMTrainer`): the trainer, with its train and eval datasets.
        subject (`str`): what is trained on what, for the plot's title (the SAM mode is added).
        noise (`dict`, *optional*): `label_noise_info` of the training set; its realised rate is drawn in the plot as
            the uniform weight.
        card_kwargs: `Trainer.create_model_card` arguments (``finetuned_from``, ``tags``, ...): the card is rewritten
            with them after the save, and `push_to_hub` gets them too.

    Returns:
        `dict`: ``eval_metrics``, ``output_dir`` and, on the main process, ``plot`` (the PNG's path).
    """
    args = trainer.args
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    if card_kwargs:
        trainer.create_model_card(**card_kwargs)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    summary = {"eval_metrics": eval_metrics, "output_dir": Path(args.output_dir)}
    if trainer.is_world_process_zero():
        out = summary["output_dir"]
        title = f"{subject}, sam_mode={args.sam_mode}"
        noise_rate = noise["realized_rate"] if noise else None
        summary["plot"] = plot_training(trainer.state.log_history, out / "training_curves.png", noise_rate, title)
        scores = ", ".join(f"{name} = {value:.4f}" for name, value in eval_metrics.items()
                           if not name.endswith(("_runtime", "_per_second")) and name != "epoch")
        print(f"\nDone. On the evaluation set: {scores}")
        print(f"  model, config and model card: {out}/model.safetensors, config.json, README.md")
        print(f"  metrics: {out}/all_results.json, train_results.json, eval_results.json")
        print(f"  training curves: {summary['plot']}")
    return summary


def base_model_card(model_name_or_path: str) -> dict:
    """`create_model_card` arguments for a fine-tuned model: its ``base_model`` when it came from the Hub (an id, not a
    local folder)."""
    return {} if os.path.isdir(model_name_or_path) else {"finetuned_from": model_name_or_path}


def image_classification_trainer(model, training_args: RWSAMConfig, train_ds, test_ds, dataset: str) -> RWSAMTrainer:
    """An `RWSAMTrainer` for image classification: the image collator and accuracy (a local `evaluate` module)."""
    accuracy = evaluate.load(ACCURACY)

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)

    return RWSAMTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=test_ds, data_collator=collate_images,
        compute_metrics=compute_metrics, dataset_name=dataset_id(dataset),
    )


def dataset_id(name: str) -> str:
    """The dataset for the model card: the Hub id of a named Hub dataset (it also goes to the ``datasets``
    metadata), else the name given (``digits``, or the image folder)."""
    return HUB_DATASETS[name].repo_id if name in HUB_DATASETS else name


def main(argv: list[str]) -> dict:
    try:
        model_args, data_args, training_args = parse_arguments(argv)
        train_ds, test_ds, class_names, noise = build_datasets(data_args, model_args, training_args.seed)
    except DataUnavailableError as err:  # unreachable data: one line, what to do
        sys.exit(f"error: {err} (here: --dataset_path DIR)")
    except ValueError as err:  # bad settings
        sys.exit(f"error: {err}")
    if training_args.should_log:
        logging.set_verbosity_info()
    set_seed(training_args.seed)
    model = create_model(
        model_args.model, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
        image_size=model_args.image_size, in_chans=model_args.num_channels,
        **json.loads(model_args.model_args or "{}"),
    )
    trainer = image_classification_trainer(model, training_args, train_ds, test_ds, data_args.dataset)
    return train_evaluate_save(trainer, f"{model_args.model} on {data_args.dataset}", noise)


if __name__ == "__main__":
    main(sys.argv[1:])
