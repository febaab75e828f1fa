"""Batches of image classification examples for the `Trainer`."""

from __future__ import annotations

import torch

from ..columns import NOISE_COLUMN
from .transforms import PIXEL_VALUES


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks examples from `prepare_dataset` into a model batch; every other column is dropped.

    Args:
        examples (`list[dict]`): rows with ``pixel_values`` (a tensor ``[C, H, W]``), ``label`` or ``labels`` and,
            optionally, ``is_noisy``.

    Returns:
        `dict`: ``pixel_values`` (float ``[b, C, H, W]``), ``labels`` (long ``[b]``) and, when the examples have it,
        ``is_noisy`` (bool ``[b]``, read by `RWSAMTrainer` for its diagnostics and never given to the model).
    """
    label_key = "labels" if "labels" in examples[0] else "label"
    batch = {
        PIXEL_VALUES: torch.stack([example[PIXEL_VALUES] for example in examples]),
        "labels": torch.tensor([example[label_key] for example in examples], dtype=torch.long),
    }
    if NOISE_COLUMN in examples[0]:
        batch[NOISE_COLUMN] = torch.tensor([bool(example[NOISE_COLUMN]) for example in examples], dtype=torch.bool)
    return batch
