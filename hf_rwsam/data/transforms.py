"""The standard train / eval image transforms of each dataset, applied lazily to produce ``pixel_values``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

from datasets import Dataset, IterableDataset
from PIL import Image
from torchvision import transforms
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .loading import IMAGE_COLUMN

PIXEL_VALUES = "pixel_values"

# Per-channel mean / std over all pixels of the 50,000 training images, in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Gray-level mean / std of the 1797 8-bit digits images of `load_image_dataset("digits")`.
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)

IMAGENET_CROP_RATIO = 0.875
"""Eval: resize the short side to ``image_size / 0.875`` (256 for 224), then center-crop ``image_size``."""


@dataclass(frozen=True)
class ImageRecipe:
    """How a dataset's images are augmented and normalised.

    ``imagenet_crops``: RandomResizedCrop / Resize + CenterCrop (ImageNet); otherwise (small images) a resize to
    ``image_size`` when it differs from ``native_size``, then, for training, RandomCrop with ``image_size // 8`` padding
    (4 pixels at 32) and a horizontal flip if ``flip``.
    """

    default_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: int | None = None
    flip: bool = True
    imagenet_crops: bool = False


RECIPES = {
    "cifar10": ImageRecipe(32, CIFAR10_MEAN, CIFAR10_STD, native_size=32),
    "cifar100": ImageRecipe(32, CIFAR100_MEAN, CIFAR100_STD, native_size=32),
    "digits": ImageRecipe(32, DIGITS_MEAN, DIGITS_STD, native_size=8, flip=False),
    "imagenet-1k": ImageRecipe(224, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), imagenet_crops=True),
}
"""Recipes by dataset name; an image folder (a directory) uses ImageNet's."""


def image_transforms(
    dataset_name: str, train: bool, image_size: int | None = None, num_channels: int = 3
) -> transforms.Compose:
    """The transform from a PIL image to a normalised float tensor ``[num_channels, image_size, image_size]``.

    CIFAR: (train) RandomCrop(32, padding=4), RandomHorizontalFlip; ImageNet and image folders: (train)
    RandomResizedCrop(224), RandomHorizontalFlip, (eval) Resize(256), CenterCrop(224); digits: Resize(image_size),
    (train) RandomCrop(image_size, padding=image_size // 8), no flip. Then ToTensor and Normalize with the dataset's
    mean / std.

    Args:
        dataset_name (`str`): ``"cifar10"``, ``"cifar100"``, ``"digits"``, ``"imagenet-1k"`` or an image folder path.
        train (`bool`): training augmentation, or the deterministic eval transform.
        image_size (`int`, *optional*): the output side (default: 32 for CIFAR and digits, 224 for ImageNet).
        num_channels (`int`, *optional*, defaults to 3): 3, or 1 for grayscale data (digits, replicated to 3 when 3).

    Returns:
        `torchvision.transforms.Compose`.
    """
    recipe = _recipe(dataset_name)
    size = image_size or recipe.default_size
    grayscale = len(recipe.mean) == 1
    if num_channels not in ((1, 3) if grayscale else (3,)):
        raise ValueError(f"image_transforms: num_channels={num_channels} is not supported for {dataset_name!r}.")
    steps = [transforms.Grayscale(num_channels) if grayscale else partial(Image.Image.convert, mode="RGB")]
    if recipe.imagenet_crops:
        if train:
            steps += [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        else:
            steps += [transforms.Resize(round(size / IMAGENET_CROP_RATIO)), transforms.CenterCrop(size)]
    else:
        if size != recipe.native_size:
            steps.append(transforms.Resize((size, size)))
        if train:
            steps.append(transforms.RandomCrop(size, padding=size // 8))
            if recipe.flip:
                steps.append(transforms.RandomHorizontalFlip())
    channels = num_channels if grayscale else 1
    steps += [transforms.ToTensor(), transforms.Normalize(recipe.mean * channels, recipe.std * channels)]
    return transforms.Compose(steps)


class PixelValues:
    """Batch transform: the images of the ``pixel_values`` column become tensors, other columns pass unchanged."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        return {**batch, PIXEL_VALUES: [self.transform(image) for image in batch[PIXEL_VALUES]]}


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    dataset_name: str,
    train: bool,
    image_size: int | None = None,
    num_channels: int = 3,
) -> Dataset | IterableDataset:
    """Renames ``img`` to ``pixel_values`` and transforms the images on access (`image_transforms`).

    The column keeps a name the model's ``forward`` accepts, so the `Trainer` keeps it with
    ``remove_unused_columns=True``; ``label`` and ``is_noisy`` are returned unchanged (see `collate_images`).

    Args:
        dataset (`Dataset` or `IterableDataset`): one split with an ``img`` column; a `Dataset` gets
            `Dataset.with_transform`, an `IterableDataset` a lazy batched `IterableDataset.map`.
        dataset_name, train, image_size, num_channels: as for `image_transforms`.

    Returns:
        The dataset, whose rows have ``pixel_values`` as a float tensor.
    """
    transform = PixelValues(image_transforms(dataset_name, train, image_size, num_channels))
    dataset = dataset.rename_column(IMAGE_COLUMN, PIXEL_VALUES)
    if isinstance(dataset, IterableDataset):
        return dataset.map(transform, batched=True)
    return dataset.with_transform(transform)


def _recipe(dataset_name: str) -> ImageRecipe:
    if dataset_name in RECIPES:
        return RECIPES[dataset_name]
    if os.path.isdir(dataset_name):
        return RECIPES["imagenet-1k"]
    raise ValueError(
        f"Unknown dataset {dataset_name!r} for image transforms: expected one of {list(RECIPES)} or a directory."
    )
