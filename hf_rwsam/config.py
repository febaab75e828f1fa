"""`RWSAMConfig`: `TrainingArguments` plus the settings of SAM, ASAM, m-SAM and RW-SAM, and the checks of what those
settings cannot do with the other training arguments and with the trainer built around them."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelerate.utils import DistributedType
from transformers import TrainingArguments
from transformers.utils import logging

from .losses import PER_SAMPLE_LOSS_EXAMPLE
from .sharpness.settings import SharpnessSettings
from .sharpness.sharding import sharded_step_problems

logger = logging.get_logger(__name__)


FSDP_SUPPORTED = (
    "Under FSDP, RWSAMTrainer supports FSDP2 sharding over all processes (no CPU offload, no replication, tensor or "
    "context parallelism) with sam_perturbation_scope='global' and sam_mode 'sam' (ASAM included) or 'rwsam' with "
    "rwsam_estimator='fd'"
)


def fsdp_problems(args, fsdp_version: int, cpu_offload: bool = False, parallelism_config=None) -> list[str]:
    """What a sharded SAM step cannot do in `args` (an `RWSAMConfig`) and FSDP's settings; empty when all is fine.

    Each process holds a shard of every parameter, so the only perturbation there is is the global one (the norm is
    the square root of the squared shard norms summed over all processes), and anything that needs whole parameters on
    one process is out. Replicas (HSDP) or tensor/context-parallel groups would count shards more than once, and
    offloaded shards live on the CPU while the step runs on the accelerator.
    """
    problems = []
    if fsdp_version != 2:
        problems.append(f"FSDP version {fsdp_version} (only FSDP2: fsdp_config version 2, Accelerate fsdp_version: 2)")
    if cpu_offload:
        problems.append("CPU offload of the parameters (fsdp_config cpu_offload / fsdp 'offload'; it must be off)")
    enabled = [name for name in ("dp_replicate", "tp", "cp", "sp")
               if parallelism_config is not None and getattr(parallelism_config, f"{name}_enabled", False)]
    if enabled:
        sizes = ", ".join(f"{name}_size={getattr(parallelism_config, f'{name}_size', '?')}" for name in enabled)
        problems.append(
            f"parallelism_config with {sizes} (only dp_shard: replicated shards (HSDP) or tensor/context parallel "
            "groups would enter the norm more than once)"
        )
    return problems + sharded_step_problems(args)


def check_training_arguments(args) -> None:
    """Refuses what the sharpness-aware settings of `args` cannot do with its other training arguments: a batch m-SAM
    cannot split, FSDP settings a sharded step cannot serve, DeepSpeed, the global scope with gradient accumulation.

    Args:
        args: `TrainingArguments` that are also `SharpnessSettings` (an `RWSAMConfig`, or your own combination).

    Raises:
        `ValueError` naming the field, the value and what is allowed.
    """
    if getattr(args, "report_label_issues", False) and args.sam_mode != "rwsam":
        raise args.refuse(
            "report_label_issues", True,
            f"the label-issue report summarises RW-SAM's per-sample scores, which sam_mode={args.sam_mode!r} does not "
            "compute; set sam_mode='rwsam' (either rwsam_estimator) or report_label_issues=False",
        )
    if args.sam_mode == "msam" and args.per_device_train_batch_size % args.msam_micro_batch_size:
        raise args.refuse(
            "msam_micro_batch_size", args.msam_micro_batch_size,
            f"it must be a positive divisor of per_device_train_batch_size={args.per_device_train_batch_size}",
        )
    if args.sam_mode != "none" and args.fsdp not in (None, False, "", []):
        # fsdp_config may still be a file path here; the trainer checks again what Accelerate then uses
        fsdp_config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        offload = "offload" in str(args.fsdp) or bool(fsdp_config.get("cpu_offload"))
        problems = fsdp_problems(args, int(fsdp_config.get("version", 2)), offload,
                                 getattr(args, "parallelism_config", None))
        if problems:
            raise args.refuse("fsdp", args.fsdp, "; ".join(problems) + f". {FSDP_SUPPORTED}")
    if args.sam_mode != "none" and args.deepspeed:
        raise args.refuse(
            "deepspeed", args.deepspeed,
            "DeepSpeed is not supported with sam_mode != 'none' (its engine owns the backward pass and the "
            "gradients); use DDP (accelerate launch / torchrun) or FSDP2 through Accelerate",
        )
    if args.sam_mode != "none" and args.sam_perturbation_scope == "global" and args.gradient_accumulation_steps > 1:
        raise args.refuse(
            "sam_perturbation_scope", "global",
            f"with gradient_accumulation_steps={args.gradient_accumulation_steps} > 1 the global ascent gradient "
            "would need a second pass over the accumulation window; use 'device' (each micro-batch perturbs "
            "with its own gradient) or gradient_accumulation_steps=1",
        )


NO_DIFFERENTIABLE_OUTPUTS = {
    ("trl", "SFTTrainer"): "its compute_loss(return_outputs=True) recomputes the outputs under torch.no_grad (one more "
                           "forward, for metrics), so no per-sample loss can carry a gradient",
}
"""Trainers whose `compute_loss` returns outputs without autograd, which RW-SAM's per-sample losses need: (the module
the class comes from, its name) -> why."""


def check_trainer_setup(trainer, per_sample_loss_func=None) -> None:
    """Refuses by name, at the trainer's construction, what its sharpness-aware step cannot do with the trainer's
    backend (DataParallel, DeepSpeed, FSDP from the Accelerate config), objective (``compute_loss_func`` without
    ``per_sample_loss_func`` for RW-SAM, a trainer whose outputs carry no gradient) and training set (a last batch
    m-SAM cannot split); warns where a setting has no effect (fp16/bf16 without autocast, RW-SAM on one sample)."""
    args, mode, name = trainer.args, trainer.args.sam_mode, type(trainer).__name__
    if mode == "none":
        return
    if args.n_gpu > 1:
        raise ValueError(
            f"{name} does not support DataParallel (n_gpu={args.n_gpu}); launch one process per "
            "GPU with `accelerate launch` or `torchrun`."
        )
    distributed_type = trainer.accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            f"{name} does not support DeepSpeed with sam_mode={mode!r} (from the Accelerate config): "
            "its engine owns the backward pass and the gradients; use DDP or FSDP2."
        )
    if distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = trainer.accelerator.state.fsdp_plugin
        problems = fsdp_problems(args, plugin.fsdp_version, isinstance(plugin.cpu_offload, CPUOffloadPolicy),
                                 getattr(trainer.accelerator, "parallelism_config", None))
        if problems:
            raise ValueError(f"{name} under FSDP (from the Accelerate config): "
                             f"{'; '.join(problems)}. {FSDP_SUPPORTED}.")
        if mode == "rwsam" and trainer.accelerator.mixed_precision != "no":
            logger.warning(
                "RW-SAM under FSDP with mixed precision: the finite-difference probes run at FSDP's compute dtype, "
                "and benchmarks/fd_step.py found bf16 probes useless; keep FSDP's parameters in fp32 for them."
            )
    if (args.fp16 or args.bf16) and not trainer.accelerator.native_amp:
        logger.warning(
            f"{'fp16' if args.fp16 else 'bf16'}=True has no effect here: Accelerate runs no autocast on "
            f"{trainer.accelerator.device.type} with it, so training runs in fp32."
        )
    if mode == "rwsam":
        for cls in type(trainer).__mro__:
            why = NO_DIFFERENTIABLE_OUTPUTS.get((cls.__module__.split(".")[0], cls.__name__))
            if why is not None:
                raise ValueError(
                    f"{name}: RW-SAM needs the per-sample losses of the ascent pass with their gradient, and "
                    f"{cls.__name__} cannot give them: {why}. Use sam_mode='sam' or 'msam' with this trainer."
                )
        if args.per_device_train_batch_size == 1 and (args.sam_perturbation_scope == "device" or args.world_size == 1):
            logger.warning(
                "RW-SAM with per_device_train_batch_size=1 is SAM: the Gibbs weights of one sample are 1 whatever its "
                "gradient norm (the fd probes then cost their forwards for nothing). Use a larger batch, "
                "sam_perturbation_scope='global' over several processes, or sam_mode='sam'."
            )
    if mode == "rwsam" and trainer.compute_loss_func is not None and per_sample_loss_func is None:
        raise ValueError(
            "RW-SAM weights one loss per sample, and with `compute_loss_func` the built-in per-sample rule cannot "
            "know your objective: pass `per_sample_loss_func(outputs, labels) -> Tensor[b]` whose mean is the "
            f"loss compute_loss_func computes; for example, for a class-weighted cross-entropy:\n\n"
            f"{PER_SAMPLE_LOSS_EXAMPLE}"
        )
    _check_msam_batches(args, trainer.train_dataset)


def _check_msam_batches(args, train_dataset) -> None:
    """m-SAM needs every batch to split into groups of m: refuse at construction a last batch that will not."""
    if args.sam_mode != "msam" or args.dataloader_drop_last or args.world_size > 1:
        return  # (several processes: Accelerate completes the last batches; each batch is checked as it comes)
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return
    last = len(train_dataset) % args.per_device_train_batch_size
    if last % args.msam_micro_batch_size:
        raise ValueError(
            f"{type(args).__name__}.msam_micro_batch_size={args.msam_micro_batch_size} does not divide the last batch "
            f"({len(train_dataset)} samples in batches of {args.per_device_train_batch_size} leave {last}); "
            "set dataloader_drop_last=True (it drops the last evaluation batch too) or use a training set whose "
            "size is a multiple of the batch size."
        )

@dataclass
class RWSAMConfig(SharpnessSettings, TrainingArguments):
    r"""
    `TrainingArguments` for [`RWSAMTrainer`]: every field of the Trainer plus the sharpness-aware settings of
    [`~hf_rwsam.sharpness.SharpnessSettings`] (``sam_*``, ``msam_*``, ``rwsam_*``; the step each mode performs is
    specified in `docs/ALGORITHMS.md`). Invalid values raise `ValueError` here, at construction, naming the field, the
    value and what is allowed; settings the chosen mode ignores are reported once.

    To give another trainer's configuration the same fields (for `SharpnessAwareMixin`), put `SharpnessSettings`
    first, so that the other configuration's own defaults stay as they are:
    ``@dataclass class RWSAMSFTConfig(SharpnessSettings, SFTConfig): pass``.

    Parameters:
        report_label_issues (`bool`, defaults to `False`):
            With ``sam_mode="rwsam"``: keep, per training example, a running summary of RW-SAM's per-sample scores and
            write at the end of `train` the examples that look mislabeled (`hf_rwsam.label_issues`,
            ``output_dir/label_issues.csv``, `RWSAMTrainer.label_issues`); no extra forward or backward pass.
    """

    report_label_issues: bool = field(
        default=False,
        metadata={"help": "RW-SAM: report the training examples that look mislabeled (output_dir/label_issues.csv)."},
    )

    def validate(self):
        """The settings' own checks, then those involving the Trainer's (before `TrainingArguments` acts on them)."""
        super().validate()
        self._type_field("report_label_issues", bool)
        check_training_arguments(self)
