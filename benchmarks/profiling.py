"""How launch-heavy a training step is: the ATen operators it dispatches, counted on any device (the CPU included).

On a GPU, small and mid-sized models are launch-bound: a step's cost follows the number of kernels it launches more
than their arithmetic. Every ATen operator that reaches the dispatcher is (at most) one kernel launch, so counting them
on the CPU measures what a GPU would pay, without a GPU. View and metadata operators count too (they launch nothing);
the breakdown tells them apart.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block, by name (``aten.add_.Tensor``...).

    Usage::

        with AtenOpCounter() as ops:
            step()
        ops.total, ops.counts.most_common(10)
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__) + "." + func._overloadname] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_aten_ops(fn: Callable[[], Any]) -> AtenOpCounter:
    """Runs `fn` once and returns the ATen operators it dispatched."""
    with AtenOpCounter() as counter:
        fn()
    return counter
