"""Peer-test plugin: run transformers' own Trainer tests against `hf_rwsam.RWSAMTrainer`.

RWSAM_PEER_MODE unset  -> the tests run against the plain `transformers.Trainer` (baseline).
RWSAM_PEER_MODE=MODE   -> (MODE in none/sam/msam/rwsam) `transformers.Trainer` is replaced, *before* the test modules
                          are imported, by `PeerRWSAMTrainer`, a thin subclass of `RWSAMTrainer` whose only addition is
                          that it accepts the plain `TrainingArguments` the tests build and turns them into an
                          `RWSAMConfig` with `sam_mode=MODE` (all other SAM fields at their defaults).

Why at import time: the test helpers subclass `Trainer` at import (e.g. `CustomDataloaderTrainer(Trainer)` in
trainer_test_utils) and bind `from transformers import Trainer` at module level, so the class must already be swapped
when the modules are imported. `TrainingArguments` itself is left alone (so `RegressionTrainingArguments` & co stay
what the tests define); the conversion happens when a trainer is built:

* the args object keeps its identity (`trainer.args is args`, as with the plain Trainer): its class is switched in
  place to a dataclass deriving from `RWSAMConfig` *and* the test's own class (e.g. `RegressionTrainingArguments`),
  the SAM fields are set to their defaults with `sam_mode=MODE`, and `RWSAMConfig`'s own validation is run. No
  TrainingArguments value is touched, so nothing RWSAMConfig rejects is introduced by the swap (the default
  `sam_perturbation_scope='device'` is valid with gradient accumulation, and no FSDP/DeepSpeed is added);
* `args=None` builds `RWSAMConfig(output_dir="tmp_trainer", sam_mode=MODE)`, mirroring the Trainer's own default;
* for msam, `msam_micro_batch_size` is set to 1 (the only value that divides every batch size the tests use).

Each test records how many trainers it built (`rwsam_trainers` in the junit properties), so a test that never touches
a trainer is not mistaken for evidence.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest

MODE = os.environ.get("RWSAM_PEER_MODE") or None
_VALID = ("none", "sam", "msam", "rwsam")
_counter = {"built": 0}

if MODE is not None:
    if MODE not in _VALID:
        raise pytest.UsageError(f"RWSAM_PEER_MODE={MODE!r}: choose one of {_VALID} (or unset it for the plain Trainer)")

    # transformers.processing_utils re-executes transformers/__init__.py on its first import
    # (`direct_transformers_import`), which puts a *new* lazy module into sys.modules["transformers"]. Import it (and
    # hf_rwsam, which pulls it in) first, then patch whatever module object is current at the end.
    import transformers.processing_utils  # noqa: F401

    import hf_rwsam
    from hf_rwsam import RWSAMConfig, RWSAMTrainer
    from transformers import TrainingArguments

    transformers = sys.modules["transformers"]
    _ORIGINAL_TRAINER = transformers.Trainer

    # dataclasses built here must be importable by name: the Trainer pickles its args into training_args.bin
    _classes = types.ModuleType("rwsam_peer_classes")
    sys.modules["rwsam_peer_classes"] = _classes
    _SAM_FIELDS = [f for f in dataclasses.fields(RWSAMConfig) if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}]

    def _config_class(cls):
        if issubclass(cls, RWSAMConfig):
            return cls
        if cls is TrainingArguments:
            return RWSAMConfig
        name = f"RWSAM_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        combined = getattr(_classes, name, None)
        if combined is None:
            combined = dataclasses.dataclass(type(name, (RWSAMConfig, cls), {"__module__": _classes.__name__}))
            combined.__qualname__ = name
            setattr(_classes, name, combined)
        return combined

    def _sam_defaults():
        values = {}
        for f in _SAM_FIELDS:
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # pragma: no cover
                values[f.name] = f.default_factory()
        values["sam_mode"] = MODE
        if MODE == "msam":
            values["msam_micro_batch_size"] = 1
        return values

    def to_rwsam_config(args):
        """The test's args as an RWSAMConfig with sam_mode=MODE (same object, class switched in place)."""
        if args is None:
            extra = {k: v for k, v in _sam_defaults().items() if k in ("sam_mode", "msam_micro_batch_size")}
            return RWSAMConfig(output_dir="tmp_trainer", **extra)
        if isinstance(args, RWSAMConfig):
            return args
        if not isinstance(args, TrainingArguments):
            return args  # let RWSAMTrainer refuse it as it would for a user
        args.__class__ = _config_class(type(args))
        for name, value in _sam_defaults().items():
            object.__setattr__(args, name, value)
        _validate(args)
        return args

    def _validate(config):
        """Run RWSAMConfig's own checks of the SAM fields (the method's name differs across hf_rwsam versions)."""
        for name in ("_validate_sam_fields", "validate"):
            method = getattr(config, name, None)
            if callable(method):
                method()
                return
        raise RuntimeError("rwsam-peer: found no validation method on RWSAMConfig (_validate_sam_fields / validate)")

    # Diagnostic option (NOT drop-in): RWSAM_PEER_LOSS=generic hands RWSAMTrainer a `per_sample_loss_func` that reads
    # the logits the way the Trainer's own prediction_step does (a tuple output's first element is the loss when the
    # model was given labels) and treats float labels as regression whatever the logits' rank. It exists only to
    # look past the per-sample-loss failures and see what breaks next; runs using it are marked "+loss".
    LOSS_OPTION = os.environ.get("RWSAM_PEER_LOSS") or None

    def generic_per_sample_loss(outputs, labels):
        import torch
        import torch.nn.functional as F

        if isinstance(outputs, dict):
            logits = outputs["logits"] if "logits" in outputs else next(v for k, v in outputs.items() if k != "loss")
        elif isinstance(outputs, (tuple, list)):
            items = list(outputs)
            if len(items) > 1 and torch.is_tensor(items[0]) and items[0].dim() == 0:
                items = items[1:]  # (loss, logits, ...): the model was given the labels
            logits = items[0]
        else:
            logits = outputs
        logits = logits.float()
        b = labels.shape[0]
        if labels.dtype.is_floating_point:
            return F.mse_loss(logits.reshape(b, -1), labels.float().reshape(b, -1), reduction="none").mean(1)
        if logits.dim() == 3:
            tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            return tok.sum(1) / (labels != -100).sum(1).clamp_min(1)
        return F.cross_entropy(logits.reshape(b, -1), labels.reshape(-1), reduction="none")

    class PeerRWSAMTrainer(RWSAMTrainer):
        """`RWSAMTrainer` that takes plain `TrainingArguments` (converted to `RWSAMConfig(sam_mode=MODE)`)."""

        def __init__(self, model=None, args=None, *rest, **kwargs):
            _counter["built"] += 1
            if LOSS_OPTION == "generic":
                kwargs.setdefault("per_sample_loss_func", generic_per_sample_loss)
            super().__init__(model, to_rwsam_config(args), *rest, **kwargs)

    PeerRWSAMTrainer.__name__ = PeerRWSAMTrainer.__qualname__ = "PeerRWSAMTrainer"
    transformers.Trainer = PeerRWSAMTrainer  # `from transformers import Trainer` now yields it
    assert sys.modules["transformers"].Trainer is PeerRWSAMTrainer


def pytest_report_header(config):
    if MODE is None:
        return "rwsam-peer: plain transformers.Trainer (RWSAM_PEER_MODE unset)"
    import hf_rwsam  # noqa: F811

    return (
        f"rwsam-peer: transformers.Trainer -> PeerRWSAMTrainer(RWSAMTrainer) with RWSAMConfig(sam_mode={MODE!r}); "
        f"hf_rwsam from {os.path.dirname(hf_rwsam.__file__)}"
        + (f"; RWSAM_PEER_LOSS={LOSS_OPTION} (diagnostic, not drop-in)" if LOSS_OPTION else "")
    )


def pytest_collection_finish(session):
    """Fail loudly if a collected test module still holds the original Trainer (the swap came too late)."""
    if MODE is None:
        return
    stale = set()
    for item in session.items:
        module = getattr(item, "module", None)
        for owner in (module, sys.modules.get("tests.trainer.trainer_test_utils")):
            if owner is not None and getattr(owner, "Trainer", PeerRWSAMTrainer) is not PeerRWSAMTrainer:
                stale.add(owner.__name__)
    if stale:
        import transformers as _t
        raise pytest.UsageError(
            f"rwsam-peer: these modules kept the plain Trainer: {sorted(stale)} "
            f"(transformers.Trainer is {_t.Trainer!r}, expected {PeerRWSAMTrainer!r})"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _counter["built"]
    if MODE is not None and getattr(sys.modules["transformers"], "Trainer", None) is not PeerRWSAMTrainer:
        # transformers re-created its lazy module after the swap: re-apply it (tests importing Trainer inside the
        # test body, e.g. JITCheckpointTest.get_trainer, read it from there)
        sys.modules["transformers"].Trainer = PeerRWSAMTrainer
    yield
    if MODE is not None:
        item.user_properties.append(("rwsam_trainers", _counter["built"] - before))
