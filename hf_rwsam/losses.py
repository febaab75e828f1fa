"""Per-sample losses ``l_i`` from a model's outputs, matching the losses transformers' heads compute.

RW-SAM weights every sample's contribution to the ascent gradient, so it needs one loss per sample rather than the
batch mean that models return. The default follows ``config.problem_type`` as transformers' sequence/image
classification heads do; all losses are computed in fp32, whatever the autocast dtype of the logits.

* ``single_label_classification``: cross-entropy (with the Trainer's ``label_smoothing_factor``);
* ``multi_label_classification``: binary cross-entropy with logits, averaged over labels;
* ``regression``: squared error, averaged over outputs;
* token-level logits ``[b, t, V]`` with labels ``[b, t]`` (``-100`` ignored): each sequence's share of the batch's
  token mean, ``l_i = b * (sum of sequence i's token losses) / (tokens in the batch)``, so that their mean is the token
  mean the models and the Trainer compute (labels shifted by one for causal language models).

Outputs may be a `ModelOutput`/dict with ``logits``, a tuple in the transformers convention (``(loss, logits, ...)``
when the model was given labels, ``(logits, ...)`` otherwise), or the logits themselves. Whatever this rule cannot
reproduce (class weights, auxiliary losses, a ``compute_loss_func``) needs a ``per_sample_loss_func``: RW-SAM checks
the rule against the loss being optimised on its first step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

PerSampleLossFunc = Callable[[Any, torch.Tensor], torch.Tensor]

IGNORE_INDEX = -100

PER_SAMPLE_LOSS_EXAMPLE = """\
    import torch.nn.functional as F
    from hf_rwsam.losses import model_logits

    class_weights = torch.tensor([1.0, 4.0])  # the weights of your weighted cross-entropy

    def per_sample_loss_func(outputs, labels):  # -> Tensor[b], whose mean is the weighted loss
        logits = model_logits(outputs)  # outputs["logits"], or the logits of a (loss, logits, ...) tuple
        w = class_weights.to(logits.device)[labels]
        return F.cross_entropy(logits.float(), labels, reduction="none") * w * len(labels) / w.sum()

    trainer = RWSAMTrainer(..., per_sample_loss_func=per_sample_loss_func)
"""
"""How a per-sample loss is written, shown by the errors that ask for one (and in the README)."""


def model_logits(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: ``outputs["logits"]``, or the first non-scalar element of a tuple (a model
    given labels returns ``(loss, logits, ...)``, one without ``(logits, ...)``), or `outputs` itself."""
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)):
        logits = next((o for o in outputs if isinstance(o, torch.Tensor) and o.dim() > 0), None)
    else:
        logits = outputs
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "The per-sample losses need the model's logits, and its outputs have none "
            f"({type(outputs).__name__}); pass a `per_sample_loss_func(outputs, labels) -> Tensor[b]` that reads them."
        )
    return logits


def infer_problem_type(logits: torch.Tensor, labels: torch.Tensor, num_labels: int | None = None) -> str:
    """transformers' rule (``*ForSequenceClassification``): 1 output is regression, integer labels single-label."""
    if logits.dim() == 3 and labels.dim() == 2:
        return "token_classification"
    if logits.dim() == 1 or (num_labels or logits.shape[-1]) == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def per_sample_loss(
    outputs: Any,
    labels: torch.Tensor,
    problem_type: str | None = None,
    label_smoothing: float = 0.0,
    shift_labels: bool = False,
) -> torch.Tensor:
    """The loss of each sample of a batch, fp32, shape ``[b]``.

    Args:
        outputs: the model's outputs (a `ModelOutput`/dict with ``logits``, a tuple ``(loss, logits, ...)`` or
            ``(logits, ...)``, or the logits tensor).
        labels (`Tensor`): ``[b]`` class indices, ``[b, C]`` multi-label targets, ``[b]``/``[b, k]`` regression
            targets or ``[b, t]`` token labels.
        problem_type (`str`, *optional*): ``config.problem_type``; inferred from the shapes and dtypes when None.
        label_smoothing (`float`): for single-label and token-level cross-entropy.
        shift_labels (`bool`): token-level only: predict token ``t + 1`` from position ``t`` (causal LMs).
    """
    logits = model_logits(outputs).float()
    if problem_type is None or (logits.dim() == 3 and labels.dim() == 2):
        problem_type = infer_problem_type(logits, labels)
    if problem_type == "token_classification":
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token_losses = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
        )
        tokens = (labels != IGNORE_INDEX).sum().clamp_min(1)
        return token_losses.sum(1) * (labels.shape[0] / tokens)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none", label_smoothing=label_smoothing)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").flatten(1).mean(1)
    if problem_type == "regression":
        b = logits.shape[0]
        return F.mse_loss(logits.reshape(b, -1), labels.float().reshape(b, -1), reduction="none").mean(1)
    raise ValueError(
        f"problem_type={problem_type!r} is not supported for per-sample losses; expected one of "
        "'single_label_classification', 'multi_label_classification', 'regression', 'token_classification', "
        "or pass `per_sample_loss_func` to the trainer."
    )


@torch.no_grad()
def classification_margins(outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The margin of Pleiss et al. (2020, "Identifying mislabeled data using the area under the margin ranking"):
    the given label's logit minus the largest other logit, per sample, fp32 ``[b]``; and that other class, the
    runner-up to the given label (int64 ``[b]``, the first of equal logits), which one ``max`` yields with its value.
    None where the outputs are not one row of class logits per sample with integer labels (regression, multi-label,
    token-level)."""
    try:
        logits = model_logits(outputs)
    except ValueError:
        return None
    if logits.dim() != 2 or logits.shape[-1] < 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0] \
            or labels.dtype.is_floating_point:
        return None
    logits = logits.float()
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others, runner_up = logits.scatter(1, labels[:, None], float("-inf")).max(1)
    return given - others, runner_up
