"""Exact per-sample gradient norms from one backward, and RW-SAM's weighted gradient from the same pass.

For a layer ``y = f(a; W)``, sample ``i``'s gradient of ``W`` comes from the layer's input ``a`` and output gradient
``g = dL/dy`` on the sample's rows (`norm_rules`: ghost norms, book-keeping). One backward of ``sum_i l_i`` gives
every layer's ``g``; forward hooks keep every layer's ``a``. The backward asks autograd for the output gradients
only (no parameter gradient is formed), and each layer then takes the norms and the weighted gradient
``sum_i p_i grad l_i`` from its pairs.

Which rows of a layer's input are whose is proven before a rule applies, never guessed:

* **Layouts.** Rows ``[i k, (i + 1) k)`` of the leading dimension are sample ``i``'s (batch-first, ``k = 1``; or a
  batch folded sample-major: multiple-choice options, windows, frames); or the batch is dimension 1 (sequence-first
  ``(T, b, ...)``); or the leading dimension holds ``k`` blocks of ``b`` rows (a sequence-first tensor flattened,
  as inside `nn.MultiheadAttention`). A layer whose input carries no batch dimension (a position table fed
  ``arange(T)``, a relative-position bias, anything broadcast over the batch) has no layout.
* **Self-check.** Shapes only say which layouts are possible (``T = b`` makes batch-first and sequence-first look
  alike). The first step that meets a layer call takes, for two samples, one autograd backward of that sample's loss
  alone and compares each parameter's squared gradient norm with the rules' under each possible layout; the layout
  that agrees is kept for that call from then on, and a parameter no layout explains takes the batched estimator for
  the run. Cost: two backwards, once per new layout.
* **Shared parameters.** A parameter used several times (tied embeddings, a layer called twice, a module's weight
  used through ``F.linear`` inside another's forward) adds the cross terms between its uses (`norm_rules.inner`).
* **Functional uses.** ``F.linear`` calls on the parameters outside the layers the rules hook (the in- and
  out-projections of `nn.MultiheadAttention`, which never call their ``Linear`` modules) are recorded as linear
  layers, row blocks of a packed weight included.
* **The rest** (a layer without a rule, a layout no rule proves, a rule that disagreed with autograd): the batched
  estimator, per-sample gradients by batched backward passes over the graph (`exact_sample_grad_norms`), and the
  parameter's share of the weighted gradient by one more backward. One warning names each such parameter by its path,
  why, and what it costs.

Parameters broadcast over the batch (timm's ViT class token and position embedding) are given one copy per sample
while recording, so their gradient comes per sample; position ids shared by the batch (``[1, T]``) are given to every
row of the batch the same way. Should either break a model's forward, the forward runs again without them.

BatchNorm in training mode couples the samples through the batch statistics: a sample's gradient then runs through
every other sample's, and treating the statistics as constants would change the gradient. Models with it take the
batched estimator for every parameter; ``fd`` is their fast estimator.

Why not Opacus 1.6 (its fast gradient clipping has the same per-layer maths): it counts the padding index's gradients
in embedding norms (norms 65-79x too large), fails on position ids of shape ``[1, t]`` (BERT, GPT-2), refuses tied
parameters (GPT-2), has no book-keeping (a second backward), does not know transformers' ``Conv1D``, reads every
layer's rows as batch-first, and wraps or re-hooks modules with full backward hooks.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm

from .norm_rules import (
    Dense,
    PerSampleGradient,
    RegisteredRule,
    embedding_rule,
    inner_products,
    linear_rule,
    norm_rule,
)
from .state import restored

logger = logging.getLogger(__name__)

CHECKED_SAMPLES = 2
"""Samples whose gradient the self-check takes by autograd."""


def batch_statistics_couple_samples(model: nn.Module) -> list[str]:
    """The BatchNorm layers that normalise with the batch's statistics (training mode, or no running statistics)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]


# ------------------------------------------------------------------------------------------------------- layouts


def layout_candidates(x: torch.Size, g: torch.Size, b: int, registered: RegisteredRule) -> list[str]:
    """The layouts the shapes of a call's input `x` and output (gradient) `g` allow, most likely first.

    ``"major"``: the leading dimension is ``b k`` rows, sample ``i``'s rows ``[i k, (i + 1) k)``; ``"seq"``: the
    batch is dimension 1; ``"minor"``: the leading dimension is ``k`` blocks of ``b`` rows, sample ``i``'s rows
    ``i, i + b, ...``. Channels-first layers (``layouts="batch_first"``) hold the batch in the leading dimension only.
    """
    if len(x) == 0 or len(g) == 0:
        return []
    leading = x[0] == g[0] and x[0] % b == 0
    positions = registered.layouts == "any"
    seq = positions and len(x) >= 2 and len(g) >= 3 and x[:2] == g[:2] and x[1] == b
    candidates = ["major"] if leading and x[0] == b else []
    if seq:
        candidates.append("seq")
    if leading and x[0] > b:
        candidates += ["major", "minor"]
    return candidates


def to_sample_major(t: torch.Tensor, layout: str, b: int, like: torch.Size) -> torch.Tensor:
    """`t` with its rows in sample-major order, if it shares the call input's leading dimensions (`like`)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != like[0]:
        return t
    if layout == "seq":
        return t.transpose(0, 1) if t.dim() >= 2 and t.shape[1] == like[1] else t
    if layout == "minor":
        return t.unflatten(0, (-1, b)).transpose(0, 1).flatten(0, 1)
    return t


def select_samples(t: torch.Tensor, b: int, samples: torch.Tensor) -> torch.Tensor:
    """The rows of `samples` from sample-major `t` (``[b k, ...]``)."""
    return t.unflatten(0, (b, -1)).index_select(0, samples).flatten(0, 1)


# ---------------------------------------------------------------------------------------------------- recording


@dataclass(eq=False)
class _FunctionalLinear:
    """An ``F.linear`` call on tracked parameters outside the hooked layers; `weight` / `bias` are the tensors it
    used (a parameter, a row block of one, or None), so `linear_rule` applies as to a layer."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(eq=False)
class _Call:
    """One call of a layer in the recorded forward."""

    key: tuple  # the call site: (layer id, how many times that layer was called before)
    layer: Any
    registered: RegisteredRule
    activations: tuple
    edge: Any  # the gradient edge of the call's output
    out_shape: torch.Size
    input_requires_grad: bool = True  # False: fed by data, nothing below needs a gradient
    grad: torch.Tensor | None = None
    candidates: list[str] = field(default_factory=list)
    layout: str | None = None
    taken: bool = False

    def sample_major(self, b: int, layout: str, samples: torch.Tensor | None = None):
        """The rule's inputs in sample-major order (only `samples`' rows, if given) and the batch size they have."""
        like = self.activations[0].shape
        activations = tuple(to_sample_major(a, layout, b, like) for a in self.activations)
        grad = to_sample_major(self.grad, layout, b, like)
        if samples is None:
            return activations, grad, b
        rows = activations[0].shape[0]
        activations = tuple(select_samples(a, b, samples) if isinstance(a, torch.Tensor) and a.dim() and
                            a.shape[0] == rows else a for a in activations)
        return activations, select_samples(grad, b, samples), len(samples)


@dataclass(eq=False)
class _Use:
    """One use of a parameter: its per-sample gradient over rows ``[start, start + rows)`` (None: all of it)."""

    grad: PerSampleGradient
    start: int | None
    rows: int | None


class PerSampleGradients:
    """Per-sample gradient norms of a model's loss on a batch, from one backward, and the Gibbs-weighted gradient.

    Usage::

        per_sample = PerSampleGradients(model, params)   # keep it: layouts proven once serve every later step
        with per_sample.recording(batch_size):           # forward hooks keep every layer's input
            losses = per_sample_losses(model(**batch))
        norms = per_sample.norms(losses)                  # one backward of sum(losses): ||grad l_i||, fp32
        grads = per_sample.weighted_gradient(p)           # sum_i p_i grad l_i, one tensor per parameter

    Args:
        model (`nn.Module`): the model (its eager module: hooks do not reach into compiled graphs).
        params (`list`): the trainable parameters the norms and the gradient run over.
        chunk_size (`int`): samples per batched backward, for the parameters the rules do not cover.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], chunk_size: int = 32):
        self.model, self.params, self.chunk_size = model, params, chunk_size
        self._wanted = {id(p): p for p in params}
        self.coupled = batch_statistics_couple_samples(model)
        self._names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), name)
        self.layers: list[tuple[nn.Module, RegisteredRule]] = []
        self._rules: dict[int, RegisteredRule] = {}
        self._unruled: dict[int, str] = {}  # parameter id -> its layer's class, for the warning
        if not self.coupled:
            for module in model.modules():
                own = [p for p in module.parameters(recurse=False) if id(p) in self._wanted]
                registered = norm_rule(module) if own else None
                if registered is not None:
                    self.layers.append((module, registered))
                    self._rules[id(module)] = registered
                for p in own:
                    if registered is None:
                        self._unruled.setdefault(id(p), type(module).__name__)
        self._broadcast = [] if self.coupled else [
            (module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
            if id(p) in self._wanted and _broadcast_over_batch(module, name, p)
        ]
        self._layouts: dict[tuple, str | None] = {}  # call site -> the layout the self-check proved (None: none did)
        self._disproven: dict[int, str] = {}  # parameter id -> why it takes the batched estimator for the run
        self._warned: set[int] = set()
        self._expand_shared = True  # give [1, T] ids to every row and one copy of broadcast parameters per sample
        self._swapped = False  # the broadcast parameters' copies are in their modules
        self._batched: list[nn.Parameter] = []  # what the last `norms` took by batched backward passes
        self._reset()

    def _reset(self) -> None:
        self.b = None
        self._calls: list[_Call] = []
        self._copies: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._copy_grads: list[torch.Tensor] = []
        self._uses: dict[int, list[_Use]] = {}
        self._remaining: collections.Counter = collections.Counter()
        self._unproven: set[int] = set()
        self._losses, self._scale = None, 1.0
        self._whole: tuple[torch.Tensor, ...] = ()  # b = 1: the gradient
        self._depth = 0  # > 0 inside a hooked layer's forward (its own F.linear calls are its rule's)
        self._times_called: dict[int, int] = {}
        self._last_rows = None
        self.expanded = False

    # ---------------------------------------------------------------------------------------------- recording

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Keeps each layer call's inputs and output during the forward (and ``F.linear`` calls on the parameters
        outside the hooked layers); broadcast parameters are one leaf copy per sample meanwhile. Everything is put
        back on leaving, also when the forward raises or an interrupt lands anywhere (`state.restored`)."""
        self._reset()
        self.b = batch_size
        if batch_size == 1:  # one sample: its gradient is the batch's, taken by one ordinary backward
            yield
            return
        original_linear = F.linear

        def restore():
            F.linear = original_linear
            for module, _ in self.layers:
                _remove_hook(module._forward_pre_hooks, self._enter)
                _remove_hook(module._forward_pre_hooks, self._per_sample_ids)
                _remove_hook(module._forward_hooks, self._keep)
            for module, name, p in self._broadcast:
                module._parameters[name] = p
            self._swapped = False

        with restored(restore):
            for module, registered in self.layers:
                module.register_forward_pre_hook(self._enter)
                if registered.rule is embedding_rule and self._expand_shared:
                    module.register_forward_pre_hook(self._per_sample_ids)
                module.register_forward_hook(self._keep, always_call=True)
            if self._expand_shared:
                self._copies = [(p, p.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True))
                                for _, _, p in self._broadcast]
                self._swapped = True
                for (module, name, _), (_, copy) in zip(self._broadcast, self._copies):
                    module._parameters[name] = copy
            if not self.coupled:
                F.linear = self._functional_linear(original_linear)
            yield

    @contextlib.contextmanager
    def parameters_registered(self) -> Iterator[None]:
        """The model's own parameters in their modules inside the block, in place of the per-sample copies the
        recording gives the broadcast ones (a save during the recorded forward writes the parameters)."""
        if not self._swapped:
            yield
            return

        def restore():
            for (module, name, _), (_, copy) in zip(self._broadcast, self._copies):
                module._parameters[name] = copy

        with restored(restore):
            for module, name, p in self._broadcast:
                module._parameters[name] = p
            yield

    def record(self, forward: Callable[[], Any], batch_size: int,
               replay: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Any:
        """``forward()`` inside `recording`; if it fails while shared ids or broadcast parameters were given per-sample
        copies, once more without them (inside ``replay()``, which replays the first attempt's random numbers), and
        without them for the run."""
        try:
            with self.recording(batch_size):
                return forward()
        except Exception as err:
            if not (self.expanded or self._copies):
                raise
            logger.warning(f"RW-SAM exact: the forward failed with ids or parameters shared by the batch given one copy "
                           f"per sample ({type(err).__name__}: {err}); those layers take the batched estimator.")
            self._expand_shared = False
            with replay(), self.recording(batch_size):
                return forward()

    def _enter(self, module, args):
        self._depth += 1

    def _per_sample_ids(self, module, args):
        """Ids shared by the batch (position ids ``[1, T]``) are given to every row of the batch (the leading size of
        the layer called last, or ``b``), so that the output (then broadcast the same way) has a gradient per row."""
        ids = args[0]
        if torch.is_grad_enabled() and ids.dim() > 1 and ids.shape[0] == 1 and self.b > 1:
            self.expanded = True
            return (ids.expand(self._last_rows or self.b, *ids.shape[1:]), *args[1:])
        return None

    def _keep(self, module, args, output):
        self._depth -= 1
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad and args
                and isinstance(args[0], torch.Tensor)):
            return
        self._record((id(module),), module, self._rules[id(module)], args, output)

    def _record(self, site: tuple, layer, registered, inputs, output) -> None:
        """Keeps one call; its key is the call site: `site` (the layer, or the parameter block of an ``F.linear``
        call) and how many times that site was called before in this forward."""
        key = (*site, self._times_called.get(site, 0))
        self._times_called[site] = key[-1] + 1
        activations = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in inputs)
        self._calls.append(_Call(key, layer, registered, activations, get_gradient_edge(output), output.shape,
                                 inputs[0].requires_grad))
        rows = activations[0].shape[0] if activations[0].dim() else None
        if rows is not None and rows % self.b == 0:
            self._last_rows = rows

    def _functional_linear(self, original):
        def linear(input, weight, bias=None):
            output = original(input, weight, bias)
            if self._depth == 0 and torch.is_grad_enabled() and output.requires_grad:
                used_weight, used_bias = self._tracked(weight), self._tracked(bias)
                if used_weight is not None or used_bias is not None:
                    layer = _FunctionalLinear(weight if used_weight is not None else None,
                                              bias if used_bias is not None else None)
                    param, start, _ = used_weight or used_bias
                    self._record(("F.linear", id(param), start), layer, _FUNCTIONAL_LINEAR, (input,), output)
            return output

        return linear

    def _tracked(self, t) -> tuple[nn.Parameter, int | None, int | None] | None:
        """(parameter, first row, rows) if `t` is a tracked parameter or a block of its rows, else None."""
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self._wanted:
            return self._wanted[id(t)], None, None
        base = t._base
        if base is None or id(base) not in self._wanted or t.dim() == 0 or t.shape[1:] != base.shape[1:] \
                or t.stride() != base.stride():
            return None
        offset = t.storage_offset() - base.storage_offset()
        row = base.stride(0) if base.dim() > 1 else 1
        if offset % row:
            return None
        return base, offset // row, t.shape[0]

    # --------------------------------------------------------------------------------------------- the norms

    def norms(self, losses: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``||grad l_i||`` over `params`, fp32 ``[b]``: one backward of ``scale * sum(losses)`` for the layers'
        output gradients (`scale`: fp16's loss scale, divided out again), the self-check where a call's layout is new,
        batched backward passes for the rest. The graph is kept for `weighted_gradient`."""
        b = self.b
        self._losses, self._scale = losses, scale
        if b == 1:
            self._whole = torch.autograd.grad(losses.sum() * scale, self.params, allow_unused=True,
                                              materialize_grads=True)
            self._batched = []
            return (sum(g.float().square().sum() for g in self._whole) / scale**2).sqrt().reshape(1)
        for call in self._calls:
            call.candidates = layout_candidates(call.activations[0].shape, call.out_shape, b, call.registered)
            proven = self._layouts.get(call.key)
            call.layout = proven if proven in call.candidates else None
        # calls whose layout is not proven yet (new sites, or sites whose shapes no longer allow the proven layout)
        pending = [c for c in self._calls if c.layout is None and c.candidates
                   and not (c.key in self._layouts and self._layouts[c.key] is None)]
        parts = []
        if self._calls or self._copies:
            if pending:
                self._output_gradients_at_once(losses, scale)
                self._calls = [c for c in self._calls if c.grad is not None]
                if any(c.grad is not None for c in pending):
                    self._check(losses, scale)
                self._count_uses()
                for call in self._calls:
                    self._take(call, call.grad, parts)
            else:
                self._count_uses()
                self._streamed(losses, scale, parts)
            parts += [torch.linalg.vector_norm(g.float().flatten(1), dim=1).square() for g in self._copy_grads]
        sq = torch.zeros(b, dtype=torch.promote_types(torch.float32, losses.dtype), device=losses.device)
        if parts:
            sq += torch.stack(parts).sum(0) / (scale * scale)
        copied = {id(p) for p, _ in self._copies}
        batched = [p for p in self.params if id(p) not in self._uses and id(p) not in copied]
        self._batched = []
        if batched:
            batched_sq, used = _batched_sq_norms(losses, batched, self.chunk_size)
            sq += batched_sq
            self._batched = [p for p, u in zip(batched, used) if u]  # the unused ones' gradient is zero
            self._warn(self._batched)
        return sq.sqrt()

    def _count_uses(self) -> None:
        """Before the rules are taken: each parameter's calls (its norm is complete after the last), and the
        parameters with a call no layout proves this step."""
        self._uses = {}
        self._remaining = collections.Counter(id(p) for c in self._calls for p in _call_parameters(c))
        self._unproven = {id(p) for c in self._calls if c.layout is None for p in _call_parameters(c)}

    def _output_gradients_at_once(self, losses: torch.Tensor, scale: float) -> None:
        """Every call's output gradient (and the broadcast copies'), kept together: what the self-check needs."""
        copies = [copy for _, copy in self._copies]
        grads = torch.autograd.grad(losses.sum() * scale, [*copies, *[c.edge for c in self._calls]],
                                    retain_graph=True, allow_unused=True)
        self._copy_grads = [torch.zeros_like(c) if g is None else g for c, g in zip(copies, grads)]
        for call, grad in zip(self._calls, grads[len(copies):]):
            call.grad = grad

    def _streamed(self, losses: torch.Tensor, scale: float, parts: list[torch.Tensor]) -> None:
        """The layers' backward, each call's rule taken as soon as its output gradient is complete (a pre-hook on the
        node that made the output), so that output gradients are released as the backward goes on, as in a plain
        backward. The backward is asked for the gradients of the calls fed by data (nothing below them needs one)
        and of the broadcast copies; a call it did not reach is taken by one more backward."""
        self._uses = {}
        copies = [copy for _, copy in self._copies]
        roots = [c for c in self._calls if not c.input_requires_grad]
        inner = [c for c in self._calls if c.input_requires_grad]
        hooks = []
        try:
            for call in inner:
                hooks.append(call.edge.node.register_prehook(
                    lambda grad_outputs, call=call: self._take(call, grad_outputs[call.edge.output_nr], parts)))
            grads = torch.autograd.grad(losses.sum() * scale, [*copies, *[c.edge for c in roots]],
                                        retain_graph=True, allow_unused=True) if copies or roots else ()
        finally:
            for hook in hooks:
                hook.remove()
        self._copy_grads = [torch.zeros_like(c) if g is None else g for c, g in zip(copies, grads)]
        for call, grad in zip(roots, grads[len(copies):]):
            self._take(call, grad, parts)
        missed = [c for c in inner if not c.taken]
        if missed:
            for call, grad in zip(missed, torch.autograd.grad(losses.sum() * scale, [c.edge for c in missed],
                                                              retain_graph=True, allow_unused=True)):
                self._take(call, grad, parts)

    def _take(self, call: _Call, grad: torch.Tensor | None, parts: list[torch.Tensor]) -> None:
        """One call's per-sample gradients from its output gradient; a parameter whose last call this is adds its
        squared norms to `parts`. A parameter with a call no layout proves this step, or disproven for the run, is
        left out (batched estimator)."""
        call.taken = True
        params = _call_parameters(call)
        if grad is not None and call.layout is not None:
            call.grad = grad
            try:
                for key, found in self._rule_grads(call, call.layout).items():
                    self._uses.setdefault(key, []).extend(found)
            except Exception as err:  # noqa: BLE001 -- a rule that cannot take this call: batched, and said why
                for p in params:
                    self._disproven[id(p)] = f"its rule failed on this layer ({type(err).__name__}: {err})"
            call.grad = None
        for p in params:
            key = id(p)
            self._remaining[key] -= 1
            if self._remaining[key] or key not in self._uses:
                continue
            if key in self._disproven or key in self._unproven:
                del self._uses[key]
                continue
            value = _sq_norms_of_uses(self._uses[key])
            if value is None:
                del self._uses[key]
                self._disproven[key] = "its uses' cross terms (a shared parameter) have no form within budget"
            else:
                parts.append(value)

    def _rule_grads(self, call: _Call, layout: str, samples: torch.Tensor | None = None) -> dict[int, list[_Use]]:
        """The call's per-sample gradients under `layout`, as uses per parameter id."""
        activations, grad, b = call.sample_major(self.b, layout, samples)
        uses: dict[int, list[_Use]] = {}
        for tensor, value in call.registered.rule(call.layer, activations, grad, b).items():
            tracked = self._tracked(tensor)
            if tracked is None:
                continue
            param, start, rows = tracked
            value = value if isinstance(value, PerSampleGradient) else Dense.of_rows(value, b)
            uses.setdefault(id(param), []).append(_Use(value, start, rows))
        return uses

    # ------------------------------------------------------------------------------------------- self-check

    def _check(self, losses: torch.Tensor, scale: float) -> None:
        """For `CHECKED_SAMPLES` samples, each parameter's squared gradient norm by autograd against the rules' under
        the layouts the shapes allow. Pending calls that share a parameter are decided together (every combination of
        their layouts, or each layout for all of them when the combinations are too many); each keeps the layout under
        which most of their parameters agree, and a parameter that still disagrees takes the batched estimator for the
        run."""
        b = self.b
        samples = torch.tensor(sorted({0, b - 1})[:CHECKED_SAMPLES], device=losses.device)
        params = [p for p in self.params if id(p) not in self._disproven]
        reference = torch.zeros(len(params), len(samples), dtype=torch.float64, device=losses.device)
        for j, s in enumerate(samples.tolist()):
            grads = torch.autograd.grad(losses[s] * scale, params, retain_graph=True, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    reference[i, j] = g.double().square().sum()
        reference /= scale * scale
        reference_of = {id(p): reference[i] for i, p in enumerate(params)}
        tolerance = 3e-2 if self._low_precision() else 1e-3
        totals = reference.sum(0)
        calls_of: dict[int, list[_Call]] = {}
        for call in self._calls:
            for p in _call_parameters(call):
                calls_of.setdefault(id(p), []).append(call)

        def agrees(p) -> bool:
            uses = []
            for call in calls_of[id(p)]:
                if call.layout is None:
                    return False
                try:
                    uses += self._rule_grads(call, call.layout, samples).get(id(p), [])
                except Exception:  # noqa: BLE001 -- the rule cannot take this layout
                    return False
            value = _sq_norms_of_uses(uses)
            if value is None:
                return False
            expected = reference_of[id(p)]
            return bool(((value.double() / scale**2 - expected).abs()
                         <= tolerance * expected + 1e-7 * totals + 1e-30).all())

        for group in _groups_sharing_parameters([c for c in self._calls if c.layout is None and c.candidates]):
            checked = {id(p): p for call in group for p in _call_parameters(call) if id(p) in reference_of}
            best, best_count = None, -1
            for combination in _layout_combinations(group):
                for call, layout in zip(group, combination):
                    call.layout = layout
                count = sum(agrees(p) for p in checked.values())
                if count > best_count:
                    best, best_count = combination, count
            for call, layout in zip(group, best):
                call.layout = layout if best_count > 0 else None
                self._layouts[call.key] = call.layout
            for p in checked.values():
                if not agrees(p):
                    self._disproven[id(p)] = ("the rule's per-sample norm disagreed with autograd's on the first step "
                                              "(its layer's rows do not map to samples in any layout the rules prove)")

    def _low_precision(self) -> bool:
        return any(c.grad is not None and c.grad.dtype in (torch.float16, torch.bfloat16) for c in self._calls)

    # ---------------------------------------------------------------------------------------- the gradient

    def weighted_gradient(self, p: torch.Tensor) -> list[torch.Tensor]:
        """``scale * sum_i p_i grad l_i`` for every parameter (zeros for the unused), from the layers' inputs and
        output gradients, and one backward of ``scale * sum_i p_i l_i`` for the parameters the rules do not cover."""
        p = p.detach().float()
        if self.b == 1:
            whole = [g * p[0].to(g.dtype) for g in self._whole]
            self._reset()
            return whole
        grads: dict[int, torch.Tensor] = {}
        for param in self.params:
            uses = self._uses.get(id(param))
            if not uses:
                continue
            total = torch.zeros(param.shape, dtype=torch.promote_types(torch.float32, param.dtype),
                                device=param.device)
            for use in uses:
                block = total if use.start is None else total[use.start: use.start + use.rows]
                block += use.grad.weighted(p).reshape(block.shape)
            grads[id(param)] = total.to(param.dtype)
        for (param, _), grad in zip(self._copies, self._copy_grads):
            grads[id(param)] = (grad.float() * p.view(-1, *[1] * (grad.dim() - 1))).sum(0, keepdim=True).to(param.dtype)
        if self._batched:
            objective = (p * self._losses).sum() * self._scale
            for q, g in zip(self._batched, torch.autograd.grad(objective, self._batched, allow_unused=True,
                                                               materialize_grads=True)):
                grads[id(q)] = g
        self._reset()
        return [grads[id(q)] if id(q) in grads else torch.zeros_like(q) for q in self.params]

    @property
    def batched(self) -> list[nn.Parameter]:
        """The parameters the last `norms` took by batched backward passes (those the losses depend on)."""
        return list(self._batched)

    def _warn(self, params: list[nn.Parameter]) -> None:
        """One warning naming the parameters newly taken by the batched estimator: why, and what it costs."""
        new = [p for p in params if id(p) not in self._warned]
        if not new:
            return
        self._warned.update(id(p) for p in new)
        if self.coupled:
            logger.warning(
                f"RW-SAM exact: BatchNorm layers normalise with the batch's statistics ({self.coupled[:3]}"
                f"{' ...' if len(self.coupled) > 3 else ''}), which couple the samples' gradients: every per-sample "
                "gradient is taken by batched backward passes (rwsam_exact_chunk_size samples each), many times a SAM "
                "step. rwsam_estimator='fd' is the fast estimator for such models."
            )
            return
        reasons: dict[str, list[str]] = {}
        for p in new:
            why = self._disproven.get(id(p))
            if why is None and id(p) in self._unruled:
                why = f"no per-sample rule for its layer ({self._unruled[id(p)]}; register_norm_rule adds one)"
            elif why is None:
                why = ("its layer's input has no batch dimension a rule can prove (a table fed ids shared by the "
                       "batch, a bias broadcast over it), or its layer was not called as a module")
            reasons.setdefault(why, []).append(self._names.get(id(p), f"<parameter {tuple(p.shape)}>"))
        lines = "\n".join(f"  - {', '.join(names)}: {why}" for why, names in reasons.items())
        logger.warning(
            "RW-SAM exact: these parameters take their per-sample gradients by batched backward passes "
            f"(rwsam_exact_chunk_size={self.chunk_size} samples each, about b / {self.chunk_size} more backwards per "
            f"step, and one more for their share of the ascent gradient):\n{lines}"
        )


_FUNCTIONAL_LINEAR = RegisteredRule(linear_rule, "any", lambda layer: True)


def _call_parameters(call: _Call) -> list[nn.Parameter]:
    """The parameters (or the tensors used, for ``F.linear`` calls) a call's rule speaks of."""
    if isinstance(call.layer, _FunctionalLinear):
        return [t._base if t._base is not None else t for t in (call.layer.weight, call.layer.bias) if t is not None]
    return list(call.layer.parameters(recurse=False))


def _groups_sharing_parameters(calls: list[_Call]) -> list[list[_Call]]:
    """`calls` grouped so that calls using a common parameter are in one group."""
    groups: list[tuple[set[int], list[_Call]]] = []
    for call in calls:
        ids = {id(p) for p in _call_parameters(call)}
        joined = [g for g in groups if g[0] & ids]
        for g in joined:
            groups.remove(g)
            ids |= g[0]
        groups.append((ids, [c for g in joined for c in g[1]] + [call]))
    return [members for _, members in groups]


MAX_COMBINATIONS = 64
"""Layout combinations the self-check tries for calls sharing a parameter; beyond, each layout for all of them."""


def _layout_combinations(group: list[_Call]) -> list[tuple[str, ...]]:
    """Each layout for every call of `group` (where all allow it), then every other combination, within
    `MAX_COMBINATIONS`."""
    if len(group) == 1:
        return [(layout,) for layout in group[0].candidates]
    kinds = dict.fromkeys(layout for call in group for layout in call.candidates)
    uniform = [tuple([kind] * len(group)) for kind in kinds if all(kind in call.candidates for call in group)]
    if math.prod(len(call.candidates) for call in group) > MAX_COMBINATIONS:
        return uniform or [tuple(call.candidates[0] for call in group)]
    return list(dict.fromkeys(uniform + list(itertools.product(*(call.candidates for call in group)))))


def _sq_norms_of_uses(uses: list[_Use]) -> torch.Tensor | None:
    """``||sum_u G_i^u||^2``: twice every cross term between uses of the same rows (uses of disjoint row blocks are
    orthogonal), then each use's squared norm; None where a cross term has no form or blocks overlap partly."""
    total = 0
    for u, v in itertools.combinations(uses, 2):
        if (u.start, u.rows) != (v.start, v.rows):
            if u.start is None or v.start is None or not (u.start + u.rows <= v.start or v.start + v.rows <= u.start):
                return None
            continue
        cross = inner_products(u.grad, v.grad)
        if cross is None:
            return None
        total = total + 2 * cross
    return total + sum(use.grad.sq_norms() for use in uses)


def _remove_hook(hooks: dict, fn) -> None:
    """Removes every entry of a module's hook dict that is `fn` (by equality: a bound method of this pass)."""
    for handle_id in [k for k, v in hooks.items() if v == fn]:
        hooks.pop(handle_id, None)


_BROADCAST = {"cls_token", "reg_token", "dist_token", "pos_embed"}
"""timm's vision transformers' parameters added or concatenated to every sample (shape ``[1, ...]``)."""


def _broadcast_over_batch(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """Whether `module` uses `p` broadcast over the batch, as a leading dimension of one (timm's ViTs, unless their
    position embedding is resampled per input size)."""
    return (type(module).__module__.startswith("timm.models.") and name in _BROADCAST and p.dim() >= 2
            and p.shape[0] == 1 and not getattr(module, "dynamic_img_size", False))


# -------------------------------------------------------------------------------------------- batched estimator


def exact_sample_grad_norms(
    losses: torch.Tensor, params: Sequence[torch.Tensor], chunk_size: int = 32, retain_graph: bool = True
) -> torch.Tensor:
    """Exact per-sample gradient norms ``||grad l_i(x)||`` by batched backward passes over one forward's graph.

    Each chunk of ``c`` samples costs one vmapped backward (``torch.autograd.grad(..., is_grads_batched=True)``) and
    ``c * d`` numbers of memory. Any model (BatchNorm's coupling included), at many times a backward's cost.

    Args:
        losses (`Tensor`): per-sample losses ``[b]`` with their autograd graph.
        params (`Sequence[Tensor]`): the parameters to differentiate.
        chunk_size (`int`): samples per batched backward.
        retain_graph (`bool`): keep the graph for a later backward (the ascent gradient).

    Returns:
        `Tensor`: ``[b]``, fp32 (fp64 for fp64 losses).
    """
    return _batched_sq_norms(losses, params, chunk_size, retain_graph)[0].sqrt()


def _batched_sq_norms(losses, params, chunk_size, retain_graph=True) -> tuple[torch.Tensor, list[bool]]:
    """Per-sample squared norms over `params`, and which of them the losses depend on."""
    b = losses.shape[0]
    eye = torch.eye(b, dtype=losses.dtype, device=losses.device)
    accumulate = torch.promote_types(torch.float32, losses.dtype)  # fp32, or fp64 for a double model
    sq_norms, used = [], [False] * len(params)
    for start in range(0, b, chunk_size):
        rows = eye[start : start + chunk_size]
        last = start + chunk_size >= b
        grads = torch.autograd.grad(
            losses, list(params), grad_outputs=rows, is_grads_batched=True,
            retain_graph=retain_graph or not last, allow_unused=True,
        )
        chunk_sq = torch.zeros(rows.shape[0], dtype=accumulate, device=losses.device)
        for i, g in enumerate(grads):
            if g is not None:
                used[i] = True
                chunk_sq += g.to(accumulate).reshape(rows.shape[0], -1).square().sum(dim=1)
        sq_norms.append(chunk_sq)
    return torch.cat(sq_norms), used
