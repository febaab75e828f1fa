"""Distributed semantics with real processes: torchrun, 2 CPU processes, gloo.

Each case trains a tiny MLP for a few steps on 8 samples in dataset order (rank 0 gets samples 0-3, rank 1 samples
4-7 every step) and compares the final parameters with a single-process run on the global batch of 8:
- ``device`` scope: each process perturbs with its own 4 samples, which is single-process m-SAM with m = 4;
- ``global`` scope: the ascent gradient is averaged over processes, which is single-process SAM on the 8 samples;
- RW-SAM ``global`` with exact norms: the Gibbs weights are computed over the global batch; ``device``: over each
  process's own batch (against a plain reference);
- FSDP2 (Accelerate's plugin, engaged on CPU by the worker): the shards are perturbed with the whole model's norm, so
  the run is SAM on the global batch.
The single-process runs are themselves checked against plain references in test_sam_reference.py, test_msam.py
and test_rwsam.py. Tolerance 1e-5: the only difference is the order of fp32 sums (all-reduce vs one batch).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from references import ref_gibbs, reference_rwsam_gradient
from utils import SequentialTrainer, TinyMLP, flat_params, make_tensors, relative_error, sgd_config, tensor_dataset

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
STEPS, PER_DEVICE, WORLD = 3, 4, 2
TOL = 1e-5

pytestmark = pytest.mark.distributed  # every test starts two processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, config, timeout=240, nproc=WORLD, **settings):
    """Run the worker under torchrun with `nproc` processes (0: as a plain single process)."""
    out = tmp_path / "result.pt"
    payload = json.dumps({"config": config, "out": str(out), "samples": PER_DEVICE * WORLD, **settings})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), payload]
    if nproc == 0:
        cmd = [sys.executable, str(WORKER), payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    return proc, (torch.load(out) if out.exists() else None)


def single_process(tmp_path, **config):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(PER_DEVICE * WORLD, seed=1)
    args = sgd_config(tmp_path / "single", per_device_train_batch_size=PER_DEVICE * WORLD, max_steps=STEPS, **config)
    SequentialTrainer(model=model, args=args, train_dataset=tensor_dataset(x, y)).train()
    return flat_params(model)


def _check(proc, result):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["world_size"] == WORLD
    return result["params"]


def test_device_scope_is_msam_with_the_per_device_batch(tmp_path):
    proc, result = launch(tmp_path, {"sam_mode": "sam", "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS})
    ours = _check(proc, result)
    msam = single_process(tmp_path, sam_mode="msam", msam_micro_batch_size=PER_DEVICE, msam_implementation="loop")
    sam = single_process(tmp_path / "sam", sam_mode="sam")
    assert relative_error(ours, msam) <= TOL
    assert relative_error(ours, sam) > 100 * TOL  # the comparison can fail: global-batch SAM is elsewhere
    # The ascent pass (forward and gradient) makes no collective call; the descent is DDP's one bucket per step.
    counts = result["counts"]
    assert not any(key.startswith("ascent:") for key in counts), counts
    assert counts.get("descent:ddp_bucket_allreduce") == STEPS, counts


def test_global_scope_is_sam_on_the_global_batch(tmp_path):
    proc, result = launch(tmp_path, {"sam_mode": "sam", "sam_perturbation_scope": "global",
                                     "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS})
    ours = _check(proc, result)
    sam = single_process(tmp_path, sam_mode="sam")
    msam = single_process(tmp_path / "msam", sam_mode="msam", msam_micro_batch_size=PER_DEVICE,
                          msam_implementation="loop")
    assert relative_error(ours, sam) <= TOL
    assert relative_error(ours, msam) > 100 * TOL
    assert result["counts"].get("ascent:all_reduce", 0) > 0  # the global ascent gradient is one reduction


def test_rwsam_exact_device_scope_weights_each_process_batch(tmp_path):
    """``device`` scope with exact norms: each process computes the Gibbs weights, the ascent and the descent on its own
    4 samples (the one-backward per-sample norms under DDP's no_sync), and DDP averages the two descent gradients.
    Reference: test_rwsam's plain step on each half, the two descents averaged."""
    rho, lam = 0.1, 2.0
    proc, result = launch(tmp_path, {"sam_mode": "rwsam", "rwsam_estimator": "exact", "rwsam_lambda": lam,
                                     "sam_rho": rho, "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS})
    ours = _check(proc, result)

    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(PER_DEVICE * WORLD, seed=1)
    for _ in range(STEPS):
        halves = [reference_rwsam_gradient(model, x[r * PER_DEVICE:(r + 1) * PER_DEVICE],
                                           y[r * PER_DEVICE:(r + 1) * PER_DEVICE], rho, lambda n: ref_gibbs(n, lam=lam))
                  for r in range(WORLD)]
        with torch.no_grad():
            for q, *grads in zip(model.parameters(), *halves):
                q.sub_(0.1 * sum(grads) / WORLD)  # sgd_config's learning rate; DDP averages the descents
    assert relative_error(ours, flat_params(model)) <= TOL
    global_rwsam = single_process(tmp_path, sam_mode="rwsam", rwsam_estimator="exact", rwsam_lambda=lam, sam_rho=rho)
    assert relative_error(ours, global_rwsam) > 100 * TOL


@pytest.mark.parametrize("extra", [{}, {"rwsam_target_ess": 0.6, "rwsam_max_weight": 3.0}])
def test_rwsam_global_scope_weights_the_global_batch(tmp_path, extra):
    config = {"sam_mode": "rwsam", "rwsam_estimator": "exact", "rwsam_lambda": 2.0, **extra}
    proc, result = launch(tmp_path, {**config, "sam_perturbation_scope": "global",
                                     "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS})
    ours = _check(proc, result)
    reference = single_process(tmp_path, **config)
    sam = single_process(tmp_path / "sam", sam_mode="sam")
    assert relative_error(ours, reference) <= TOL
    assert relative_error(ours, sam) > 100 * TOL


def test_a_failing_rank_ends_the_run_cleanly_with_its_error(tmp_path):
    before = {p.pid for p in psutil.process_iter()}
    proc, result = launch(tmp_path, {"sam_mode": "sam", "per_device_train_batch_size": PER_DEVICE,
                                     "max_steps": STEPS}, timeout=120, fail_rank=1)
    assert proc.returncode != 0 and result is None
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                 and str(WORKER) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


def test_deepspeed_is_refused_at_construction_by_name(tmp_path):
    from hf_rwsam import RWSAMConfig

    with pytest.raises(ValueError, match=r"RWSAMConfig\.deepspeed=.*DDP.*FSDP"):
        RWSAMConfig(output_dir=str(tmp_path), sam_mode="rwsam", deepspeed={"train_batch_size": 8}, use_cpu=True)


FSDP = {"fsdp": True, "fsdp_config": {"version": 2}, "sam_perturbation_scope": "global"}
PER_LAYER = {"fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["Linear"]}}  # nested FSDP modules


def launch_fsdp(tmp_path, config, **settings):
    """Accelerate's FSDP2 plugin on 2 CPU processes (train_worker.engage_fsdp_on_cpu); checks the model was sharded
    (the root alone, or each Linear too with PER_LAYER)."""
    proc, result = launch(tmp_path, {**FSDP, **config, "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS},
                          fsdp=True, **settings)
    params = _check(proc, result)
    assert result["distributed_type"] == "DistributedType.FSDP"
    assert set(result["sharded"]) == {"DTensor"}, result["sharded"]
    assert result["fsdp_modules"] == (3 if config.get("fsdp_config") == PER_LAYER["fsdp_config"] else 1), result
    return params, result


def unsharded_ascent_norm(adaptive=False):
    """||T g|| of the first step, computed plainly on the whole model and the global batch (ASAM: eta = 0.01)."""
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = make_tensors(PER_DEVICE * WORLD, seed=1)
    grads = torch.autograd.grad(model(x, labels=y)["loss"], list(model.parameters()))
    scaled = [g * (p.abs() + 0.01) if adaptive else g for g, p in zip(grads, model.parameters())]  # eta = 0.01
    return float(torch.cat([t.detach().reshape(-1) for t in scaled]).norm())


def assert_first_norms_are_the_unsharded_one(result, adaptive=False):
    # each rank holds shards only; the norm it used is the whole model's, the same on every rank
    expected = unsharded_ascent_norm(adaptive)
    for (norm,) in result["first_perturbation_norms"]:
        assert abs(norm - expected) <= 1e-6 * expected, (result["first_perturbation_norms"], expected)


@pytest.mark.parametrize(
    "extra, wrap",
    [({}, {}), ({"sam_adaptive": True}, {}), ({"max_grad_norm": 0.3}, PER_LAYER)],  # clipping acts: norms ~0.55
)
def test_fsdp_perturbs_with_the_global_norm_and_equals_sam_on_the_global_batch(tmp_path, extra, wrap):
    ours, result = launch_fsdp(tmp_path, {"sam_mode": "sam", **extra, **wrap})
    assert_first_norms_are_the_unsharded_one(result, adaptive=extra.get("sam_adaptive", False))
    sam = single_process(tmp_path, sam_mode="sam", **extra)
    sgd = single_process(tmp_path / "sgd", sam_mode="none")
    assert relative_error(ours, sam) <= TOL
    assert relative_error(ours, sgd) > 10 * TOL  # ASAM at rho = 0.05 moves these weights by 7e-4


@pytest.mark.parametrize("wrap", [{}, PER_LAYER])
def test_fsdp_rwsam_fd_restores_the_shards_after_its_probes(tmp_path, wrap):
    # lambda = 0 gives uniform weights whatever the probes say: the run is SAM exactly, unless a probe's shift of
    # the shards (written in place under FSDP) were not undone bit for bit
    ours, result = launch_fsdp(tmp_path, {"sam_mode": "rwsam", "rwsam_lambda": 0.0, "rwsam_num_probes": 2, **wrap})
    sam = single_process(tmp_path, sam_mode="sam")
    assert relative_error(ours, sam) <= TOL
    # uniform weights over the global batch: the ascent gradient (summed over ranks) is SAM's, norm included
    assert_first_norms_are_the_unsharded_one(result)


def test_fsdp_original_parameters_write_x_into_the_shards_during_the_descent(tmp_path):
    """What a save made inside the step sees under FSDP: the shards, written in place with x + e, hold x inside
    `original_parameters()` and x + e again after it; the run is still SAM on the global batch."""
    ours, result = launch_fsdp(tmp_path, {"sam_mode": "sam"}, hold_x_in_descent=True)
    assert [len(held) for held in result["held_x"]] == [STEPS] * WORLD, result["held_x"]
    assert all(all(checks) for held in result["held_x"] for checks in held), result["held_x"]
    assert relative_error(ours, single_process(tmp_path, sam_mode="sam")) <= TOL


def test_fsdp_rwsam_fd_weights_follow_the_per_sample_norms_of_the_whole_model(tmp_path):
    # Probes drawn shard by shard estimate the norms of whole-model per-sample gradients: with many probes the run
    # lands much nearer RW-SAM with exact norms than SAM does.
    config = {"sam_mode": "rwsam", "rwsam_lambda": 4.0}
    ours, _ = launch_fsdp(tmp_path, {**config, "rwsam_num_probes": 64})
    exact = single_process(tmp_path, **config, rwsam_estimator="exact")
    sam = single_process(tmp_path / "sam", sam_mode="sam")
    assert relative_error(ours, exact) < 0.25 * relative_error(sam, exact)


def test_fsdp_with_bf16_runs_rwsam_and_warns_about_its_probes(tmp_path):
    proc, result = launch(tmp_path, {**FSDP, "sam_mode": "rwsam", "bf16": True, "per_device_train_batch_size": PER_DEVICE,
                                     "max_steps": STEPS}, fsdp=True)
    ours = _check(proc, result)
    assert "RW-SAM under FSDP with mixed precision" in proc.stdout + proc.stderr
    # bf16 keeps 8 mantissa bits (relative rounding 4e-3); three steps stay within 1e-2 of fp32 SAM
    assert torch.isfinite(ours).all()
    assert relative_error(ours, single_process(tmp_path, sam_mode="sam")) <= 1e-2


@pytest.mark.parametrize(
    "config, named",
    [
        ({"fsdp_config": {"version": 1}}, r"FSDP version 1 \(only FSDP2"),
        ({"sam_perturbation_scope": "device"}, r"sam_perturbation_scope='device'.*set sam_perturbation_scope='global'"),
        ({"sam_mode": "msam", "msam_micro_batch_size": 4}, r"sam_mode='msam'"),
        ({"sam_mode": "rwsam", "rwsam_estimator": "exact"}, r"rwsam_estimator='exact'"),
        ({"fsdp_config": {"version": 2, "cpu_offload": True}}, r"CPU offload"),
        ({"parallelism_config": "HSDP"}, r"parallelism_config with dp_replicate_size=2 \(only dp_shard"),
    ],
)
def test_fsdp_refuses_what_a_sharded_step_cannot_do_by_name(tmp_path, config, named):
    from hf_rwsam import RWSAMConfig

    from accelerate.parallelism_config import ParallelismConfig

    settings = {"sam_mode": "sam", **FSDP, **config}
    if settings.get("parallelism_config") == "HSDP":
        settings["parallelism_config"] = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)
    with pytest.raises(ValueError, match=r"RWSAMConfig\.fsdp=True is invalid: .*" + named + ".*supports FSDP2"):
        RWSAMConfig(output_dir=str(tmp_path), use_cpu=True, **settings)


def test_fsdp_from_the_accelerate_config_is_checked_by_the_trainer_too(tmp_path):
    # launched with an Accelerate FSDP config, RWSAMConfig.fsdp is unset: the Trainer refuses at construction
    proc, result = launch(tmp_path, {"sam_mode": "sam", "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS},
                          fsdp=True, accelerate_fsdp=True)
    assert proc.returncode != 0 and result is None
    # (the worker's trainer is a subclass of RWSAMTrainer: the message names the class in use)
    assert "PhaseTrainer under FSDP (from the Accelerate config): sam_perturbation_scope='device'" in (
        proc.stdout + proc.stderr)


def test_a_model_sharded_outside_accelerate_is_refused_rather_than_silently_unperturbed(tmp_path):
    # Its DTensor parameters are not in the autograd graph: the ascent gradient would be zero on every step. A plain
    # single process, as Accelerate sees transformers' distributed loading (under torchrun, DDP fails on DTensors).
    proc, result = launch(tmp_path, {"sam_mode": "sam", "per_device_train_batch_size": PER_DEVICE, "max_steps": STEPS},
                          nproc=0, shard_before_trainer=True)
    assert proc.returncode != 0 and result is None
    assert "the parameters are sharded (DTensor) but Accelerate's FSDP is off" in proc.stdout + proc.stderr
