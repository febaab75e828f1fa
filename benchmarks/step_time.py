"""Per-step time, dispatched ATen ops and peak memory of every mode, side by side in one run, plus two peer SAM
implementations.

    python benchmarks/step_time.py --quick --json benchmarks/step_time.json

Each variant gets its own copy of the model and optimizer. Variants are timed interleaved (one step of each in turn,
repeated) after warm-up, so machine noise hits all of them alike; the figure per variant is the median. Ratios
compare medians of the same run. ``aten_ops``: the ATen operators one step dispatches after warm-up
(`benchmarks/profiling.py`), what a GPU pays in kernel launches where a step is launch-bound (not for ``*_compiled``
variants: under a dispatch mode compiled code runs eagerly). ``--bf16``: real autocast, checked before timing. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU, the peak resident
set of a fresh subprocess that runs only that variant (the SGD subprocess is the baseline).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import timm
import torch
import torch.nn.functional as F
from pytorch_optimizer import SAM as PeerSAM
from timm.layers import GroupNorm
from torch import nn

from hf_rwsam import RWSAMConfig, RWSAMTrainer
from profiling import count_aten_ops


class Classifier(nn.Module):
    """A timm model with the Trainer's calling convention (``norm="groupnorm"``: GroupNorm, 8 groups, for BatchNorm;
    ``"native"``: the model's own, e.g. ``small_cnn_gn``'s GroupNorm)."""

    def __init__(self, name: str, num_classes: int, norm: str = "batchnorm"):
        super().__init__()
        kwargs = {"norm_layer": functools.partial(GroupNorm, num_groups=8)} if norm == "groupnorm" else {}
        self.body = timm.create_model(name, num_classes=num_classes, **kwargs)

    def forward(self, pixel_values, labels=None):
        logits = self.body(pixel_values)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels) if labels is not None else None}


def trainer_variants(batch: int) -> dict[str, dict]:
    variants = {
        "sgd": dict(sam_mode="none"),
        "sam": dict(sam_mode="sam"),
        "asam": dict(sam_mode="sam", sam_adaptive=True),
    }
    for div in (4, 8, 16):
        for impl in ("loop", "vmap"):
            variants[f"msam_{impl}_b/{div}"] = dict(
                sam_mode="msam", msam_micro_batch_size=batch // div, msam_implementation=impl
            )
    for q in (1, 2, 4):
        variants[f"rwsam_fd_q{q}"] = dict(sam_mode="rwsam", rwsam_num_probes=q)
    variants["rwsam_exact"] = dict(sam_mode="rwsam", rwsam_estimator="exact", rwsam_exact_chunk_size=16)
    for name in ("sgd", "sam", "msam_loop_b/8", "rwsam_fd_q1", "rwsam_exact"):
        variants[f"{name}_compiled"] = dict(variants[name], torch_compile=True)
    return variants


def first_activation_dtype(model, batch) -> torch.dtype:
    """The dtype of the first convolution's (or linear layer's) output in one forward: bf16 iff autocast runs."""
    layer = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


class TrainerStep:
    """One optimizer step of RWSAMTrainer: its training_step, then the Trainer's optimizer step and zero_grad.

    The model and optimizer are prepared by the Trainer's Accelerator exactly as `train()` prepares them, so bf16 runs
    in autocast and ``torch_compile`` compiles; with ``--bf16`` the autocast is checked before anything is timed.
    """

    def __init__(self, model, batch, settings, device, bf16):
        args = RWSAMConfig(
            output_dir="/tmp/hf_rwsam_bench", per_device_train_batch_size=batch["labels"].shape[0], report_to="none",
            learning_rate=0.05, optim="sgd", max_grad_norm=0.0, bf16=bf16, use_cpu=device.type == "cpu",
            disable_tqdm=True, **settings,
        )
        self.trainer = RWSAMTrainer(model=model, args=args)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.trainer.current_gradient_accumulation_steps = 1
        self.model, self.trainer.optimizer = self.trainer.accelerator.prepare(self.trainer.model, self.trainer.optimizer)
        self.trainer.model_wrapped = self.model
        self.batch = batch
        if bf16 and first_activation_dtype(self.model, batch) != torch.bfloat16:
            raise RuntimeError("--bf16: the prepared model runs no autocast; the figures would be fp32 ones")

    def __call__(self):
        self.trainer.training_step(self.model, self.batch)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)


class HandSAMStep:
    """The davda54/sam first/second step, written out: the peer every SAM implementation is compared with (in bf16
    autocast with ``--bf16``, compiled with ``hand_sam_compiled``)."""

    def __init__(self, model, batch, rho=0.05, bf16=False, compiled=False):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.model, self.batch, self.rho = torch.compile(model) if compiled else model, batch, rho
        self.optimizer = torch.optim.SGD(self.params, lr=0.05)
        self.device_type, self.bf16 = next(model.parameters()).device.type, bf16

    def forward_backward(self):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.batch)["loss"]
        loss.backward()

    def __call__(self):
        params = self.params
        self.forward_backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
            e = [p.grad * (self.rho / (norm + 1e-12)) for p in params]
            for p, ep in zip(params, e):
                p.add_(ep)
        self.optimizer.zero_grad(set_to_none=True)
        momenta = [m.momentum for m in self.bn]
        for m in self.bn:
            m.momentum = 0.0
        self.forward_backward()
        for m, mom in zip(self.bn, momenta):
            m.momentum = mom
        with torch.no_grad():
            for p, ep in zip(params, e):
                p.sub_(ep)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ProbeForward:
    """One no-grad training-mode forward: the cost of an fd probe, hence RW-SAM's floor ``1 + fwd / SAM`` (in fp32,
    as the probes run also under ``--bf16``)."""

    def __init__(self, model, batch):
        self.model, self.batch = model.train(), {k: v for k, v in batch.items() if k != "labels"}

    @torch.no_grad()
    def __call__(self):
        self.model(**self.batch)


class MicroBatchForwardBackward:
    """Forward and backward of the batch in ``k`` micro-batches, no optimizer: the compute m-SAM repeats twice."""

    def __init__(self, model, batch, k, bf16=False):
        self.model = model.train()
        self.chunks = [dict(zip(batch, values)) for values in zip(*(v.chunk(k) for v in batch.values()))]
        self.device_type, self.bf16 = next(model.parameters()).device.type, bf16

    def __call__(self):
        for chunk in self.chunks:
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(**chunk)["loss"]
            loss.backward()
        self.model.zero_grad(set_to_none=True)


class ParameterPass:
    """One ``x += y`` over every parameter: the unit of the per-group passes (norm, ``x + e``) m-SAM cannot avoid."""

    def __init__(self, model):
        self.params = [p.detach() for p in model.parameters()]
        self.others = [torch.full_like(p, 1e-8) for p in self.params]

    @torch.no_grad()
    def __call__(self):
        torch._foreach_add_(self.params, self.others)


class PeerSAMStep:
    """pytorch_optimizer.SAM with SGD (in bf16 autocast with ``--bf16``)."""

    def __init__(self, model, batch, rho=0.05, bf16=False):
        self.model, self.batch = model, batch
        self.optimizer = PeerSAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=rho, lr=0.05)
        self.device_type, self.bf16 = next(model.parameters()).device.type, bf16

    def forward_backward(self):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.batch)["loss"]
        loss.backward()

    def __call__(self):
        self.forward_backward()
        self.optimizer.first_step(zero_grad=True)
        self.forward_backward()
        self.optimizer.second_step(zero_grad=True)


def build(name, base, batch, device, bf16):
    model = copy.deepcopy(base).to(device)
    if name in ("hand_sam", "hand_sam_compiled"):
        return HandSAMStep(model, batch, bf16=bf16, compiled=name.endswith("_compiled"))
    if name == "pytorch_optimizer_sam":
        return PeerSAMStep(model, batch, bf16=bf16)
    if name == "forward_nograd":
        return ProbeForward(model, batch)
    if name.startswith("fwd_bwd_b/"):
        return MicroBatchForwardBackward(model, batch, int(name.split("/")[1]), bf16)
    if name == "parameter_pass":
        return ParameterPass(model)
    return TrainerStep(model, batch, trainer_variants(batch["labels"].shape[0])[name], device, bf16)


COST_UNITS = ("fwd_bwd_b/1", "fwd_bwd_b/8", "parameter_pass")  # timed for the limits, not modes (no memory figure)


def msam_limit(modes, k):
    """m-SAM's floor against SAM: SAM's own work, plus both passes run on k micro-batches instead of one batch, plus
    the two passes over the parameters (the norm, ``x + e``) each of the k - 1 extra groups needs.

        1 + (2 (fwd_bwd(b/k) - fwd_bwd(b)) + 2 (k - 1) pass) / SAM
    """
    if not {"sam", f"fwd_bwd_b/{k}", "fwd_bwd_b/1", "parameter_pass"} <= modes.keys():
        return None
    t = {name: modes[name]["step_s"] for name in modes}
    extra = 2 * (t[f"fwd_bwd_b/{k}"] - t["fwd_bwd_b/1"]) + 2 * (k - 1) * t["parameter_pass"]
    return 1 + extra / t["sam"]


TEXT_MODELS = {"bert-base": "BertConfig", "bert-tiny": "BertConfig"}
"""transformers text classifiers built from a config (offline): ``bert-base`` (110M parameters, the default
BertConfig) and ``bert-tiny`` (2 layers of width 128, for a quick run); ``--image-size`` is their sequence length."""


def make_text_model(name: str, num_classes: int):
    from transformers import BertConfig, BertForSequenceClassification

    sizes = {} if name == "bert-base" else dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=512)
    return BertForSequenceClassification(BertConfig(num_labels=num_classes, **sizes))


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    if args.model in TEXT_MODELS:
        ids = torch.randint(0, 30522, (args.batch_size, args.image_size), generator=g)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
        return {"input_ids": ids.to(device), "labels": labels.to(device)}
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    return {"pixel_values": pixels.to(device), "labels": labels.to(device)}


def all_variant_names(batch_size):
    return list(trainer_variants(batch_size)) + ["hand_sam", "hand_sam_compiled", "pytorch_optimizer_sam",
                                                  "forward_nograd", "fwd_bwd_b/1", "fwd_bwd_b/8", "parameter_pass"]


def peak_memory_mb(name, args) -> float:
    """Peak memory of `name` alone: the CUDA allocator's peak, or on CPU the peak resident set of a fresh subprocess
    that runs the variant once to warm up, resets the kernel's high-water mark (``/proc/self/clear_refs``) and runs
    it twice more (the reset leaves out the libraries' start-up peak, which would hide every difference)."""
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        device = torch.device("cuda")
        step = build(name, make_model(args), make_batch(args, device), device, args.bf16)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del step
        return peak
    cmd = [sys.executable, __file__, "--memory-of", name, *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def make_model(args):
    torch.manual_seed(0)
    if args.model in TEXT_MODELS:
        return make_text_model(args.model, args.num_classes)
    return Classifier(args.model, args.num_classes, args.norm)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="timm resnet18, 32x32, batch 128 (the reference setting)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--norm", choices=("batchnorm", "groupnorm", "native"), default="batchnorm",
                        help="the model's normalisation layers (groupnorm: timm's GroupNorm, 8 groups; native: the "
                             "model's own, e.g. small_cnn_gn)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 quick, 20 otherwise)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=None, help="comma-separated subset of variants")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (7 if args.quick else 20)
    device = torch.device(args.device)

    if args.memory_of:  # subprocess: run one variant, print its peak RSS in MiB
        step = build(args.memory_of, make_model(args), make_batch(args, device), device, args.bf16)
        step()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        for _ in range(2):
            step()
        with open("/proc/self/status") as f:
            hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(hwm_kb / 1024)
        return

    names = args.variants.split(",") if args.variants else all_variant_names(args.batch_size)
    base, batch = make_model(args), make_batch(args, device)
    steps = {name: build(name, base, batch, device, args.bf16) for name in names}
    times = {name: [] for name in names}
    for round_ in range(args.warmup + repeats):
        for name in names:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.warmup + repeats} done", file=sys.stderr)
    modes = {name: {"step_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}
    for name, step in steps.items():  # (a dispatch mode runs compiled code eagerly: no count for compiled variants)
        modes[name]["aten_ops"] = None if name.endswith("_compiled") else count_aten_ops(step).total
    del steps

    if not args.no_memory:
        for name in names:
            if name not in COST_UNITS:
                modes[name]["peak_mem_mb"] = peak_memory_mb(name, args)

    def ratio(a, b):
        """The median over rounds of the two variants' ratio in the same round (paired: a round's steps run back to
        back, so a slow spell of the machine hits both)."""
        if a not in times or b not in times:
            return None
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    msam_best = min(
        (n for n in modes if n.startswith("msam_") and n.endswith("b/8")), key=lambda n: modes[n]["step_s"], default=None
    )
    ratios = {
        "sam/sgd": ratio("sam", "sgd"),
        "rwsam/sam": ratio("rwsam_fd_q1", "sam"),
        "rwsam_exact/sam": ratio("rwsam_exact", "sam"),
        "msam/sam": ratio(msam_best, "sam") if msam_best else None,
        "trainer_sam/loop_sam": ratio("sam", "hand_sam"),
        "pytorch_optimizer_sam/sgd": ratio("pytorch_optimizer_sam", "sgd"),
        "asam/sam": ratio("asam", "sam"),
        "rwsam/sam_limit": 1 + ratio("forward_nograd", "sam") if "forward_nograd" in modes else None,
        "msam/sam_limit": msam_limit(modes, k=8),
        "sam_compiled/sgd_compiled": ratio("sam_compiled", "sgd_compiled"),
        "rwsam_compiled/sam_compiled": ratio("rwsam_fd_q1_compiled", "sam_compiled"),
        "trainer_sam_compiled/loop_sam_compiled": ratio("sam_compiled", "hand_sam_compiled"),
    }
    ratios = {key: value for key, value in ratios.items() if value is not None}
    memory = {n: m["peak_mem_mb"] for n, m in modes.items() if "peak_mem_mb" in m}
    if {"sgd", "sam", "rwsam_fd_q1"} <= memory.keys():
        param_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
        ratios["sam_extra_mem/param_mem"] = (memory["sam"] - memory["sgd"]) / param_mb
        ratios["rwsam_mem/sam_mem"] = memory["rwsam_fd_q1"] / memory["sam"]
    if {"sam", "rwsam_exact"} <= memory.keys():
        ratios["rwsam_exact_mem/sam_mem"] = memory["rwsam_exact"] / memory["sam"]
    result = {
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "setting": dict(model=args.model, norm=args.norm, image_size=args.image_size, batch_size=args.batch_size,
                        device=args.device, bf16=args.bf16, repeats=repeats, torch=torch.__version__,
                        threads=torch.get_num_threads(), machine=platform.machine()),
        "msam_b/8_best": msam_best,
        "ratios": ratios,
        "modes": modes,
    }
    print(f"{'variant':28s} {'median ms':>10s} {'min ms':>8s} {'aten ops':>9s} {'peak MiB':>9s}")
    for name, m in modes.items():
        ops = "-" if m["aten_ops"] is None else m["aten_ops"]
        print(f"{name:28s} {1000 * m['step_s']:10.1f} {1000 * m['min_s']:8.1f} {ops:>9} "
              f"{m.get('peak_mem_mb', float('nan')):9.0f}")
    for key, value in ratios.items():
        print(f"{key:38s} {value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
