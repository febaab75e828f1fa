"""`ExampleIndexed`: a map-style dataset whose rows also carry their position in it, so that per-example records
(`hf_rwsam.label_issues`) find their example again after the sampler's shuffling, the Trainer's column removal and
the collator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..columns import INDEX_COLUMN


class ExampleIndexed(torch.utils.data.Dataset):
    """`dataset` with one more column, ``example_index``: row ``i`` is ``{**dataset[i], "example_index": i}``.

    The rows are fetched as `dataset` fetches them (its ``__getitems__`` for a batch when it has one, as a
    `datasets.Dataset` does), so its transforms see the same rows in the same order, random augmentation included.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) whose rows are mappings (dicts).
    """

    def __init__(self, dataset):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"Indexing the examples needs a map-style training set (with __len__ and __getitem__: an example's "
                f"position in it is its index), got {type(dataset).__name__}."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _with_index(self.dataset[index], index)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [_with_index(row, i) for row, i in zip(rows, indices)]


def _with_index(row, index: int) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"Indexing the examples needs rows that are mappings (dicts), got {type(row).__name__}.")
    if INDEX_COLUMN in row:
        raise ValueError(
            f"The training set has a column {INDEX_COLUMN!r}, the name the example index is carried under; rename it."
        )
    return {**row, INDEX_COLUMN: int(index)}
