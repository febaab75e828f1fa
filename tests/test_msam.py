"""m-SAM (`sam_mode="msam"`) against a plain sequential reference, loop vs vmap, BatchNorm, auto fallback, and
gradient accumulation with `sam_mode="sam"` (each micro-batch perturbs with its own gradient: m-SAM).

The reference (`msam_reference`) is the tml-epfl/understanding-sam algorithm written out plainly: split the batch into
``k = b / m`` consecutive groups; for group ``j``: ``g_j = grad(mean loss of the group at x)``,
``e_j = rho g_j / ||g_j||``, descent gradient ``grad(mean loss of the group at x + e_j)``; the step's gradient is the
average of the ``k`` descent gradients; an SGD update ``x <- x - lr * gradient``. With BatchNorm, each group's ascent
forward (train mode) updates the running statistics; the descent forward does not (``track_running_stats=False``
during it).

Tolerance: fp32 on CPU; the trainer and the reference do the same arithmetic in a different order (per-sample losses
then mean vs fused mean, batched ``torch.func`` kernels for vmap, ``1 / (k * accumulation)`` applied to the loss
instead of averaging gradients), a few ulps (~1e-7 relative) per step. Over 3-4 steps at lr 0.1 on tiny nets the
parameters and the running statistics stay within ~1e-6 relative; 1e-5 has a margin, while a wrong grouping, using
one perturbation for the whole batch (SAM instead of m-SAM), or a descent pass that updates BN statistics moves them
by >= 1e-3 (the tests check these "wrong" variants are far away, so the tolerance is meaningful).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from references import msam_reference
from utils import (
    SequentialTrainer,
    TinyCNN,
    TinyMLP,
    flat_params,
    make_images,
    make_tensors,
    relative_error,
    sgd_config,
    tensor_dataset,
)

TOL = 1e-5
LR = 0.1
RHO = 0.1


# ---------------------------------------------------------------------------------------------- the reference


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _buffers(model):
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def _assert_buffers_close(ours, reference, tol=TOL):
    assert ours.keys() == reference.keys() and ours
    for name in reference:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], reference[name]), (name, ours[name], reference[name])
        else:
            err = relative_error(ours[name].float(), reference[name].float())
            assert err <= tol, f"{name}: relative error {err:.3e}"


def _train(model, dataset, tmp_path, name, trainer_cls=SequentialTrainer, **config):
    config.setdefault("learning_rate", LR)
    config.setdefault("sam_rho", RHO)
    trainer = trainer_cls(model=model, args=sgd_config(tmp_path / name, **config), train_dataset=dataset)
    trainer.train()
    return trainer


def _mlp(seed=0):
    torch.manual_seed(seed)
    return TinyMLP(dropout=0.0, batch_norm=False).float()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return TinyCNN().float()


# ---------------------------------------------------------------------------------------------- loop / vmap = reference


@pytest.mark.parametrize("implementation", ["loop", "vmap"])
def test_msam_matches_sequential_reference(tmp_path, implementation):
    b, m, steps = 8, 2, 4
    x, y = make_tensors(n=b, seed=1)
    model = _mlp()
    reference = flat_params(msam_reference(copy.deepcopy(model), x, y, m, RHO, LR, steps))
    trainer = _train(
        copy.deepcopy(model), tensor_dataset(x, y), tmp_path, implementation, sam_mode="msam",
        msam_micro_batch_size=m, msam_implementation=implementation, per_device_train_batch_size=b, max_steps=steps,
    )
    assert trainer.state.global_step == steps
    ours = flat_params(trainer.model)
    err = relative_error(ours, reference)
    assert err <= TOL, f"m-SAM ({implementation}) vs sequential reference: relative error {err:.3e}"
    # The comparison can fail: whole-batch SAM (m = b) and another grouping are far from it.
    for wrong_m in (b, 4):
        wrong = flat_params(msam_reference(copy.deepcopy(model), x, y, wrong_m, RHO, LR, steps))
        assert relative_error(ours, wrong) > 100 * TOL, f"m={m} indistinguishable from m={wrong_m}"


def test_msam_loop_and_vmap_agree_with_batchnorm(tmp_path):
    """TinyCNN (two BatchNorm2d): loop, vmap and the reference agree on parameters and running statistics."""
    b, m, steps = 8, 2, 3
    x, y = make_images(n=b, seed=1)
    dataset = tensor_dataset(x, y, input_name="pixel_values")
    model = _cnn()
    common = dict(sam_mode="msam", msam_micro_batch_size=m, per_device_train_batch_size=b, max_steps=steps)
    loop = _train(copy.deepcopy(model), dataset, tmp_path, "loop", msam_implementation="loop", **common)
    vmap = _train(copy.deepcopy(model), dataset, tmp_path, "vmap", msam_implementation="vmap", **common)
    reference = msam_reference(copy.deepcopy(model), x, y, m, RHO, LR, steps)

    # BatchNorm bookkeeping: k ascent forwards per step, no descent forward counted.
    k = b // m
    for bn in _bn_modules(reference):
        assert int(bn.num_batches_tracked) == k * steps

    err = relative_error(flat_params(vmap.model), flat_params(loop.model))
    assert err <= TOL, f"vmap vs loop parameters: relative error {err:.3e}"
    _assert_buffers_close(_buffers(vmap.model), _buffers(loop.model))
    for name, trainer in (("loop", loop), ("vmap", vmap)):
        err = relative_error(flat_params(trainer.model), flat_params(reference))
        assert err <= TOL, f"{name} vs sequential reference parameters: relative error {err:.3e}"
        _assert_buffers_close(_buffers(trainer.model), _buffers(reference))

    # The comparison can fail: a reference whose descent passes also update BN running statistics is far away.
    wrong = msam_reference(copy.deepcopy(model), x, y, m, RHO, LR, steps, freeze_bn_in_descent=False)
    ours, wrong_buffers = _buffers(loop.model), _buffers(wrong)
    stat_errs = [relative_error(ours[n], wrong_buffers[n]) for n in ours if n.endswith(("running_mean", "running_var"))]
    assert min(stat_errs) > 100 * TOL, stat_errs
    assert not torch.equal(ours["features.1.num_batches_tracked"], wrong_buffers["features.1.num_batches_tracked"])


# ---------------------------------------------------------------------------------------------- auto falls back to loop


class ItemMLP(TinyMLP):
    """A TinyMLP whose forward reads a tensor value on the host (`.item()`), which torch.func's vmap cannot run.

    The branch is never taken (an absolute sum is never negative), so the function is the TinyMLP's.
    """

    def forward(self, x, labels=None):
        if x.abs().sum().item() < 0:
            x = -x
        return super().forward(x, labels)


def test_msam_auto_falls_back_to_loop(tmp_path):
    b, m, steps = 8, 2, 3
    x, y = make_tensors(n=b, seed=4)
    dataset = tensor_dataset(x, y)
    torch.manual_seed(0)
    model = ItemMLP().float()
    common = dict(sam_mode="msam", msam_micro_batch_size=m, per_device_train_batch_size=b, max_steps=steps)

    logger = logging.get_logger("hf_rwsam.sharpness")
    with CaptureLogger(logger) as captured:
        auto = _train(copy.deepcopy(model), dataset, tmp_path, "auto", msam_implementation="auto", **common)
    assert auto.state.global_step == steps
    assert auto.sharpness_step.msam.vmap_ok is False
    assert "loop" in captured.out and "m-SAM" in captured.out, captured.out
    assert captured.out.count("m-SAM") == 1, "the fallback should be decided (and logged) once"

    loop = _train(copy.deepcopy(model), dataset, tmp_path, "loop", msam_implementation="loop", **common)
    assert torch.equal(flat_params(auto.model), flat_params(loop.model))
    reference = flat_params(msam_reference(copy.deepcopy(model), x, y, m, RHO, LR, steps))
    assert relative_error(flat_params(auto.model), reference) <= TOL

    # torch.func refuses `.item()`; no silent fallback, and the error names the model and the other choices
    with pytest.raises(ValueError, match=r"msam_implementation='vmap'.*ItemMLP.*'loop'.*'auto'"):
        _train(copy.deepcopy(model), dataset, tmp_path, "vmap", msam_implementation="vmap", **common)


def test_msam_auto_uses_vmap_where_it_runs(tmp_path):
    b, m = 8, 2
    x, y = make_tensors(n=b, seed=5)
    trainer = _train(
        _mlp(), tensor_dataset(x, y), tmp_path, "auto", sam_mode="msam", msam_micro_batch_size=m,
        per_device_train_batch_size=b, max_steps=1, msam_implementation="auto",
    )
    assert trainer.sharpness_step.msam.vmap_ok is True


# ---------------------------------------------------------------------------------------------- accumulation = m-SAM


def test_sam_with_gradient_accumulation_is_msam(tmp_path):
    """SAM, 2 micro-batches of 16 accumulated (device scope): each perturbs with its own gradient, i.e. m-SAM m=16."""
    n, m, steps = 32, 16, 3
    x, y = make_tensors(n=n, seed=6)
    dataset = tensor_dataset(x, y)
    model = _mlp()
    accumulated = _train(
        copy.deepcopy(model), dataset, tmp_path, "ga", sam_mode="sam", per_device_train_batch_size=m,
        gradient_accumulation_steps=2, max_steps=steps,
    )
    assert accumulated.args.sam_perturbation_scope == "device"
    assert accumulated.state.global_step == steps
    msam = _train(
        copy.deepcopy(model), dataset, tmp_path, "msam", sam_mode="msam", msam_micro_batch_size=m,
        msam_implementation="loop", per_device_train_batch_size=n, max_steps=steps,
    )
    reference = flat_params(msam_reference(copy.deepcopy(model), x, y, m, RHO, LR, steps))
    ours = flat_params(accumulated.model)
    err = relative_error(ours, reference)
    assert err <= TOL, f"SAM with accumulation vs m-SAM reference: relative error {err:.3e}"
    err = relative_error(ours, flat_params(msam.model))
    assert err <= TOL, f"SAM with accumulation vs the trainer's m-SAM: relative error {err:.3e}"
    # Not the same as one perturbation for all 32 samples (global SAM on the accumulated batch).
    whole = flat_params(msam_reference(copy.deepcopy(model), x, y, n, RHO, LR, steps))
    assert relative_error(ours, whole) > 100 * TOL


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_msam_asam_loop_and_vmap_agree(tmp_path, eta):
    """ASAM scaling per group under vmap (its gradients can be expanded views: no in-place arithmetic on them)."""
    b, m, steps = 8, 2, 3
    pixels, labels = make_images(n=b, seed=2)
    dataset = tensor_dataset(pixels, labels, input_name="pixel_values")
    model = _cnn()
    trained = {
        impl: _train(
            copy.deepcopy(model), dataset, tmp_path, f"{impl}{eta}", sam_mode="msam", msam_micro_batch_size=m,
            msam_implementation=impl, per_device_train_batch_size=b, max_steps=steps, sam_adaptive=True,
            sam_adaptive_eta=eta, sam_rho=0.5,
        ).model
        for impl in ("loop", "vmap")
    }
    err = relative_error(flat_params(trained["vmap"]), flat_params(trained["loop"]))
    assert err <= TOL, f"ASAM m-SAM vmap vs loop: relative error {err:.3e}"
    plain = _train(copy.deepcopy(model), dataset, tmp_path, f"sam{eta}", sam_mode="msam", msam_micro_batch_size=m,
                   msam_implementation="loop", per_device_train_batch_size=b, max_steps=steps, sam_rho=0.5).model
    assert relative_error(flat_params(trained["loop"]), flat_params(plain)) > 100 * TOL  # ASAM is not SAM here
