"""Model state that the extra passes of a SAM step must not disturb: BatchNorm running statistics and the RNG, and
the rule by which every temporary change of the step is undone (`restored`).

A SAM step runs the network several times on the same batch (ascent, finite-difference probes, descent). Two
conventions make those passes behave like one training forward:

* **BatchNorm running statistics move once.** Every extra pass normalises with the statistics of its own batch,
  exactly as in training mode, but leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched
  (davda54/sam's ``disable_running_stats``, done here by switching ``track_running_stats`` off, which skips the
  ``num_batches_tracked`` increment too and is immune to ``0 * nan``).
* **Every pass sees the same random numbers** (dropout masks, stochastic depth): the extra passes replay the RNG
  state captured before the ascent pass, as the JAX reference implementation of SAM does, and the RNG is left where
  the ascent pass put it, so the step consumes exactly the random numbers a plain training step consumes.

Every temporary change (parameters at ``x + e``, statistics frozen, hooks, RNG replayed) is made inside a `restored`
block and undone when it exits, however it exits: also when an interrupt (Ctrl-C's ``KeyboardInterrupt``) lands in
the middle of the change or of the undoing itself.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@contextlib.contextmanager
def restored(restore: Callable[[], None]) -> Iterator[None]:
    """Runs `restore` when the block exits, however it exits, and to its end.

    Make the change inside the block, never before it: an interrupt between a change and the block that undoes it
    leaves the change for good. `restore` must be idempotent (it puts back values kept beforehand, and may run over a
    partly made change): if an exception (a ``KeyboardInterrupt`` from Ctrl-C, any `BaseException`) interrupts it, it
    runs again from the start, then the exception goes on. One window Python leaves open (PEP 419): an interrupt
    between a ``with`` block's last line and its ``__exit__`` skips the exit; a generator's block like this one is then
    closed as the interrupt unwinds the frame holding it, which runs `restore` all the same.
    """
    finished = False
    try:
        try:
            yield
        finally:
            restore()
            finished = True
    except BaseException:
        if not finished:  # the interrupt landed in `restore`
            restore()
        raise


def running_stat_modules(model: nn.Module) -> list[_NormBase]:
    """The normalisation layers of `model` that keep running statistics (BatchNorm, SyncBatchNorm, timm's BN-Act)."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def frozen_running_stats(modules: list[_NormBase]) -> Iterator[None]:
    """Normalise with batch statistics without updating running statistics (train-mode forward, stats frozen); each
    layer's own setting is put back afterwards."""
    kept = [module.track_running_stats for module in modules]

    def restore():
        for module, value in zip(modules, kept):
            module.track_running_stats = value

    with restored(restore):
        for module in modules:
            module.track_running_stats = False
        yield


class RNGReplay:
    """Captures the RNG state of the CPU and of the accelerators a model lives on (and Python's and NumPy's), and
    replays it on demand.

    Args:
        devices (`torch.device` or a collection of them): the devices whose generators the model's random ops use
            besides the CPU's (a model spread over several GPUs: all of them).

    Usage::

        rng = RNGReplay(device)      # capture, right before the ascent pass
        ascent()                     # consumes random numbers as usual
        with rng.replay():           # the same random numbers again; afterwards the RNG is back where ascent() left it
            descent()
    """

    def __init__(self, devices):
        devices = [devices] if isinstance(devices, torch.device) else list(devices)
        self.devices = sorted({d for d in devices if d.type not in ("cpu", "meta")}, key=str)
        self.device_type = self.devices[0].type if self.devices else None
        self.cpu_state = torch.get_rng_state()
        self.device_states = [self._device_module().get_rng_state(d) for d in self.devices]
        # Python's and NumPy's generators too, as the Trainer seeds them (a model may draw its noise there)
        self.python_state = random.getstate()
        self.numpy_state = np.random.get_state()

    def _device_module(self):
        return getattr(torch, self.device_type)

    def _set(self, cpu_state, device_states, python_state, numpy_state) -> None:
        torch.set_rng_state(cpu_state)
        for device, state in zip(self.devices, device_states):
            self._device_module().set_rng_state(state, device)
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """The captured states inside the block; every generator where it was before the block afterwards."""
        now = (torch.get_rng_state(), [self._device_module().get_rng_state(d) for d in self.devices],
               random.getstate(), np.random.get_state())
        with restored(lambda: self._set(*now)):
            self._set(self.cpu_state, self.device_states, self.python_state, self.numpy_state)
            yield
