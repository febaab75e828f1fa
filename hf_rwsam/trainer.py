"""`RWSAMTrainer` and `SharpnessAwareMixin`: the transformers `Trainer` whose training step is sharpness-aware.

The step itself is `hf_rwsam.sharpness.SharpnessAwareStep` (docs/ALGORITHMS.md). This module is the Trainer's glue: it
builds the step from the `RWSAMConfig` and the Trainer's Accelerator, hands it the Trainer's `compute_loss` as the
objective (``compute_loss_func``, label smoothing and the model's own loss terms included) and the Trainer's own
`training_step` as the descent (its accumulation scaling, AMP scaler and DDP sync), reports the clean loss in the units
the Trainer logs, adds the step's diagnostics to the logs, and writes model cards. With
``report_label_issues`` it carries each example's index to the step and keeps the label-issue report
(`hf_rwsam.label_issues`) from the step's per-sample scores.

The mixin makes any Trainer subclass sharpness-aware, e.g. TRL's::

    @dataclass
    class RWSAMSFTConfig(SharpnessSettings, SFTConfig):  # settings first: SFTConfig keeps its own defaults
        pass

    class RWSAMSFTTrainer(SharpnessAwareMixin, SFTTrainer):
        pass
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cards import render_model_card
from .columns import INDEX_COLUMN, NOISE_COLUMN
from .config import RWSAMConfig, check_trainer_setup, check_training_arguments
from .data import ExampleIndexed, label_noise_info
from .label_issues import LABEL_ISSUES_CSV, STEP_POWER, LabelIssueReport
from .losses import PerSampleLossFunc, per_sample_loss
from .sharpness import AccelerateHost, SharpnessAwareStep, SharpnessSettings
from .sharpness.state import restored

logger = logging.get_logger(__name__)

LABEL_ISSUES_STATE = "label_issues_state.pt"
"""The running label-issue report in a checkpoint, so that a resumed run's report covers the whole training."""


class SharpnessAwareMixin:
    """Makes a `transformers.Trainer` subclass sharpness-aware, as set by the ``sam_*`` fields of its arguments.

    ``class MyTrainer(SharpnessAwareMixin, SomeTrainer)``: `training_step` runs a `SharpnessAwareStep` whose
    objective is the trainer's `compute_loss` and whose descent is the trainer's own `training_step`; `log` adds the
    step's diagnostics. The arguments must carry the `SharpnessSettings`: an `RWSAMConfig`, or the trainer's own
    configuration class combined with them. Saves write ``x``, also when made during the step (a signal handler's, a
    callback's in the descent): `save_model`, `_save` and `_save_checkpoint` hold the parameters at ``x`` meanwhile.

    Args:
        per_sample_loss_func (`Callable`, *optional*):
            ``(outputs, labels) -> Tensor[b]`` of per-sample losses, whose mean is the loss, for RW-SAM. By default
            they follow ``model.config.problem_type`` (`hf_rwsam.losses`); either way they are checked on the first
            step against the trainer's loss. Required with RW-SAM when ``compute_loss_func`` is set.
        *args, **kwargs: as for the trainer; ``args`` defaults to ``RWSAMConfig(output_dir="tmp_trainer")``.
    """

    sam_side_effect_attributes: tuple[str, ...] = ("_metrics", "_total_train_tokens")
    """What `compute_loss` may update as a side effect (TRL's trainers count metrics and tokens there): the extra
    passes of a step (ascent, probes) leave these as they found them, so only the descent counts, once per batch."""

    def __init__(self, *args, per_sample_loss_func: PerSampleLossFunc | None = None, **kwargs):
        if len(args) < 2 and kwargs.get("args") is None:
            logger.info("No `args` passed, using `output_dir=tmp_trainer` and RWSAMConfig's defaults.")
            kwargs["args"] = RWSAMConfig(output_dir="tmp_trainer")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SharpnessSettings):
            raise ValueError(
                f"{type(self).__name__} needs `args` with the sharpness-aware settings, an RWSAMConfig, got "
                f"{type(self.args).__name__}; for another trainer's configuration combine the two, settings first: "
                "`@dataclass class MyConfig(SharpnessSettings, OtherConfig): pass`."
            )
        check_training_arguments(self.args)  # RWSAMConfig has done so already; a combined configuration has not
        check_trainer_setup(self, per_sample_loss_func)
        unwrapped = self.accelerator.unwrap_model(self.model)
        default_per_sample_loss = functools.partial(
            per_sample_loss,
            problem_type=getattr(getattr(unwrapped, "config", None), "problem_type", None),
            label_smoothing=self.args.label_smoothing_factor,
            shift_labels=self._loss_shifts_tokens(unwrapped),
        )
        self.sharpness_step = SharpnessAwareStep(
            self.args, AccelerateHost(self.accelerator), per_sample_loss_func=per_sample_loss_func,
            default_per_sample_loss=default_per_sample_loss, label_names=tuple(self.label_names or ["labels"]),
            seed=self.args.seed,
        )
        self._recorded_losses: list[torch.Tensor] | None = None
        self._descent_share = 1  # m-SAM: the descent's loss divided by it when the Trainer would not
        self._loss_counts_items: bool | None = None  # whether compute_loss divides by num_items_in_batch
        self._sharpness_sum, self._sharpness_steps = 0.0, set()
        self._label_issues: LabelIssueReport | None = None  # the running report, during `train`
        self._label_issue_auroc = False  # whether the epochs' ends merge the report for its AUROC, during `train`
        self._label_issue_results: tuple | None = None  # (the report as a Dataset, its summary) after `train`
        if self._reports_label_issues():
            if self.train_dataset is not None:
                ExampleIndexed(self.train_dataset)  # refuses, by name, a training set without positions
            self.add_callback(_LabelIssueAUROC(self))

    def _loss_shifts_tokens(self, unwrapped) -> bool:
        """Whether the loss predicts token t + 1 at position t: a causal LM (its class or a parent's, also under a PEFT
        wrapper), or a loss the Trainer found to be ``ForCausalLMLoss``."""
        model = getattr(getattr(unwrapped, "base_model", None), "model", unwrapped)  # PEFT: the wrapped model
        names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(cls.__name__ in names for cls in type(model).__mro__) or bool(getattr(self, "_loss_shifts_labels", False))

    # ------------------------------------------------------------------ the step

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self.args.sam_mode == "none":
            return super().training_step(model, inputs, num_items_in_batch)
        noisy, index = inputs.get(NOISE_COLUMN), inputs.get(INDEX_COLUMN)
        inputs = self._prepare_inputs(inputs)
        if noisy is not None:
            inputs[NOISE_COLUMN] = noisy
        model.train()
        self.sharpness_step.seed = self.args.seed  # as the Trainer reads it, also when changed after construction
        reported: list[torch.Tensor] = []  # what the Trainer's own steps returned, and the losses they computed
        perturbed: list[torch.Tensor] = []
        clean = self.sharpness_step(
            model, inputs, self._objective(num_items_in_batch),
            functools.partial(self._descent, model, num_items_in_batch, reported, perturbed),
            global_step=self.state.global_step,
            reference_loss_fn=None if num_items_in_batch is None else self._objective(None),
            msam_vmap_unavailable=None if num_items_in_batch is None else (
                f"the Trainer normalises {type(self.accelerator.unwrap_model(model)).__name__}'s loss by "
                "num_items_in_batch (label counts over the accumulation window), which the vmap m-SAM's per-group "
                "losses cannot reproduce"
            ),
        )
        # The clean loss in the units the Trainer logs: it returned c * L(x + e) where compute_loss gave L(x + e).
        reported_total, perturbed_mean = sum(reported), torch.stack(perturbed).mean()
        usable = (perturbed_mean != 0) & torch.isfinite(perturbed_mean) & torch.isfinite(reported_total)
        factor = torch.where(usable, reported_total / perturbed_mean, 1.0 / self.current_gradient_accumulation_steps)
        clean = (clean * factor).detach()
        # Sharpness in those units too: summed over the accumulation window and averaged over steps, as the loss is
        self._sharpness_sum = self._sharpness_sum + (reported_total.detach() - clean)
        self._sharpness_steps.add(self.state.global_step)
        if self._label_issues is not None:
            self._record_label_issues(index, inputs, noisy)
        return clean

    def _objective(self, num_items_in_batch):
        """The trainer's `compute_loss` as the step's ``loss_fn``, leaving no side effects behind."""

        def loss_fn(model, inputs, return_outputs=False):
            with self.compute_loss_context_manager(), self._side_effects_discarded():
                return self.compute_loss(model, dict(inputs), return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)

        return loss_fn

    def _descent(self, model, num_items_in_batch, reported, perturbed, inputs, share, loss=None) -> torch.Tensor:
        """The trainer's own training step at the perturbed weights, counting for ``1 / share`` of the step; or, for
        the vmap m-SAM's `loss` (computed already: a mean, the vmap runs only without num_items_in_batch), its
        backward scaled as the trainer scales such a loss."""
        if loss is not None:
            scaled = loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(scaled)
            reported.append(scaled.detach())
            perturbed.append(loss.detach())
            return loss.detach()
        steps = self.current_gradient_accumulation_steps
        # A loss the Trainer takes as normalised over the accumulation window is not divided by its steps: an m-SAM
        # group's share then comes from num_items_in_batch if the loss divides by it, else from dividing by `share`
        divide_by_share = share > 1 and self._scaled_for_accumulation(num_items_in_batch) and \
            not self._counts_items(model, inputs, num_items_in_batch)

        def restore():
            self.current_gradient_accumulation_steps = steps
            self._recorded_losses, self._descent_share = None, 1

        with restored(restore):
            self._descent_share = share if divide_by_share else 1
            self.current_gradient_accumulation_steps = steps * share
            self._recorded_losses = []
            reported.append(super().training_step(model, inputs, num_items_in_batch))
            perturbed.append(self._recorded_losses[-1])
        return perturbed[-1]

    def _scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The Trainer's rule: does it leave the loss undivided by the accumulation steps (`training_step`)?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    @torch.no_grad()
    def _counts_items(self, model, inputs, num_items_in_batch) -> bool:
        """Whether `compute_loss` divides by `num_items_in_batch` (a sum over the accumulation window's items) or
        returns a mean regardless (regression heads, models that take but ignore it): found once, by doubling it."""
        if self._loss_counts_items is None:
            if num_items_in_batch is None:
                return False
            was_training = model.training
            with restored(lambda: model.train(was_training)):
                model.eval()  # no dropout, no statistics: the two evaluations differ only by num_items_in_batch
                once, twice = (self._objective(n)(model, inputs) for n in (num_items_in_batch, 2 * num_items_in_batch))
            self._loss_counts_items = bool(torch.isclose(once.float(), 2 * twice.float(), rtol=1e-3))
        return self._loss_counts_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's loss; during the descent its value is kept (to report the clean loss in the same units), and
        divided by an m-SAM group's share where the Trainer would not divide it."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._recorded_losses is not None:
            loss = result[0] if return_outputs else result
            self._recorded_losses.append(loss.detach())
            if self._descent_share != 1:
                loss = loss / self._descent_share
                result = (loss, result[1]) if return_outputs else loss
        return result

    @contextlib.contextmanager
    def _side_effects_discarded(self):
        kept = {name: copy.deepcopy(vars(self)[name]) for name in self.sam_side_effect_attributes if name in vars(self)}

        def restore():
            for name, value in kept.items():
                setattr(self, name, value)

        with restored(restore):
            yield

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the step's diagnostics to training logs, each averaged over the steps since the previous log and over
        processes (so ``sam/skipped_perturbations`` is the fraction of perturbations skipped in that interval)."""
        if "loss" in logs and self.args.sam_mode != "none":
            metrics = self.sharpness_step.pop_metrics()
            if self._sharpness_steps:  # the glue's, in the Trainer's loss units (the step's are loss_fn's)
                metrics["sam/sharpness"] = torch.as_tensor(self._sharpness_sum / len(self._sharpness_steps))
                self._sharpness_sum, self._sharpness_steps = 0.0, set()
            for name, value in metrics.items():
                logs[name] = self.accelerator.reduce(value.to(self.args.device).float(), reduction="mean").item()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saves write x, also from inside a step

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trainer's; made during a step (a signal handler's save, a callback's), it writes ``x``, not ``x + e``."""
        with self.sharpness_step.original_parameters():
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        with self.sharpness_step.original_parameters():
            super()._save(output_dir, state_dict)

    # ------------------------------------------------------------------ the label-issue report

    def _reports_label_issues(self) -> bool:
        return bool(getattr(self.args, "report_label_issues", False))

    def train(self, *args, **kwargs):
        """The trainer's; with ``report_label_issues``, it keeps the report meanwhile and, at the end, writes
        ``output_dir/label_issues.csv`` (`label_issues` returns the same rows)."""
        if not self._reports_label_issues() or self.train_dataset is None:
            return super().train(*args, **kwargs)

        def restore():
            self._label_issues = None

        with restored(restore):
            self._label_issues = LabelIssueReport(len(ExampleIndexed(self.train_dataset)))
            self._label_issue_auroc = _may_mark_noise(self.train_dataset)
            output = super().train(*args, **kwargs)
            self._finish_label_issues()
        return output

    def label_issues(self):
        """The label-issue report of the last `train` (``report_label_issues=True``): a `datasets.Dataset` of every
        training example, the most likely mislabeled first, with its ``index`` in ``train_dataset``, ``score``,
        given ``label``, the model's ``prediction``, whether it is ``flagged`` (its score is above the threshold) and,
        when the dataset says so, ``is_noisy``; the rows of ``output_dir/label_issues.csv``."""
        if self._label_issue_results is None:
            raise ValueError(
                f"{type(self).__name__}.label_issues(): no report yet; set report_label_issues=True (with "
                "sam_mode='rwsam') and call train() first."
            )
        return self._label_issue_results[0]

    def get_train_dataloader(self):
        """The trainer's; with ``report_label_issues``, its rows also carry their position in ``train_dataset``
        (`ExampleIndexed`), which the collator passes on and `_prepare_inputs` takes out again."""
        dataset = self.train_dataset
        if self._label_issues is None or dataset is None:
            return super().get_train_dataloader()

        def restore():
            self.train_dataset = dataset

        with restored(restore):
            self.train_dataset = ExampleIndexed(dataset)
            return super().get_train_dataloader()

    def _record_label_issues(self, index, inputs, noisy) -> None:
        """Adds this micro-batch's per-sample scores (the step's `sample_scores`) to the report."""
        if index is None:
            raise ValueError(
                f"report_label_issues: the batch carries no {INDEX_COLUMN!r}. It is added to the rows by "
                "get_train_dataloader and must reach the training step: use a collator that passes the column on "
                "(hf_rwsam.data.collate_images and transformers' collators do)."
            )
        scores = self.sharpness_step.sample_scores
        if scores.margins is None:
            raise ValueError(
                "report_label_issues needs a classifier: one row of class logits per sample and integer labels "
                f"(the outputs of {type(self.accelerator.unwrap_model(self.model)).__name__} are not)."
            )
        labels = self.sharpness_step.per_sample_losses.labels(inputs)
        self._label_issues.update(index, scores, labels, noisy=noisy)

    def _merged_label_issues(self) -> LabelIssueReport:
        """The report over every process (a collective; one process merges with itself, with no device round trip,
        which on MPS could not hold the float64 sums)."""
        if self.accelerator.num_processes == 1:
            return self._label_issues.merged(lambda values: values)
        device = self.args.device
        return self._label_issues.merged(lambda values: self.accelerator.gather(values.to(device)).cpu())

    def _finish_label_issues(self) -> None:
        report = self._merged_label_issues()
        dataset, summary = report.to_dataset(), report.summary()
        self._label_issue_results = dataset, summary
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            dataset.to_pandas().to_csv(os.path.join(self.args.output_dir, LABEL_ISSUES_CSV), index=False)
        unseen = summary["num_examples"] - summary["num_scored"]
        if unseen:
            logger.warning(f"The label-issue report has no score for {unseen} of {summary['num_examples']} examples: "
                           "training never reached them (max_steps, dataloader_drop_last); they come last.")
        auroc = "" if summary["auroc"] is None else f"; AUROC against is_noisy {summary['auroc']:.4f}"
        logger.info(f"Label issues: {summary['num_flagged']} of {summary['num_examples']} examples flagged (score > "
                    f"{summary['threshold']}){auroc}; every example in {LABEL_ISSUES_CSV}.")

    def _log_label_issue_auroc(self) -> None:
        """Logs ``label_issues/auroc`` when the training set marks its corrupted labels (``is_noisy``). One whose
        columns show none skips the merge, a collective: the columns are the same on every process, so all of them skip
        it."""
        if self._label_issues is None or not self._label_issue_auroc:
            return
        auroc = self._merged_label_issues().auroc()
        if auroc is not None:
            self.log({"label_issues/auroc": auroc})

    def _save_checkpoint(self, model, trial) -> None:
        with self.sharpness_step.original_parameters():
            super()._save_checkpoint(model, trial)
        if self._label_issues is not None:
            state = self._merged_label_issues().state_dict()
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if self.args.should_save:
                torch.save(state, os.path.join(folder, LABEL_ISSUES_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """The trainer's, and the label-issue report saved with the checkpoint: a resumed report goes on from it."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._label_issues is None:
            return
        path = os.path.join(resume_from_checkpoint, LABEL_ISSUES_STATE)
        if not os.path.exists(path):
            logger.warning(f"{resume_from_checkpoint} holds no label-issue report (it was saved without "
                           "report_label_issues): the report covers only the steps after the resume.")
            return
        state = torch.load(path, weights_only=True)
        if LabelIssueReport.step_power_of(state) != STEP_POWER:
            logger.warning(f"The label-issue report in {resume_from_checkpoint} weighs visits by t^"
                           f"{LabelIssueReport.step_power_of(state)}, this version by t^{STEP_POWER}: the report starts "
                           "again and covers only the steps after the resume.")
            return
        if self.accelerator.process_index == 0:  # the saved report is every process's: it is counted once
            self._label_issues.load_state_dict(state)
        else:
            self._label_issues.updates = state["updates"]

    # ------------------------------------------------------------------ columns that never reach the model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (NOISE_COLUMN, INDEX_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _prepare_inputs(self, inputs):
        """The trainer's, minus the ``is_noisy`` and ``example_index`` columns (for diagnostics and the report)."""
        return super()._prepare_inputs({k: v for k, v in inputs.items() if k not in (NOISE_COLUMN, INDEX_COLUMN)})


def _may_mark_noise(dataset) -> bool:
    """Whether the rows of `dataset` may carry ``is_noisy``: its columns list it, or it lists none (not a
    `datasets.Dataset`; its rows are not read, which could draw a random transform's numbers)."""
    columns = getattr(dataset, "column_names", None)
    return columns is None or NOISE_COLUMN in columns


class _LabelIssueAUROC(TrainerCallback):
    """Logs the label-issue report's AUROC at the end of every epoch (`SharpnessAwareMixin._log_label_issue_auroc`)."""

    def __init__(self, trainer: SharpnessAwareMixin):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._log_label_issue_auroc()


class RWSAMTrainer(SharpnessAwareMixin, Trainer):
    """A `Trainer` whose training step is sharpness-aware, as set by its [`RWSAMConfig`], with hf-rwsam's model cards.

    Args:
        per_sample_loss_func (`Callable`, *optional*): see `SharpnessAwareMixin`.
        dataset_name (`str`, *optional*):
            The training dataset, e.g. ``"uoft-cs/cifar10"``, for the model card (its ``datasets`` metadata).
        *args, **kwargs: as for `Trainer`; ``args`` must be an `RWSAMConfig`.
    """

    def __init__(self, *args, dataset_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset_name = dataset_name

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
            label_issues=None if self._label_issue_results is None else self._label_issue_results[1],
            **card_data,
        )
        # Written aside and renamed into place: an upload reading the folder sees the old card or the new one, never
        # half of one (the Trainer's uploads ignore names starting with "_"). The name is this write's own, so that two
        # writers of one folder (two trainers, a save from a signal handler) do not move each other's file; opened
        # exclusively rather than by `tempfile`, so that the card gets the umask's permissions, not 0600.
        staging = Path(folder, f"_README.md.{uuid.uuid4().hex}.tmp")
        try:
            with open(staging, "x", encoding="utf-8") as f:
                f.write(card)
            os.replace(staging, Path(folder, "README.md"))
        finally:
            staging.unlink(missing_ok=True)  # after a failed write (after a rename, it is gone already)
