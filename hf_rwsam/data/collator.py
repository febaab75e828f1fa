"""Batches of image classification examples for the `Trainer`."""

from __future__ import annotations

import torch

from ..columns import INDEX_COLUMN, NOISE_COLUMN
from .transforms import PIXEL_VALUES


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks examples from `prepare_dataset` into a model batch; every other column is dropped.

    Args:
        examples (`list[dict]`): rows with ``pixel_values`` (a tensor ``[C, H, W]``), ``label`` or ``labels`` and,
            optionally, ``is_noisy`` and ``example_index``.

    Returns:
        `dict`: ``pixel_values`` (float ``[b, C, H, W]``), ``labels`` (long ``[b]``) and, when the examples have it,
        ``is_noisy`` (bool ``[b]``, read by `RWSAMTrainer` for its diagnostics) and ``example_index`` (long ``[b]``,
        the examples' positions in the training set, for its label-issue report); neither is given to the model.
    """
    label_key = "labels" if "labels" in examples[0] else "label"
    batch = {
        PIXEL_VALUES: torch.stack([example[PIXEL_VALUES] for example in examples]),
        "labels": torch.tensor([example[label_key] for example in examples], dtype=torch.long),
    }
    if NOISE_COLUMN in examples[0]:
        batch[NOISE_COLUMN] = torch.tensor([bool(example[NOISE_COLUMN]) for example in examples], dtype=torch.bool)
    if INDEX_COLUMN in examples[0]:
        batch[INDEX_COLUMN] = torch.tensor([int(example[INDEX_COLUMN]) for example in examples], dtype=torch.long)
    return batch
