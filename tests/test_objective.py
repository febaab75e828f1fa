"""The user's objective, whatever the model returns: every mode optimises the Trainer's own loss.

* SAM and ASAM ascend along the gradient of `compute_loss` (a class-weighted `compute_loss_func`, a model loss with an
  auxiliary term, `label_smoothing_factor`): compared step for step with `pytorch_optimizer.SAM` on the same objective.
* RW-SAM weights per-sample losses whose mean is that loss: a user's `per_sample_loss_func` against a plain RW-SAM loop
  written here; the built-in rule refused (by name, with an example) where it cannot reproduce the loss.
* Tuple outputs in the transformers convention, labels in every pass, regression heads.

Tolerances as in test_sam_reference.py: fp32, the same formulas in another order, ~1e-7 per step; 1e-5 after 5 steps,
while the comparison against the unweighted (or unsmoothed) objective is shown to be far above it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.utils import logging
from transformers.testing_utils import CaptureLogger

from hf_rwsam import RWSAMConfig, RWSAMTrainer
from hf_rwsam.losses import model_logits

from references import msam_reference, pytorch_optimizer_sam, ref_gibbs, reference_rwsam
from utils import (
    SequentialTrainer,
    TinyMLP,
    flat_params,
    make_tensors,
    relative_error,
    sgd_config,
    tensor_dataset,
    tiny_gpt2,
    token_dataset,
)

TOL = 1e-5
LR = 0.1
STEPS = 5
CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5])


def weighted_ce(outputs, labels, num_items_in_batch=None):
    """A user's `compute_loss_func`: class-weighted cross-entropy (torch's weighted mean, sum w_y l / sum w_y)."""
    return F.cross_entropy(model_logits(outputs), labels, weight=CLASS_WEIGHTS)


def weighted_ce_per_sample(outputs, labels):
    """The same objective split per sample: l_i = b w_{y_i} CE_i / sum_j w_{y_j}, whose mean is `weighted_ce`."""
    w = CLASS_WEIGHTS[labels]
    return F.cross_entropy(model_logits(outputs).float(), labels, reduction="none") * w * len(labels) / w.sum()


class ConfiguredMLP(TinyMLP):
    """With a `config`, as the Trainer's label smoother needs."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()


class AuxLossMLP(TinyMLP):
    """A model whose own loss has an auxiliary term (as a mixture-of-experts router loss does)."""

    AUX = 0.5

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if labels is not None:
            out["loss"] = out["loss"] + self.AUX * out["logits"].square().mean()
        return out


def aux_loss_per_sample(outputs, labels):
    logits = outputs["logits"].float()
    return F.cross_entropy(logits, labels, reduction="none") + AuxLossMLP.AUX * logits.square().mean(1)


class TupleMLP(TinyMLP):
    """`return_dict=False`: ``(loss, logits)`` when given labels, ``(logits,)`` without."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)


class LabelsRequiredMLP(TinyMLP):
    """A model whose forward cannot run without labels (it computes its loss unconditionally)."""

    def forward(self, x, labels):
        return super().forward(x, labels)


def _model(cls=TinyMLP, seed=0):
    torch.manual_seed(seed)
    return cls().float()


def _train(model, x, y, tmp_path, trainer_cls=RWSAMTrainer, trainer_kwargs=None, **config):
    """A dataset that is exactly one batch, so every step sees the same `b` samples."""
    args = sgd_config(tmp_path, per_device_train_batch_size=len(y), learning_rate=LR, max_steps=STEPS, **config)
    trainer = trainer_cls(model=model, args=args, train_dataset=tensor_dataset(x, y), **(trainer_kwargs or {}))
    trainer.train()
    return trainer


def _peer_sam(model, x, y, loss_of, rho=0.05, adaptive=False, steps=STEPS):
    """pytorch_optimizer's SAM (around SGD) stepping on ``loss_of(model, x, y)``."""
    return pytorch_optimizer_sam(model, x, y, rho, LR, steps, adaptive, loss_of)


def _weighted(model, x, y):
    return F.cross_entropy(model(x)["logits"], y, weight=CLASS_WEIGHTS)


def _plain(model, x, y):
    return F.cross_entropy(model(x)["logits"], y)


def _with_aux(model, x, y):
    return model(x, labels=y)["loss"]


def _smoothed(model, x, y):
    return F.cross_entropy(model(x)["logits"], y, label_smoothing=0.2)


OBJECTIVES = {
    # name: (model class, trainer kwargs, config, the objective written plainly, a wrong objective it must not match)
    "compute_loss_func": (TinyMLP, {"compute_loss_func": weighted_ce}, {}, _weighted, _plain),
    "model_aux_loss": (AuxLossMLP, {}, {}, _with_aux, _plain),
    "label_smoothing": (ConfiguredMLP, {}, {"label_smoothing_factor": 0.2}, _smoothed, _plain),
}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_sam_ascends_along_the_trainers_own_loss(tmp_path, name, adaptive):
    model_cls, trainer_kwargs, config, objective, wrong = OBJECTIVES[name]
    x, y = make_tensors(n=8, seed=1)
    model = _model(model_cls)
    trainer = _train(copy.deepcopy(model), x, y, tmp_path, trainer_kwargs=trainer_kwargs, sam_mode="sam",
                     sam_rho=0.3, sam_adaptive=adaptive, sam_adaptive_eta=0.0, **config)
    ours = flat_params(trainer.model)
    reference = flat_params(_peer_sam(copy.deepcopy(model), x, y, objective, rho=0.3, adaptive=adaptive))
    assert relative_error(ours, reference) <= TOL
    # the comparison can fail: SAM on the plain cross-entropy lands elsewhere
    elsewhere = flat_params(_peer_sam(copy.deepcopy(model), x, y, wrong, rho=0.3, adaptive=adaptive))
    assert relative_error(ours, elsewhere) > 100 * TOL


def weighted_ce_over_items(outputs, labels, num_items_in_batch=None):
    """The same weighted loss written as transformers asks of a compute_loss_func: a sum over the accumulation
    window's items, divided by their number (each micro-batch, or m-SAM group, then brings its share)."""
    losses = F.cross_entropy(model_logits(outputs), labels, reduction="none") * CLASS_WEIGHTS[labels]
    return losses.sum() / (num_items_in_batch if num_items_in_batch is not None else len(labels))


@pytest.mark.parametrize("counts_items", [False, True], ids=["mean_loss", "sum_over_items"])
def test_msam_groups_ascend_along_compute_loss_func(tmp_path, counts_items):
    """m-SAM (loop): each group's perturbation comes from the user's loss on that group, and the step's gradient is
    the micro-batch's: the groups' mean when the loss is a mean (which the Trainer does not divide by the
    accumulation steps once compute_loss_func is set), their sum when the loss divides by num_items_in_batch."""
    b, m = 8, 4
    k = b // m
    x, y = make_tensors(n=b, seed=2)
    model = _model()
    loss_func = weighted_ce_over_items if counts_items else weighted_ce
    trainer = _train(copy.deepcopy(model), x, y, tmp_path, trainer_cls=SequentialTrainer,  # groups in dataset order
                     trainer_kwargs={"compute_loss_func": loss_func}, sam_mode="msam", msam_micro_batch_size=m,
                     msam_implementation="loop", sam_rho=0.3)

    def group_loss(model, xg, yg):
        if counts_items:  # the group's share of the sum over the micro-batch's b items
            return (F.cross_entropy(model(xg)["logits"], yg, reduction="none") * CLASS_WEIGHTS[yg]).sum() / b
        return _weighted(model, xg, yg) / k  # the group's mean, one k-th of the step

    def reference(loss_of_group):
        return flat_params(msam_reference(copy.deepcopy(model), x, y, m, 0.3, LR, STEPS, group_loss=loss_of_group))

    ours = flat_params(trainer.model)
    assert relative_error(ours, reference(group_loss)) <= TOL
    assert relative_error(ours, reference(lambda mdl, xg, yg: _plain(mdl, xg, yg) / k)) > 100 * TOL
    # the other normalisation (k times the step, or 1/k of it) is far away too
    other = (lambda mdl, xg, yg: group_loss(mdl, xg, yg) * k) if not counts_items else \
        (lambda mdl, xg, yg: group_loss(mdl, xg, yg) / k)
    assert relative_error(ours, reference(other)) > 100 * TOL


def rwsam_on(model, x, y, per_sample, loss, rho=0.1, lam=2.0):
    """RW-SAM (`references.reference_rwsam`) for a user's objective: Gibbs weights at `lam` over exact per-sample norms
    of `per_sample`, ascent on sum_i p_i l_i, descent on `loss`."""
    return reference_rwsam(model, x, y, STEPS, LR, rho, lambda n: ref_gibbs(n, lam=lam), per_sample, loss)


def test_rwsam_weights_the_users_per_sample_loss(tmp_path):
    """A class-weighted compute_loss_func with its per_sample_loss_func: the step equals the plain loop above.

    Per-sample norms of the weighted losses (the weight w_y / mean w enters each sample's gradient) differ from the
    plain ones, so the weights, and the ascent, differ from RW-SAM on the unweighted loss (checked)."""
    x, y = make_tensors(n=8, seed=3)
    model = _model()
    trainer = _train(
        copy.deepcopy(model), x, y, tmp_path, sam_mode="rwsam", rwsam_estimator="exact", rwsam_lambda=2.0,
        sam_rho=0.1, trainer_kwargs={"compute_loss_func": weighted_ce, "per_sample_loss_func": weighted_ce_per_sample},
    )
    ours = flat_params(trainer.model)
    reference = rwsam_on(copy.deepcopy(model), x, y, weighted_ce_per_sample, _weighted)
    assert relative_error(ours, flat_params(reference)) <= TOL

    def plain_per_sample(outputs, labels):
        return F.cross_entropy(outputs["logits"], labels, reduction="none")

    unweighted = rwsam_on(copy.deepcopy(model), x, y, plain_per_sample, _plain)
    assert relative_error(ours, flat_params(unweighted)) > 100 * TOL


def unweighted_ce_per_sample(outputs, labels):
    """A per_sample_loss_func that forgets the class weights of `weighted_ce`."""
    return F.cross_entropy(model_logits(outputs).float(), labels, reduction="none")


def negated_ce_per_sample(outputs, labels):
    """A per_sample_loss_func returning -l_i: RW-SAM's ascent would descend."""
    return -weighted_ce_per_sample(outputs, labels)


@pytest.mark.parametrize("per_sample, message", [
    (unweighted_ce_per_sample, r"per_sample_loss_func does not reproduce this loss: their mean is .* where the loss "
                               r"being optimised is (.|\n)*class-weighted loss needs its weights(.|\n)*def "),
    (negated_ce_per_sample, r"per_sample_loss_func returned negative ones \(the smallest is -.*\) where the loss being "
                            r"optimised is .* >= 0"),
], ids=["forgets_the_class_weights", "negative"])
def test_rwsam_checks_the_users_per_sample_loss_on_the_first_step(tmp_path, per_sample, message):
    """A user's per_sample_loss_func is checked against the loss being optimised as the built-in rule is (it was
    trusted as given): one that forgets the class weights, or returns -l_i, stops the first step with the numbers,
    parameters untouched."""
    x, y = make_tensors(n=8, seed=3)
    model = _model()
    before = flat_params(model)
    with pytest.raises(ValueError, match=message):
        _train(model, x, y, tmp_path, sam_mode="rwsam",
               trainer_kwargs={"compute_loss_func": weighted_ce, "per_sample_loss_func": per_sample})
    assert torch.equal(flat_params(model), before), "the refused step moved the parameters"


def test_rwsam_refuses_compute_loss_func_without_per_sample_losses(tmp_path):
    x, y = make_tensors(n=8)
    args = sgd_config(tmp_path, sam_mode="rwsam", max_steps=1)
    with pytest.raises(ValueError, match=r"compute_loss_func.*per_sample_loss_func\(outputs, labels\)(.|\n)*def "):
        RWSAMTrainer(model=_model(), args=args, train_dataset=tensor_dataset(x, y), compute_loss_func=weighted_ce)


def test_rwsam_refuses_a_built_in_rule_that_misses_the_models_own_loss_terms(tmp_path):
    """The model adds an auxiliary term to its loss: the built-in cross-entropy cannot reproduce it, and the first
    step says so (with the numbers and an example) instead of perturbing along another objective."""
    x, y = make_tensors(n=8)
    model = _model(AuxLossMLP)
    before = flat_params(model)
    with pytest.raises(ValueError, match=r"built-in per-sample rule(.|\n)*mean is .* where the loss being optimised is"
                                         r"(.|\n)*per_sample_loss_func"):
        _train(model, x, y, tmp_path / "refused", sam_mode="rwsam")
    assert torch.equal(flat_params(model), before), "the refused step moved the parameters"
    # with a per-sample rule that includes the auxiliary term, RW-SAM at lambda = 0 is SAM on the model's loss
    ours = _train(_model(AuxLossMLP), x, y, tmp_path / "rw", sam_mode="rwsam", rwsam_lambda=0.0, sam_rho=0.3,
                  trainer_kwargs={"per_sample_loss_func": aux_loss_per_sample})
    reference = _peer_sam(_model(AuxLossMLP), x, y, _with_aux, rho=0.3)
    assert relative_error(flat_params(ours.model), flat_params(reference)) <= TOL


@pytest.mark.parametrize("mode", ["sam", "rwsam"])
def test_tuple_outputs_train_and_equal_dict_outputs(tmp_path, mode):
    """`(loss, logits)` / `(logits,)` outputs give exactly the parameters a dict-returning twin gives."""
    x, y = make_tensors(n=8, seed=4)
    settings = dict(sam_mode=mode, rwsam_estimator="exact", rwsam_lambda=2.0, sam_rho=0.2)
    tuples = _train(_model(TupleMLP), x, y, tmp_path / "tuple", **settings)
    dicts = _train(_model(TinyMLP), x, y, tmp_path / "dict", **settings)
    assert not torch.equal(flat_params(dicts.model), flat_params(_model(TinyMLP)))
    assert torch.equal(flat_params(tuples.model), flat_params(dicts.model))


class SeenStructures:
    """A per_sample_loss_func that records the structure of every `outputs` it sees."""

    def __init__(self):
        self.seen = []

    def __call__(self, outputs, labels):
        self.seen.append(tuple(sorted(outputs)) if isinstance(outputs, dict) else (type(outputs).__name__, len(outputs)))
        return F.cross_entropy(model_logits(outputs), labels, reduction="none")


@pytest.mark.parametrize("model_cls", [LabelsRequiredMLP, TupleMLP])
def test_rwsam_probes_call_the_model_with_its_labels(tmp_path, model_cls):
    """Every pass (probes, ascent) calls the model with the same inputs, labels included: a forward that needs its
    labels runs, and the per-sample loss sees one structure of outputs."""
    x, y = make_tensors(n=8, seed=5)
    recorder = SeenStructures()
    _train(_model(model_cls), x, y, tmp_path, sam_mode="rwsam", rwsam_num_probes=3,
           trainer_kwargs={"per_sample_loss_func": recorder})
    assert len(recorder.seen) == STEPS * 4  # 3 probes and the ascent per step
    assert len(set(recorder.seen)) == 1, recorder.seen


def test_regression_with_one_dimensional_outputs(tmp_path):
    """A regression head returning [b] predictions with float labels (the transformers tests' RegressionModel):
    RW-SAM's built-in rule is the squared error, and at lambda = 0 RW-SAM is SAM on the model's MSE."""

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.5))
            self.b = torch.nn.Parameter(torch.tensor(-0.3))

        def forward(self, x, labels=None):
            y = x[:, 0] * self.a + self.b
            return (y,) if labels is None else (F.mse_loss(y, labels), y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    y = 2.0 * x[:, 0] + 1.0 + 0.1 * torch.randn(8, generator=g)
    rw = _train(Regression(), x, y, tmp_path / "rw", sam_mode="rwsam", rwsam_lambda=0.0, sam_rho=0.3)
    sam = _train(Regression(), x, y, tmp_path / "sam", sam_mode="sam", sam_rho=0.3)
    reference = _peer_sam(Regression(), x, y, lambda m, xi, yi: m(xi, labels=yi)[0], rho=0.3)
    assert relative_error(flat_params(sam.model), flat_params(reference)) <= TOL
    assert relative_error(flat_params(rw.model), flat_params(reference)) <= TOL


def test_trainer_without_args_builds_default_rwsam_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = RWSAMTrainer(model=_model())
    assert isinstance(trainer.args, RWSAMConfig)
    assert trainer.args.output_dir.endswith("tmp_trainer") and trainer.args.sam_mode == "rwsam"


NO_EFFECT = [
    ("rwsam_in_sam", dict(sam_mode="sam", rwsam_lambda=2.0), "RWSAMConfig.rwsam_lambda=2.0 has no effect with sam_mode='sam'"),
    ("msam_in_rwsam", dict(sam_mode="rwsam", msam_micro_batch_size=4),
     "RWSAMConfig.msam_micro_batch_size=4 has no effect with sam_mode='rwsam'"),
    ("sam_in_none", dict(sam_mode="none", sam_rho=0.1), "RWSAMConfig.sam_rho=0.1 has no effect with sam_mode='none'"),
    ("eta_without_asam", dict(sam_mode="sam", sam_adaptive_eta=0.1),
     "RWSAMConfig.sam_adaptive_eta=0.1 has no effect with sam_adaptive=False"),
    ("probes_with_exact", dict(sam_mode="rwsam", rwsam_estimator="exact", rwsam_num_probes=4),
     "RWSAMConfig.rwsam_num_probes=4 has no effect with rwsam_estimator='exact'"),
    ("lambda_with_target_ess", dict(sam_mode="rwsam", rwsam_target_ess=0.5, rwsam_lambda=3.0),
     "RWSAMConfig.rwsam_lambda=3.0 has no effect with rwsam_target_ess is set"),
]


@pytest.mark.parametrize("settings, message", [c[1:] for c in NO_EFFECT], ids=[c[0] for c in NO_EFFECT])
def test_a_setting_without_effect_warns_once(tmp_path, settings, message):
    with CaptureLogger(logging.get_logger("hf_rwsam.sharpness.settings")) as captured:
        RWSAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **settings)
    assert captured.out.count("has no effect") == 1, captured.out
    assert message in captured.out, captured.out


def test_defaults_warn_about_nothing(tmp_path):
    for mode in ("none", "sam", "rwsam"):
        with CaptureLogger(logging.get_logger("hf_rwsam.sharpness.settings")) as captured:
            RWSAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", sam_mode=mode)
        assert captured.out == "", captured.out


def test_fp16_on_cpu_says_it_has_no_effect(tmp_path):
    x, y = make_tensors(n=8)
    args = sgd_config(tmp_path, sam_mode="sam", fp16=True)
    with CaptureLogger(logging.get_logger("hf_rwsam.config")) as captured:
        RWSAMTrainer(model=_model(), args=args, train_dataset=tensor_dataset(x, y))
    assert "fp16=True has no effect here" in captured.out, captured.out



# --------------------------------------------------------------------------------------------- transformers models


@pytest.mark.parametrize("mode", ["sam", "rwsam"])
def test_causal_lm_trains_on_its_own_loss(tmp_path, mode):
    """A tiny GPT-2 (it takes num_items_in_batch, so the Trainer normalises by token counts): RW-SAM's built-in rule
    passes its first-step check against the model's token mean, and both modes train."""
    dataset = token_dataset()
    args = sgd_config(tmp_path, sam_mode=mode, max_steps=3, per_device_train_batch_size=4)
    trainer = RWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=dataset)
    before = flat_params(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 3
    assert not torch.equal(flat_params(trainer.model), before)
    logs = [h for h in trainer.state.log_history if "sam/sharpness" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_explicit_vmap_on_gpt2_names_the_model_and_the_other_choices(tmp_path):
    args = sgd_config(tmp_path, sam_mode="msam", msam_micro_batch_size=2, msam_implementation="vmap", max_steps=1,
                      per_device_train_batch_size=4)
    trainer = RWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset())
    with pytest.raises(ValueError, match=r"msam_implementation='vmap'.*GPT2LMHeadModel.*'loop'.*'auto'"):
        trainer.train()
