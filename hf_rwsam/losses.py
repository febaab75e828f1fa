"""Per-sample losses ``l_i`` from a model's outputs, matching the losses transformers' heads compute.

RW-SAM weights every sample's contribution to the ascent gradient, so it needs one loss per sample rather than the
batch mean that models return. The default follows ``config.problem_type`` as transformers' sequence/image
classification heads do; all losses are computed in fp32, whatever the autocast dtype of the logits.

* ``single_label_classification``: cross-entropy (with the Trainer's ``label_smoothing_factor``);
* ``multi_label_classification``: binary cross-entropy with logits, averaged over labels;
* ``regression``: squared error, averaged over outputs;
* token-level logits ``[b, t, V]`` with labels ``[b, t]`` (``-100`` ignored): the mean over each sequence's tokens,
  with labels shifted by one for causal language models.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

PerSampleLossFunc = Callable[[Any, torch.Tensor], torch.Tensor]

IGNORE_INDEX = -100


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def infer_problem_type(logits: torch.Tensor, labels: torch.Tensor, num_labels: int | None = None) -> str:
    """transformers' rule (``*ForSequenceClassification``): 1 output is regression, integer labels single-label."""
    if logits.dim() == 3 and labels.dim() == 2:
        return "token_classification"
    if (num_labels or logits.shape[-1]) == 1:
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
        outputs: the model's outputs (a `ModelOutput`/dict with ``logits``, a tuple whose first element is the
            logits, or the logits tensor).
        labels (`Tensor`): ``[b]`` class indices, ``[b, C]`` multi-label targets, ``[b]``/``[b, k]`` regression
            targets or ``[b, t]`` token labels.
        problem_type (`str`, *optional*): ``config.problem_type``; inferred from the shapes and dtypes when None.
        label_smoothing (`float`): for single-label and token-level cross-entropy.
        shift_labels (`bool`): token-level only: predict token ``t + 1`` from position ``t`` (causal LMs).
    """
    logits = _logits(outputs).float()
    if problem_type is None or (logits.dim() == 3 and labels.dim() == 2):
        problem_type = infer_problem_type(logits, labels)
    if problem_type == "token_classification":
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token_losses = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
        )
        counts = (labels != IGNORE_INDEX).sum(1).clamp_min(1)
        return token_losses.sum(1) / counts
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
