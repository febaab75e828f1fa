"""`RWSAMTrainer`: the transformers `Trainer` whose `training_step` is a SAM / ASAM / m-SAM / RW-SAM step.

One step on a micro-batch (ALGORITHMS.md has the full contract):

1. ascent pass at ``x`` (no gradient communication, except the global scope's reduction): per-sample losses
   ``l_i``, ``g = grad(sum_i a_i l_i)`` with ``a_i = 1/b`` (SAM) or RW-SAM's Gibbs weights (after ``Q``
   finite-difference probes, or exact norms);
2. ``e = rho T^2 g / ||T g||``;  3. move to ``x + e`` (the parameters point at new storage; FSDP's shards are
   written in place);
4. descent pass: the Trainer's own `training_step` (``compute_loss`` + ``accelerator.backward``), with the ascent's
   random numbers replayed and BatchNorm running statistics frozen, so accumulation, AMP scaling and DDP sync are the
   Trainer's;
5. restore ``x`` bit-exactly in a ``finally``;  6. return the clean loss for logging.

Gradient clipping, weight decay, the optimizer and the scheduler are the Trainer's and act on the descent gradient.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from .cards import render_model_card
from .config import FSDP_SUPPORTED, RWSAMConfig, fsdp_problems
from .losses import PerSampleLossFunc, per_sample_loss
from .sharpness.msam import split_batch, vmap_msam_step
from .sharpness.perturb import global_norm, perturbed, sam_perturbation, swapped_parameters, written_parameters
from .sharpness.reweight import (
    effective_sample_size,
    exact_sample_grad_norms,
    fd_norms,
    fd_probe_losses,
    gibbs_weights,
    rademacher_seed,
)
from .sharpness.state import RNGReplay, frozen_running_stats, running_stat_modules

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded parameters
    DTensor = ()

logger = logging.get_logger(__name__)

NOISE_COLUMN = "is_noisy"
"""Optional batch column marking samples whose training label was corrupted; used for diagnostics only."""


class _RunningMeans:
    """Diagnostics accumulated on device between two logs (no host synchronisation per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        self.sums[name] = self.sums[name] + value.to(self.sums[name].device) if name in self.sums else value.clone()
        self.counts[name] += 1

    def pop(self) -> dict[str, torch.Tensor]:
        means = {name: total / self.counts[name] for name, total in self.sums.items()}
        self.sums, self.counts = {}, defaultdict(int)
        return means


class RWSAMTrainer(Trainer):
    """A `Trainer` whose training step is sharpness-aware, as set by its [`RWSAMConfig`].

    Args:
        per_sample_loss_func (`Callable`, *optional*):
            ``(outputs, labels) -> Tensor[b]`` of per-sample losses for the ascent pass. By default they follow
            ``model.config.problem_type`` (see `hf_rwsam.losses`).
        dataset_name (`str`, *optional*):
            The training dataset, e.g. ``"uoft-cs/cifar10"``, for the model card (its ``datasets`` metadata).
        *args, **kwargs: as for `Trainer`; ``args`` must be an `RWSAMConfig`.
    """

    def __init__(
        self, *args, per_sample_loss_func: PerSampleLossFunc | None = None, dataset_name: str | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RWSAMConfig):
            raise ValueError(f"RWSAMTrainer needs `args` to be an RWSAMConfig, got {type(self.args).__name__}.")
        if self.args.sam_mode != "none" and self.args.n_gpu > 1:
            raise ValueError(
                f"RWSAMTrainer does not support DataParallel (n_gpu={self.args.n_gpu}); launch one process per GPU "
                "with `accelerate launch` or `torchrun`."
            )
        distributed_type = self.accelerator.distributed_type
        if self.args.sam_mode != "none" and distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                f"RWSAMTrainer does not support DeepSpeed with sam_mode={self.args.sam_mode!r} (from the Accelerate "
                "config): its engine owns the backward pass and the gradients; use DDP or FSDP2."
            )
        self._sharded = self.args.sam_mode != "none" and distributed_type == DistributedType.FSDP
        if self._sharded:
            from torch.distributed.fsdp import CPUOffloadPolicy

            plugin = self.accelerator.state.fsdp_plugin
            problems = fsdp_problems(self.args, plugin.fsdp_version, isinstance(plugin.cpu_offload, CPUOffloadPolicy),
                                     getattr(self.accelerator, "parallelism_config", None))
            if problems:
                raise ValueError(f"RWSAMTrainer under FSDP (from the Accelerate config): {'; '.join(problems)}. "
                                 f"{FSDP_SUPPORTED}.")
            if self.args.sam_mode == "rwsam" and self.accelerator.mixed_precision != "no":
                logger.warning(
                    "RW-SAM under FSDP with mixed precision: the finite-difference probes run at FSDP's compute dtype, "
                    "and benchmarks/fd_step.py found bf16 probes useless; keep FSDP's parameters in fp32 for them."
                )
        if self.args.sam_mode == "msam" and self.args.msam_implementation == "vmap" and self.accelerator.num_processes > 1:
            raise ValueError(
                "RWSAMConfig.msam_implementation='vmap' is invalid with several processes (it bypasses the DDP "
                "forward); choose 'loop' or 'auto'."
            )
        self._check_msam_batches()
        self.per_sample_loss_func = per_sample_loss_func
        self.dataset_name = dataset_name
        self._diagnostics = _RunningMeans()
        self._micro_step = (-1, 0)  # (global step, index of the micro-batch within it)
        self._msam_vmap_ok: bool | None = None  # decided on the first m-SAM step under "auto"
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._problem_type = getattr(getattr(unwrapped, "config", None), "problem_type", None)
        self._shift_labels = unwrapped._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._last_training_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ Trainer hooks

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if NOISE_COLUMN not in self._signature_columns:
            self._signature_columns.append(NOISE_COLUMN)

    def _prepare_inputs(self, inputs):
        """The Trainer's, minus the `is_noisy` column, which never reaches the model."""
        return super()._prepare_inputs({k: v for k, v in inputs.items() if k != NOISE_COLUMN})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; the last value is kept so the clean loss can be reported in the same units."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._last_training_loss = (result[0] if return_outputs else result).detach()
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the SAM diagnostics to training logs, each averaged over the steps since the previous log and over
        processes (so ``sam/skipped_perturbations`` is the fraction of perturbations skipped in that interval)."""
        if "loss" in logs:
            for name, value in self._diagnostics.pop().items():
                logs[name] = self.accelerator.reduce(value.to(self.args.device), reduction="mean").item()
        super().log(logs, start_time)

    def _check_msam_batches(self):
        """m-SAM needs every batch to split into groups of m: refuse at construction a last batch that will not."""
        args = self.args
        if args.sam_mode != "msam" or args.dataloader_drop_last or args.world_size > 1:
            return  # (several processes: Accelerate completes the last batches; each batch is checked as it comes)
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            return
        last = len(self.train_dataset) % args.per_device_train_batch_size
        if last % args.msam_micro_batch_size:
            raise ValueError(
                f"RWSAMConfig.msam_micro_batch_size={args.msam_micro_batch_size} does not divide the last batch "
                f"({len(self.train_dataset)} samples in batches of {args.per_device_train_batch_size} leave {last}); "
                "set dataloader_drop_last=True (it drops the last evaluation batch too) or use a training set whose "
                "size is a multiple of the batch size."
            )

    # ------------------------------------------------------------------ model card

    def create_model_card(
        self, language=None, license=None, tags=None, model_name=None, finetuned_from=None, dataset=None
    ) -> None:
        """Writes the hf-rwsam model card (`hf_rwsam.cards`) to ``output_dir/README.md``.

        `push_to_hub` calls it with its keyword arguments: ``language``, ``license``, ``tags`` (added to hf-rwsam's),
        ``model_name``, ``finetuned_from`` (the ``base_model``) and ``dataset`` (instead of the trainer's
        ``dataset_name``).
        """
        if self.is_world_process_zero():
            self._write_model_card(
                self.args.output_dir, model_name=model_name, dataset_name=dataset, tags=tags, language=language,
                license=license, base_model=finetuned_from,
            )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save, plus the model card: every checkpoint and every final save gets its README.md."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self._write_model_card(output_dir or self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer's; it uploads ``output_dir`` after copying only the weights there, so the card is refreshed.

        Only when the Trainer will push: it skips a push while the previous one is still uploading (unless
        ``hub_always_push``), and that upload may still be reading the folder.
        """
        previous = self.push_in_progress
        if self.args.hub_always_push or previous is None or previous.is_done():
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)

    def _write_model_card(self, folder: str, model_name=None, dataset_name=None, **card_data) -> None:
        from .data import label_noise_info  # not at the top: hf_rwsam.data imports this module

        noise_info = None
        try:
            noise_info = None if self.train_dataset is None else label_noise_info(self.train_dataset)
        except ValueError as err:  # a card must not stop the training
            logger.warning_once(f"The model card leaves out the label noise: {err}")
        hub_id = self.hub_model_id or self.args.hub_model_id
        card = render_model_card(
            self.args,
            self.state,
            model_name=model_name or Path(hub_id or self.args.output_dir).name,
            model_class=type(self.accelerator.unwrap_model(self.model)).__name__,
            repo_id=hub_id or folder,
            dataset_name=dataset_name or self.dataset_name,
            noise_info=noise_info,
            **card_data,
        )
        # Written aside and renamed into place: an upload reading the folder sees the old card or the new one, never
        # half of one (the Trainer's uploads ignore names starting with "_").
        staging = Path(folder, "_README.md.tmp")
        staging.write_text(card, encoding="utf-8")
        os.replace(staging, Path(folder, "README.md"))

    # ------------------------------------------------------------------ the step

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        mode = self.args.sam_mode
        if mode == "none":
            return super().training_step(model, inputs, num_items_in_batch)
        is_noisy = inputs.get(NOISE_COLUMN)
        inputs = self._prepare_inputs(inputs)
        model.train()
        self._advance_micro_step()
        if mode == "msam":
            return self._msam_step(model, inputs, num_items_in_batch)
        return self._sam_step(model, inputs, num_items_in_batch, reweight=mode == "rwsam", is_noisy=is_noisy)

    def _sam_step(self, model, inputs, num_items_in_batch, reweight=False, is_noisy=None, descent_share=1):
        """One SAM (or RW-SAM) step on `inputs`; the descent gradient counts for ``1 / descent_share`` of the step."""
        args = self.args
        params = self._trainable_params(model)
        shards = self._local_shards(params)  # the parameters themselves, or this process's shards under FSDP
        assign = self._shard_writer(model) if self._sharded else swapped_parameters
        bn_modules = self._running_stat_modules(model)
        labels = self._labels(inputs)
        rng = RNGReplay(labels.device)

        # FSDP's ascent gradient is its own reduce-scatter (global scope), so only DDP skips the gradient sync
        with contextlib.nullcontext() if self._sharded else self.accelerator.no_sync(model):
            if reweight and args.rwsam_estimator == "fd":
                probe_losses = self._fd_forward(model, inputs, labels, rng, bn_modules)
                generator = self._probe_generator(labels.device)
                num_coordinates = sum(p.numel() for p in params)  # d of the whole model (a DTensor counts all shards)
                probes = fd_probe_losses(probe_losses, shards, args.rwsam_num_probes, args.rwsam_fd_step, generator,
                                         num_coordinates=num_coordinates, assign=assign)
                # Under mixed precision the slopes need an fp32 reference at x too; in fp32 the ascent's losses are it.
                fd_reference = probe_losses() if self.accelerator.native_amp else None
            with self.compute_loss_context_manager():
                clean_loss, outputs = self.compute_loss(
                    model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            losses = self._per_sample_losses(outputs, labels)
            del outputs
            if reweight:
                if args.rwsam_estimator == "fd":
                    reference = losses if fd_reference is None else fd_reference
                    norms = fd_norms(probes, reference, num_coordinates, args.rwsam_fd_step)
                else:
                    norms = exact_sample_grad_norms(losses, params, args.rwsam_exact_chunk_size, retain_graph=True)
                norms = self._gather_for_scope(norms)
                weights, lam = gibbs_weights(
                    norms, args.rwsam_lambda, args.rwsam_normalize, args.rwsam_target_ess, args.rwsam_max_weight,
                    return_lambda=True,
                )
                self._log_weights(weights, lam, is_noisy)
                ascent_objective = (self._local_slice(weights) * losses).sum()
            else:
                ascent_objective = losses.mean()
            grads = self._ascent_gradient(ascent_objective, params, summed_over_processes=reweight)
        perturbation = sam_perturbation(shards, grads, args.sam_rho, args.sam_adaptive, args.sam_adaptive_eta,
                                        norm_fn=self._perturbation_norm)
        self._diagnostics.add("sam/ascent_grad_norm", perturbation.ascent_grad_norm)
        self._diagnostics.add("sam/skipped_perturbations", float(perturbation.skipped))

        del grads  # the same tensors as perturbation.e, which `perturbed` turns into x + e
        with perturbed(shards, perturbation.e, assign), rng.replay(), frozen_running_stats(bn_modules):
            descent_loss = self._trainer_descent(model, inputs, num_items_in_batch, descent_share)
        return self._report_clean_loss(clean_loss, descent_loss, descent_share)

    def _msam_step(self, model, inputs, num_items_in_batch):
        args = self.args
        b = len(self._labels(inputs))
        if b % args.msam_micro_batch_size:
            raise ValueError(
                f"RWSAMConfig.msam_micro_batch_size={args.msam_micro_batch_size} does not divide this batch of {b} "
                "samples (set dataloader_drop_last=True when the dataset size is not a multiple of the batch size)."
            )
        k = b // args.msam_micro_batch_size
        if self._use_msam_vmap(model, k):
            try:
                return self._msam_vmap_step(model, inputs, k)
            except Exception as err:  # noqa: BLE001 -- any failure of torch.func on this model means "use the loop"
                if args.msam_implementation == "vmap" or self._msam_vmap_ok:
                    raise
                logger.warning(f"m-SAM: torch.func cannot run this model ({err!r}); using the loop implementation.")
                self._msam_vmap_ok = False
        total = 0.0
        for j, group in enumerate(split_batch(inputs, k)):
            sync = contextlib.nullcontext() if j == k - 1 else self.accelerator.no_sync(model)
            with sync:
                total = total + self._sam_step(model, group, num_items_in_batch, descent_share=k)
        return total

    # ------------------------------------------------------------------ pieces of the step

    def _fd_forward(self, model, inputs, labels, rng, bn_modules):
        """Per-sample losses at the current parameters, for the finite-difference probes.

        No gradient, the ascent pass's random numbers, BatchNorm statistics frozen, and fp32: under bf16 autocast the
        weights are rounded to 8 bits of mantissa in every matmul, which either hides a step ``h`` or swamps it
        (benchmarks/fd_step.py: mean relative error >= 0.66 at every h on resnet18, against 0.08 in fp32). Accelerate
        wraps ``forward`` in autocast and keeps the original as ``_original_forward``; the probes use it, except under
        FSDP, whose hooks (gathering the shards) run only through the module's ``__call__``: there the probes run at
        FSDP's compute dtype (a warning says so at construction).
        """
        model_inputs = self._model_inputs(inputs)
        forward = model
        if self.accelerator.native_amp and not self._sharded:
            forward = self.accelerator.unwrap_model(model)._original_forward
        device_type = labels.device.type

        @torch.no_grad()
        def per_sample_losses():
            with rng.replay(), frozen_running_stats(bn_modules), torch.autocast(device_type, enabled=False):
                return self._per_sample_losses(forward(**model_inputs), labels)

        return per_sample_losses

    def _ascent_gradient(self, objective, params, summed_over_processes=False):
        """``grad(objective)`` without touching ``.grad``; under fp16 on the scaled objective, then unscaled.

        With the ``global`` scope the gradient is averaged (or, for RW-SAM's globally normalised weights, summed)
        over processes. Under FSDP it is this process's shard of that gradient.
        """
        scaler = self.accelerator.scaler
        if scaler is not None:
            objective = scaler.scale(objective)
        if self._sharded:
            grads = self._sharded_backward(objective, params)
            if summed_over_processes:
                torch._foreach_mul_(grads, float(self.accelerator.num_processes))
        else:
            grads = list(torch.autograd.grad(objective, params, materialize_grads=True))
            if self.args.sam_perturbation_scope == "global" and self.accelerator.num_processes > 1:
                grads = list(self.accelerator.reduce(grads, reduction="sum" if summed_over_processes else "mean"))
        if scaler is not None:
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
        return grads

    def _sharded_backward(self, objective, params):
        """FSDP: this process's shard of the gradient of `objective` averaged over processes.

        The sharded parameters are not in the autograd graph (their all-gathered copies are), so the gradient comes
        from FSDP's own backward, which reduce-scatters the mean over processes into ``.grad``; the gradient already
        there (accumulated descent gradients) is set aside meanwhile and put back.
        """
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            objective.backward()
            return [torch.zeros_like(p.to_local()) if p.grad is None else p.grad.to_local() for p in params]
        finally:
            for p, grad in zip(params, kept):
                p.grad = grad

    def _shard_writer(self, model):
        """Under FSDP, how parameters take new values: `written_parameters` on this process's shards, then every FSDP
        module is resharded, because a module that keeps its all-gathered parameters after the forward (the root does)
        would otherwise run the next forward on the old values."""
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]

        def reshard():
            for module in fsdp_modules:
                module.reshard()

        return functools.partial(written_parameters, after_write=reshard)

    def _perturbation_norm(self, tensors):
        """``||T g||`` over the whole model: under FSDP the square root of the all-reduced squared shard norms."""
        if not self._sharded:
            return global_norm(tensors)
        return self.accelerator.reduce(global_norm(tensors).square(), reduction="sum").sqrt()

    def _trainer_descent(self, model, inputs, num_items_in_batch, share):
        """The Trainer's own training step (its loss scaling, AMP and DDP sync), counting for ``1 / share``."""
        steps = self.current_gradient_accumulation_steps
        self.current_gradient_accumulation_steps = steps * share
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.current_gradient_accumulation_steps = steps

    def _report_clean_loss(self, clean_loss, descent_loss, share):
        """The clean loss in the units the Trainer logs (its accumulation scaling), and the sharpness diagnostic.

        The Trainer returned ``descent_loss = c * L(x + e)`` with ``L(x + e)`` kept by `compute_loss`; the same
        factor ``c`` applies to the clean loss. Sharpness is reported per micro-batch: ``L(x + e) - L(x)``.
        """
        perturbed_loss = self._last_training_loss
        undo_accumulation = self.current_gradient_accumulation_steps * share
        factor = torch.where(perturbed_loss != 0, descent_loss / perturbed_loss, 1.0 / undo_accumulation)
        clean = clean_loss.mean() * factor
        self._diagnostics.add("sam/sharpness", (descent_loss - clean) * undo_accumulation)
        return clean.detach()

    def _msam_vmap_step(self, model, inputs, k):
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.no_sync(model), self.compute_loss_context_manager():
            result = vmap_msam_step(
                unwrapped, self._model_inputs(inputs), self._labels(inputs), self._per_sample_losses, k,
                args.sam_rho, args.sam_adaptive, args.sam_adaptive_eta, self._running_stat_modules(model),
            )
        self._msam_vmap_ok = True
        self.accelerator.backward(result.perturbed_loss / self.current_gradient_accumulation_steps)
        for norm in result.ascent_grad_norms:
            self._diagnostics.add("sam/ascent_grad_norm", norm)
        self._diagnostics.add("sam/skipped_perturbations", result.skipped.sum() / k)
        clean = result.clean_losses.mean()
        self._diagnostics.add("sam/sharpness", result.perturbed_loss.detach() - clean)
        return clean / self.current_gradient_accumulation_steps

    def _use_msam_vmap(self, model, k) -> bool:
        impl = self.args.msam_implementation
        if impl != "auto":
            return impl == "vmap"
        if self._msam_vmap_ok is False or self.accelerator.num_processes > 1:
            return False
        params = self._trainable_params(model)
        extra_mb = 2 * k * sum(p.numel() * p.element_size() for p in params) / 2**20
        return extra_mb <= self.args.msam_vmap_max_memory_mb

    def _log_weights(self, weights, lam, is_noisy):
        b = weights.shape[0]
        self._diagnostics.add("rwsam/ess", effective_sample_size(weights) / b)
        self._diagnostics.add("rwsam/max_weight", weights.max() * b)
        self._diagnostics.add("rwsam/lambda", lam)
        if is_noisy is not None:
            noisy = self._gather_for_scope(torch.as_tensor(is_noisy, device=weights.device).float())
            self._diagnostics.add("rwsam/noisy_weight_mass", (weights * noisy).sum())

    # ------------------------------------------------------------------ helpers

    def _per_sample_losses(self, outputs, labels) -> torch.Tensor:
        if self.per_sample_loss_func is not None:
            return self.per_sample_loss_func(outputs, labels).float()
        return per_sample_loss(
            outputs, labels, self._problem_type, self.args.label_smoothing_factor, shift_labels=self._shift_labels
        )

    def _labels(self, inputs) -> torch.Tensor:
        name = next((n for n in (self.label_names or ["labels"]) if n in inputs), None)
        if name is None:
            raise ValueError(
                f"RWSAMTrainer needs labels in the batch (looked for {self.label_names or ['labels']}), to compute "
                "the per-sample losses of the ascent pass."
            )
        return inputs[name]

    def _model_inputs(self, inputs) -> dict[str, Any]:
        """The batch without its labels: the model's forward then returns logits only."""
        return {k: v for k, v in inputs.items() if k not in (self.label_names or ["labels"])}

    def _trainable_params(self, model) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def _local_shards(self, params) -> list[torch.Tensor]:
        """Under FSDP, this process's shards (views of the buffer FSDP all-gathers from); otherwise `params`.

        Either Accelerate's FSDP shards every trainable parameter or nothing is sharded: a parameter FSDP left whole
        would enter the all-reduced norm once per process, and parameters sharded outside Accelerate are not in the
        autograd graph, so their ascent gradient would silently be zero.
        """
        sharded = [isinstance(p, DTensor) for p in params]
        if self._sharded and not all(sharded):
            raise ValueError(
                "RWSAMTrainer under FSDP: some trainable parameters are not sharded (FSDP ignored_modules?); a sharded "
                "SAM step needs FSDP to shard all of them."
            )
        if not self._sharded and any(sharded):
            raise ValueError(
                "RWSAMTrainer: the parameters are sharded (DTensor) but Accelerate's FSDP is off (a model sharded "
                "before the Trainer, by fully_shard or a distributed from_pretrained); SAM modes support sharding only "
                "through Accelerate's FSDP plugin."
            )
        return [p.to_local() for p in params] if self._sharded else params

    def _running_stat_modules(self, model):
        if getattr(self, "_bn_cache", (None, None))[0] is not model:
            self._bn_cache = (model, running_stat_modules(model))
        return self._bn_cache[1]

    def _advance_micro_step(self):
        step, micro = self._micro_step
        self._micro_step = (self.state.global_step, micro + 1 if step == self.state.global_step else 0)

    def _probe_generator(self, device) -> torch.Generator:
        """Seeded from (seed, global step, micro-step, rank), so a resumed run draws the same probes."""
        generator = torch.Generator(device=device)
        step, micro = self._micro_step
        generator.manual_seed(rademacher_seed(self.args.seed, step, micro, self.accelerator.process_index))
        return generator

    def _gather_for_scope(self, values: torch.Tensor) -> torch.Tensor:
        """All processes' values (global scope) or this process's (device scope)."""
        if self.args.sam_perturbation_scope == "global" and self.accelerator.num_processes > 1:
            return self.accelerator.gather(values)
        return values

    def _local_slice(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of values gathered by `_gather_for_scope`."""
        if self.args.sam_perturbation_scope == "global" and self.accelerator.num_processes > 1:
            b = values.shape[0] // self.accelerator.num_processes
            return values[self.accelerator.process_index * b : (self.accelerator.process_index + 1) * b]
        return values
