"""Synthetic and human label noise on a `datasets.Dataset`, and the noise statistics of a noisy dataset.

Noise models: symmetric (uniform over the other classes); asymmetric, i.e. class-dependent (Patrini et al., "Making
Deep Neural Networks Robust to Label Noise: a Loss Correction Approach", CVPR 2017: CIFAR-10's map, and CIFAR-100's
flip to the next class of the same superclass, here with the superclasses of the ``coarse_label`` column); pair flip
(Han et al., "Co-teaching", NeurIPS 2018); and the CIFAR-10N / CIFAR-100N human labels (`cifar_n`).
"""

from __future__ import annotations

import json
import os

import numpy as np
from datasets import ClassLabel, Dataset, Value

from ..columns import CLEAN_LABEL_COLUMN, NOISE_COLUMN
from .cifar_n import HUMAN_NOISE_TYPES, human_noisy_labels

COARSE_LABEL_COLUMN = "coarse_label"

SYNTHETIC_NOISE_TYPES = ("symmetric", "asymmetric", "pairflip")
NOISE_TYPES = SYNTHETIC_NOISE_TYPES + tuple(HUMAN_NOISE_TYPES)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ASYMMETRIC_MAP = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
"""CIFAR-10's standard asymmetric noise (Patrini et al., 2017), by class name; other classes keep their label."""

_RECORD_PREFIX = "hf_rwsam.label_noise: "
"""Marks the line of ``info.description`` that holds the JSON record of the noise applied."""


def add_label_noise(
    dataset: Dataset,
    noise_type: str,
    rate: float | None = None,
    seed: int = 0,
    label_column: str = "label",
    mapping: dict[int, int] | None = None,
    human_labels_path: str | os.PathLike | None = None,
) -> Dataset:
    """Corrupts the labels of a dataset, keeping the original ones.

    Args:
        dataset (`Dataset`): a map-style dataset whose ``label_column`` is a `ClassLabel`.
        noise_type (`str`):
            - ``"symmetric"``: exactly ``round(rate * n)`` samples, chosen uniformly, get a label drawn uniformly from
              the other ``C - 1`` classes;
            - ``"asymmetric"``: each sample of a mapped class moves to its target class with probability ``rate``,
              other classes never change. The map is ``mapping`` if given, else CIFAR-10's (`CIFAR10_ASYMMETRIC_MAP`,
              by class name) when the classes are CIFAR-10's, else, when the dataset has a ``coarse_label`` column
              (CIFAR-100), the next fine class of the same superclass (fine classes by index, cyclic);
            - ``"pairflip"``: class ``c`` moves to ``(c + 1) mod C`` with probability ``rate``;
            - ``"cifar10n-aggre"``, ``"cifar10n-worst"``, ``"cifar10n-random1"`` / ``2`` / ``3``, ``"cifar100n"``: the
              CIFAR-N human labels (`HUMAN_NOISE_TYPES`); the dataset must be the full CIFAR training split in order.
        rate (`float`, *optional*): the noise rate in [0, 1]; required for the synthetic types, `None` for CIFAR-N
            (its rate is the file's).
        seed (`int`, *optional*, defaults to 0): seeds the synthetic noise; same seed, same labels.
        label_column (`str`, *optional*, defaults to ``"label"``): the column to corrupt.
        mapping (`dict[int, int]`, *optional*): clean class index -> noisy class index, for ``"asymmetric"``.
        human_labels_path (`str` or `os.PathLike`, *optional*): the CIFAR-N label file (``CIFAR-10_human.pt`` or
            ``CIFAR-100_human.pt``); without it, it is downloaded (needs network).

    Returns:
        `Dataset`: ``label_column`` holds the training (possibly corrupted) labels, ``clean_label`` the original ones
        and ``is_noisy`` whether they differ; the noise type and rate are recorded in ``info.description`` (see
        `label_noise_info`).
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"add_label_noise needs a map-style datasets.Dataset, got {type(dataset).__name__}.")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"add_label_noise: unknown noise_type={noise_type!r}; expected one of {NOISE_TYPES}.")
    class_label = dataset.features.get(label_column)
    if not isinstance(class_label, ClassLabel):
        raise ValueError(f"add_label_noise: column {label_column!r} must be a ClassLabel, got {class_label!r}.")
    present = {CLEAN_LABEL_COLUMN, NOISE_COLUMN} & set(dataset.column_names)
    if present:
        raise ValueError(f"add_label_noise: the dataset already has label noise (columns {sorted(present)}).")
    if mapping is not None and noise_type != "asymmetric":
        raise ValueError(f"add_label_noise: `mapping` is for noise_type='asymmetric', not {noise_type!r}.")
    clean = _column(dataset, label_column)

    if noise_type in HUMAN_NOISE_TYPES:
        if rate is not None:
            raise ValueError(f"add_label_noise: rate={rate} is set by the human labels of {noise_type!r}; pass None.")
        noisy = human_noisy_labels(noise_type, clean, human_labels_path)
        rate = float(np.mean(noisy != clean))
    else:
        if rate is None or not 0 <= rate <= 1:
            raise ValueError(f"add_label_noise: rate={rate} must be in [0, 1] for noise_type={noise_type!r}.")
        if class_label.num_classes < 2:
            raise ValueError(f"add_label_noise: label noise needs at least 2 classes, got {class_label.num_classes}.")
        rng = np.random.default_rng(seed)
        if noise_type == "symmetric":
            noisy = _symmetric(clean, class_label.num_classes, rate, rng)
        else:
            target = _target_classes(dataset, noise_type, class_label, clean, mapping)
            flip = (rng.random(len(clean)) < rate) & (target[clean] != clean)
            noisy = np.where(flip, target[clean], clean)

    noisy_dataset = (
        dataset.rename_column(label_column, CLEAN_LABEL_COLUMN)
        .add_column(label_column, noisy, feature=class_label)
        .add_column(NOISE_COLUMN, noisy != clean, feature=Value("bool"))
    )
    record = {"noise_type": noise_type, "rate": rate, "label_column": label_column}
    noisy_dataset.info.description = f"{dataset.info.description or ''}\n{_RECORD_PREFIX}{json.dumps(record)}".lstrip()
    return noisy_dataset


def label_noise_info(dataset) -> dict | None:
    """The label noise of a dataset made by `add_label_noise` (also after ``select``, ``shuffle``, ``with_transform``,
    ``save_to_disk``, which keep its ``info``).

    Args:
        dataset (`Dataset`): any dataset.

    Returns:
        `dict` or `None`: `None` for a dataset without recorded noise, else ``noise_type``, ``rate`` (nominal),
        ``realized_rate`` (fraction of rows whose training label differs from ``clean_label``), ``num_classes`` ``C``
        and ``transition_matrix``: ``C`` lists of ``C`` floats, row ``i`` the distribution of the training label over
        the rows of clean class ``i`` (a row of zeros for a class without rows).
    """
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    records = [line[len(_RECORD_PREFIX) :] for line in description.splitlines() if line.startswith(_RECORD_PREFIX)]
    if not records:
        return None
    record = json.loads(records[-1])
    label_column = record["label_column"]
    if not isinstance(dataset, Dataset) or not {label_column, CLEAN_LABEL_COLUMN} <= set(dataset.column_names):
        raise ValueError(
            f"label_noise_info needs the map-style dataset with its {label_column!r} and {CLEAN_LABEL_COLUMN!r} "
            "columns, as returned by add_label_noise (call it before removing columns or streaming)."
        )
    labels, clean = _column(dataset, label_column), _column(dataset, CLEAN_LABEL_COLUMN)
    num_classes = dataset.features[CLEAN_LABEL_COLUMN].num_classes
    counts = np.bincount(clean * num_classes + labels, minlength=num_classes**2).reshape(num_classes, num_classes)
    transition = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return {
        "noise_type": record["noise_type"],
        "rate": record["rate"],
        "realized_rate": float(np.mean(labels != clean)),
        "transition_matrix": transition.tolist(),
        "num_classes": num_classes,
    }


def _symmetric(clean: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    noisy = clean.copy()
    flipped = rng.choice(len(clean), size=round(rate * len(clean)), replace=False)
    noisy[flipped] = (clean[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return noisy


def _target_classes(dataset, noise_type, class_label, clean, mapping) -> np.ndarray:
    """``target[c]``: the class that class ``c`` flips to (``c`` itself for a class that never flips)."""
    num_classes = class_label.num_classes
    target = np.arange(num_classes)
    if noise_type == "pairflip":
        return (target + 1) % num_classes
    if mapping is not None:
        for source, destination in mapping.items():
            if not (0 <= source < num_classes and 0 <= destination < num_classes):
                raise ValueError(f"add_label_noise: mapping {source} -> {destination} is outside 0..{num_classes - 1}.")
            target[source] = destination
    elif set(class_label.names) == set(CIFAR10_CLASSES):
        for source, destination in CIFAR10_ASYMMETRIC_MAP.items():
            target[class_label.str2int(source)] = class_label.str2int(destination)
    elif COARSE_LABEL_COLUMN in dataset.column_names:
        pairs = np.unique(np.stack([clean, _column(dataset, COARSE_LABEL_COLUMN)], axis=1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            raise ValueError(f"add_label_noise: a class of {COARSE_LABEL_COLUMN!r} superclasses is in several of them.")
        for superclass in np.unique(pairs[:, 1]):
            members = pairs[pairs[:, 1] == superclass, 0]  # ascending: np.unique sorts the (fine, coarse) rows
            target[members] = np.roll(members, -1)
    else:
        raise ValueError(
            "add_label_noise: noise_type='asymmetric' has a standard class map only for CIFAR-10 (its class names) "
            f"and CIFAR-100 (a {COARSE_LABEL_COLUMN!r} column); for other classes pass "
            "mapping={clean_class_index: noisy_class_index}."
        )
    return target


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """One column as an int64 array, read without the dataset's transform or other columns."""
    return np.asarray(dataset.with_format("numpy", columns=[name])[:][name], dtype=np.int64)
