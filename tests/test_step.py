"""`SharpnessAwareStep` without the Trainer: a plain PyTorch loop, against the same independent references.

* SAM / ASAM against `pytorch_optimizer.SAM`; ``none`` is a plain SGD step bit for bit;
* m-SAM (loop and vmap) against the sequential m-SAM of test_msam.py; RW-SAM (exact) against the plain loop of
  test_objective.py; fd probes reproducible from the step index;
* the engine imports nothing from transformers.

Tolerances as in test_sam_reference.py (fp32, same formulas in another order: ~1e-7 per step, 1e-5 after 5 steps).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_rwsam import SharpnessAwareStep, SharpnessSettings
from hf_rwsam.sharpness import TorchHost

from references import (
    loop_grad_norms,
    msam_reference,
    per_sample_ce,
    pytorch_optimizer_sam,
    ref_gibbs,
    reference_rwsam,
)
from utils import TinyMLP, flat_params, make_tensors, relative_error

TOL = 1e-5
LR = 0.1
STEPS = 5


def loss_fn(model, batch, return_outputs=False):
    outputs = model(batch["x"], labels=batch["labels"])
    return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


def plain_loop(model, x, y, settings, steps=STEPS, **step_kwargs):
    """A user's loop: the step, then SGD, on one fixed batch."""
    step = SharpnessAwareStep(settings, TorchHost(), **step_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for _ in range(steps):
        step(model, {"x": x, "labels": y}, loss_fn)
        optimizer.step()
        optimizer.zero_grad()
    return model, step


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyMLP()


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_in_a_plain_loop_matches_pytorch_optimizer(adaptive):
    x, y = make_tensors(8, seed=1)
    ours, _ = plain_loop(_model(), x, y, SharpnessSettings(sam_mode="sam", sam_rho=0.3, sam_adaptive=adaptive,
                                                            sam_adaptive_eta=0.0))
    reference = pytorch_optimizer_sam(_model(), x, y, 0.3, LR, STEPS, adaptive)
    assert relative_error(flat_params(ours), flat_params(reference)) <= TOL
    sgd, _ = plain_loop(_model(), x, y, SharpnessSettings(sam_mode="none"))
    assert relative_error(flat_params(ours), flat_params(sgd)) > 100 * TOL


def test_mode_none_is_a_plain_step_bit_for_bit():
    x, y = make_tensors(8, seed=2)
    ours, _ = plain_loop(_model(), x, y, SharpnessSettings(sam_mode="none"))
    reference = _model().train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for _ in range(STEPS):
        loss_fn(reference, {"x": x, "labels": y}).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(flat_params(ours), flat_params(reference))


@pytest.mark.parametrize("implementation", ["loop", "vmap"])
def test_msam_in_a_plain_loop_matches_sequential_msam(implementation):
    x, y = make_tensors(8, seed=3)
    settings = SharpnessSettings(sam_mode="msam", msam_micro_batch_size=2, msam_implementation=implementation,
                                 sam_rho=0.05)
    ours, step = plain_loop(_model(), x, y, settings)
    reference = msam_reference(_model(), x, y, 2, 0.05, LR, STEPS)
    assert relative_error(flat_params(ours), flat_params(reference)) <= TOL
    assert step.msam.vmap_ok is (True if implementation == "vmap" else None)


def test_rwsam_exact_in_a_plain_loop_matches_the_gibbs_reference():
    x, y = make_tensors(8, seed=4)
    settings = SharpnessSettings(sam_mode="rwsam", rwsam_estimator="exact", rwsam_lambda=2.0, sam_rho=0.1)
    ours, step = plain_loop(_model(), x, y, settings)
    reference = reference_rwsam(_model(), x, y, STEPS, LR, 0.1, lambda norms: ref_gibbs(norms, lam=2.0))
    assert relative_error(flat_params(ours), flat_params(reference)) <= TOL
    metrics = step.pop_metrics()
    assert {"rwsam/ess", "rwsam/lambda", "sam/ascent_grad_norm", "sam/sharpness"} <= metrics.keys()
    assert step.pop_metrics() == {}  # popped: the next interval starts empty


def test_fd_probes_are_drawn_again_from_the_step_index():
    """Two steps from the same weights and the same global_step draw the same probes, hence the same gradient; another
    global_step draws others."""
    x, y = make_tensors(8, seed=5)
    settings = SharpnessSettings(sam_mode="rwsam", rwsam_lambda=4.0, rwsam_num_probes=1)
    grads = {}
    for name, global_step in (("a", 7), ("b", 7), ("c", 8)):
        model = _model()
        SharpnessAwareStep(settings, seed=3)(model, {"x": x, "labels": y}, loss_fn, global_step=global_step)
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(grads["a"], grads["b"])
    assert not torch.equal(grads["a"], grads["c"])


def test_the_engine_imports_nothing_from_transformers():
    sharpness = Path(__file__).resolve().parents[1] / "hf_rwsam" / "sharpness"
    for path in sharpness.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path.name} imports {names}"


def test_importing_the_engine_loads_neither_transformers_nor_timm_datasets_torchvision():
    """``import hf_rwsam.sharpness`` (its parent package included: the top level imports lazily) in a fresh
    interpreter; ``import hf_rwsam`` then registers the architectures once timm is imported, by whoever."""
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "import hf_rwsam.sharpness\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'timm', 'datasets', 'torchvision', "
        "'accelerate'})\n"
        "import timm\n"
        "print(json.dumps([heavy, 'small_cnn_gn' in timm.list_models()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, registered = json.loads(out.strip().splitlines()[-1])
    assert heavy == [] and registered


def test_msam_batch_that_does_not_split_is_refused_by_name():
    x, y = make_tensors(6)
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="msam", msam_micro_batch_size=4))
    with pytest.raises(ValueError, match=r"SharpnessSettings\.msam_micro_batch_size=4 does not divide this batch of 6"):
        step(_model(), {"x": x, "labels": y}, loss_fn)


def test_default_descent_scales_by_the_share_and_backpropagates_the_scaled_loss_under_a_grad_scaler():
    """A loop with a GradScaler: the ascent is unscaled (same perturbation as without), the descent's .grad is scaled
    like `scaler.scale(loss).backward()` would, so `scaler.step` then unscales it."""
    x, y = make_tensors(8, seed=6)
    settings = SharpnessSettings(sam_mode="sam", sam_rho=0.3)
    plain, scaled = _model(), _model()
    SharpnessAwareStep(settings)(plain, {"x": x, "labels": y}, loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    SharpnessAwareStep(settings, TorchHost(grad_scaler=scaler))(scaled, {"x": x, "labels": y}, loss_fn)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q.grad, 1024.0 * p.grad, rtol=1e-6, atol=1e-7)



def test_sharded_parameters_refuse_what_a_sharded_step_cannot_do():
    """On FSDP2 shards (here a host that says so) the device scope, m-SAM and the exact estimator are refused by
    name, in a plain loop as in the Trainer."""

    class ShardedHost(TorchHost):
        def parameters(self, model):
            params = super().parameters(model)
            params.sharded = True
            return params

    x, y = make_tensors(8)
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="sam"), ShardedHost())
    with pytest.raises(ValueError, match=r"on FSDP2 shards: sam_perturbation_scope='device'"):
        step(_model(), {"x": x, "labels": y}, loss_fn)


def test_batchnorm_layers_are_found_again_every_step_and_keep_their_own_setting():
    """A BatchNorm layer swapped in after the first step moves its running statistics once per step (the layers are
    not cached), and one whose user turned track_running_stats off keeps it off."""
    torch.manual_seed(0)
    model = TinyMLP(batch_norm=True)
    x, y = make_tensors(8)
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_num_probes=2))
    step(model, {"x": x, "labels": y}, loss_fn)
    model.net[1] = torch.nn.BatchNorm1d(12)
    step(model, {"x": x, "labels": y}, loss_fn)
    assert int(model.net[1].num_batches_tracked) == 1
    model.net[1].track_running_stats = False
    step(model, {"x": x, "labels": y}, loss_fn)
    assert model.net[1].track_running_stats is False


def test_channels_last_weights_keep_their_memory_format_in_probes_and_descent():
    conv = torch.nn.Conv2d(1, 4, 3).to(memory_format=torch.channels_last)
    formats = []
    conv.register_forward_pre_hook(lambda m, a: formats.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    head = torch.nn.Linear(4, 3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = conv, head

        def forward(self, x, labels=None):
            logits = self.head(self.conv(x).mean((2, 3)))
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_num_probes=2))(Net(), {"x": x, "labels": y}, loss_fn)
    assert formats == [True] * 4, formats  # 2 probes, the ascent, the descent
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_vmap_msam_refuses_a_grad_scaler_and_auto_uses_the_loop():
    x, y = make_tensors(8)
    scaler = torch.amp.GradScaler("cpu")
    settings = dict(sam_mode="msam", msam_micro_batch_size=2)
    with pytest.raises(ValueError, match=r"msam_implementation='vmap'.*loss scale.*'loop' or 'auto'"):
        SharpnessAwareStep(SharpnessSettings(**settings, msam_implementation="vmap"), TorchHost(scaler))(
            _model(), {"x": x, "labels": y}, loss_fn)
    auto = SharpnessAwareStep(SharpnessSettings(**settings), TorchHost(scaler))
    auto(_model(), {"x": x, "labels": y}, loss_fn)
    assert auto.msam.vmap_ok is None  # never tried: the loop ran


def test_unwrap_looks_through_ddp_and_compile_only():
    class HasModuleAttribute(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)

    model = HasModuleAttribute()
    assert TorchHost().unwrap(model) is model
    assert TorchHost().unwrap(torch.compile(model)) is model


def test_original_parameters_hold_x_during_the_descent_which_then_goes_on_at_x_plus_e():
    """`original_parameters()` inside the step (what the Trainer's saves use) puts x back on its own storage for the
    block, then x + e again: the descent's gradient is the one of a step without it, bit for bit."""
    x, y = make_tensors(8, seed=7)
    batch = {"x": x, "labels": y}
    settings = SharpnessSettings(sam_mode="sam", sam_rho=0.3)

    def gradient(hold_x):
        model = _model()
        at_x = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
        step = SharpnessAwareStep(settings)
        seen = {}

        def descent(inputs, share, loss=None):
            seen["perturbed"] = flat_params(model)
            if hold_x:
                with step.original_parameters():
                    seen["inside"] = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
                seen["after"] = flat_params(model)
            loss = loss_fn(model, inputs)
            loss.backward()
            return loss.detach()

        with step.original_parameters():  # outside a step: nothing to put back
            assert all(torch.equal(p, v) and p.data_ptr() == ptr for p, (v, ptr) in zip(model.parameters(), at_x))
        step(model, batch, loss_fn, descent)
        if hold_x:
            assert not torch.equal(seen["perturbed"], torch.cat([v.reshape(-1) for v, _ in at_x]))  # x + e there
            assert all(torch.equal(v, w) and ptr == q for (v, ptr), (w, q) in zip(seen["inside"], at_x))
            assert torch.equal(seen["after"], seen["perturbed"])
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    assert torch.equal(gradient(hold_x=True), gradient(hold_x=False))


def test_an_fd_step_fp32_cannot_resolve_for_this_model_is_refused_on_the_first_step():
    """h = u ||x|| / 2 (u = 2^-24) passes construction (h >= 2^-24) but moves a weight of the model's typical size by
    less than fp32 resolves: the first step refuses it by name, parameters untouched. The refusal is no formality:
    against exact per-sample norms (a loop of backward calls) fd at that h is off by more than 100%, at the default h
    by the sampling floor only (~6% with 64 probes)."""
    from hf_rwsam import sample_grad_norms
    from hf_rwsam.sharpness.estimators import fd_norms, fd_probe_losses


    x, y = make_tensors(16, seed=5)
    model = _model()
    before = flat_params(model)
    h = 2.0**-24 * float(before.norm()) / 2
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_fd_step=h))  # constructs: h > 2^-24
    with pytest.raises(ValueError, match=r"SharpnessSettings\.rwsam_fd_step=.* cannot resolve .* choose h >= "):
        step(model, {"x": x, "labels": y}, loss_fn)
    assert torch.equal(flat_params(model), before) and all(p.grad is None for p in model.parameters())

    exact = loop_grad_norms(model, x, y)
    params = list(model.parameters())

    def fd_error(fd_step):  # the estimator's own pieces: sample_grad_norms refuses such an h as the step does
        with torch.no_grad():
            clean = per_sample_ce(model, {"x": x, "labels": y})
        probes = fd_probe_losses(lambda: per_sample_ce(model, {"x": x, "labels": y}), params, 64, fd_step,
                                 torch.Generator().manual_seed(0))
        fd = fd_norms(probes, clean, sum(p.numel() for p in params), fd_step)
        return float(((fd - exact).abs() / exact).mean())

    assert fd_error(h) > 1.0
    assert fd_error(None) < 0.1
    with pytest.raises(ValueError, match=r"rwsam_fd_step=.* cannot resolve"):
        sample_grad_norms(model, {"x": x, "labels": y}, per_sample_ce, method="fd", fd_step=h)
    SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam"))(model, {"x": x, "labels": y}, loss_fn)  # the default runs


@pytest.mark.parametrize("settings", [dict(sam_mode="sam"), dict(sam_mode="rwsam"),
                                      dict(sam_mode="msam", msam_micro_batch_size=2, msam_implementation="vmap")],
                         ids=["sam", "rwsam", "msam-vmap"])
def test_a_model_with_every_parameter_frozen_is_refused_by_name(settings):
    """It failed inside autograd ("`inputs` to grad() cannot be empty"), or as "torch.func cannot run" for the vmap."""
    x, y = make_tensors(8)
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"TinyMLP has no trainable parameters \(all 4 have requires_grad=False\)"):
        SharpnessAwareStep(SharpnessSettings(**settings))(model, {"x": x, "labels": y}, loss_fn)


@pytest.mark.parametrize("implementation", ["auto", "vmap"])
def test_the_users_error_on_the_first_vmap_step_is_reported_as_the_users(implementation):
    """A loss that raises is the user's error, raised as it came: not reported as "torch.func cannot run" (which,
    under "auto", also switched the vmap off for good)."""
    x, y = make_tensors(8)

    def broken_loss(model, batch, return_outputs=False):
        raise KeyError("the user's loss reads a column the batch does not have")

    step = SharpnessAwareStep(SharpnessSettings(sam_mode="msam", msam_micro_batch_size=2,
                                                msam_implementation=implementation))
    model = _model()
    before = flat_params(model)
    with pytest.raises(KeyError, match="the user's loss reads a column") as info:
        step(model, {"x": x, "labels": y}, broken_loss)
    assert "torch.func" not in str(info.value) and info.value.__suppress_context__
    assert step.msam.vmap_ok is None  # undecided: the next step tries the vmap again
    assert torch.equal(flat_params(model), before) and all(p.grad is None for p in model.parameters())


def test_a_causal_lms_loss_in_a_plain_loop_is_met_with_the_advice_to_shift_the_labels():
    """GPT-2's loss predicts token t + 1 at position t. The plain loop's default per-sample rule does not shift, and the
    first step's check says to set shift_labels=True (it advised class weights and router losses); with the shift
    the rule reproduces the loss and the step runs."""
    import functools

    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_rwsam.losses import per_sample_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt the loss leaves out
    batch = {"input_ids": ids, "labels": labels}

    def lm_loss(model, batch, return_outputs=False):
        outputs = model(**batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    before = flat_params(model)
    with pytest.raises(ValueError, match=r"does not reproduce this loss(.|\n)*shifted labels reproduces it(.|\n)*set "
                                         r"shift_labels=True: `SharpnessAwareStep\(\.\.\., default_per_sample_loss="):
        SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam"))(model, batch, lm_loss)
    assert torch.equal(flat_params(model), before)
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam"),
                              default_per_sample_loss=functools.partial(per_sample_loss, shift_labels=True))
    step(model, batch, lm_loss)
    assert step.per_sample_losses.checked and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_rwsam_exposes_each_samples_loss_norm_weight_and_margin_after_the_step():
    """`sample_scores` after an RW-SAM step: the per-sample losses, margins and runner-up classes of the batch at x
    (computed plainly here), the norms the weights came from, and weights summing to 1 in the batch's order."""
    import torch.nn.functional as F

    from hf_rwsam.sharpness import SharpnessAwareStep, SharpnessSettings
    from utils import TinyMLP, make_tensors

    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(8)

    def loss_fn(m, batch, return_outputs=False):
        out = m(batch["x"], labels=batch["labels"])
        return (out["loss"], out) if return_outputs else out["loss"]

    with torch.no_grad():
        logits = model(x)["logits"]
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_estimator="exact", rwsam_lambda=2.0))
    assert step.sample_scores is None
    step(model, {"x": x, "labels": y}, loss_fn)
    scores = step.sample_scores
    torch.testing.assert_close(scores.losses, F.cross_entropy(logits, y, reduction="none"))
    others = logits.clone()
    others[torch.arange(8), y] = float("-inf")
    torch.testing.assert_close(scores.margins, logits[torch.arange(8), y] - others.max(1).values)
    assert scores.runner_up.tolist() == others.argmax(1).tolist()
    torch.testing.assert_close(scores.weights, torch.softmax(2.0 * scores.norms / scores.norms.mean(), 0))
    assert scores.norms.shape == (8,) and not scores.norms.requires_grad
