#!/usr/bin/env python
"""Fine-tune a pretrained Vision Transformer from the Hub with SAM / ASAM / m-SAM / RW-SAM, as in the RW-SAM paper's
ViT experiments: CIFAR-10 / CIFAR-100 upscaled to the model's input size (224 for ViT-B/16), optionally under label
noise.

    accelerate launch examples/finetune_vit.py --dataset cifar10 \\
        --model_name_or_path timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --sam_mode rwsam --sam_rho 0.05 \\
        --learning_rate 0.01 --optim sgd --optim_args momentum=0.9 --lr_scheduler_type cosine --warmup_ratio 0.05 \\
        --num_train_epochs 10 --per_device_train_batch_size 128 --eval_strategy epoch --output_dir out/vit-c10-rwsam

The model is loaded with `AutoModelForImageClassification` (a timm checkpoint becomes a
`TimmWrapperForImageClassification`; a transformers one, e.g. `google/vit-base-patch16-224`, works too) and its
classifier is replaced by a new one for the dataset's classes. Images get the dataset's augmentation (CIFAR: resize to
the model's input size, random crop with padding, horizontal flip) and the model's own normalisation (mean / std of its
timm `pretrained_cfg`; the dataset's when the checkpoint has none). The data arguments, the JSON/YAML settings file and
the outputs (model, model card, `*_results.json`, training-curve plot) are those of `train_image_classification.py`.
Offline, pass a local copy of the checkpoint (`hf download MODEL --local-dir DIR`, then `--model_name_or_path DIR`)
and of the dataset (`--dataset_path`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from torchvision import transforms
from transformers import AutoConfig, AutoModelForImageClassification, set_seed
from transformers.utils import logging

from hf_rwsam import RWSAMConfig
from hf_rwsam.data import DataUnavailableError, image_transforms
from hf_rwsam.data.transforms import PixelValues
from train_image_classification import (
    base_model_card,
    DataArguments,
    ModelArguments,
    build_datasets,
    image_classification_trainer,
    parse_arguments,
    train_evaluate_save,
)

DEFAULT_MODEL = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


@dataclass
class ViTArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A Hub model id or a local directory: a timm checkpoint (timm/...) or a transformers image "
                  "classifier."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input side; default: the model's (its timm pretrained_cfg input_size, or "
                  "config.image_size). ViTs take only the size they were trained at."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache the downloaded checkpoint."})
    revision: str = field(default="main", metadata={"help": "The checkpoint's branch, tag or commit."})


class ModelUnavailableError(RuntimeError):
    """The checkpoint could not be read locally nor fetched from the Hub."""


def load_pretrained(auto_class, name: str, **kwargs):
    """``auto_class.from_pretrained(name, **kwargs)`` (a config or a tokenizer: the cheap part of a checkpoint, loaded
    first to fail early), or `ModelUnavailableError` saying how to provide it when it is neither local nor reachable."""
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelUnavailableError(
            f"Could not load {name!r}: {reason} With network access, allow downloads (unset HF_HUB_OFFLINE or set it "
            f"to 0). Without it, download the checkpoint elsewhere (`hf download {name} --local-dir DIR`) and pass "
            "--model_name_or_path DIR."
        ) from err


def preprocessing(config, image_size: int | None) -> tuple[int, tuple[float, ...] | None, tuple[float, ...] | None]:
    """The model's input side and normalisation: from a timm `pretrained_cfg`, else `config.image_size` and None."""
    data_config = getattr(config, "pretrained_cfg", None) or {}
    if image_size is None and "input_size" in data_config:
        image_size = data_config["input_size"][-1]
    elif image_size is None:
        image_size = getattr(config, "image_size", None)
    if image_size is None:
        raise ValueError(f"The model {config.name_or_path!r} does not record its input size; pass --image_size.")
    if data_config.get("fixed_input_size") and image_size != data_config["input_size"][-1]:
        raise ValueError(
            f"--image_size {image_size}: the model {config.name_or_path!r} takes only {data_config['input_size'][-1]}."
        )
    mean, std = data_config.get("mean"), data_config.get("std")
    return int(image_size), (tuple(mean) if mean else None), (tuple(std) if std else None)


def with_model_normalization(dataset, dataset_name: str, train: bool, image_size: int, mean, std):
    """`prepare_dataset`'s transform for `dataset_name`, normalised with the model's mean / std instead."""
    steps = image_transforms(dataset_name, train, image_size, num_channels=3).transforms
    if not isinstance(steps[-1], transforms.Normalize):  # the recipe ends with ToTensor, Normalize
        raise TypeError(f"Expected the image transform of {dataset_name!r} to end with Normalize, got {steps[-1]}.")
    return dataset.with_transform(PixelValues(transforms.Compose([*steps[:-1], transforms.Normalize(mean, std)])))


def main(argv: list[str]) -> dict:
    try:
        vit_args, data_args, training_args = parse_arguments(argv, (ViTArguments, DataArguments, RWSAMConfig))
        config = load_pretrained(
            AutoConfig, vit_args.model_name_or_path, cache_dir=vit_args.cache_dir, revision=vit_args.revision
        )
        image_size, mean, std = preprocessing(config, vit_args.image_size)
        train_ds, test_ds, class_names, noise = build_datasets(
            data_args, ModelArguments(image_size=image_size, num_channels=3), training_args.seed
        )
    except (DataUnavailableError, ModelUnavailableError, ValueError) as err:  # one line, saying what to do
        flag = " (here: --dataset_path DIR)" if isinstance(err, DataUnavailableError) else ""
        sys.exit(f"error: {err}{flag}")
    if mean is not None and std is not None:
        train_ds = with_model_normalization(train_ds, data_args.dataset, True, image_size, mean, std)
        test_ds = with_model_normalization(test_ds, data_args.dataset, False, image_size, mean, std)
    if training_args.should_log:
        logging.set_verbosity_info()
    set_seed(training_args.seed)
    model = AutoModelForImageClassification.from_pretrained(
        vit_args.model_name_or_path,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        ignore_mismatched_sizes=True,  # the checkpoint's classifier (ImageNet's 1000 classes) is replaced
        cache_dir=vit_args.cache_dir,
        revision=vit_args.revision,
    )
    trainer = image_classification_trainer(model, training_args, train_ds, test_ds, data_args.dataset)
    base_model = vit_args.model_name_or_path
    subject = f"{os.path.basename(base_model.rstrip('/'))} on {data_args.dataset}"
    return train_evaluate_save(trainer, subject, noise, **base_model_card(base_model))


if __name__ == "__main__":
    main(sys.argv[1:])
