"""Nothing is lost: parameters restored on error, BatchNorm statistics moved once, resumed runs identical."""

import contextlib
import copy
import math
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

import hf_rwsam
from hf_rwsam import RWSAMTrainer, SharpnessAwareStep, SharpnessSettings
from hf_rwsam.sharpness import AccelerateHost, RNGReplay

from references import EVERY_MODE
from utils import TinyCNN, TinyMLP, flat_params, make_images, make_tensors, sgd_config, tensor_dataset


class FailsOnSecondForward(TinyMLP):
    """Raises in the descent pass: the ascent forward is the step's first call of forward with labels."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom in the descent pass")
        return super().forward(x, labels)


@pytest.mark.parametrize("mode", ["sam", "rwsam"])
def test_exception_in_descent_propagates_and_restores_parameters(tmp_path, mode):
    torch.manual_seed(0)
    model = FailsOnSecondForward()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_tensors(8)
    # exact estimator: no probe forwards, so the second forward is the descent pass
    trainer = RWSAMTrainer(
        model=model, args=sgd_config(tmp_path, sam_mode=mode, rwsam_estimator="exact", max_steps=1),
        train_dataset=tensor_dataset(x, y),
    )
    with pytest.raises(RuntimeError, match="boom in the descent pass"):
        trainer.train()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), "a parameter kept its perturbation after the descent pass raised"


@pytest.mark.parametrize(
    "mode,extra",
    [("sam", {}), ("rwsam", {}), ("rwsam", {"rwsam_num_probes": 3}), ("rwsam", {"rwsam_estimator": "exact"})],
)
def test_batchnorm_running_stats_move_once_per_step(tmp_path, mode, extra):
    torch.manual_seed(0)
    model = TinyCNN()
    reference = copy.deepcopy(model).train()
    pixels, labels = make_images(8)
    with torch.no_grad():
        reference(pixels)  # one plain training-mode forward on the same batch
    trainer = RWSAMTrainer(
        model=model, args=sgd_config(tmp_path, sam_mode=mode, max_steps=1, **extra),
        train_dataset=tensor_dataset(pixels, labels, input_name="pixel_values"),
    )
    trainer.train()
    for name, buf in reference.named_buffers():
        got = dict(model.named_buffers())[name]
        # The ascent pass is the same forward as the reference's, so the statistics agree to fp32 rounding.
        torch.testing.assert_close(got, buf, rtol=1e-6, atol=1e-7, msg=f"{name} differs from one plain forward")


def test_zero_ascent_gradient_skips_the_perturbation_and_is_counted(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(num_classes=2)
    for p in model.parameters():
        nn.init.zeros_(p)
    # Zero weights: tanh(0) = 0 kills every weight gradient; logits are 0, softmax is exactly (0.5, 0.5), and with
    # balanced labels the bias gradient mean(p - onehot) is exactly 0 in floating point too.
    x, _ = make_tensors(8)
    y = torch.tensor([0, 1] * 4)
    reference = copy.deepcopy(model)
    trainer = RWSAMTrainer(
        model=model, args=sgd_config(tmp_path, sam_mode="sam", max_steps=1, per_device_train_batch_size=8),
        train_dataset=tensor_dataset(x, y),
    )
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "sam/skipped_perturbations" in h)
    assert logs["sam/skipped_perturbations"] == 1.0
    assert logs["sam/ascent_grad_norm"] == 0.0
    assert torch.equal(flat_params(model), flat_params(reference))  # zero gradient: SGD leaves x where it was


def _resume_args(tmp_path, **kwargs):
    return sgd_config(
        tmp_path, sam_mode="rwsam", rwsam_num_probes=2, learning_rate=0.05, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=3, save_only_model=False, **kwargs,
    )


def test_resume_continues_bit_identically(tmp_path):
    """6 steps straight == 3 steps + checkpoint + resume for 3 more (rwsam, fd probes, dropout, shuffling)."""
    x, y = make_tensors(24)
    dataset = tensor_dataset(x, y)

    def fresh_model():
        torch.manual_seed(0)
        return TinyMLP(dropout=0.3, batch_norm=True)

    straight = fresh_model()
    RWSAMTrainer(model=straight, args=_resume_args(tmp_path / "a", max_steps=6), train_dataset=dataset).train()

    first = fresh_model()
    RWSAMTrainer(model=first, args=_resume_args(tmp_path / "b", max_steps=3), train_dataset=dataset).train()
    resumed = fresh_model()  # weights come from the checkpoint
    trainer = RWSAMTrainer(model=resumed, args=_resume_args(tmp_path / "b", max_steps=6), train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_checkpoint_holds_clean_weights(tmp_path):
    """The weights saved at step 3 are the weights the optimizer produced, never the perturbed ones."""
    x, y = make_tensors(12)
    torch.manual_seed(0)
    model = TinyMLP()
    trainer = RWSAMTrainer(model=model, args=_resume_args(tmp_path, max_steps=3), train_dataset=tensor_dataset(x, y))
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value), name


MODES = [pytest.param(settings["sam_mode"], {k: v for k, v in settings.items() if k != "sam_mode"}, id=name)
         for name, settings in EVERY_MODE.items()]


@pytest.mark.parametrize("mode,extra", MODES)
def test_bf16_autocast_on_cpu_every_mode(tmp_path, mode, extra):
    torch.manual_seed(0)
    model = TinyCNN()
    pixels, labels = make_images(16)
    trainer = RWSAMTrainer(
        model=model, args=sgd_config(tmp_path, sam_mode=mode, bf16=True, max_steps=2, **extra),
        train_dataset=tensor_dataset(pixels, labels, input_name="pixel_values"),
    )
    trainer.train()
    diagnostics = [h for h in trainer.state.log_history if "sam/ascent_grad_norm" in h]
    assert diagnostics, "no diagnostics were logged"
    for entry in diagnostics:
        for key, value in entry.items():
            assert math.isfinite(value), f"{key}={value} under bf16"
        assert math.isfinite(entry["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_transformers_sequence_classification_trains_under_rwsam(tmp_path):
    """Per-sample losses work beyond images: a tiny BERT built from a config (offline) trains under RW-SAM."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (32, 8), generator=g)
    labels = (ids[:, 0] > 25).long()  # learnable from the first token
    dataset = tensor_dataset(ids, labels, input_name="input_ids", attention_mask=torch.ones_like(ids).tolist())
    before = flat_params(model)
    trainer = RWSAMTrainer(
        model=model,
        args=sgd_config(tmp_path, sam_mode="rwsam", rwsam_num_probes=2, max_steps=4, learning_rate=0.05),
        train_dataset=dataset,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rwsam/ess" in h]
    assert logs and all(0 < h["rwsam/ess"] <= 1 and math.isfinite(h["sam/sharpness"]) for h in logs)
    assert not torch.equal(before, flat_params(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fd_probes_run_in_fp32_under_bf16_autocast(tmp_path):
    """bf16 rounding hides or swamps any fd step, so the probes run in fp32: the first step's RW-SAM weights (their
    ESS and max weight) are those of an fp32 run. Before probes ran in fp32, bf16 gave D = 0 and uniform weights."""
    x, y = make_tensors(16)
    first_logs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        trainer = RWSAMTrainer(
            model=TinyMLP(), args=sgd_config(tmp_path / str(bf16), sam_mode="rwsam", rwsam_lambda=3.0, bf16=bf16,
                                             max_steps=1, per_device_train_batch_size=16, rwsam_num_probes=4),
            train_dataset=tensor_dataset(x, y),
        )
        trainer.train()
        first_logs[bf16] = next(h for h in trainer.state.log_history if "rwsam/ess" in h)
    assert first_logs[False]["rwsam/ess"] < 0.99  # the weights are not uniform in fp32...
    for key in ("rwsam/ess", "rwsam/max_weight"):  # ...and bf16 computes the same ones (fp32 rounding)
        assert first_logs[True][key] == pytest.approx(first_logs[False][key], rel=1e-5), key


@pytest.mark.parametrize("raises", [False, True])
def test_written_parameters_write_in_place_and_restore_bit_exactly(raises):
    # FSDP's shards are views of the buffer it all-gathers from: the new values must land in that storage, and the
    # originals must come back bit for bit, also when the block raises.
    from hf_rwsam.sharpness import written_parameters

    flat = torch.randn(10, generator=torch.Generator().manual_seed(0))
    shards = [flat[:4].view(2, 2), flat[4:]]  # views, as FSDP's local shards are
    before = flat.clone()
    values = [torch.full((2, 2), 3.0), torch.full((6,), -1.0)]
    writes = []
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with written_parameters(shards, values, after_write=lambda: writes.append(flat.clone())):
            assert torch.equal(flat, torch.cat([v.reshape(-1) for v in values]))
            if raises:
                raise RuntimeError("descent failed")
    assert torch.equal(flat, before)
    assert len(writes) == 2 and torch.equal(writes[1], before)  # called after the write and after the restore


# ---------------------------------------------------------------------------------------------- interrupts (Ctrl-C)

PACKAGE = str(Path(hf_rwsam.__file__).resolve().parent) + os.sep


class DrawsFromEveryGenerator(nn.Module):
    """Consumes Python's and NumPy's random numbers too (as a data-augmenting model may), so that the sweep sees a
    replay of those generators left unfinished."""

    def forward(self, x):
        random.random()
        np.random.rand()
        return x


class SweepNet(nn.Module):
    """A tiny Trainer-style model with dropout and BatchNorm (or, for the exact estimator's layer rules, LayerNorm)."""

    def __init__(self, norm="batch"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8) if norm == "batch" else nn.LayerNorm(8), nn.Tanh(),
                                 nn.Dropout(0.25), DrawsFromEveryGenerator(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def sweep_loss(model, batch, return_outputs=False):
    outputs = model(batch["x"], labels=batch["labels"])
    return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


class LineTracer:
    """`sys.settrace` function counting the line events inside hf_rwsam/ (calling `on_line(k)` at the k-th), or
    raising KeyboardInterrupt at the `interrupt_at`-th, as a Ctrl-C landing just before that line would. Python stops
    tracing once the tracer raises, so the restoring code then runs as it would after a real interrupt."""

    def __init__(self, interrupt_at=None, on_line=None, within=None):
        self.interrupt_at, self.on_line, self.count, self.where = interrupt_at, on_line, 0, None
        self.within = within  # (file under hf_rwsam/, function names): only their lines (default: all of hf_rwsam/)

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return None
        if self.within is not None and not (code.co_filename.endswith(self.within[0])
                                            and code.co_name in self.within[1]):
            return None
        return self.local

    def local(self, frame, event, arg):
        if event == "line":
            if self.count == self.interrupt_at:
                self.where = f"{frame.f_code.co_filename[len(PACKAGE):]}:{frame.f_lineno}"
                raise KeyboardInterrupt
            if self.on_line is not None:
                self.on_line(self.count)
            self.count += 1
        return self.local


def rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def same_rng_states(a, b) -> bool:
    (torch_a, python_a, numpy_a), (torch_b, python_b, numpy_b) = a, b
    return (torch.equal(torch_a, torch_b) and python_a == python_b
            and all(np.array_equal(u, v) for u, v in zip(numpy_a, numpy_b)))


def seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


SWEEP_BATCH = (torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1]))
SWEEP_MODES = [
    pytest.param("batch", dict(sam_mode="sam"), id="sam"),
    pytest.param("batch", dict(sam_mode="sam", sam_adaptive=True), id="asam"),
    pytest.param("batch", dict(sam_mode="msam", msam_micro_batch_size=2, msam_implementation="loop"), id="msam-loop"),
    pytest.param("batch", dict(sam_mode="msam", msam_micro_batch_size=2, msam_implementation="vmap"), id="msam-vmap"),
    pytest.param("batch", dict(sam_mode="rwsam", rwsam_num_probes=2), id="rwsam-fd"),
    pytest.param("batch-under-bf16-autocast", dict(sam_mode="rwsam"), id="rwsam-fd-bf16"),  # fp32 probes
    pytest.param("layer", dict(sam_mode="rwsam", rwsam_estimator="exact"), id="rwsam-exact"),
]


LINEAR = torch.nn.functional.linear


def hooks(model):
    return [(name, kind, list(getattr(module, kind))) for name, module in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]


def batchnorm_flags(model):
    return [m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


def interrupt_sweep(monkeypatch, template, step, state=lambda: None, within=None):
    """The failures of the sweep: `step(model, tracer)` runs one step from the same random numbers on `model` (a fresh
    copy of `template`) under `tracer`; `state()` is whatever else must be as before (a trainer's attributes);
    `within`: ``(file, function names)``, to interrupt only at their lines."""
    outside_replays = []  # the generators' states before each replay now open
    real_replay = RNGReplay.replay

    @contextlib.contextmanager
    def replay(self):
        outside_replays.append(rng_states())
        try:
            with real_replay(self):
                yield
        finally:
            outside_replays.pop()

    monkeypatch.setattr(RNGReplay, "replay", replay)

    def gradient_of_a_full_step(model):
        model.zero_grad(set_to_none=True)
        step(model, None)
        return [p.grad.clone() for p in model.parameters()]

    # the uninterrupted step: its line events, and what each one found
    counted = copy.deepcopy(template)
    found = []
    counting = LineTracer(on_line=lambda k: found.append((
        outside_replays[0] if outside_replays else rng_states(), [b.clone() for b in counted.buffers()])),
        within=within)
    step(counted, counting)
    lines = counting.count
    assert lines > (20 if within else 100), f"only {lines} line events: is the tracer looking at hf_rwsam/?"
    reference_gradient = gradient_of_a_full_step(copy.deepcopy(template))
    state_before = state()

    failures = {}
    for k in range(lines):
        model = copy.deepcopy(template)
        before = [(p, p.detach().clone(), p.data_ptr()) for p in model.parameters()]
        flags, hooks_before = batchnorm_flags(model), hooks(model)
        tracer = LineTracer(interrupt_at=k, within=within)
        with pytest.raises(KeyboardInterrupt):
            step(model, tracer)
        problems = []
        for (name, p), (q, value, pointer) in zip(model.named_parameters(), before):
            if p is not q or not torch.equal(p.detach(), value) or p.data_ptr() != pointer:
                problems.append(f"{name} is not x on its own storage")
        if batchnorm_flags(model) != flags:
            problems.append("track_running_stats changed")
        rng_found, buffers_found = found[k]
        if not all(torch.equal(b, e) for b, e in zip(model.buffers(), buffers_found)):
            problems.append("running statistics differ from the uninterrupted step's at this line")
        if hooks(model) != hooks_before:
            problems.append("hooks left")
        if torch.nn.functional.linear is not LINEAR:  # the exact estimator records F.linear calls meanwhile
            problems.append("torch.nn.functional.linear left replaced")
            torch.nn.functional.linear = LINEAR
        if not torch.is_grad_enabled():
            problems.append("gradients left disabled")
            torch.set_grad_enabled(True)
        if torch._C._functorch.maybe_current_level() is not None:
            problems.append("a torch.func transform left open")
        if not same_rng_states(rng_states(), rng_found):
            problems.append("a generator is not where the step had it")
        if state() != state_before:
            problems.append(f"{state()} where it was {state_before}")
        if not problems and not all(torch.equal(g, r) for g, r in zip(gradient_of_a_full_step(model),
                                                                       reference_gradient)):
            problems.append("the next full step differs from a fresh model's")
        if problems:
            failures[f"line event {k} ({tracer.where})"] = problems
    assert not failures, f"{len(failures)} of {lines} interrupted lines left the model changed:\n" + "\n".join(
        f"{where}: {', '.join(problems)}" for where, problems in failures.items())


def traced(tracer, call):
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return call()
    finally:
        sys.settrace(previous)


@pytest.mark.slow  # a settrace sweep: one step per executed line
@pytest.mark.parametrize("norm,settings", SWEEP_MODES)
def test_an_interrupt_at_any_line_of_the_step_leaves_the_model_as_it_was(monkeypatch, norm, settings):
    """Ctrl-C at every line the step executes: one step counts the line events inside hf_rwsam/, then for each k a
    fresh step on a fresh copy of the model is interrupted by a KeyboardInterrupt at the k-th. After each:

    * every parameter is the same object, bit for bit as before and on its own storage (same data_ptr);
    * BatchNorm's ``track_running_stats`` as before, its running statistics as the uninterrupted step had them at
      that line (moved by the ascent forward if it ran, as a plain step interrupted there leaves them);
    * no module hook left, gradients enabled, no torch.func transform left open;
    * each generator (torch's, Python's, NumPy's) where the uninterrupted step had it at that line or, inside a
      replay of the ascent's random numbers, where it was before the replay;
    * and a full step then gives a fresh model's descent gradient, bit for bit.
    """
    x, y = SWEEP_BATCH
    norm, _, autocast = norm.partition("-under-bf16-autocast")

    def step(model, tracer):
        sharpness_step = SharpnessAwareStep(SharpnessSettings(**settings))
        seed_everything()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            traced(tracer, lambda: sharpness_step(model, {"x": x, "labels": y}, sweep_loss))

    interrupt_sweep(monkeypatch, SweepNet(norm).train(), step)


class SharedPositionsAttention(nn.Module):
    """For the exact estimator's temporary changes: position ids ``[1, T]`` (given to every row while recording) and
    `nn.MultiheadAttention`, sequence-first (its projections recorded through ``F.linear``)."""

    def __init__(self):
        super().__init__()
        self.project, self.positions = nn.Linear(2, 8), nn.Embedding(2, 8)
        self.attention, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        h = self.project(x.view(x.shape[0], 2, 2)) + self.positions(torch.arange(2)[None])  # [b, T = 2, 8]
        h = h.transpose(0, 1)
        logits = self.head(self.attention(h, h, h, need_weights=False)[0].mean(0))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class TinyViT(nn.Module):
    """timm's ViT: its class token and position embedding get one copy per sample while recording."""

    def __init__(self):
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_tiny_patch16_224", img_size=4, patch_size=2, in_chans=1, embed_dim=4,
                                     depth=1, num_heads=1, num_classes=3)

    def forward(self, x, labels=None):
        logits = self.vit(x.view(x.shape[0], 1, 2, 2).repeat(1, 1, 2, 2))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


@pytest.mark.slow  # a settrace sweep: one step per executed line
@pytest.mark.parametrize("build", [SharedPositionsAttention, TinyViT], ids=["positions-attention", "timm-vit"])
def test_an_interrupt_at_any_line_of_the_exact_estimators_step_leaves_the_model_as_it_was(monkeypatch, build):
    """The sweep above, at every line of the exact estimator's recording (the rest of the step is swept above), on
    models that make it change more: per-row position ids, ``F.linear`` recorded, broadcast parameters swapped for
    per-sample copies."""
    x, y = SWEEP_BATCH
    torch.manual_seed(0)
    template = build().train()

    def step(model, tracer):
        sharpness_step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_estimator="exact"))
        seed_everything()
        traced(tracer, lambda: sharpness_step(model, {"x": x, "labels": y}, sweep_loss))

    recording = {"record", "recording", "restore", "_enter", "_per_sample_ids", "_keep", "_record", "linear",
                 "_tracked", "parameters_registered"}
    interrupt_sweep(monkeypatch, template, step, within=("sharpness/ghost.py", recording))


@pytest.mark.slow  # a settrace sweep: one step per executed line
@pytest.mark.parametrize("settings", [
    dict(sam_mode="msam", msam_micro_batch_size=2, msam_implementation="loop"), dict(sam_mode="rwsam"),
], ids=["msam-loop", "rwsam-fd"])
def test_an_interrupt_at_any_line_of_the_trainers_step_leaves_model_and_trainer_as_they_were(
        tmp_path, monkeypatch, settings):
    """The same sweep through `RWSAMTrainer.training_step` (its descent scales the accumulation steps for m-SAM's
    groups while the Trainer's own step runs): the trainer's attributes are also as before."""
    x, y = SWEEP_BATCH
    template = SweepNet().train()
    trainer = RWSAMTrainer(model=copy.deepcopy(template),
                           args=sgd_config(tmp_path, per_device_train_batch_size=4, **settings))

    def step(model, tracer):  # on a fresh trainer state: `train()` sets the accumulation steps
        trainer.current_gradient_accumulation_steps, trainer._recorded_losses, trainer._descent_share = 1, None, 1
        trainer.sharpness_step = SharpnessAwareStep(trainer.args, AccelerateHost(trainer.accelerator))
        seed_everything()
        traced(tracer, lambda: trainer.training_step(model, {"x": x, "labels": y}))

    interrupt_sweep(monkeypatch, template, step, lambda: (
        trainer.current_gradient_accumulation_steps, trainer._recorded_losses, trainer._descent_share))


# ------------------------------------------------------------------------------------------ saves during the step


class SavesWhilePerturbed(TrainerCallback):
    """Keeps ``x`` as each step begins; a forward hook on the model then saves whenever a forward runs away from ``x``
    (RW-SAM's probes at ``x + h u``, the descent at ``x + e``), directly or from a SIGUSR1 handler."""

    def __init__(self, folder, by_signal):
        self.folder, self.by_signal, self.x, self.saves, self.trainer = folder, by_signal, None, [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.x = {name: p.detach().clone() for name, p in model.named_parameters()}

    def save(self, *args):
        folder = str(self.folder / f"save-{len(self.saves)}")
        self.saves.append((folder, self.x))
        self.trainer.save_model(folder)

    def forward_hook(self, module, args, output):
        if self.x is not None and not all(torch.equal(p, self.x[n]) for n, p in module.named_parameters()):
            if self.by_signal:
                signal.raise_signal(signal.SIGUSR1)  # the handler runs before the next line of this hook
            else:
                self.save()


@pytest.mark.parametrize("by_signal", [False, True], ids=["from-the-descent", "from-a-signal-handler"])
@pytest.mark.parametrize("mode", ["sam", "rwsam"])
def test_a_save_made_during_the_step_writes_x_and_training_goes_on_unaffected(tmp_path, mode, by_signal):
    from safetensors.torch import load_file

    x, y = make_tensors(16)

    def train(saver=None):
        torch.manual_seed(0)
        model = TinyMLP(dropout=0.2)
        trainer = RWSAMTrainer(model=model, args=sgd_config(tmp_path / "out", sam_mode=mode, rwsam_num_probes=2,
                                                            max_steps=3), train_dataset=tensor_dataset(x, y))
        if saver is not None:
            saver.trainer = trainer
            trainer.add_callback(saver)
            model.register_forward_hook(saver.forward_hook)
        trainer.train()
        return model

    saver = SavesWhilePerturbed(tmp_path, by_signal)
    if by_signal:
        previous = signal.signal(signal.SIGUSR1, saver.save)
    try:
        saving = train(saver)
    finally:
        if by_signal:
            signal.signal(signal.SIGUSR1, previous)
    # every step saved once per forward away from x: the descent, and RW-SAM's two probes
    assert len(saver.saves) == 3 * (1 if mode == "sam" else 3), len(saver.saves)
    for folder, x_then in saver.saves:
        saved = load_file(str(Path(folder) / "model.safetensors"))
        for name, value in x_then.items():
            assert torch.equal(saved[name], value), f"{folder}: {name} is not x"
    assert torch.equal(flat_params(saving), flat_params(train())), "a save during the step changed the training"


def test_a_save_during_the_exact_estimators_forward_writes_the_parameters_not_their_per_sample_copies():
    """While the exact estimator records, a timm ViT's class token and position embedding are per-sample copies
    ``[b, ...]`` in their module; `original_parameters()` puts the parameters themselves back for the save."""
    torch.manual_seed(0)
    model = TinyViT().train()
    x, y = SWEEP_BATCH
    x_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_estimator="exact"))
    seen = []

    def save_during_forward(module, args, output):
        if not isinstance(model.vit.cls_token, nn.Parameter):
            with step.original_parameters():
                seen.append({k: v.clone() for k, v in model.state_dict().items()})
            seen.append(model.vit._parameters["cls_token"].shape)  # the copy again after the block

    model.vit.head.register_forward_hook(save_during_forward)
    step(model, {"x": x, "labels": y}, sweep_loss)
    assert len(seen) == 2, "the hook saw no recorded forward (with per-sample copies)"
    saved, shape_after = seen
    assert shape_after[0] == len(y), "the copies are back in the module after the save"
    for name, value in x_before.items():
        assert torch.equal(saved[name], value), f"{name} saved is not x"
