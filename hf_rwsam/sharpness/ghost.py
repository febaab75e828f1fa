"""Exact per-sample gradient norms from one backward, and RW-SAM's weighted gradient from the same pass.

For a layer ``y = f(a; W)``, sample ``i``'s gradient is ``grad_W l_i = sum_t g_it (x) a_it`` (output gradients
``g = dl/dy`` against inputs ``a``, over the sample's positions ``t``). Its squared norm needs no per-sample gradient:

    ||grad_W l_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is)      ("ghost norm", Goodfellow 2015; Li et al. 2022)

which costs ``T^2 (d_in + d_out)`` against ``T d_in d_out`` for forming the gradient: each layer takes the cheaper.
One backward of ``sum_i l_i`` gives every layer's ``g``; forward hooks keep every layer's ``a``. RW-SAM's ascent
gradient ``sum_i p_i grad l_i`` then comes from the same pairs, scaling ``g_i`` by ``p_i`` ("book-keeping", Bu et al.
2023), without a second backward.

Layers: `nn.Linear` (and transformers' ``Conv1D``) on inputs of any rank (attention goes through its linear layers),
`nn.Conv1d` / `nn.Conv2d` (unfolded; groups, stride, dilation, padding modes), `nn.Embedding` (repeated ids, padding
index, position ids broadcast over the batch), `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm` and BatchNorm in eval mode
(per-sample affine). Parameters broadcast over the batch (timm's ViT class token and position embedding) are given one
copy per sample while recording, so their gradient comes per sample. Any other parameter (its module unknown, or
overriding ``forward``; shared by two layers, or a layer called twice) gets today's estimator: per-sample gradients by batched backward passes, and its share of the
weighted gradient by one more backward; one warning names them.

BatchNorm in training mode couples the samples through the batch statistics: a sample's gradient then runs through
every other sample's, the per-row output gradients are no longer per-sample ones, and treating the statistics as
constants would change the gradient. Models with it keep today's estimator for every parameter (true per-sample
gradients through the batch statistics, ``rwsam_exact_chunk_size`` samples per batched backward); ``fd`` is their
fast estimator.

Why not Opacus 1.6 (its fast gradient clipping has the same per-layer maths): evaluated on the layers above, it
counts the padding index's gradients in embedding norms (norms 65-79x too large), fails on position ids of shape
``[1, t]`` (BERT, GPT-2 by default), refuses tied parameters (GPT-2), has no book-keeping (a second backward), does
not know transformers' ``Conv1D`` or subclasses, and wraps or re-hooks modules with full backward hooks. The
embedding norm's (sample, id) aggregation below is its idea.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)


def batch_statistics_couple_samples(model: nn.Module) -> list[str]:
    """The BatchNorm layers that normalise with the batch's statistics (training mode, or no running statistics)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]


# ---------------------------------------------------------------------------------------------------- per-layer maths


def _fp(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (the norms of bf16/fp16 activations and gradients are taken in fp32; fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _outer_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_i^T a_i||_F^2`` per sample for ``a [B, T, d_in]``, ``g [B, T, d_out]``: ghost or formed, the cheaper."""
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    if t * (d_in + d_out) < d_in * d_out:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))


def _weighted(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p_i g_i``: every sample's output gradient scaled by its weight."""
    return g * p.view(-1, *[1] * (g.dim() - 1))


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is ``[d_in, d_out]`` (not imported here)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


class _Linear:
    @staticmethod
    def sq_norms(m, x, g, b, include):
        a, g = _fp(x.reshape(b, -1, x.shape[-1])), _fp(g.reshape(b, -1, g.shape[-1]))
        sq = _outer_sq_norms(a, g) if include(m.weight) else 0
        if m.bias is not None and include(m.bias):
            sq = sq + g.sum(1).square().sum(1)
        return sq

    @staticmethod
    def weighted(m, x, g, p):
        a, g = _fp(x.reshape(-1, x.shape[-1])), _weighted(_fp(g), p).reshape(-1, g.shape[-1])
        weight = g.t() @ a
        yield m.weight, weight.t() if _is_hf_conv1d(m) else weight
        if m.bias is not None:
            yield m.bias, g.sum(0)


def _unfold(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input patches, ``[B, groups, C_in / groups * prod(kernel), L]``."""
    one_d = x.dim() == 3
    x = x.unsqueeze(2) if one_d else x
    kernel, stride, dilation = ((1, *t) if one_d else t for t in (m.kernel_size, m.stride, m.dilation))
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        pads = []  # F.pad's order: last dimension first
        for k, d, p in zip(m.kernel_size[::-1], m.dilation[::-1], (m.padding[::-1] if not isinstance(m.padding, str)
                                                                    else [None] * len(m.kernel_size))):
            if m.padding == "valid":
                left = right = 0
            elif m.padding == "same":
                total = d * (k - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = p
            pads += [left, right]
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x.squeeze(2) if one_d else x, pads, mode=mode)
        x = x.unsqueeze(2) if one_d else x
        padding = 0
    else:
        padding = (0, *m.padding) if one_d else m.padding
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C k, L]
    return patches.view(patches.shape[0], m.groups, -1, patches.shape[-1])


class _Conv:
    @staticmethod
    def sq_norms(m, x, g, b, include):
        sq = 0
        g = _fp(g).reshape(b, m.groups, -1, g[0, 0].numel())  # [B, G, O / G, L]
        if include(m.weight):
            u = _unfold(m, _fp(x))  # [B, G, I, L]
            groups, length = m.groups, u.shape[-1]
            sq = _outer_sq_norms(u.transpose(2, 3).reshape(b * groups, length, -1),
                                 g.transpose(2, 3).reshape(b * groups, length, -1)).view(b, groups).sum(1)
        if m.bias is not None and include(m.bias):
            sq = sq + g.sum(-1).square().sum((1, 2))
        return sq

    @staticmethod
    def weighted(m, x, g, p):
        b = x.shape[0]
        g = _weighted(_fp(g), p).reshape(b, m.groups, -1, g[0, 0].numel())
        yield m.weight, torch.einsum("bgol,bgil->goi", g, _unfold(m, _fp(x))).reshape(m.weight.shape)
        if m.bias is not None:
            yield m.bias, g.sum((0, 3)).reshape(-1)


class _Embedding:
    @staticmethod
    def _rows(m, x, g, b):
        ids, g = x.reshape(-1), _fp(g).reshape(-1, g.shape[-1])
        if m.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            g = g * (ids != m.padding_idx).unsqueeze(-1)
        return ids, g

    @staticmethod
    def sq_norms(m, x, g, b, include):
        """Each sample's gradient has one row per distinct id: the sum of that id's output gradients in the sample."""
        if not include(m.weight):
            return 0
        ids, g = _Embedding._rows(m, x, g, b)
        sample = torch.arange(b, device=ids.device).repeat_interleave(ids.numel() // b)
        keys, rows = torch.unique(sample * m.num_embeddings + ids, return_inverse=True)
        summed = g.new_zeros(keys.numel(), g.shape[-1]).index_add_(0, rows, g)
        return g.new_zeros(b).index_add_(0, keys // m.num_embeddings, summed.square().sum(1))

    @staticmethod
    def weighted(m, x, g, p):
        ids, g = _Embedding._rows(m, x, _weighted(g, p), x.shape[0])
        yield m.weight, g.new_zeros(m.weight.shape).index_add_(0, ids, g)


class _Affine:
    """Per-channel affine layers after a per-sample normalisation: their per-sample gradients are small, so formed."""

    @staticmethod
    def per_sample(m, x, g, b):
        x, g = _fp(x), _fp(g)
        if isinstance(m, nn.GroupNorm):
            normalized = F.group_norm(x, m.num_groups, eps=m.eps)

            def reduce(z):
                return z.reshape(b, m.num_channels, -1).sum(-1)
        elif isinstance(m, _BatchNorm):  # eval mode: the running statistics, constants
            shape = (1, -1, *[1] * (x.dim() - 2))
            normalized = (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)

            def reduce(z):
                return z.reshape(b, z.shape[1], -1).sum(-1)
        else:  # LayerNorm, RMSNorm: over the trailing normalized_shape
            normalized = (F.layer_norm(x, m.normalized_shape, eps=m.eps) if isinstance(m, nn.LayerNorm)
                          else F.rms_norm(x, m.normalized_shape, eps=m.eps))

            def reduce(z):
                return z.reshape(b, -1, *m.normalized_shape).sum(1)
        if m.weight is not None:
            yield m.weight, reduce(normalized * g)
        if getattr(m, "bias", None) is not None:
            yield m.bias, reduce(g)

    @staticmethod
    def sq_norms(m, x, g, b, include):
        return sum(grads.flatten(1).square().sum(1) for param, grads in _Affine.per_sample(m, x, g, b)
                   if include(param))

    @staticmethod
    def weighted(m, x, g, p):
        for param, grads in _Affine.per_sample(m, x, g, x.shape[0]):
            yield param, (grads * p.view(-1, *[1] * (grads.dim() - 1))).sum(0)


_AFFINE = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, _BatchNorm)
_SAME_FORWARD = {("timm.layers.norm", "GroupNorm"), ("timm.layers.norm", "LayerNorm")}
"""Subclasses that override ``forward`` with the very same computation (timm's, to call a fused kernel)."""


_BROADCAST = {"cls_token", "reg_token", "dist_token", "pos_embed"}
"""timm's vision transformers' parameters added or concatenated to every sample (shape ``[1, ...]``)."""


def _broadcast_over_batch(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """Whether `module` uses `p` broadcast over the batch, as a leading dimension of one (timm's ViTs, unless their
    position embedding is resampled per input size)."""
    return (type(module).__module__.startswith("timm.models.") and name in _BROADCAST and p.dim() >= 2
            and p.shape[0] == 1 and not getattr(module, "dynamic_img_size", False))


def _rule(m: nn.Module):
    """The per-layer maths for `m`, or None (unknown, or its forward overridden)."""
    if _is_hf_conv1d(m):
        return _Linear
    if (type(m).__module__, type(m).__name__) in _SAME_FORWARD:
        return _Affine
    for base, rule in ((nn.Linear, _Linear), (nn.Conv1d, _Conv), (nn.Conv2d, _Conv), (nn.Embedding, _Embedding)):
        if isinstance(m, base):
            plain = type(m).forward is base.forward
            if base is nn.Embedding:
                plain = plain and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
            return rule if plain else None
    for base in _AFFINE:
        if isinstance(m, base):
            return _Affine if type(m).forward is base.forward else None
    return None


# ---------------------------------------------------------------------------------------------------------- the pass


class PerSampleGradients:
    """Per-sample gradient norms of a model's loss on a batch, from one backward, and the Gibbs-weighted gradient.

    Usage::

        per_sample = PerSampleGradients(model, params, batch_size)
        with per_sample.recording():             # forward hooks keep every layer's input
            losses = per_sample_losses(model(**batch))
        norms = per_sample.norms(losses)          # one backward of sum(losses): ||grad l_i||, fp32
        grads = per_sample.weighted_gradient(p)   # sum_i p_i grad l_i, one tensor per parameter

    Args:
        model (`nn.Module`): the model (its eager module: hooks do not reach into compiled graphs).
        params (`list`): the trainable parameters the norms and the gradient run over.
        batch_size (`int`): ``b``, the leading dimension of every layer's input.
        chunk_size (`int`): samples per batched backward, for the parameters the layer maths does not cover.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], batch_size: int, chunk_size: int = 32):
        self.model, self.params, self.b, self.chunk_size = model, params, batch_size, chunk_size
        wanted = {id(p) for p in params}
        self.coupled = batch_statistics_couple_samples(model)
        self.layers: list[tuple[nn.Module, object]] = []
        owners: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            for p in own:
                owners.setdefault(id(p), []).append(module)
            rule = None if self.coupled else _rule(module)
            if own and rule is not None:
                self.layers.append((module, rule))
        shared = {i for i, mods in owners.items() if len(mods) > 1}
        hooked = {id(m) for m, _ in self.layers}
        self.by_layers = [p for p in params if id(p) not in shared and id(owners[id(p)][0]) in hooked]
        # Parameters broadcast over the batch (ViT's class token and position embedding): given one copy per sample
        # while recording, their gradient is per sample already
        self._broadcast = [] if self.coupled or batch_size == 1 else [
            (module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
            if id(p) in wanted and id(p) not in shared and _broadcast_over_batch(module, name, p)
        ]
        self.by_layers += [p for _, _, p in self._broadcast]
        self._layer_params = {id(p) for p in self.by_layers}
        self._rules = {id(m): rule for m, rule in self.layers}
        self._calls: list[list] = []  # [module, rule, input, output gradient]
        self._copies: list[tuple[nn.Parameter, torch.Tensor]] = []  # broadcast parameters and their per-sample copies
        self._copy_grads: list[torch.Tensor] = []
        self._open = False

    def _counted(self, param) -> bool:
        """Whether the layer maths accounts for `param` (else the batched estimator does)."""
        return id(param) in self._layer_params

    @property
    def batched(self) -> list[nn.Parameter]:
        """The parameters left to today's estimator (batched backward passes)."""
        return [p for p in self.params if id(p) not in self._layer_params]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keeps each known layer's input during the forward, and its output gradient during `norms`' backward;
        parameters broadcast over the batch are one leaf copy per sample meanwhile."""
        handles = []
        for module, rule in self.layers:
            handles.append(module.register_forward_hook(self._keep, with_kwargs=False))
            if rule is _Embedding:
                handles.append(module.register_forward_pre_hook(self._per_sample_ids))
        self._copies = []
        for module, name, p in self._broadcast:
            copy = p.detach().expand(self.b, *p.shape[1:]).clone().requires_grad_(True)
            module._parameters[name] = copy
            self._copies.append((p, copy))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, name, p in self._broadcast:
                module._parameters[name] = p
        self._unhook_reused_layers()

    def _per_sample_ids(self, module, args):
        """Ids shared by the batch (position ids ``[1, t]``) are given to every sample, so that the output (then
        broadcast the same way) has a gradient per sample."""
        ids = args[0]
        if torch.is_grad_enabled() and ids.dim() > 1 and ids.shape[0] == 1 and self.b > 1:
            return (ids.expand(self.b, *ids.shape[1:]), *args[1:])
        return None

    def _keep(self, module, args, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        call = [module, self._rules[id(module)], args[0].detach(), None]
        self._calls.append(call)
        output.register_hook(lambda grad, call=call: call.__setitem__(3, grad.detach()) if self._open else None)

    def _unhook_reused_layers(self) -> None:
        """A layer called more than once in the forward shares its parameters between the calls: their gradients add
        before the norm (cross terms), so those parameters go to the batched estimator."""
        counts: dict[int, int] = {}
        for call in self._calls:
            counts[id(call[0])] = counts.get(id(call[0]), 0) + 1
        reused = {i for i, n in counts.items() if n > 1}
        if reused:
            self._calls = [c for c in self._calls if id(c[0]) not in reused]
            for module, _ in self.layers:
                if id(module) in reused:
                    self._layer_params -= {id(p) for p in module.parameters(recurse=False)}

    def norms(self, losses: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``||grad l_i||`` over `params`, fp32 ``[b]``: one backward of ``scale * sum(losses)`` for the known layers
        (`scale`: fp16's loss scale, divided out again), batched backward passes for the rest. The graph is kept for
        `weighted_gradient`, which returns ``scale`` times the gradient."""
        b = self.b
        sq = torch.zeros(b, dtype=torch.promote_types(torch.float32, losses.dtype), device=losses.device)
        if self._calls or self._copies:
            self._open = True  # the output gradients of this backward only (not of the batched ones after it)
            copies = [copy for _, copy in self._copies]
            try:
                copy_grads = torch.autograd.grad(losses.sum() * scale, [*copies, *self.params], retain_graph=True,
                                                 allow_unused=True)[: len(copies)]
            finally:
                self._open = False
            include = self._counted
            for module, rule, inputs, grad in self._calls:
                if grad is not None:
                    sq += rule.sq_norms(module, inputs, grad, b, include)
            self._copy_grads = [torch.zeros_like(c) if g is None else g for c, g in zip(copies, copy_grads)]
            for g in self._copy_grads:
                sq += _fp(g).flatten(1).square().sum(1)
            sq /= scale * scale
        batched = self.batched
        if batched:
            sq += _batched_sq_norms(losses, batched, self.chunk_size)
        self._losses, self._scale = losses, scale
        return sq.sqrt()

    def weighted_gradient(self, p: torch.Tensor) -> list[torch.Tensor]:
        """``scale * sum_i p_i grad l_i`` for every parameter (zeros for the unused), from the layers' inputs and
        output gradients, and one backward of ``scale * sum_i p_i l_i`` for the parameters the layers do not cover."""
        p = _fp(p.detach())
        grads: dict[int, torch.Tensor] = {}
        for module, rule, inputs, grad in self._calls:
            if grad is None:
                continue
            for param, value in rule.weighted(module, inputs, grad, p):
                if id(param) in self._layer_params:
                    grads[id(param)] = value.to(param.dtype)
        for (param, _), grad in zip(self._copies, getattr(self, "_copy_grads", [])):
            grads[id(param)] = (_weighted(_fp(grad), p).sum(0, keepdim=True)).to(param.dtype)
        batched = self.batched
        if batched:
            objective = (p * self._losses).sum() * self._scale
            for q, g in zip(batched, torch.autograd.grad(objective, batched, allow_unused=True, materialize_grads=True)):
                grads[id(q)] = g
        self._calls, self._losses, self._copies, self._copy_grads = [], None, [], []
        return [grads[id(q)] if id(q) in grads else torch.zeros_like(q) for q in self.params]


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
    return _batched_sq_norms(losses, params, chunk_size, retain_graph).sqrt()


def _batched_sq_norms(losses, params, chunk_size, retain_graph=True) -> torch.Tensor:
    b = losses.shape[0]
    eye = torch.eye(b, dtype=losses.dtype, device=losses.device)
    accumulate = torch.promote_types(torch.float32, losses.dtype)  # fp32, or fp64 for a double model
    sq_norms = []
    for start in range(0, b, chunk_size):
        rows = eye[start : start + chunk_size]
        last = start + chunk_size >= b
        grads = torch.autograd.grad(
            losses, list(params), grad_outputs=rows, is_grads_batched=True,
            retain_graph=retain_graph or not last, allow_unused=True,
        )
        chunk_sq = torch.zeros(rows.shape[0], dtype=accumulate, device=losses.device)
        for g in grads:
            if g is not None:
                chunk_sq += g.to(accumulate).reshape(rows.shape[0], -1).square().sum(dim=1)
        sq_norms.append(chunk_sq)
    return torch.cat(sq_norms)
