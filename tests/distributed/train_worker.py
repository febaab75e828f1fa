"""Worker for tests/test_distributed.py: trains a tiny MLP with RWSAMTrainer under torchrun (gloo, CPU).

Usage: torchrun --nproc_per_node 2 tests/distributed/train_worker.py '<json settings>'

Settings: "config" (RWSAMConfig keyword arguments), "out" (where rank 0 writes the final parameters, the
collective counts and the first perturbation norm of every rank), optional "fail_rank" (that rank raises in its first
training step), optional "fsdp" (run Accelerate's FSDP2 plugin on CPU, see `engage_fsdp_on_cpu`), optional
"accelerate_fsdp" (FSDP2 requested by the environment, as `accelerate launch` with an FSDP config does), optional
"shard_before_trainer" (`fully_shard` the model before the Trainer sees it), optional "hold_x_in_descent" (every descent
enters `original_parameters()` and records whether the local parameters then hold x, and x + e again after it).
Collectives are counted per phase of the step: every torch.distributed call from Python (our own reductions,
Accelerate's gather/reduce) and every gradient bucket DDP all-reduces (through a counting comm hook; DDP's
buckets do not go through the Python API).
"""

import collections
import functools
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from utils import (SequentialTrainer, TinyMLP, leave_process_group, make_tensors, sgd_config,  # noqa: E402
                   tensor_dataset)

from transformers import TrainerCallback  # noqa: E402

from hf_rwsam.sharpness import AccelerateHost  # noqa: E402

COUNTS = collections.Counter()
PHASE = ["outside"]
COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_gather_object", "broadcast_object_list", "reduce", "gather", "scatter"]


def count_python_collectives():
    for name in COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, __original=original, __name=name, **kwargs):
            COUNTS[f"{PHASE[0]}:{__name}"] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)


def engage_fsdp_on_cpu():
    """Accelerate engages its FSDP plugin only on accelerators (on CPU the state stays MULTI_CPU), although FSDP2
    itself runs on CPU with gloo. After Accelerate's own set-up, the state is switched to FSDP with the plugin the
    Trainer passed, so `Accelerator.prepare` shards the model with `fully_shard` exactly as it does on GPUs."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def counting_allreduce_hook(state, bucket):
    COUNTS[f"{PHASE[0]}:ddp_bucket_allreduce"] += 1
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(None, bucket)


class PhaseTrainer(SequentialTrainer):
    """Marks the phases of the step for the collective counts, records every perturbation norm ``||T g||`` the step
    computes (and fails on purpose when asked)."""

    fail_rank = None
    perturbation_norms = []
    hold_x_in_descent = False
    held_x = []  # per descent: [x inside original_parameters(), x + e again after it, x + e differs from x]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharpness_step.host = NormRecordingHost(self.accelerator, self.perturbation_norms)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.fail_rank == self.args.process_index:
            raise RuntimeError(f"rank {self.args.process_index} fails on purpose")
        self._x = self._local_values()
        PHASE[0] = "ascent"
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            PHASE[0] = "outside"

    def _local_values(self):
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in self.model.parameters()]

    def _descent(self, *args, **kwargs):
        if self.hold_x_in_descent:
            perturbed = self._local_values()
            with self.sharpness_step.original_parameters():
                inside = self._local_values()
            after = self._local_values()
            self.held_x.append([all(map(torch.equal, inside, self._x)), all(map(torch.equal, after, perturbed)),
                                not all(map(torch.equal, perturbed, self._x))])
        PHASE[0] = "descent"
        try:
            return super()._descent(*args, **kwargs)
        finally:
            PHASE[0] = "ascent"


class NormRecordingHost(AccelerateHost):
    """The Trainer's host, whose parameters record every norm the step takes of the ascent gradient."""

    def __init__(self, accelerator, norms):
        super().__init__(accelerator)
        self.norms = norms

    def parameters(self, model):
        params = super().parameters(model)
        norm = params.norm

        def recorded(tensors):
            value = norm(tensors)
            if tensors is not params.tensors:  # not the norm of x (the first step's check of the fd step)
                self.norms.append(float(value))
            return value

        params.norm = recorded
        return params


class RegisterCommHook(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, counting_allreduce_hook)


def main():
    settings = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(settings.get("samples", 16), seed=1)
    if settings.get("fsdp"):
        engage_fsdp_on_cpu()  # before the config: it sets up Accelerate's state
    if settings.get("accelerate_fsdp"):  # FSDP from the launcher's environment, as `accelerate launch` sets it
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    args = sgd_config(settings["out"] + ".run", **settings["config"])
    if settings.get("shard_before_trainer"):  # a model sharded by the user, not by Accelerate's FSDP plugin
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # run as a plain single process: a one-rank group, unseen by Accelerate
            dist.init_process_group("gloo", init_method=f"file://{settings['out']}.store", rank=0, world_size=1)
        fully_shard(model)
    count_python_collectives()
    PhaseTrainer.fail_rank = settings.get("fail_rank")
    PhaseTrainer.hold_x_in_descent = settings.get("hold_x_in_descent", False)
    trainer = PhaseTrainer(model=model, args=args, train_dataset=tensor_dataset(x, y))
    trainer.add_callback(RegisterCommHook(trainer))
    distributed_type = str(trainer.accelerator.distributed_type)
    trainer.train()
    PHASE[0] = "result"
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: all-gather the shards (every rank)
              for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    first_norms = [None] * args.world_size
    dist.all_gather_object(first_norms, trainer.perturbation_norms[:1])
    held_x = [None] * args.world_size
    dist.all_gather_object(held_x, trainer.held_x)
    if args.process_index == 0:
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        torch.save({"params": flat, "counts": dict(COUNTS), "world_size": args.world_size,
                    "distributed_type": distributed_type,
                    "sharded": [type(p).__name__ for p in trainer.model.parameters()],
                    "fsdp_modules": sum(type(m).__name__.startswith("FSDP") for m in trainer.model.modules()),
                    "first_perturbation_norms": first_norms, "held_x": held_x}, settings["out"])
    leave_process_group()


if __name__ == "__main__":
    main()
