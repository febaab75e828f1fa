"""CIFAR-10N / CIFAR-100N: real human label noise on the CIFAR training sets.

Reference: Wei et al., "Learning with Noisy Labels Revisited: A Study Using Real-World Human Annotations", ICLR 2022;
label files from https://github.com/UCSC-REAL/cifar-10-100n (``data/CIFAR-10_human.pt``, ``data/CIFAR-100_human.pt``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from datasets import DownloadManager

from .loading import DataUnavailableError

HUMAN_LABELS_URL = "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/{file_name}"

HUMAN_NOISE_TYPES = {
    "cifar10n-aggre": ("CIFAR-10_human.pt", "aggre_label"),
    "cifar10n-worst": ("CIFAR-10_human.pt", "worse_label"),
    "cifar10n-random1": ("CIFAR-10_human.pt", "random_label1"),
    "cifar10n-random2": ("CIFAR-10_human.pt", "random_label2"),
    "cifar10n-random3": ("CIFAR-10_human.pt", "random_label3"),
    "cifar100n": ("CIFAR-100_human.pt", "noisy_label"),
}
"""noise_type -> (label file, key of its noisy labels); every file also holds the original labels as ``clean_label``."""

# The label files are torch-saved dicts of integer numpy arrays: the globals they need (numpy 1 and 2 names), allowed
# for a weights-only load.
_NUMPY_GLOBALS = [
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    *(type(np.dtype(kind + str(bits))) for kind in "iu" for bits in (1, 2, 4, 8)),
]


def human_noisy_labels(noise_type: str, clean_labels: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
    """The human labels of ``noise_type`` for a CIFAR training split.

    Args:
        noise_type (`str`): a key of `HUMAN_NOISE_TYPES`.
        clean_labels (`np.ndarray`): the split's labels, in the order of the full training split.
        path (`str` or `os.PathLike`, *optional*):
            The official label file; without it, it is downloaded once into the `datasets` cache (needs network).

    Returns:
        `np.ndarray` of int64: the human labels, aligned with ``clean_labels``.

    Raises:
        `DataUnavailableError`: no ``path`` and the file cannot be downloaded.
        `ValueError`: the file's ``clean_label`` differs from ``clean_labels`` (another dataset, or a subset or
            reordering of the training split), or it lacks the key of ``noise_type``.
    """
    file_name, key = HUMAN_NOISE_TYPES[noise_type]
    path = os.fspath(path) if path is not None else _download(file_name, noise_type)
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        contents = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"clean_label", key} - set(contents)
    if missing:
        raise ValueError(
            f"{path} has no {sorted(missing)} entry (keys: {sorted(contents)}); {noise_type!r} needs {file_name}."
        )
    file_clean = np.asarray(contents["clean_label"]).astype(np.int64)
    if file_clean.shape != clean_labels.shape or (file_clean != clean_labels).any():
        detail = (
            f"{len(file_clean)} labels in the file, {len(clean_labels)} in the dataset"
            if file_clean.shape != clean_labels.shape
            else f"{int((file_clean != clean_labels).sum())} of {len(file_clean)} labels differ"
        )
        raise ValueError(
            f"The clean labels in {path} do not match the dataset's labels ({detail}). {noise_type!r} needs the full "
            "CIFAR training split in its original order: apply add_label_noise to "
            "load_image_dataset(...)['train'] before any select, shuffle or split."
        )
    return np.asarray(contents[key]).astype(np.int64)


def _download(file_name: str, noise_type: str) -> str:
    url = HUMAN_LABELS_URL.format(file_name=file_name)
    try:
        return DownloadManager().download(url)
    except OSError as err:  # ConnectionError (offline, unreachable), FileNotFoundError (moved)
        raise DataUnavailableError(
            f"Could not download {url} for noise_type={noise_type!r} ({err}). Download {file_name} from "
            "https://github.com/UCSC-REAL/cifar-10-100n (folder data/) and pass its path: "
            f"add_label_noise(..., noise_type={noise_type!r}, human_labels_path='.../{file_name}'), or allow network "
            "access (HF_DATASETS_OFFLINE=0)."
        ) from err
