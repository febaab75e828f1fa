"""Micro-batch SAM (m-SAM): every group of ``m`` samples perturbs the weights with its own gradient.

Foret et al. (2021) and Andriushchenko & Flammarion (2022, tml-epfl/understanding-sam) split the batch into
``k = b / m`` consecutive groups ``G_j``; group ``j`` ascends along its own gradient ``g_j``, and the step's gradient
is the average of the groups' descent gradients ``grad L_{G_j}(x + e_j)``, with ``e_j = rho T^2 g_j / ||T g_j||``.

Two implementations with the same result up to float rounding:

* ``loop`` runs the ordinary SAM step once per group (`split_batch` cuts the groups; `MicroBatchSAM` runs them).
* ``vmap`` (`vmap_msam_step`) runs all groups at once with ``torch.func``: one batched ascent giving the ``k``
  per-group gradients, then one batched descent at the ``k`` perturbed points. Extra memory: about ``2 k d`` numbers
  (per-group gradients, then per-group perturbed parameters).

BatchNorm: each group normalises with its own batch statistics. Running statistics are updated only by the ascent
passes, group after group, as the loop does; under vmap they are captured per group and applied in group order.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _NormBase

from .context import RunningMeans, StepContext, batch_size
from .state import RNGReplay, frozen_running_stats, restored, running_stat_modules

logger = logging.getLogger(__name__)


def split_batch(inputs: Mapping[str, Any], num_groups: int) -> list[dict[str, Any]]:
    """Cut a batch into `num_groups` consecutive groups along the first dimension (other values are shared)."""
    b = batch_size(inputs)
    chunks = {k: v.chunk(num_groups) if _is_batched(v, b) else None for k, v in inputs.items()}
    return [{k: (chunks[k][j] if chunks[k] is not None else v) for k, v in inputs.items()} for j in range(num_groups)]


def _is_batched(value: Any, b: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b


@dataclass
class MSAMStepResult:
    clean_losses: torch.Tensor  # [k] each group's loss at x
    perturbed_losses: torch.Tensor  # [k] each group's loss at x + e_j
    descent_objective: torch.Tensor  # its value is mean_j L_j(x + e_j), its gradient the mean descent gradient
    ascent_grad_norms: torch.Tensor  # [k] ||T g_j||
    skipped: torch.Tensor  # [k] 1.0 where ||T g_j|| was zero or not finite
    update_running_stats: Callable[[], None]  # applies the ascent passes' BatchNorm statistics, group after group


class _Objective(nn.Module):
    """``loss_fn(model, inputs)`` as a module, so that `functional_call` can evaluate it at other parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs):
        return self.loss_fn(self.model, inputs)


class _BatchStatsRecorder:
    """Records the batch mean and unbiased variance each BatchNorm layer sees inside `recording`, to update running
    stats afterwards."""

    def __init__(self, modules: list[_NormBase]):
        self.modules = modules
        self.called: list[_NormBase] = []  # the layers in call order (a layer may run more than once)
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(self) -> contextlib.AbstractContextManager:
        return _hooked(self.modules, self._record)

    def _record(self, module, args):
        x = args[0].float()  # fp32 statistics, also under autocast
        dims = [d for d in range(x.dim()) if d != 1]
        self.called.append(module)
        self.stats.append((x.mean(dims), x.var(dims, correction=1)))

    def pop(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        means, variances = [s[0] for s in self.stats], [s[1] for s in self.stats]
        self.stats = []
        return means, variances

    @torch.no_grad()
    def apply_in_group_order(self, means: list[torch.Tensor], variances: list[torch.Tensor]) -> None:
        """``r <- (1 - momentum) r + momentum * stat_j`` for j = 1..k, as k training forwards would do."""
        for module, mean, var in zip(self.called, means, variances):
            for j in range(mean.shape[0]):
                module.num_batches_tracked.add_(1)
                momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
                module.running_mean.lerp_(mean[j].to(module.running_mean.dtype), momentum)
                module.running_var.lerp_(var[j].to(module.running_var.dtype), momentum)


def _match_batchnorm_input_dtype(module, args):
    """Under autocast, feed BatchNorm its weights' dtype: torch.func cannot differentiate mixed-dtype batch_norm."""
    if module.weight is not None and args[0].dtype != module.weight.dtype:
        return (args[0].to(module.weight.dtype), *args[1:])
    return None


@contextlib.contextmanager
def _hooked(modules: list[nn.Module], hook) -> Iterator[None]:
    """`hook` is a forward pre-hook of every module inside the block, and of none after it (`restored`)."""
    handles = []

    def remove():
        for handle in handles:
            handle.remove()

    with restored(remove):
        for module in modules:
            handles.append(module.register_forward_pre_hook(hook))
        yield


def _vmappable_batchnorm(model: nn.Module) -> contextlib.AbstractContextManager:
    return _hooked([m for m in model.modules() if isinstance(m, _NormBase)], _match_batchnorm_input_dtype)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Refuses a forward that assigns new tensors to the model's buffers: under vmap they would be batched tensors
    escaping the transform (and breaking the next `state_dict`). The buffers are put back, and the error lets the
    ``"auto"`` implementation choose the loop."""
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()]
    changed = []

    def put_back():
        changed.extend(name for module, name, buffer in buffers if module._buffers.get(name) is not buffer)
        for module, name, buffer in buffers:
            module._buffers[name] = buffer

    with restored(put_back):
        yield
    if changed:
        raise RuntimeError(f"vmap: the forward assigns new values to the buffers {changed}, which torch.func cannot "
                           "batch per group")


def vmap_msam_step(
    model: nn.Module,
    inputs: Mapping[str, Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    num_groups: int,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
    bn_modules: list[_NormBase] | None = None,
) -> MSAMStepResult:
    """All m-SAM groups at once: batched ascent gradients, perturbations and descent losses with ``torch.func``.

    Each group's loss is ``loss_fn(model, group)``, evaluated at per-group parameters with `functional_call`, so the
    ascent follows the loop's own objective. Backpropagating the returned ``descent_objective`` (whose value is the
    groups' mean loss at their perturbed points) accumulates the mean of the groups' descent gradients into ``.grad``.
    Random ops draw different numbers per group, and the descent replays the ascent's. The BatchNorm running statistics the
    ascent saw are applied only by ``update_running_stats()``, once the caller's descent has succeeded.

    Args:
        model (`nn.Module`): the (unwrapped) model, in training mode.
        inputs (`Mapping`): the batch, labels included; tensors with ``b`` rows are split into groups.
        loss_fn (`Callable`): ``(model, group_inputs) -> Tensor`` (a scalar: the group's loss).
        num_groups (`int`): ``k``.
        rho, adaptive, eta: as in `sam_perturbation`.
        bn_modules (`list`, *optional*): BatchNorm layers whose running statistics the ascent updates.
    """
    bn_modules = bn_modules or []
    b = batch_size(inputs)
    m = b // num_groups
    objective = _Objective(model, loss_fn)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grouped = {k: (v.reshape(num_groups, m, *v.shape[1:]) if _is_batched(v, b) else v) for k, v in inputs.items()}
    in_dims = {k: (0 if _is_batched(v, b) else None) for k, v in inputs.items()}
    recorder = _BatchStatsRecorder(bn_modules)
    device = next(iter(params.values())).device

    def group_loss(weights, group_inputs):
        return functional_call(objective, {f"model.{n}": w for n, w in weights.items()}, args=(group_inputs,))

    def ascent(weights, group_inputs):
        loss = group_loss(weights, group_inputs)
        means, variances = recorder.pop()
        return loss, (loss.detach(), means, variances)

    rng = RNGReplay(device)
    with recorder.recording(), frozen_running_stats(bn_modules), _vmappable_batchnorm(model), _buffers_kept(model):
        grads, (clean, means, variances) = vmap(
            grad(ascent, has_aux=True), in_dims=(None, in_dims), randomness="different"
        )(params, grouped)

    with torch.no_grad():
        g = [grads.pop(n) for n in names]  # torch.func may return expanded views: only out-of-place ops below
        if adaptive:
            scale = [(params[n].abs() + eta) for n in names]
            g = list(torch._foreach_mul(g, scale))
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float32) for t in g]), dim=0
        )  # [k]: ||T g_j||
        usable = torch.isfinite(norms) & (norms > 0)
        if not bool(usable.all()):  # rare: zero the unusable groups' gradients (they may hold nan or inf)
            g = [torch.where(usable.view(-1, *[1] * (t.dim() - 1)), t, 0) for t in g]
        factor = torch.where(usable, rho / norms, torch.zeros_like(norms))
        if adaptive:
            g = list(torch._foreach_mul(g, scale))
        e = {}
        for n in names:  # per-group factors broadcast over each parameter's shape; g's entries freed one by one
            t = g.pop(0)
            e[n] = t * factor.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
        del g, grads

    fixed = {n: params[n].detach() for n in names}

    def descent(delta, group_inputs):
        loss = group_loss({n: fixed[n] + delta[n] for n in names}, group_inputs)
        return loss, loss.detach()

    # The descent gradients come from torch.func too (vmap of grad): autocast, which the model's forward may enter
    # (Accelerate wraps it so), is ignored under a bare vmap and honoured under vmap(grad), as in the ascent.
    with rng.replay(), frozen_running_stats(bn_modules), _vmappable_batchnorm(model), _buffers_kept(model):
        descent_grads, perturbed = vmap(grad(descent, has_aux=True), in_dims=(0, in_dims), randomness="different")(
            e, grouped
        )
    del e
    with torch.no_grad():
        mean_grads = {n: descent_grads.pop(n).mean(0) for n in names}
    # The objective whose gradient is the groups' mean descent gradient and whose value is their mean loss
    objective = perturbed.mean() + sum((mean_grads[n] * (params[n] - fixed[n])).sum() for n in names)
    return MSAMStepResult(
        clean_losses=clean, perturbed_losses=perturbed, descent_objective=objective, ascent_grad_norms=norms,
        skipped=(~usable).float(),
        update_running_stats=lambda: recorder.apply_in_group_order(means, variances),
    )


class MicroBatchSAM:
    """m-SAM's step on a micro-batch: ``k = b / m`` groups, each perturbing with its own gradient, one after another
    (``"loop"``: the SAM step on each group) or all at once (``"vmap"``, `vmap_msam_step`). ``"auto"`` takes the vmap
    where torch.func runs the model (tried on the first step) and its extra memory, about ``2 k d`` numbers, fits
    ``msam_vmap_max_memory_mb``; the loop otherwise.

    Args:
        settings (`SharpnessSettings`): ``msam_micro_batch_size``, ``msam_implementation``, ``sam_rho``, ASAM's.
        host (`TorchHost`): the loop's (the vmap runs on one process only).
        metrics (`RunningMeans`): where the diagnostics go.
    """

    def __init__(self, settings, host, metrics: RunningMeans):
        self.settings, self.metrics = settings, metrics
        self.vmap_ok: bool | None = None  # decided on the first step under "auto"
        self._warned_uncompiled = False
        if settings.msam_implementation == "vmap" and host.num_processes > 1:
            raise settings.refuse(
                "msam_implementation", "vmap", "it bypasses the DDP forward, so it runs on one process only; choose "
                "'loop' or 'auto'"
            )

    def __call__(self, ctx: StepContext, descent: Callable, group_step: Callable[[dict, int], torch.Tensor],
                 vmap_unavailable: str | None = None) -> torch.Tensor:
        """The step on ``ctx.inputs``; `group_step(group, k)` is the SAM step on one group, counting ``1 / k``.

        Returns:
            `Tensor`: the groups' mean clean loss.
        """
        s, b = self.settings, ctx.batch_size
        if b % s.msam_micro_batch_size:
            raise ValueError(
                f"{type(s).__name__}.msam_micro_batch_size={s.msam_micro_batch_size} does not divide this batch of {b} "
                "samples (set dataloader_drop_last=True when the dataset size is not a multiple of the batch size)."
            )
        k = b // s.msam_micro_batch_size
        if self._use_vmap(ctx, k, vmap_unavailable):
            clean = self._vmap_step(ctx, descent, k)
            if clean is not None:
                return clean
        total = 0.0
        for j, group in enumerate(split_batch(ctx.inputs, k)):
            with contextlib.nullcontext() if j == k - 1 else ctx.host.no_sync(ctx.model):
                total = total + group_step(group, k)
        return total / k

    def _vmap_step(self, ctx: StepContext, descent: Callable, k: int) -> torch.Tensor | None:
        """All groups at once; None when torch.func cannot run the model and ``"auto"`` falls back to the loop."""
        s, model = self.settings, ctx.model
        unwrapped = ctx.host.unwrap(model)
        if hasattr(model, "_orig_mod") and not self._warned_uncompiled:
            logger.warning("m-SAM's vmap implementation runs the model uncompiled: torch.func transforms the eager module "
                           "(msam_implementation='loop' runs the compiled one).")
            self._warned_uncompiled = True
        try:
            with ctx.host.no_sync(model):
                result = vmap_msam_step(unwrapped, ctx.inputs, ctx.loss_fn, k, s.sam_rho, s.sam_adaptive,
                                        s.sam_adaptive_eta, ctx.bn_modules)
        except Exception as err:  # noqa: BLE001 -- any failure of torch.func on this model means "use the loop"
            if self.vmap_ok:
                raise
            _raise_the_loss_own_error(ctx, k)
            if s.msam_implementation == "vmap":
                raise ValueError(
                    f"{type(s).__name__}.msam_implementation='vmap': torch.func cannot run "
                    f"{type(unwrapped).__name__} ({type(err).__name__}: {err}); choose msam_implementation='loop' "
                    "(groups one after another) or 'auto' (vmap where it runs, else the loop)."
                ) from err
            logger.warning(
                f"m-SAM: torch.func cannot run {type(unwrapped).__name__} ({err!r}); using the loop implementation."
            )
            self.vmap_ok = False
            return None
        perturbed_loss = descent(ctx.inputs, 1, loss=result.descent_objective)
        result.update_running_stats()
        self.vmap_ok = True
        for norm in result.ascent_grad_norms:
            self.metrics.add("sam/ascent_grad_norm", norm)
        self.metrics.add("sam/skipped_perturbations", result.skipped.mean())
        clean = result.clean_losses.mean()
        self.metrics.add("sam/sharpness", perturbed_loss.detach().float() - clean.float())
        return clean

    def _use_vmap(self, ctx: StepContext, k: int, unavailable: str | None) -> bool:
        """Whether this step runs the vmap: refused by name where it was asked for and cannot serve (`unavailable`:
        why the loop's descent cannot take its loss; fp16's loss scale; several processes)."""
        impl, host = self.settings.msam_implementation, ctx.host
        if unavailable is None and host.grad_scaler is not None:
            unavailable = "its per-group gradients are taken without fp16's loss scale (they could underflow)"
        if unavailable is None and host.num_processes > 1:
            unavailable = "it bypasses the DDP forward, so it runs on one process only"
        if unavailable is not None:
            if impl == "vmap":
                raise self.settings.refuse("msam_implementation", impl, f"{unavailable}; choose 'loop' or 'auto'")
            return False
        if impl != "auto":
            return impl == "vmap"
        if self.vmap_ok is False:
            return False
        extra_mb = 2 * k * sum(p.numel() * p.element_size() for p in ctx.params.params) / 2**20
        return extra_mb <= self.settings.msam_vmap_max_memory_mb


def _raise_the_loss_own_error(ctx: StepContext, k: int) -> None:
    """After the vmap m-SAM failed on its first step: runs the loss once plainly on the first group (no gradient,
    BatchNorm statistics frozen, the random numbers replayed), and if it raises there too, raises that error, the
    loss's own (the user's code), rather than reporting that torch.func cannot run the model."""
    rng = RNGReplay({p.device for p in ctx.model.parameters()})
    try:
        with torch.no_grad(), rng.replay(), frozen_running_stats(running_stat_modules(ctx.model)):
            ctx.loss_fn(ctx.model, split_batch(ctx.inputs, k)[0])
    except Exception as own:  # noqa: BLE001 -- whatever it is, it is the loss's, and it goes on as it came
        raise own from None
