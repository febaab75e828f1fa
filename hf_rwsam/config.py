"""`RWSAMConfig`: `TrainingArguments` plus the settings of SAM, ASAM, m-SAM and RW-SAM."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

SAM_MODES = ("none", "sam", "msam", "rwsam")
PERTURBATION_SCOPES = ("device", "global")
MSAM_IMPLEMENTATIONS = ("auto", "loop", "vmap")
RWSAM_ESTIMATORS = ("fd", "exact")
RWSAM_NORMALIZATIONS = ("mean", "none")


def _refuse(field_name: str, value, allowed: str) -> ValueError:
    return ValueError(f"RWSAMConfig.{field_name}={value!r} is invalid: {allowed}.")


FSDP_SUPPORTED = (
    "Under FSDP, RWSAMTrainer supports FSDP2 sharding over all processes (no CPU offload, no replication, tensor or "
    "context parallelism) with sam_perturbation_scope='global' and sam_mode 'sam' (ASAM included) or 'rwsam' with "
    "rwsam_estimator='fd'"
)


def fsdp_problems(args, fsdp_version: int, cpu_offload: bool = False, parallelism_config=None) -> list[str]:
    """What a sharded SAM step cannot do in `args` (an `RWSAMConfig`) and FSDP's settings; empty when all is fine.

    Each process holds a shard of every parameter, so the only perturbation there is is the global one (the norm is
    the square root of the squared shard norms summed over all processes), and anything that needs whole parameters on
    one process is out. Replicas (HSDP) or tensor/context-parallel groups would count shards more than once, and
    offloaded shards live on the CPU while the step runs on the accelerator.
    """
    problems = []
    if fsdp_version != 2:
        problems.append(f"FSDP version {fsdp_version} (only FSDP2: fsdp_config version 2, Accelerate fsdp_version: 2)")
    if cpu_offload:
        problems.append("CPU offload of the parameters (fsdp_config cpu_offload / fsdp 'offload'; it must be off)")
    enabled = [name for name in ("dp_replicate", "tp", "cp", "sp")
               if parallelism_config is not None and getattr(parallelism_config, f"{name}_enabled", False)]
    if enabled:
        sizes = ", ".join(f"{name}_size={getattr(parallelism_config, f'{name}_size', '?')}" for name in enabled)
        problems.append(
            f"parallelism_config with {sizes} (only dp_shard: replicated shards (HSDP) or tensor/context parallel "
            "groups would enter the norm more than once)"
        )
    if args.sam_perturbation_scope != "global":
        problems.append(
            f"sam_perturbation_scope={args.sam_perturbation_scope!r} (each process holds only a shard of every "
            "parameter, so the perturbation is the global one: set sam_perturbation_scope='global')"
        )
    if args.sam_mode == "msam":
        problems.append("sam_mode='msam' (per-group perturbations of sharded parameters; RW-SAM mimics m-SAM)")
    if args.sam_mode == "rwsam" and args.rwsam_estimator == "exact":
        problems.append("rwsam_estimator='exact' (its batched backward needs whole parameters)")
    return problems


@dataclass
class RWSAMConfig(TrainingArguments):
    r"""
    `TrainingArguments` for [`RWSAMTrainer`]: every field of the Trainer plus the sharpness-aware settings below.
    The training step each mode performs is specified in `ALGORITHMS.md`; invalid values raise `ValueError` here,
    at construction.

    Parameters:
        sam_mode (`str`, defaults to `"rwsam"`):
            `"none"` (the plain Trainer step), `"sam"`, `"msam"` (micro-batch SAM) or `"rwsam"` (Reweighted SAM).
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
            m-SAM's `m`; must divide `per_device_train_batch_size`.
        msam_implementation (`str`, defaults to `"auto"`):
            `"loop"` (groups one after another), `"vmap"` (all groups at once with `torch.func`) or `"auto"`.
        msam_vmap_max_memory_mb (`float`, defaults to `1024`):
            `"auto"` uses vmap only if its extra memory, about `2 k d` numbers for `k` groups, fits in this budget.
        rwsam_lambda (`float`, defaults to `1.0`):
            Inverse temperature of the Gibbs weights `softmax(lambda * s)`; 0 is SAM.
        rwsam_estimator (`str`, defaults to `"fd"`):
            Per-sample gradient norms by finite differences (`"fd"`, `rwsam_num_probes` extra forwards) or `"exact"`.
        rwsam_num_probes (`int`, defaults to `1`):
            Rademacher probes `Q` of the `"fd"` estimator.
        rwsam_fd_step (`float`, *optional*):
            Finite-difference step `h` along the unit direction; `None` uses the measured default `1e-3 * sqrt(d)`
            (`hf_rwsam.sharpness.reweight.default_fd_step`).
        rwsam_normalize (`str`, defaults to `"mean"`):
            Scores `s = n / mean(n)` (`"mean"`, scale-free lambda) or `s = n` (`"none"`, the paper's raw form).
        rwsam_target_ess (`float`, *optional*):
            In (0, 1]: choose lambda every step so the effective sample size is this fraction of the batch.
        rwsam_max_weight (`float`, *optional*):
            `c >= 1`: cap every weight at `c / b`.
        rwsam_exact_chunk_size (`int`, defaults to `32`):
            Samples per batched backward of the `"exact"` estimator (memory grows as `chunk * d`).
    """

    sam_mode: str = field(default="rwsam", metadata={"help": f"Sharpness-aware mode, one of {SAM_MODES}."})
    sam_rho: float = field(default=0.05, metadata={"help": "Perturbation radius rho (>= 0)."})
    sam_adaptive: bool = field(default=False, metadata={"help": "ASAM: scale the perturbation by |x| + eta."})
    sam_adaptive_eta: float = field(default=0.01, metadata={"help": "ASAM offset eta (>= 0)."})
    sam_perturbation_scope: str = field(
        default="device", metadata={"help": f"Where the perturbation is computed, one of {PERTURBATION_SCOPES}."}
    )
    msam_micro_batch_size: int | None = field(
        default=None, metadata={"help": "m-SAM micro-batch size m; must divide per_device_train_batch_size."}
    )
    msam_implementation: str = field(
        default="auto", metadata={"help": f"m-SAM implementation, one of {MSAM_IMPLEMENTATIONS}."}
    )
    msam_vmap_max_memory_mb: float = field(
        default=1024.0, metadata={"help": "Extra memory (MiB) m-SAM 'auto' may spend on the vmap implementation."}
    )
    rwsam_lambda: float = field(default=1.0, metadata={"help": "Gibbs inverse temperature lambda (>= 0); 0 is SAM."})
    rwsam_estimator: str = field(
        default="fd", metadata={"help": f"Per-sample gradient norm estimator, one of {RWSAM_ESTIMATORS}."}
    )
    rwsam_num_probes: int = field(default=1, metadata={"help": "Rademacher probes Q of the 'fd' estimator (>= 1)."})
    rwsam_fd_step: float | None = field(
        default=None, metadata={"help": "Finite-difference step h (> 0); None: the measured default 1e-3 * sqrt(d)."}
    )
    rwsam_normalize: str = field(
        default="mean", metadata={"help": f"Score normalisation, one of {RWSAM_NORMALIZATIONS}."}
    )
    rwsam_target_ess: float | None = field(
        default=None, metadata={"help": "Target effective sample size as a fraction of the batch, in (0, 1]."}
    )
    rwsam_max_weight: float | None = field(
        default=None, metadata={"help": "Cap every Gibbs weight at c / b (c >= 1)."}
    )
    rwsam_exact_chunk_size: int = field(
        default=32, metadata={"help": "Samples per batched backward of the 'exact' estimator (>= 1)."}
    )

    def __post_init__(self):
        self._validate_sam_fields()
        super().__post_init__()

    def _validate_sam_fields(self):
        choices = {
            "sam_mode": SAM_MODES,
            "sam_perturbation_scope": PERTURBATION_SCOPES,
            "msam_implementation": MSAM_IMPLEMENTATIONS,
            "rwsam_estimator": RWSAM_ESTIMATORS,
            "rwsam_normalize": RWSAM_NORMALIZATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise _refuse(name, getattr(self, name), f"choose one of {allowed}")
        for name in ("sam_rho", "sam_adaptive_eta", "rwsam_lambda"):
            if not getattr(self, name) >= 0:
                raise _refuse(name, getattr(self, name), "it must be >= 0")
        if not self.msam_vmap_max_memory_mb >= 0:
            raise _refuse("msam_vmap_max_memory_mb", self.msam_vmap_max_memory_mb, "it must be >= 0")
        for name in ("rwsam_num_probes", "rwsam_exact_chunk_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise _refuse(name, value, "it must be an integer >= 1")
        if self.rwsam_fd_step is not None and not self.rwsam_fd_step > 0:
            raise _refuse("rwsam_fd_step", self.rwsam_fd_step, "it must be > 0, or None for the default")
        if self.rwsam_target_ess is not None and not 0 < self.rwsam_target_ess <= 1:
            raise _refuse("rwsam_target_ess", self.rwsam_target_ess, "it must be in (0, 1], or None")
        if self.rwsam_max_weight is not None and not self.rwsam_max_weight >= 1:
            raise _refuse("rwsam_max_weight", self.rwsam_max_weight, "it must be >= 1 (a cap of c / b per weight)")
        if self.sam_mode == "msam":
            m = self.msam_micro_batch_size
            if m is None:
                raise _refuse("msam_micro_batch_size", m, "sam_mode='msam' needs a micro-batch size m >= 1")
            if not (isinstance(m, int) and m >= 1) or self.per_device_train_batch_size % m:
                raise _refuse(
                    "msam_micro_batch_size", m,
                    f"it must be a positive divisor of per_device_train_batch_size={self.per_device_train_batch_size}",
                )
        if self.sam_mode != "none" and self.fsdp not in (None, False, "", []):
            # fsdp_config may still be a file path here; RWSAMTrainer checks again what Accelerate then uses
            fsdp_config = self.fsdp_config if isinstance(self.fsdp_config, dict) else {}
            offload = "offload" in str(self.fsdp) or bool(fsdp_config.get("cpu_offload"))
            problems = fsdp_problems(self, int(fsdp_config.get("version", 2)), offload,
                                     getattr(self, "parallelism_config", None))
            if problems:
                raise _refuse("fsdp", self.fsdp, "; ".join(problems) + f". {FSDP_SUPPORTED}")
        if self.sam_mode != "none" and self.deepspeed:
            raise _refuse(
                "deepspeed", self.deepspeed,
                "DeepSpeed is not supported with sam_mode != 'none' (its engine owns the backward pass and the "
                "gradients); use DDP (accelerate launch / torchrun) or FSDP2 through Accelerate",
            )
        if self.sam_mode != "none" and self.sam_perturbation_scope == "global" and self.gradient_accumulation_steps > 1:
            raise _refuse(
                "sam_perturbation_scope", "global",
                f"with gradient_accumulation_steps={self.gradient_accumulation_steps} > 1 the global ascent gradient "
                "would need a second pass over the accumulation window; use 'device' (each micro-batch perturbs "
                "with its own gradient) or gradient_accumulation_steps=1",
            )
