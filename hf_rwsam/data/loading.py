"""Image classification datasets as `datasets` objects with an ``img`` (Image) and a ``label`` (ClassLabel) column."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDatasetDict,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DatasetNotFoundError

IMAGE_COLUMN = "img"
LABEL_COLUMN = "label"

DIGITS_TEST_SIZE = 0.2
DIGITS_SPLIT_SEED = 0


class DataUnavailableError(RuntimeError):
    """A dataset or label file could not be read locally nor fetched (offline, unreachable, gated)."""


@dataclass(frozen=True)
class HubDataset:
    """A Hub dataset and the column renames that bring it to the ``img`` / ``label`` schema."""

    repo_id: str
    renames: dict[str, str] = field(default_factory=dict)


HUB_DATASETS = {
    "cifar10": HubDataset("uoft-cs/cifar10"),
    "cifar100": HubDataset("uoft-cs/cifar100", {"fine_label": LABEL_COLUMN}),
    "imagenet-1k": HubDataset("ILSVRC/imagenet-1k", {"image": IMAGE_COLUMN}),
}
"""The datasets known by name; CIFAR-100 keeps its ``coarse_label`` column (used by asymmetric label noise)."""

FOLDER_RENAMES = {"image": IMAGE_COLUMN}
"""Renames for a local directory given as ``name`` (the ``imagefolder`` builder names its column ``image``)."""


def load_image_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    **load_kwargs,
) -> DatasetDict | IterableDatasetDict:
    """Loads an image classification dataset with an ``img`` (`datasets.Image`) and a ``label`` (`datasets.ClassLabel`)
    column in every split.

    Args:
        name (`str`):
            ``"digits"`` (scikit-learn's 1797 8x8 digit images, offline; stratified 80/20 train/test split, always
            the same), ``"cifar10"`` (Hub ``uoft-cs/cifar10``), ``"cifar100"`` (``uoft-cs/cifar100``: ``fine_label``
            becomes ``label``, ``coarse_label`` is kept), ``"imagenet-1k"`` (``ILSVRC/imagenet-1k``, gated: ``image``
            becomes ``img``), or a local directory: an image folder (one sub-directory per class, see `datasets`'
            ``imagefolder``) or a dataset already in this schema.
        path (`str` or `os.PathLike`, *optional*):
            A local copy of the named Hub dataset, in its own schema, used instead of the Hub: a directory written by
            `DatasetDict.save_to_disk`, or a directory with the repository's parquet files (e.g. from
            ``hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR``).
        streaming (`bool`, *optional*, defaults to `False`):
            Return an `IterableDatasetDict` that reads the data as it iterates (meant for ImageNet).
        cache_dir (`str`, *optional*):
            Where `datasets.load_dataset` caches the prepared data (default: ``HF_DATASETS_CACHE``).
        load_kwargs:
            Passed on to `datasets.load_dataset` (``revision``, ``token``, ``num_proc``, ...).

    Returns:
        `DatasetDict` (or `IterableDatasetDict` when ``streaming``): the dataset's splits.

    Raises:
        `DataUnavailableError`: the Hub dataset cannot be reached (offline, no network, gated without a token) and
            is not in the local cache; the message says how to provide it.
        `ValueError`: an unknown name, a ``path`` that is not a directory, or data without the expected columns.
    """
    if name == "digits":
        if path is not None:
            raise ValueError("load_image_dataset: 'digits' ships with scikit-learn and takes no `path`.")
        dataset = digits_dataset()
    elif name in HUB_DATASETS:
        spec = HUB_DATASETS[name]
        if path is None:
            dataset = _load_from_hub(spec.repo_id, name, streaming, cache_dir, load_kwargs)
        elif os.path.isdir(path):
            dataset = _load_local(os.fspath(path), streaming, cache_dir, load_kwargs)
        else:
            raise ValueError(f"load_image_dataset: path={str(path)!r} for {name!r} is not a directory.")
        dataset = _rename(dataset, spec.renames)
    elif os.path.isdir(name):
        dataset = _rename(_load_local(name, streaming, cache_dir, load_kwargs), FOLDER_RENAMES)
    else:
        raise ValueError(
            f"load_image_dataset: unknown dataset {name!r}; expected 'digits', {', '.join(map(repr, HUB_DATASETS))} "
            "or an existing local directory."
        )
    if streaming and isinstance(dataset, DatasetDict):
        dataset = IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in dataset.items()})
    _check_schema(dataset, name)
    return dataset


def digits_dataset() -> DatasetDict:
    """scikit-learn's digits (UCI optical recognition of handwritten digits) as 8x8 grayscale images.

    The values 0..16 become 8-bit gray levels (``round(v * 255 / 16)``); the train/test split is stratified 80/20 with
    a fixed seed, so every call returns the same splits.

    Returns:
        `DatasetDict`: ``train`` (1437 images) and ``test`` (360 images), classes ``"0"`` .. ``"9"``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    features = Features({IMAGE_COLUMN: Image(), LABEL_COLUMN: ClassLabel(names=[str(d) for d in range(10)])})
    splits = train_test_split(
        np.arange(len(digits.target)),
        test_size=DIGITS_TEST_SIZE,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {IMAGE_COLUMN: list(pixels[rows]), LABEL_COLUMN: digits.target[rows].tolist()}, features=features
            )
            for split, rows in zip(("train", "test"), splits)
        }
    )


def _load_local(directory, streaming, cache_dir, load_kwargs):
    """`load_from_disk` for a `DatasetDict.save_to_disk` directory, `load_dataset` for data files (parquet, images)."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        return load_from_disk(directory)
    return load_dataset(directory, streaming=streaming, cache_dir=cache_dir, **load_kwargs)


def _load_from_hub(repo_id, name, streaming, cache_dir, load_kwargs):
    """`load_dataset` from the Hub (or its local cache), with an actionable error when the Hub cannot be reached."""
    try:
        return load_dataset(repo_id, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    except (ConnectionError, DatasetNotFoundError) as err:
        raise DataUnavailableError(
            f"Could not load the dataset {name!r} (Hub dataset {repo_id!r}): {err}. With network access, allow "
            "downloads (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE or set them to 0; log in for gated datasets). "
            f"Without it, download the dataset elsewhere (`hf download {repo_id} --repo-type dataset --local-dir DIR`, "
            f"or `datasets.load_dataset({repo_id!r}).save_to_disk(DIR)`) and pass the copy: "
            f"load_image_dataset({name!r}, path=DIR)."
        ) from err


def _rename(dataset, renames):
    """Applies the renames whose source column exists and whose target does not."""
    columns = next(iter(dataset.values())).column_names or []
    return dataset.rename_columns({old: new for old, new in renames.items() if old in columns and new not in columns})


def _check_schema(dataset, name):
    for split, ds in dataset.items():
        features = ds.features or {}
        if not isinstance(features.get(IMAGE_COLUMN), Image) or not isinstance(features.get(LABEL_COLUMN), ClassLabel):
            raise ValueError(
                f"load_image_dataset({name!r}): split {split!r} needs an {IMAGE_COLUMN!r} Image column and a "
                f"{LABEL_COLUMN!r} ClassLabel column; it has {dict(features)}."
            )
