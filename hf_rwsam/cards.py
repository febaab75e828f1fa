"""Model cards for models trained with [`RWSAMTrainer`]: the Jinja2 template
``hf_rwsam/model_cards/rwsam_model_card.md`` filled from the training arguments, the Trainer's state, the training
set's label-noise record and the label-issue report, with the Hub metadata (`huggingface_hub.ModelCardData`) in its YAML front matter."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from importlib import resources
from typing import Any

import jinja2
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import TrainerState
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from .config import RWSAMConfig
from .label_issues import LABEL_ISSUES_CSV

TEMPLATE_NAME = "rwsam_model_card.md"
SAM_PREFIXES = ("sam_", "msam_", "rwsam_")
TRAINING_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "weight_decay", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
)
MAX_MATRIX_CLASSES = 20
"""The realised transition matrix is tabulated up to this many classes."""
_TIMING_SUFFIXES = ("_runtime", "_per_second", "_preparation_time")
TIMM_WRAPPER = "TimmWrapperForImageClassification"
"""The class `hf_rwsam.models.create_model` returns: loading it needs hf-rwsam's timm architectures registered."""


def render_model_card(
    args: RWSAMConfig,
    state: TrainerState,
    *,
    model_name: str,
    model_class: str,
    repo_id: str,
    dataset_name: str | None = None,
    noise_info: dict[str, Any] | None = None,
    label_issues: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    **card_data,
) -> str:
    """
    Renders the model card of a model trained with `RWSAMTrainer`.

    Args:
        args (`RWSAMConfig`):
            The training arguments; every ``sam_*`` / ``msam_*`` / ``rwsam_*`` field is listed.
        state (`TrainerState`):
            Gives the steps, epochs and the latest evaluation metrics (``eval_*`` in ``state.log_history``).
        model_name (`str`): Title of the card and name of its ``model-index`` entry.
        model_class (`str`): Class name of the saved model; picks the loading snippet.
        repo_id (`str`): Hub repository id (or local folder) shown in the loading snippet.
        dataset_name (`str`, *optional*): Training dataset, e.g. ``"uoft-cs/cifar10"`` (a Hub id also goes to the
            ``datasets`` metadata), ``"digits"`` or a local folder.
        noise_info (`dict`, *optional*):
            The training set's label-noise record, as returned by `hf_rwsam.data.label_noise_info`.
        label_issues (`dict`, *optional*):
            The label-issue report's summary (`hf_rwsam.label_issues.LabelIssueReport.summary`), when training kept
            one (``report_label_issues=True``).
        tags (`list[str]`, *optional*): Tags added to hf-rwsam's own.
        card_data: Other `huggingface_hub.ModelCardData` fields (``license``, ``language``, ``base_model``, ...).

    Returns:
        `str`: The card, a markdown document with YAML front matter.
    """
    task = _task(model_class)
    evaluation = _latest_evaluation(state.log_history)
    metrics = evaluation["metrics"] if evaluation else {}
    accuracy = next((value for name, value in metrics.items() if name.endswith("accuracy")), None)
    # The Hub's `metrics`: what was evaluated, besides the loss (the training objective itself)
    metric_names = [name.removeprefix("eval_") for name in metrics if name != "eval_loss"]
    hub_dataset = dataset_name if dataset_name and _is_hub_id(dataset_name) else None
    sam_tags = ["sharpness-aware-minimization", args.sam_mode] if args.sam_mode != "none" else []
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=list(dict.fromkeys(["hf-rwsam", *sam_tags, task, *(tags or [])])),
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=metric_names or None,
        model_name=model_name,
        eval_results=None if accuracy is None else [
            EvalResult(
                task_type=task, dataset_type=hub_dataset or "custom", dataset_name=dataset_name or "evaluation set",
                metric_type="accuracy", metric_value=accuracy,
            )
        ],
        **card_data,
    )
    total_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    small = noise_info is not None and noise_info["num_classes"] <= MAX_MATRIX_CLASSES
    template = (resources.files(__package__) / "model_cards" / TEMPLATE_NAME).read_text(encoding="utf-8")
    content = jinja2.Template(
        template, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    ).render(
        card_data=metadata.to_yaml(),
        model_name=model_name,
        model_class=model_class,
        repo_id=repo_id,
        loader=_loader(model_class),
        timm_model=model_class == TIMM_WRAPPER,
        sam_mode=args.sam_mode,
        sam_adaptive=args.sam_adaptive,
        sam_settings=_settings(args, [f.name for f in dataclasses.fields(args) if f.name.startswith(SAM_PREFIXES)]),
        training_settings=_settings(args, TRAINING_SETTINGS) + [("total_train_batch_size", total_batch_size)],
        global_step=state.global_step,
        epoch=state.epoch,
        dataset_name=dataset_name,
        noise=noise_info,
        transition_matrix=noise_info["transition_matrix"] if small else None,
        label_issues=label_issues,
        label_issues_csv=LABEL_ISSUES_CSV,
        evaluation=evaluation,
    )
    return str(ModelCard(content))  # parsing the front matter checks the metadata


def _latest_evaluation(log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last logged evaluation: its ``eval_*`` metrics (timings left out), step and epoch."""
    for entry in reversed(log_history):
        metrics = {
            name: value for name, value in entry.items()
            if name.startswith("eval_") and not name.endswith(_TIMING_SUFFIXES)
        }
        if metrics:
            return {"metrics": metrics, "step": entry.get("step"), "epoch": entry.get("epoch")}
    return None


def _is_hub_id(name: str) -> bool:
    """``owner/name`` and not a local path: a Hub dataset the ``datasets`` metadata can point to."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not os.path.exists(name)


def _task(model_class: str) -> str:
    """The Hub pipeline of the model: text classification for ``*ForSequenceClassification``, else image."""
    return "text-classification" if model_class.endswith("ForSequenceClassification") else "image-classification"


def _loader(model_class: str) -> str | None:
    """The `transformers` class whose ``from_pretrained`` loads ``model_class`` (an Auto class where one applies)."""
    if model_class in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        return "AutoModelForImageClassification"
    if model_class.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    return model_class if hasattr(transformers, model_class) else None


def _settings(args: RWSAMConfig, names) -> list[tuple[str, Any]]:
    values = [getattr(args, name) for name in names]
    return [(name, value.value if isinstance(value, enum.Enum) else value) for name, value in zip(names, values)]
