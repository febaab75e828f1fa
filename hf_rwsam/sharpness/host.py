"""What the training loop lends a sharpness-aware step: its backward, its gradient sync, its processes, its precision.

The step (`hf_rwsam.sharpness.step`) owns the algorithm; the loop that runs it owns the things below, and a host object
hands them over:

* ``backward(loss)``: ``loss.backward()``, or ``accelerator.backward`` (loss scaling, DeepSpeed-free accumulation);
* ``no_sync(model)``: the context that keeps DDP from all-reducing the ascent gradient;
* ``reduce(tensors, op)`` / ``gather(tensor)``: the global scope's cross-process reduction;
* ``grad_scaler``: fp16's loss scaler, if any (``scale(objective)``, ``loss_scale``);
* ``mixed_precision(model)`` / ``full_precision(model)``: whether the training forward runs in reduced precision,
  and a context in which it runs in fp32 (RW-SAM's finite-difference probes need fp32);
* ``parameters(model)``: the parameters as whole tensors or as FSDP2 shards (`hf_rwsam.sharpness.sharding`).

`TorchHost` serves a plain PyTorch loop (one process, or ``torch.distributed`` with DDP or FSDP2); `AccelerateHost`
an Accelerate loop, the Trainer included.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .sharding import LocalParameters, ShardedParameters, is_sharded, trainable_parameters
from .state import restored


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


class TorchHost:
    """A plain PyTorch loop: ``loss.backward()``; under ``torch.distributed``, DDP's ``no_sync`` and collectives.

    Args:
        grad_scaler (`torch.amp.GradScaler`, *optional*): fp16's loss scaler: the default descent backpropagates the
            scaled loss, and the ascent gradient is taken on the scaled objective and unscaled.
    """

    def __init__(self, grad_scaler: torch.amp.GradScaler | None = None):
        self._grad_scaler = grad_scaler

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self._grad_scaler

    @property
    def num_processes(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def process_index(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        no_sync = getattr(model, "no_sync", None)  # DDP's
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    def _all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat)
        return flat

    def reduce(self, tensors: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        """Sum (``op="sum"``) or average (``"mean"``) `tensors` over processes, in one collective."""
        if self.num_processes == 1:
            return tensors
        flat = self._all_reduce(_flatten_dense_tensors(tensors))
        if op == "mean":
            flat /= self.num_processes
        return list(_unflatten_dense_tensors(flat, tensors))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor`, concatenated along dim 0 in process order."""
        if self.num_processes == 1:
            return tensor
        out = tensor.new_empty((self.num_processes * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model under DDP's and ``torch.compile``'s wrappers (and only theirs: a submodule of the user's model
        called ``module`` stays where it is)."""
        from torch._dynamo.eval_frame import OptimizedModule
        from torch.nn.parallel import DistributedDataParallel

        while isinstance(model, (DistributedDataParallel, OptimizedModule)):
            model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
        return model

    def mixed_precision(self, model: nn.Module) -> bool:
        """Whether the training forward runs under autocast (an enclosing ``torch.autocast``)."""
        return torch.is_autocast_enabled(_device_type(model))

    @contextlib.contextmanager
    def full_precision(self, model: nn.Module) -> Iterator[None]:
        """The model's forward in fp32 inside the block: autocast off. The forward still goes through the module's
        ``__call__``, so hooks (FSDP's gathering of the shards) run; FSDP's own parameter dtype is left as configured."""
        with torch.autocast(_device_type(model), enabled=False):
            yield

    def scale(self, objective: torch.Tensor) -> torch.Tensor:
        """`objective` times fp16's loss scale (gradients taken on it are unscaled by `loss_scale`), or as is."""
        return objective if self.grad_scaler is None else self.grad_scaler.scale(objective)

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.reduce([tensor], "sum")[0]

    def parameters(self, model: nn.Module) -> LocalParameters | ShardedParameters:
        params = trainable_parameters(model)
        return ShardedParameters(model, params, self._reduce_sum) if is_sharded(params) else self._local(params)

    def _local(self, params: list[nn.Parameter]) -> LocalParameters:
        """The same `LocalParameters` from step to step while the parameters stay the same."""
        cached = getattr(self, "_local_parameters", None)
        if cached is None or not cached.same_as(params):
            cached = self._local_parameters = LocalParameters(params)
        return cached


class AccelerateHost(TorchHost):
    """An Accelerate loop (the Trainer's too): `Accelerator.backward`, ``no_sync``, ``reduce``, ``gather`` and its
    grad scaler; FSDP2 when Accelerate's FSDP plugin is on.

    Args:
        accelerator (`accelerate.Accelerator`): the loop's accelerator.
    """

    def __init__(self, accelerator):
        from accelerate.utils import DistributedType

        super().__init__()
        self.accelerator = accelerator
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP

    @property
    def grad_scaler(self):
        return self.accelerator.scaler

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(model)

    def _all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(flat, reduction="sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.num_processes > 1 else tensor

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def mixed_precision(self, model: nn.Module) -> bool:
        """Also when Accelerate wrapped the model's forward in autocast (it keeps the original as
        ``_original_forward``)."""
        return super().mixed_precision(model) or "_original_forward" in vars(self.unwrap(model))

    @contextlib.contextmanager
    def full_precision(self, model: nn.Module) -> Iterator[None]:
        """Also with Accelerate's autocast wrapper set aside, if the model was prepared with mixed precision."""
        inner = self.unwrap(model)
        wrapped = vars(inner).get("forward") if "_original_forward" in vars(inner) else None

        def restore():
            if wrapped is not None:
                inner.forward = wrapped

        with restored(restore):
            if wrapped is not None:
                inner.forward = inner._original_forward
            with super().full_precision(model):
                yield

    def parameters(self, model: nn.Module) -> LocalParameters | ShardedParameters:
        """Under Accelerate's FSDP the shards; parameters sharded outside it are refused (they are not in the
        autograd graph of a non-FSDP forward, so their ascent gradient would silently be zero)."""
        params = trainable_parameters(model)
        if self.fsdp:
            return ShardedParameters(model, params, self._reduce_sum)
        if is_sharded(params):
            raise ValueError(
                "Sharpness-aware step: the parameters are sharded (DTensor) but Accelerate's FSDP is off (a model sharded before the "
                "Trainer, by fully_shard or a distributed from_pretrained); SAM modes support sharding only through "
                "Accelerate's FSDP plugin."
            )
        return self._local(params)
