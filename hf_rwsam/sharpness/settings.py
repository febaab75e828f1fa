"""`SharpnessSettings`: what a sharpness-aware step does, validated once, shared by every host loop.

The fields are the ``sam_*`` / ``msam_*`` / ``rwsam_*`` settings of docs/ALGORITHMS.md. `RWSAMConfig` is these settings
plus `TrainingArguments` (one declaration of each field, with its help, for both the Trainer's command line and a
plain loop). Values are typed as `transformers.HfArgumentParser` types them (``"0.05"`` is 0.05, ``"false"`` is
False); invalid ones raise `ValueError` naming the class, the field, the value and what is allowed; a setting that the
chosen mode ignores logs one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)  # the library's loggers are plain `logging` ones (transformers' are too)

SamMode = Literal["none", "sam", "msam", "rwsam"]
PerturbationScope = Literal["device", "global"]
MsamImplementation = Literal["auto", "loop", "vmap"]
RwsamEstimator = Literal["fd", "exact"]
RwsamNormalize = Literal["mean", "none"]
"""The string settings' choices, as types: `HfArgumentParser` offers them as the command line's choices."""

SAM_MODES = typing.get_args(SamMode)
PERTURBATION_SCOPES = typing.get_args(PerturbationScope)
MSAM_IMPLEMENTATIONS = typing.get_args(MsamImplementation)
RWSAM_ESTIMATORS = typing.get_args(RwsamEstimator)
RWSAM_NORMALIZATIONS = typing.get_args(RwsamNormalize)

TRUE_STRINGS, FALSE_STRINGS = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
"""How `HfArgumentParser` reads a bool from a string (`transformers.hf_argparser.string_to_bool`)."""

FP32_UNIT_ROUNDOFF = 2.0**-24
"""Half the spacing of fp32 numbers relative to their size: a weight ``w`` moves by a step below ``2^-24 |w|`` by
nothing or by a whole spacing, never by the step (the step is not resolved)."""

# Which mode (or setting) each group of fields serves: a field set away from its default where it is ignored is
# reported once at construction.
_USED_BY = {
    "sam_": lambda s: s.sam_mode != "none",
    "msam_": lambda s: s.sam_mode == "msam",
    "rwsam_": lambda s: s.sam_mode == "rwsam",
}
_IGNORED_WITHIN_MODE = {
    "sam_adaptive_eta": (lambda s: not s.sam_adaptive, "sam_adaptive=False"),
    "msam_vmap_max_memory_mb": (lambda s: s.msam_implementation != "auto", "msam_implementation != 'auto'"),
    "rwsam_num_probes": (lambda s: s.rwsam_estimator != "fd", "rwsam_estimator='exact'"),
    "rwsam_fd_step": (lambda s: s.rwsam_estimator != "fd", "rwsam_estimator='exact'"),
    "rwsam_exact_chunk_size": (lambda s: s.rwsam_estimator != "exact", "rwsam_estimator='fd'"),
    "rwsam_lambda": (lambda s: s.rwsam_target_ess is not None, "rwsam_target_ess is set (it chooses lambda)"),
}


@dataclass
class SharpnessSettings:
    r"""
    The settings of one sharpness-aware training step (`hf_rwsam.sharpness.SharpnessAwareStep`).

    Parameters:
        sam_mode (`str`, defaults to `"rwsam"`):
            `"none"` (a plain step), `"sam"`, `"msam"` (micro-batch SAM) or `"rwsam"` (Reweighted SAM).
        sam_rho (`float`, defaults to `0.05`):
            Radius of the perturbation, `e = rho * T^2 g / ||T g||`.
        sam_adaptive (`bool`, defaults to `False`):
            ASAM: scale the perturbation by `T = |x| + sam_adaptive_eta`, in every mode.
        sam_adaptive_eta (`float`, defaults to `0.01`):
            ASAM's offset `eta` (0 reproduces davda54/sam and pytorch_optimizer).
        sam_perturbation_scope (`str`, defaults to `"device"`):
            `"device"`: each process perturbs with its own micro-batch; `"global"`: with the gradient averaged over
            all processes (and RW-SAM weights over the global batch).
        msam_micro_batch_size (`int`, *optional*):
            m-SAM's `m`, required by `sam_mode="msam"`; must divide the per-device batch.
        msam_implementation (`str`, defaults to `"auto"`):
            `"loop"` (groups one after another), `"vmap"` (all groups at once with `torch.func`) or `"auto"`.
        msam_vmap_max_memory_mb (`float`, defaults to `1024`):
            `"auto"` uses vmap only if its extra memory, about `2 k d` numbers for `k` groups, fits in this budget.
        rwsam_lambda (`float`, defaults to `1.0`):
            Inverse temperature of the Gibbs weights `softmax(lambda * s)`; 0 is SAM.
        rwsam_estimator (`str`, defaults to `"fd"`):
            Per-sample gradient norms by finite differences (`"fd"`, `rwsam_num_probes` extra forwards) or `"exact"`
            (one backward, and the weighted ascent gradient from the same pass; BatchNorm models: batched backward
            passes, much slower).
        rwsam_num_probes (`int`, defaults to `1`):
            Rademacher probes `Q` of the `"fd"` estimator.
        rwsam_fd_step (`float`, *optional*):
            Finite-difference step `h` along the unit direction; `None` uses the measured default `1e-3 * sqrt(d)`
            (`hf_rwsam.sharpness.estimators.fd.default_fd_step`). It must be one fp32 can resolve: a probe moves every
            coordinate by `h / sqrt(d)`, and a weight of the typical (root-mean-square) size `||x|| / sqrt(d)` moves
            by that only if it is at least `2^-24` times the weight (`FP32_UNIT_ROUNDOFF`), that is if
            `h >= 2^-24 ||x||`. The first RW-SAM step checks this against the model's `||x||`; construction refuses
            `h < 2^-24`, which no model with `||x|| >= 1` (any network) resolves.
        rwsam_normalize (`str`, defaults to `"mean"`):
            Scores `s = n / mean(n)` (`"mean"`, scale-free lambda) or `s = n` (`"none"`, the paper's raw form).
        rwsam_target_ess (`float`, *optional*):
            In (0, 1]: choose lambda every step so the effective sample size is this fraction of the batch.
        rwsam_max_weight (`float`, *optional*):
            `c >= 1`: cap every weight at `c / b`; `None` or `inf`: no cap.
        rwsam_exact_chunk_size (`int`, defaults to `32`):
            The `"exact"` estimator takes per-sample norms from one backward through its layer rules
            (`hf_rwsam.sharpness.ghost`); the parameters no rule covers, and models whose BatchNorm couples the
            samples, take batched backward passes of this many samples each (memory grows as `chunk * d`).
    """

    sam_mode: SamMode = field(default="rwsam", metadata={"help": f"Sharpness-aware mode, one of {SAM_MODES}."})
    sam_rho: float = field(default=0.05, metadata={"help": "Perturbation radius rho (>= 0)."})
    sam_adaptive: bool = field(default=False, metadata={"help": "ASAM: scale the perturbation by |x| + eta."})
    sam_adaptive_eta: float = field(default=0.01, metadata={"help": "ASAM offset eta (>= 0)."})
    sam_perturbation_scope: PerturbationScope = field(
        default="device", metadata={"help": f"Where the perturbation is computed, one of {PERTURBATION_SCOPES}."}
    )
    msam_micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "m-SAM micro-batch size m; required by sam_mode='msam', must divide the per-device batch."},
    )
    msam_implementation: MsamImplementation = field(
        default="auto", metadata={"help": f"m-SAM implementation, one of {MSAM_IMPLEMENTATIONS}."}
    )
    msam_vmap_max_memory_mb: float = field(
        default=1024.0, metadata={"help": "Extra memory (MiB) m-SAM 'auto' may spend on the vmap implementation."}
    )
    rwsam_lambda: float = field(default=1.0, metadata={"help": "Gibbs inverse temperature lambda (>= 0); 0 is SAM."})
    rwsam_estimator: RwsamEstimator = field(
        default="fd", metadata={"help": f"Per-sample gradient norm estimator, one of {RWSAM_ESTIMATORS}."}
    )
    rwsam_num_probes: int = field(default=1, metadata={"help": "Rademacher probes Q of the 'fd' estimator (>= 1)."})
    rwsam_fd_step: float | None = field(
        default=None,
        metadata={"help": "Finite-difference step h (one fp32 resolves: h >= 2^-24 ||x||); None: the measured default "
                          "1e-3 * sqrt(d)."},
    )
    rwsam_normalize: RwsamNormalize = field(
        default="mean", metadata={"help": f"Score normalisation, one of {RWSAM_NORMALIZATIONS}."}
    )
    rwsam_target_ess: float | None = field(
        default=None, metadata={"help": "Target effective sample size as a fraction of the batch, in (0, 1]."}
    )
    rwsam_max_weight: float | None = field(
        default=None, metadata={"help": "Cap every Gibbs weight at c / b (c >= 1; None or inf: no cap)."}
    )
    rwsam_exact_chunk_size: int = field(
        default=32,
        metadata={"help": "Samples per batched backward, for what the 'exact' estimator's layer rules do not cover (>= 1)."},
    )

    def __post_init__(self):
        self.validate()
        # Cooperative: a dataclass that combines these settings with `TrainingArguments` (`RWSAMConfig`, or one of
        # your own with a TRL config) goes on with that class's own checks.
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def refuse(self, field_name: str, value, allowed: str) -> ValueError:
        """The error for an invalid setting: ``<Class>.<field>=<value> is invalid: <what is allowed>.``"""
        return ValueError(f"{type(self).__name__}.{field_name}={value!r} is invalid: {allowed}.")

    def validate(self) -> None:
        """Types the fields as `HfArgumentParser` would, then raises `ValueError` for the first invalid one; warns once
        for each field the mode ignores."""
        self._type_fields()
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:
                raise self.refuse(name, getattr(self, name), f"choose one of {allowed}")
        for name in ("sam_rho", "sam_adaptive_eta", "rwsam_lambda", "msam_vmap_max_memory_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise self.refuse(name, value, "it must be a finite number >= 0")
        for name in ("rwsam_num_probes", "rwsam_exact_chunk_size"):
            if not getattr(self, name) >= 1:
                raise self.refuse(name, getattr(self, name), "it must be an integer >= 1")
        h = self.rwsam_fd_step
        if h is not None and not (math.isfinite(h) and h >= FP32_UNIT_ROUNDOFF):
            raise self.refuse(
                "rwsam_fd_step", h, f"it must be a finite number >= 2^-24 = {FP32_UNIT_ROUNDOFF:.3g} (fp32 cannot "
                "resolve a shorter step for any model whose weights have norm >= 1), or None for the default "
                "1e-3 * sqrt(d)"
            )
        if self.rwsam_target_ess is not None and not 0 < self.rwsam_target_ess <= 1:
            raise self.refuse("rwsam_target_ess", self.rwsam_target_ess, "it must be in (0, 1], or None")
        if self.rwsam_max_weight is not None and not self.rwsam_max_weight >= 1:
            raise self.refuse("rwsam_max_weight", self.rwsam_max_weight,
                              "it must be >= 1 (a cap of c / b per weight), or None or inf for no cap")
        m = self.msam_micro_batch_size
        if self.sam_mode == "msam" and m is None:
            raise self.refuse("msam_micro_batch_size", m, "sam_mode='msam' needs a micro-batch size m >= 1")
        if m is not None and not m >= 1:
            raise self.refuse("msam_micro_batch_size", m, "it must be an integer >= 1, or None")
        self._warn_ignored_settings()

    def _type_fields(self) -> None:
        """Each field as its declared type, as `HfArgumentParser` reads a string for it (`_type_field`)."""
        hints = typing.get_type_hints(SharpnessSettings)  # `field.type` may be a string (or HfArgumentParser's type)
        for f in dataclasses.fields(SharpnessSettings):
            if typing.get_origin(hints[f.name]) is not Literal:  # the choices are checked by name in `validate`
                self._type_field(f.name, hints[f.name])

    def _type_field(self, name: str, hint) -> None:
        """Field `name` as type `hint` (``bool``, ``int``, ``float``, optionally ``| None``), as `HfArgumentParser`
        reads a string for it: numbers from numeric strings, bools from yes/no, true/false, t/f, y/n, 1/0. A bool is
        not taken for a number (Python's ``True == 1``), nor a non-integral number for an integer."""
        types = typing.get_args(hint) or (hint,)
        kind, optional = next(t for t in types if t is not type(None)), type(None) in types
        value = getattr(self, name)
        if value is None and optional:
            return
        allowed = {bool: "True or False (or, as HfArgumentParser reads strings, one of "
                         f"{TRUE_STRINGS + FALSE_STRINGS})",
                   int: "an integer", float: "a number"}[kind] + (", or None" if optional else "")
        if kind is bool:
            if isinstance(value, str) and value.lower() in TRUE_STRINGS + FALSE_STRINGS:
                value = value.lower() in TRUE_STRINGS
            elif not isinstance(value, bool):
                raise self.refuse(name, value, f"it must be {allowed}")
        elif isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise self.refuse(name, value, f"it must be {allowed}") from None
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
            raise self.refuse(name, value, f"it must be {allowed}")
        else:
            value = kind(value)
        setattr(self, name, value)

    def _warn_ignored_settings(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(SharpnessSettings)}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value == default or name == "sam_mode":
                continue
            prefix = name.split("_")[0] + "_"
            if not _USED_BY[prefix](self):
                logger.warning(f"{type(self).__name__}.{name}={value!r} has no effect with sam_mode={self.sam_mode!r}.")
            elif name in _IGNORED_WITHIN_MODE and _IGNORED_WITHIN_MODE[name][0](self):
                logger.warning(
                    f"{type(self).__name__}.{name}={value!r} has no effect with {_IGNORED_WITHIN_MODE[name][1]}."
                )


def _choices() -> dict[str, tuple[str, ...]]:
    """Each string setting's choices, from its `Literal` type."""
    hints = typing.get_type_hints(SharpnessSettings)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(SharpnessSettings)
            if typing.get_origin(hints[f.name]) is Literal}
