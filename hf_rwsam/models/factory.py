"""`create_model`: a timm architecture as a transformers image classifier, built offline and randomly initialised."""

from __future__ import annotations

from typing import Any

import timm
import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.utils import logging

logger = logging.get_logger(__name__)

# the parts of timm's pretrained_cfg that `TimmWrapperImageProcessor` builds its transforms from
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def create_model(
    name: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    label2id: dict[str, int] | None = None,
    image_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    **model_args: Any,
) -> TimmWrapperForImageClassification:
    """Build a timm architecture as a transformers [`TimmWrapperForImageClassification`], without pretrained weights.

    The model saves with `save_pretrained`, pushes with `push_to_hub` and loads back with
    `AutoModelForImageClassification.from_pretrained`, where the architectures of `hf_rwsam.models` need
    `import hf_rwsam` first (it registers them in timm). Its weights keep the architecture's own (timm's)
    initialisation, not the generic one transformers gives new models. `config.problem_type` is left None: the loss,
    like `RWSAMTrainer`'s per-sample losses, then follows the labels (integer class indices: cross-entropy).

    Args:
        name (`str`):
            A timm architecture: `cifar_resnet18`, `cifar_wrn28_10`, `cifar_pyramidnet110_a270`, `small_cnn` or any
            of timm's own (e.g. "resnet18").
        num_labels (`int`):
            The number of classes.
        id2label (`dict[int, str]`, *optional*):
            Class names for the ids 0 to num_labels - 1, distinct; from `label2id`, else "LABEL_{i}", by default.
        label2id (`dict[str, int]`, *optional*):
            The inverse of `id2label`, checked against it (transformers saves timm models' labels as one name list).
        image_size (`int` or `tuple[int, int]`, *optional*):
            The input resolution (height, width) recorded in `config.pretrained_cfg`, whence `AutoImageProcessor`
            builds its transforms; the architecture's default (32 for the CIFAR models) if None. The convolutional
            networks take any size; models with a fixed one (ViTs) take `img_size` in `model_args`.
        in_chans (`int`, *optional*, defaults to 3):
            The input channels (1 for grayscale).
        **model_args:
            More arguments of `timm.create_model` (`drop_rate`, `depth`, ...), saved in `config.model_args`.

    Returns:
        [`TimmWrapperForImageClassification`]: the model, in training mode.
    """
    if not timm.is_model(name):
        raise ValueError(f"`name` must be a timm architecture (see `timm.list_models()`), got {name!r}.")
    if id2label is None:
        default = {i: f"LABEL_{i}" for i in range(num_labels)}
        id2label = {i: label for label, i in label2id.items()} if label2id else default
    id2label = {int(i): label for i, label in id2label.items()}
    if sorted(id2label) != list(range(num_labels)) or len(set(id2label.values())) != num_labels:
        raise ValueError(
            f"`id2label` must name the ids 0 to {num_labels - 1} (num_labels={num_labels}) with distinct names, got "
            f"{id2label}."
        )
    id2label = dict(sorted(id2label.items()))
    inverse = {label: i for i, label in id2label.items()}
    if label2id is not None and {label: int(i) for label, i in label2id.items()} != inverse:
        raise ValueError(f"`label2id` must be the inverse of `id2label` ({inverse}), got {label2id}.")

    model_args = {"in_chans": in_chans, **model_args}
    config = TimmWrapperConfig(
        architecture=name, num_labels=num_labels, id2label=id2label, label2id=inverse, model_args=model_args
    )
    # transformers would re-draw every weight of a new model from N(0, initializer_range): build the wrapper on the meta
    # device (no initialisation), then put in the timm model built the way `TimmWrapperForImageClassification` does
    with torch.device("meta"):
        model = TimmWrapperForImageClassification(config)
    model.timm_model = timm.create_model(name, pretrained=False, num_classes=num_labels, **model_args)
    config.pretrained_cfg = _data_config(model.timm_model.pretrained_cfg, in_chans, image_size)
    logger.info(f"Created {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters.")
    return model


def _data_config(pretrained_cfg: dict, in_chans: int, image_size: int | tuple[int, int] | None) -> dict:
    """The preprocessing part of timm's `pretrained_cfg`, for `in_chans` channels at `image_size`."""
    data_config = {key: pretrained_cfg[key] for key in _DATA_CONFIG_KEYS if pretrained_cfg.get(key) is not None}
    if image_size is None:
        image_size = data_config["input_size"][1:]
    elif isinstance(image_size, int):
        image_size = (image_size, image_size)
    data_config["input_size"] = (in_chans, *image_size)
    for key in ("mean", "std"):
        if len(data_config[key]) != in_chans:  # e.g. grayscale inputs to an RGB config: the channel average
            data_config[key] = (sum(data_config[key]) / len(data_config[key]),) * in_chans
    return data_config
