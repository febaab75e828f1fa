"""Which training examples look mislabeled: a running summary, per example, of the per-sample scores that RW-SAM
computes at every step anyway (`SharpnessAwareStep.sample_scores`), so the report costs no forward or backward pass.

The score of example ``i`` is minus its margin, the given label's logit minus the largest other logit in the
step's forward at ``x`` (the margin of the area under the margin, AUM: Pleiss et al., "Identifying Mislabeled Data
using the Area Under the Margin Ranking", NeurIPS 2020), averaged over its visits ``v`` with weights growing as the
eighth power of the step ``t_v`` at which they happen::

    score_i = - sum_v t_v^8 m_iv / sum_v t_v^8

so that later, more informative visits count more without knowing when training will end: whenever the report is
read, the last tenth of the steps so far holds 61% of the weight (``1 - 0.9^9``). An example is flagged when
``score_i > 0``: on average, its given label lost to another class. Both were chosen on separate noisy runs
(experiments/RESULTS.md, "Choosing the summary and the threshold"; `experiments/label_issues.py --select`: MNIST and
digits, 30% symmetric and asymmetric noise, 5 and 15 epochs): this summary had AUROC 0.85-0.997, against 0.67-0.99
for RW-SAM's own gradient-norm summaries (normalised norm, Gibbs weight, rank in the batch) and 0.75-0.99 for the
plain mean margin; weights ``t^8`` beat ``t`` in 14 of 16 runs (by up to 0.05 after 5 epochs) and ``t^16`` did no
better. ``score > 0`` recalls 82-99% of the corrupted labels; it flags more examples than are corrupted when the
model is undertrained (1.2x after 15 epochs on MNIST, 1.9-2.6x after 5), when it also disagrees with clean labels:
rank by the score where precision matters. A two-component Gaussian mixture on the scores (as DivideMix splits
losses) flagged 4-6x too many under the asymmetric noise.

Memory is O(N) for N examples (a few numbers each); every process keeps the examples it saw, and `merged` adds them
up over processes. The report lives on the device of the margins it is given (float64 sums; on MPS, which has no
float64, on the CPU), so that an update waits for nothing; it comes to the CPU only to be read (`merged`, `scores`,
`to_dataset`, `summary`, `state_dict`). `RWSAMTrainer` keeps one with ``RWSAMConfig(report_label_issues=True)``; a
plain loop keeps its own::

    report = LabelIssueReport(len(dataset))
    for batch in loader:  # rows carry "example_index" (`hf_rwsam.data.ExampleIndexed`)
        index = batch.pop("example_index")
        loss = step(model, batch, loss_fn)
        report.update(index, step.sample_scores, batch["labels"])
        ...
    report.to_dataset()  # index, score, label, prediction, flagged, visits; the most suspicious first
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

LABEL_ISSUES_CSV = "label_issues.csv"
"""The report's file in the Trainer's ``output_dir``."""

STEP_POWER = 8
"""A visit at step ``t`` weighs ``t ** STEP_POWER`` in the score (chosen among 0, 1, 2, 4, 8 and 16 by `--select`)."""

THRESHOLD = 0.0
THRESHOLD_RULE = (
    "0 was chosen on separate noisy runs (MNIST and digits, 30% symmetric and asymmetric noise; "
    "experiments/label_issues.py --select), where it recalled 82-99% of the corrupted labels and flagged 1.0-1.2x "
    "their number after 15 epochs (more when the model is undertrained: rank by the score where precision "
    "matters), and a two-component Gaussian mixture split of the scores 4-6x too many under the asymmetric noise"
)
"""How `THRESHOLD` was chosen, for the model card."""


class LabelIssueReport:
    """Per training example: how often it was seen, the step-weighted sums of minus its margins, its given label, the
    model's prediction at its last visit and, when the data say so, whether its label was corrupted.

    Args:
        num_examples (`int`): N, the size of the training set; examples are its positions ``0 .. N - 1``.
    """

    def __init__(self, num_examples: int):
        if not (isinstance(num_examples, int) and num_examples >= 1):
            raise ValueError(f"LabelIssueReport: num_examples={num_examples!r} must be an integer >= 1.")
        self.num_examples = num_examples
        self.visits = torch.zeros(num_examples, dtype=torch.int64)
        self.score_sums = torch.zeros(num_examples, dtype=torch.float64)  # sum_v t_v^8 (-m_iv)
        self.weight_sums = torch.zeros(num_examples, dtype=torch.float64)  # sum_v t_v^8
        self.labels = torch.full((num_examples,), -1, dtype=torch.int64)
        self.predictions = torch.full((num_examples,), -1, dtype=torch.int64)
        self.noisy = torch.full((num_examples,), -1, dtype=torch.int8)
        self.last_update = torch.full((num_examples,), -1, dtype=torch.int64)
        self.updates = 0

    def update(self, indices, scores, labels, *, noisy=None) -> None:
        """Adds one micro-batch: this process's rows, in the batch's order.

        The predicted class at this visit, the argmax of the logits, comes from the margin ``m`` and the runner-up
        ``r`` without the logits: the given label ``y`` where ``m > 0``, ``r`` where ``m < 0`` and, where they tie
        (``m == 0``), the smaller of ``y`` and ``r``, the first of the equal logits as ``argmax`` takes it.

        Args:
            indices (`Tensor` or sequence): ``[b]`` the examples' positions in the training set.
            scores (`SampleScores`): the step's ``sample_scores`` for this micro-batch; a classifier's (its
                ``margins`` and ``runner_up`` are set).
            labels (`Tensor`): ``[b]`` the given (training) labels, those the margins were taken against.
            noisy (`Tensor`, *optional*): ``[b]`` whether each label is known to be corrupted (``is_noisy``).
        """
        if scores.margins is None or scores.runner_up is None:
            raise ValueError(
                "LabelIssueReport.update: the scores have no margins or runner-up classes; the report needs a "
                "classifier, one row of class logits per sample with integer labels."
            )
        device = _home(scores.margins.device)
        moved = self.visits.device != device  # the first update, or the first after `load_state_dict`
        indices = torch.as_tensor(indices).detach().reshape(-1)
        b = indices.shape[0]
        given = {"margins": scores.margins, "runner_up": scores.runner_up, "labels": labels, "noisy": noisy}
        for name, value in given.items():
            if value is not None and torch.as_tensor(value).reshape(-1).shape[0] != b:
                raise ValueError(
                    f"LabelIssueReport.update: {b} indices but {torch.as_tensor(value).reshape(-1).shape[0]} {name}; "
                    "pass this process's rows of one micro-batch, in the batch's order."
                )
        # Reading the indices' range back waits for the device that holds them: they are checked by name where that
        # is free (on the CPU) and, on a device, once, when the report moves there; a bad index after that still
        # fails, in index_add_'s own bounds check (on CUDA a device-side assert, raised at the next synchronisation).
        if b and (indices.device.type == "cpu" or moved) and not (
                0 <= int(indices.min()) and int(indices.max()) < self.num_examples):
            raise ValueError(
                f"LabelIssueReport.update: indices must be positions in the training set, 0 .. {self.num_examples - 1};"
                f" got {int(indices.min())} .. {int(indices.max())}."
            )
        if moved:
            for name in _BUFFERS:
                setattr(self, name, getattr(self, name).to(device))
        indices = _to(indices, device, torch.int64)
        self.updates += 1
        weight = torch.full((b,), float(self.updates) ** STEP_POWER, dtype=torch.float64, device=device)  # t_v^8
        self.visits.index_add_(0, indices, torch.ones_like(indices))
        margins, labels, runner_up = (_to(scores.margins, device, torch.float64), _to(labels, device, torch.int64),
                                      _to(scores.runner_up, device, torch.int64))
        self.score_sums.index_add_(0, indices, -weight * margins)
        self.weight_sums.index_add_(0, indices, weight)
        self.labels[indices] = labels
        given_wins = (margins > 0) | ((margins == 0) & (labels < runner_up))
        self.predictions[indices] = torch.where(given_wins, labels, runner_up)
        if noisy is not None:
            self.noisy[indices] = _to(noisy, device, torch.int8)
        self.last_update[indices] = self.updates

    def merged(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> LabelIssueReport:
        """The report of every process's updates, the same on every process (a collective: all of them call it).

        Args:
            gather (`Callable`): every process's tensor concatenated along dim 0 in process order
                (``accelerator.gather``, ``TorchHost().gather``).
        """
        n = self.num_examples
        merged = LabelIssueReport(n)

        def stacked(values: torch.Tensor) -> torch.Tensor:
            return gather(values).cpu().reshape(-1, n)

        for name in ("visits", "score_sums", "weight_sums"):
            setattr(merged, name, stacked(getattr(self, name)).sum(0))
        last_updates = stacked(self.last_update)
        latest = last_updates.argmax(0, keepdim=True)  # the process that saw the example last
        merged.last_update = last_updates.gather(0, latest)[0]
        for name in ("labels", "predictions", "noisy"):
            setattr(merged, name, stacked(getattr(self, name)).gather(0, latest)[0])
        merged.updates = self.updates
        return merged

    def scores(self) -> np.ndarray:
        """Per example, minus its ``t^8``-weighted mean margin (higher: more likely mislabeled); NaN if unseen."""
        weights = self.weight_sums.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(weights > 0, self.score_sums.cpu().numpy() / weights, np.nan)

    def auroc(self) -> float | None:
        """The area under the ROC curve of the scores as a detector of the examples known to be corrupted (their
        ``is_noisy``), over the examples seen; None without both corrupted and clean ones among them."""
        from sklearn.metrics import roc_auc_score

        scores, noisy = self.scores(), self.noisy.cpu().numpy()
        known = ~np.isnan(scores) & (noisy >= 0)
        if len(np.unique(noisy[known])) < 2:
            return None
        return float(roc_auc_score(noisy[known], scores[known]))

    def to_dataset(self):
        """The report as a `datasets.Dataset`, the most suspicious example first (unseen ones last, ties by index):
        ``index`` (position in the training set), ``score``, ``label`` (given; -1 if never seen), ``prediction`` (the
        predicted class at the last visit; -1 where unknown), ``flagged`` (``score > THRESHOLD``), ``visits`` and,
        when known, ``is_noisy``."""
        from datasets import Dataset

        scores = self.scores()
        order = np.argsort(-np.where(np.isnan(scores), -np.inf, scores), kind="stable")
        columns: dict[str, Any] = {
            "index": order,
            "score": scores[order],
            "label": self.labels.cpu().numpy()[order],
            "prediction": self.predictions.cpu().numpy()[order],
            "flagged": scores[order] > THRESHOLD,
            "visits": self.visits.cpu().numpy()[order],
        }
        noisy = self.noisy.cpu().numpy()
        if (noisy >= 0).any():
            columns["is_noisy"] = noisy[order] == 1
        return Dataset.from_dict(columns)

    def summary(self) -> dict[str, Any]:
        """What the model card says: ``num_examples``, ``num_scored`` (seen at least once), ``num_flagged``,
        ``threshold``, ``threshold_rule`` (how it was chosen), ``auroc`` (None unless `auroc` has one) and
        ``num_noisy`` (the examples known to be corrupted, None when unknown)."""
        scores, noisy = self.scores(), self.noisy.cpu().numpy()
        return {
            "num_examples": self.num_examples,
            "num_scored": int((~np.isnan(scores)).sum()),
            "num_flagged": int((scores > THRESHOLD).sum()),
            "threshold": THRESHOLD,
            "threshold_rule": THRESHOLD_RULE,
            "auroc": self.auroc(),
            "num_noisy": int((noisy == 1).sum()) if (noisy >= 0).any() else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the report holds, on the CPU, to continue it after a resume (`load_state_dict`: the next
        update moves it back to the margins' device)."""
        return {"num_examples": self.num_examples, "updates": self.updates, "step_power": STEP_POWER,
                **{name: getattr(self, name).to("cpu", copy=True) for name in _BUFFERS}}

    @staticmethod
    def step_power_of(state: dict[str, Any]) -> int:
        """The power of the step by which the visits of a saved report (`state_dict`) were weighted: 1 for a report
        saved before ``step_power`` was recorded, which weighed a visit at step t by t."""
        return state.get("step_power", 1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the report saved by `state_dict` (copies of its tensors). A report whose visits were weighted
        by another power of the step (saved before ``STEP_POWER`` changed) is refused: its sums do not add up with
        this one's."""
        if state["num_examples"] != self.num_examples:
            raise ValueError(
                f"LabelIssueReport: the saved report covers {state['num_examples']} examples, this training set has "
                f"{self.num_examples}."
            )
        if self.step_power_of(state) != STEP_POWER:
            raise ValueError(
                f"LabelIssueReport: the saved report weighs a visit at step t by t^{self.step_power_of(state)}, this "
                f"version by t^{STEP_POWER}; its sums cannot be continued."
            )
        self.updates = state["updates"]
        for name in _BUFFERS:
            setattr(self, name, state[name].clone())


_BUFFERS = ("visits", "score_sums", "weight_sums", "labels", "predictions", "noisy", "last_update")
"""The report's per-example tensors."""


def _home(device: torch.device) -> torch.device:
    """Where a report fed margins on `device` keeps its float64 sums: there, or on the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _to(values, device: torch.device, dtype) -> torch.Tensor:
    """`values` flat on `device`; a copy to an accelerator is queued without waiting (safe from the CPU's memory, which
    CUDA stages at once), one to the CPU waits (its values are read next)."""
    return torch.as_tensor(values).detach().reshape(-1).to(device, dtype, non_blocking=device.type != "cpu")
