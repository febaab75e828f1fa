"""Hyperparameter selection on the noisy validation split, over several selection seeds, ties broken toward the
package's defaults and reported as ties.

A method's grids are searched one after another (a coordinate search: RW-SAM's 6 rho at lambda = 1, then its 4 lambda
at the chosen rho, 9 candidates rather than 24). A candidate's score is the validation accuracy of its early-stopped
model (the best epoch on the noisy validation split), averaged over the selection seeds and counted in validation
images. Candidates within ``tolerance`` images of the best score are tied; among them the value closest to the
package's default (`SharpnessSettings`: rho 0.05, lambda 1) in log scale wins, the smaller one at equal distance (the
one closer to SAM, or to SGD). The test split is never looked at.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from hf_rwsam.sharpness import SharpnessSettings

DEFAULTS = {f.name: f.default for f in dataclasses.fields(SharpnessSettings)}


@dataclass(frozen=True)
class Tuned:
    """A method whose hyperparameters are chosen on the validation split, one grid after another.

    Args:
        label (`str`): the method's name in the tables.
        method (`dict`): its `SharpnessSettings` fields, the grids' starting values included (the defaults).
        grids (`tuple`): ``(field, values)`` pairs, searched in this order.
    """

    label: str
    method: dict = field(hash=False)
    grids: tuple = ()


def choose(scores: dict, name: str, tolerance: float) -> dict:
    """The value of field `name` to keep, from ``{value: score}`` (validation images).

    Returns ``value``, ``score``, ``tied`` (every value within `tolerance` of the best, ascending), ``margin``
    (the chosen score minus the best score among the values not tied; None when all are tied) and ``default``.
    """
    best = max(scores.values())
    tied = sorted(value for value, score in scores.items() if score >= best - tolerance)
    default = DEFAULTS[name]
    value = min(tied, key=lambda v: (abs(math.log(v / default)) if v > 0 and default > 0 else abs(v - default), v))
    others = [score for v, score in scores.items() if v not in tied]
    return {"value": value, "score": scores[value], "tied": tied, "default": default,
            "margin": scores[value] - max(others) if others else None}


def score(runs: list[dict], validation_size: int) -> float:
    """A candidate's score: the early-stopped model's validation accuracy, mean over the selection seeds, in images."""
    return statistics.fmean(run["val_accuracy_best"] for run in runs) * validation_size


def describe(decision: dict, name: str) -> str:
    """``rho=0.1`` or ``rho=0.1 (tie 0.05-0.2)`` for the tables."""
    short = name.split("_")[-1]
    text = f"{short}={decision['value']:g}"
    if len(decision["tied"]) > 1:
        text += " (tie " + "/".join(f"{v:g}" for v in decision["tied"]) + ")"
    return text
