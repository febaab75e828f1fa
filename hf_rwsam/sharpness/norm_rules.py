"""Per-layer rules for exact per-sample gradients, and their public registry (in the style of Opacus's
``register_grad_sampler``).

A rule sees one call of its layer: ``activations`` (the call's positional tensor arguments) and ``backprops`` (the
gradient of the summed per-sample losses with respect to the call's output), both with their rows in sample-major
order: rows ``[i k, (i + 1) k)`` belong to sample ``i`` (``k = 1`` for a plain batch; ``k`` rows per sample for batches
folded into the leading dimension: multiple-choice options, windows, frames). The pass that calls the rules
(`hf_rwsam.sharpness.ghost.PerSampleGradients`) has proven that layout before; a rule only does the layer's maths.
It returns, for each of the layer's parameters, sample ``i``'s gradient ``G_i`` in a form whose squared norm, weighted
sum over samples and inner product with another use of the same parameter can be taken without always forming it:

* `OuterProduct`: ``G_i = sum_t L_it^T R_it`` (linear layers; convolutions through their patches). Its squared norm
  is the ghost form ``sum_{t,s} (L_it . L_is)(R_it . R_is)`` (Goodfellow 2015; Li et al. 2022) or ``||G_i||^2`` with
  ``G_i`` formed, whichever costs less: ``T^2 (r + c)`` against ``T r c`` per sample.
* `EmbeddingRows`: ``G_i = sum_t e_{id_it} g_it^T``, one row per distinct id (the (sample, id) aggregation is
  Opacus's idea).
* `Dense`: ``G_i`` formed, ``[b, *shape]``: small parameters (the affine parameters of normalisation layers). A
  user's rule may return a plain tensor ``[rows, *shape]`` of per-row gradients; it becomes one.

The weighted gradient ``sum_i p_i G_i`` of RW-SAM's ascent comes from the same pairs, with each sample's output
gradient scaled by ``p_i`` ("book-keeping", Bu et al. 2023); convolutions take it from the native weight-gradient
kernel. A parameter used several times (tied weights, a layer called twice) has ``G_i = sum_u G_i^u``, whose squared
norm adds the cross terms ``2 <G_i^u, G_i^v>``: ghost products too (`inner`).

A new layer::

    from hf_rwsam.sharpness import register_norm_rule

    @register_norm_rule(MyScale)           # forward: x * self.gain, gain of shape [d], features last
    def my_scale_rule(layer, activations, backprops, b):
        (x,) = activations
        rows = (x * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)   # each row's gradient, [rows, d]
        return {layer.gain: rows}

The pass checks every rule against autograd on the first step (`ghost`), so a rule that is wrong for a model costs
speed (its parameters take batched backward passes), never a wrong number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

FORM_BUDGET = 2**26
"""The most numbers (``b * numel``) a cross term may form per-sample gradients with; beyond, its parameter takes the
batched estimator."""


KEEP_FORMED = 2
"""Per-sample gradients formed for the norms are kept for the weighted gradient (a contraction instead of another
product of the layer's inputs and output gradients) while they hold at most this many times the numbers of those
operands, which the pass holds anyway."""


def _fp(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 activations and gradients are multiplied in fp32; fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    """``||t_i||^2`` over all but the leading dimension, reduced without a squared copy of `t`."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).square()


def _per_sample(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`p` (``[b]``) broadcastable against `like` (``[b, ...]``)."""
    return p.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


# ------------------------------------------------------------------------------------------ per-sample gradients


class PerSampleGradient:
    """Sample ``i``'s gradient ``G_i`` of one parameter in one use, for ``i < b``."""

    b: int
    shape: torch.Size

    def sq_norms(self) -> torch.Tensor:
        """``||G_i||^2``, ``[b]``."""
        return _sq_norms(self.formed())

    def weighted(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_i p_i G_i``, shaped like the parameter."""
        return torch.tensordot(p.to(self.formed().dtype), self.formed(), dims=1)

    def formed(self) -> torch.Tensor:
        """``G``, ``[b, *shape]``."""
        raise NotImplementedError

    def inner(self, other: "PerSampleGradient") -> torch.Tensor | None:
        """``<G_i, G'_i>``, ``[b]``, where a form cheaper than forming both exists (else None)."""
        return None

    @property
    def formed_numel(self) -> int:
        return self.b * math.prod(self.shape)


def inner_products(u: PerSampleGradient, v: PerSampleGradient) -> torch.Tensor | None:
    """``<G_i^u, G_i^v>`` for two uses of one parameter: their own ghost form, else formed within `FORM_BUDGET`,
    else None."""
    value = u.inner(v)
    if value is None:
        value = v.inner(u)
    if value is None and max(u.formed_numel, v.formed_numel) <= FORM_BUDGET:
        value = (u.formed() * v.formed()).flatten(1).sum(1)
    return value


class Dense(PerSampleGradient):
    """``G`` formed, ``[b, *shape]``."""

    def __init__(self, per_sample: torch.Tensor):
        self.per_sample = _fp(per_sample)
        self.b, self.shape = per_sample.shape[0], per_sample.shape[1:]

    @classmethod
    def of_rows(cls, rows: torch.Tensor, b: int) -> "Dense":
        """From per-row gradients ``[b k, *shape]`` in sample-major order: each sample's ``k`` rows summed."""
        return cls(rows if rows.shape[0] == b else rows.reshape(b, -1, *rows.shape[1:]).sum(1))

    def formed(self) -> torch.Tensor:
        return self.per_sample


class OuterProduct(PerSampleGradient):
    """``G_i = sum_t L_it^T R_it`` per group: `left` ``[b, groups, T, r]``, `right` ``[b, groups, T, c]``, the
    parameter ``[groups * r, c]`` reshaped to `shape`.

    Where the norms form ``G`` (cheaper than the ghost form), they keep it within `KEEP_FORMED`, and the weighted
    gradient is then a contraction of it rather than another product of ``L`` and ``R``."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, shape: torch.Size):
        self.left, self.right = _fp(left), _fp(right)
        self.b, self.shape = left.shape[0], torch.Size(shape)
        self._kept = None

    @classmethod
    def of_rows(cls, left: torch.Tensor, right: torch.Tensor, b: int, shape: torch.Size) -> "OuterProduct":
        """From rows ``[b k, ..., r]`` and ``[b k, ..., c]`` (every position of every row of a sample is one ``t``)."""
        return cls(left.reshape(b, 1, -1, left.shape[-1]), right.reshape(b, 1, -1, right.shape[-1]), shape)

    def _positions_and_sides(self) -> tuple[int, int, int]:
        """``T`` (positions per sample and group), ``r`` and ``c``."""
        return self.left.shape[2], self.left.shape[3], self.right.shape[3]

    def _operands_numel(self) -> int:
        """How many numbers the pass holds for this use already (the budget of `KEEP_FORMED`)."""
        return self.left.numel() + self.right.numel()

    def sq_norms(self) -> torch.Tensor:
        t, r, c = self._positions_and_sides()
        if t * (r + c) < r * c:
            return self._ghost_sq_norms()
        formed = self.formed()
        if formed.numel() <= KEEP_FORMED * self._operands_numel():
            self._kept = formed
            self._release_operands()
        return _sq_norms(formed)

    def _release_operands(self) -> None:
        """Once the formed gradient is kept, the inputs and output gradients it came from are no longer needed."""
        self.left = self.right = None

    def _ghost_sq_norms(self) -> torch.Tensor:
        left, right = self.left, self.right
        if left.shape[2] == 1:  # one position: ||l||^2 ||r||^2
            return (left.square().sum((2, 3)) * right.square().sum((2, 3))).sum(1)
        return ((left @ left.transpose(2, 3)) * (right @ right.transpose(2, 3))).sum((1, 2, 3))

    def weighted(self, p: torch.Tensor) -> torch.Tensor:
        if self._kept is not None:
            return torch.tensordot(p.to(self._kept.dtype), self._kept, dims=1)
        return self._weighted_product(p)

    def _weighted_product(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_{i,t} p_i L_it^T R_it``, the smaller operand scaled by the weights."""
        left, right = self.left, self.right
        if left.numel() <= right.numel():
            left = left * _per_sample(p, left)
        else:
            right = right * _per_sample(p, right)
        groups, r, c = left.shape[1], left.shape[3], right.shape[3]
        if groups == 1:
            return (left.reshape(-1, r).t() @ right.reshape(-1, c)).reshape(self.shape)
        return torch.einsum("bgtr,bgtc->grc", left, right).reshape(self.shape)

    def formed(self) -> torch.Tensor:
        return (self.left.transpose(2, 3) @ self.right).reshape(self.b, *self.shape)

    def inner(self, other: PerSampleGradient) -> torch.Tensor | None:
        if not (isinstance(other, OuterProduct) and other.left.shape[1:2] == self.left.shape[1:2]
                and other.left.shape[3] == self.left.shape[3] and other.right.shape[3] == self.right.shape[3]):
            return None
        t, s, r, c = self.left.shape[2], other.left.shape[2], self.left.shape[3], self.right.shape[3]
        if t * s * (r + c) < (t + s) * r * c:
            return ((self.left @ other.left.transpose(2, 3)) * (self.right @ other.right.transpose(2, 3))).sum((1, 2, 3))
        return ((self.left.transpose(2, 3) @ self.right) * (other.left.transpose(2, 3) @ other.right)).sum((1, 2, 3))


class EmbeddingRows(PerSampleGradient):
    """``G_i = sum_t e_{id_it} g_it^T`` of an embedding table ``[num_embeddings, d]``: `ids` ``[b, T]``, `grads`
    ``[b, T, d]`` (zero at the padding index, which gets no gradient)."""

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, shape: torch.Size):
        self.ids, self.grads = ids, _fp(grads)
        self.b, self.shape = ids.shape[0], torch.Size(shape)

    def sq_norms(self) -> torch.Tensor:
        """Each sample's gradient has one row per distinct id: the sum of that id's output gradients in the sample."""
        b, t = self.ids.shape
        num_embeddings = self.shape[0]
        sample = torch.arange(b, device=self.ids.device).repeat_interleave(t)
        keys, rows = torch.unique(sample * num_embeddings + self.ids.reshape(-1), return_inverse=True)
        summed = self.grads.new_zeros(keys.numel(), self.shape[1]).index_add_(0, rows, self.grads.reshape(b * t, -1))
        return self.grads.new_zeros(b).index_add_(0, keys // num_embeddings, summed.square().sum(1))

    def weighted(self, p: torch.Tensor) -> torch.Tensor:
        grads = (self.grads * _per_sample(p, self.grads)).reshape(-1, self.shape[1])
        return grads.new_zeros(self.shape).index_add_(0, self.ids.reshape(-1), grads)

    def formed(self) -> torch.Tensor:
        b, t = self.ids.shape
        rows = (torch.arange(b, device=self.ids.device)[:, None] * self.shape[0] + self.ids).reshape(-1)
        out = self.grads.new_zeros(b * self.shape[0], self.shape[1])
        return out.index_add_(0, rows, self.grads.reshape(b * t, -1)).view(b, *self.shape)

    def inner(self, other: PerSampleGradient) -> torch.Tensor | None:
        if isinstance(other, EmbeddingRows):  # sum_{t,s} [id_t == id'_s] (g_t . g'_s)
            same = (self.ids[:, :, None] == other.ids[:, None, :]).to(self.grads.dtype)
            return (same * (self.grads @ other.grads.transpose(1, 2))).sum((1, 2))
        if isinstance(other, OuterProduct) and other.left.shape[1] == 1 and other.left.shape[3] == self.shape[0]:
            # a linear layer whose weight is this table (tied output embedding): G'_i[v] = sum_s L_sv R_s, so
            # <G_i, G'_i> = sum_{t,s} L_{s, id_t} (R_s . g_t)
            left, right = other.left[:, 0], other.right[:, 0]  # [b, S, V], [b, S, d]
            index = self.ids[:, None, :].expand(-1, left.shape[1], -1)
            return ((right @ self.grads.transpose(1, 2)) * left.gather(2, index)).sum((1, 2))
        return None


class ConvWeight(OuterProduct):
    """A convolution's weight: an `OuterProduct` of its output gradients and input patches, unfolded only for the
    ghost form (few output positions); the formed gradients from one grouped call of the native weight-gradient kernel,
    the weighted gradient from the kernel itself."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, padding):
        self.layer, self.x, self.g, self.padding = layer, x, g, padding
        self.b, self.shape = b, layer.weight.shape
        self._pairs = None
        self._kept = None

    @property
    def left(self) -> torch.Tensor:  # [b, G, k L, O / G]
        return self._patches()[0]

    @property
    def right(self) -> torch.Tensor:  # [b, G, k L, I / G * prod(kernel)]
        return self._patches()[1]

    def _patches(self):
        if self._pairs is None:
            layer, b = self.layer, self.b
            groups, rows = layer.groups, self.x.shape[0]
            one_d = self.x.dim() == 3
            x = _fp(self.x).unsqueeze(2) if one_d else _fp(self.x)
            kernel, stride, dilation = ((1, *t) if one_d else t for t in (layer.kernel_size, layer.stride,
                                                                          layer.dilation))
            padding = (0, *self.padding) if one_d else self.padding
            patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C k, L]
            length = patches.shape[-1]
            patches = patches.view(b, rows // b, groups, -1, length).permute(0, 2, 1, 4, 3)  # [b, G, k, L, C k / G]
            g = _fp(self.g).reshape(b, rows // b, groups, -1, length).permute(0, 2, 1, 4, 3)  # [b, G, k, L, O / G]
            self._pairs = (g.reshape(b, groups, -1, g.shape[-1]), patches.reshape(b, groups, -1, patches.shape[-1]))
        return self._pairs

    def _positions_and_sides(self) -> tuple[int, int, int]:
        layer = self.layer
        return self.g[0, 0].numel() * (self.x.shape[0] // self.b), layer.weight.shape[0] // layer.groups, \
            layer.weight[0].numel()

    def _operands_numel(self) -> int:
        return self.x.numel() + self.g.numel()

    def _release_operands(self) -> None:
        self.x = self.g = self._pairs = None

    def _weight_gradient(self, x: torch.Tensor, g: torch.Tensor, groups: int) -> torch.Tensor:
        """The native weight-gradient kernel: ``grad_W`` of a convolution with input `x` and output gradient `g`."""
        layer = self.layer
        gradient = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}[x.dim() - 2]
        shape = (layer.weight.shape[0] * groups // layer.groups, *layer.weight.shape[1:])
        return gradient(x, shape, g, layer.stride, self.padding, layer.dilation, groups)

    def _weighted_product(self, p: torch.Tensor) -> torch.Tensor:
        """The batch's weight gradient with each row's input or output gradient (the smaller) scaled by its weight."""
        x, g = _fp(self.x), _fp(self.g)
        p = p.to(g.dtype).repeat_interleave(x.shape[0] // self.b)
        if x.numel() < g.numel():
            return self._weight_gradient(x * _per_sample(p, x), g, self.layer.groups)
        return self._weight_gradient(x, g * _per_sample(p, g), self.layer.groups)

    def formed(self) -> torch.Tensor:
        """Every row's weight gradient from one grouped call of the native kernel (rows as groups), summed per
        sample: the same arithmetic as the batch's weight gradient, without unfolding the input."""
        x, g, rows = _fp(self.x), _fp(self.g), self.x.shape[0]
        per_row = self._weight_gradient(x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]),
                                        rows * self.layer.groups)
        if rows == self.b:
            return per_row.view(self.b, *self.shape)
        return per_row.view(self.b, rows // self.b, *self.shape).sum(1)


# ------------------------------------------------------------------------------------------------- the registry

Rule = Callable[[nn.Module, tuple, torch.Tensor, int], dict]
"""``rule(layer, activations, backprops, b) -> {parameter: PerSampleGradient or Tensor[rows, *shape]}``."""


@dataclass(frozen=True)
class RegisteredRule:
    rule: Rule
    layouts: Literal["any", "batch_first"]
    supports: Callable[[nn.Module], bool]


_RULES: dict[type | str, RegisteredRule] = {}


def register_norm_rule(*layers: type | str, layouts: Literal["any", "batch_first"] = "any",
                       supports: Callable[[nn.Module], bool] | None = None):
    """Registers ``rule(layer, activations, backprops, b)`` for the module classes `layers` (classes, or
    ``"package.module.ClassName"`` strings for classes not imported here).

    Args:
        layers: the module classes. A subclass that keeps its parent's ``forward`` uses the parent's rule.
        layouts (`str`): ``"any"``: features last, so the rows may come from any leading dimensions (sequence-first
            inputs, batches folded into rows); ``"batch_first"``: channels on dimension 1 (convolutions, GroupNorm),
            so only the leading dimension holds samples.
        supports (`Callable`, *optional*): whether the rule's maths covers this layer's options.

    Returns:
        The decorator, which returns the rule unchanged.
    """

    def decorator(rule: Rule) -> Rule:
        for layer in layers:
            _RULES[layer] = RegisteredRule(rule, layouts, supports or (lambda module: True))
        return rule

    return decorator


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _transformers_rms_norm(cls: type) -> bool:
    """transformers' per-model RMSNorm copies (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``T5LayerNorm``, ...): one weight
    scaling ``x / sqrt(mean(x^2) + eps)`` over the last dimension (Gemma's ``1 + weight`` has the same gradient)."""
    return cls.__module__.startswith("transformers.models.") and (
        cls.__name__.endswith("RMSNorm") or cls.__name__.endswith("T5LayerNorm"))


def norm_rule(layer: nn.Module) -> RegisteredRule | None:
    """The rule registered for `layer`'s class, or for the nearest parent whose ``forward`` it keeps; None if none, or
    if the rule does not support the layer's options."""
    cls = type(layer)
    registered = None
    for base in cls.__mro__:
        found = _RULES.get(base) or _RULES.get(_qualified_name(base))
        if found is not None and (base is cls or cls.forward is base.forward):
            registered = found
            break
        if found is not None:
            return None  # the forward is the subclass's own: the parent's maths may not hold
    if registered is None and _transformers_rms_norm(cls):
        registered = _TRANSFORMERS_RMS_NORM
    if registered is None or not registered.supports(layer):
        return None
    return registered


# ----------------------------------------------------------------------------------------------- built-in rules


@register_norm_rule(nn.Linear)
def linear_rule(layer, activations, backprops, b):
    """``y = x W^T + c``: ``G_i(W) = sum_t g_it^T x_it``, ``G_i(c) = sum_t g_it``."""
    x = activations[0]
    rules = {}
    if layer.weight is not None:
        rules[layer.weight] = OuterProduct.of_rows(backprops, x, b, layer.weight.shape)
    if layer.bias is not None:
        rules[layer.bias] = Dense(_fp(backprops).reshape(b, -1, backprops.shape[-1]).sum(1))
    return rules


@register_norm_rule("transformers.pytorch_utils.Conv1D")
def hf_conv1d_rule(layer, activations, backprops, b):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + c`` with ``W [d_in, d_out]``: ``G_i(W) = sum_t x_it^T g_it``."""
    x = activations[0]
    rules = {layer.weight: OuterProduct.of_rows(x, backprops, b, layer.weight.shape)}
    if layer.bias is not None:
        rules[layer.bias] = Dense(_fp(backprops).reshape(b, -1, backprops.shape[-1]).sum(1))
    return rules


def _explicit_padding(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """`x` padded as the convolution's forward pads it where ``F.conv*d``'s own zero padding cannot (other padding
    modes, ``"same"``/``"valid"``), and the padding left to the convolution."""
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return x, tuple(layer.padding)
    pads = []  # F.pad's order: last dimension first
    for k, d, p in zip(layer.kernel_size[::-1], layer.dilation[::-1],
                       layer.padding[::-1] if not isinstance(layer.padding, str) else [None] * len(layer.kernel_size)):
        if layer.padding == "valid":
            left = right = 0
        elif layer.padding == "same":
            total = d * (k - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = p
        pads += [left, right]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pads, mode=mode), (0,) * len(layer.kernel_size)


def _conv_rules(layer, x, g, b, padding):
    rules = {layer.weight: ConvWeight(layer, x, g, b, padding)}
    if layer.bias is not None:
        rules[layer.bias] = Dense.of_rows(_fp(g).flatten(2).sum(2), b)
    return rules


@register_norm_rule(nn.Conv1d, nn.Conv2d, layouts="batch_first")
def conv_rule(layer, activations, backprops, b):
    """``G_i(W) = sum_l g_il^T u_il`` over the output positions ``l`` of the input patches ``u`` (per group)."""
    x, padding = _explicit_padding(layer, activations[0])
    return _conv_rules(layer, x, backprops, b, padding)


@register_norm_rule("timm.layers.conv2d_same.Conv2dSame", layouts="batch_first")
def timm_conv2d_same_rule(layer, activations, backprops, b):
    """timm's TensorFlow-style ``"SAME"`` convolution: the input padded as its forward pads it, then `conv_rule`."""
    from timm.layers.padding import pad_same

    x = pad_same(activations[0], layer.weight.shape[-2:], layer.stride, layer.dilation)
    return _conv_rules(layer, x, backprops, b, (0, 0))


@register_norm_rule(nn.Embedding, supports=lambda m: m.max_norm is None and not m.scale_grad_by_freq and not m.sparse)
def embedding_rule(layer, activations, backprops, b):
    """``G_i = sum_t e_{id_it} g_it^T`` (the padding row gets no gradient)."""
    ids = activations[0].reshape(b, -1)
    grads = _fp(backprops).reshape(b, -1, backprops.shape[-1])
    if layer.padding_idx is not None:
        grads = grads * (ids != layer.padding_idx).unsqueeze(-1)
    return {layer.weight: EmbeddingRows(ids, grads, layer.weight.shape)}


def _affine_rules(layer, normalized, g, b, reduce, weight_name="weight", bias_name="bias"):
    """Per-channel affine parameters after a per-sample normalisation: ``G_i(w) = sum g * x_hat``, ``G_i(c) = sum g``
    over the sample's rows and positions (`reduce`: ``[rows, ...] -> [rows, channels]``)."""
    rules = {}
    weight, bias = getattr(layer, weight_name, None), getattr(layer, bias_name, None)
    if isinstance(bias, nn.Parameter):
        rules[bias] = Dense.of_rows(reduce(g), b)
    if isinstance(weight, nn.Parameter):  # `normalized` is the rule's own: multiplied in place
        rules[weight] = Dense.of_rows(reduce(normalized.mul_(g)), b)
    return rules


def _trailing(shape):
    """Rows ``[N, ..., *shape]`` reduced to ``[N, *shape]``."""
    return lambda z: z.reshape(z.shape[0], -1, *shape).sum(1)


def _channels(z):
    """Rows ``[N, C, ...]`` reduced to ``[N, C]``."""
    return z.reshape(z.shape[0], z.shape[1], -1).sum(-1)


@register_norm_rule(nn.LayerNorm, "timm.layers.norm.LayerNorm")
def layer_norm_rule(layer, activations, backprops, b):
    x, g = _fp(activations[0]), _fp(backprops)
    normalized = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    return _affine_rules(layer, normalized, g, b, _trailing(layer.normalized_shape))


@register_norm_rule(nn.RMSNorm)
def rms_norm_rule(layer, activations, backprops, b):
    x, g = _fp(activations[0]), _fp(backprops)
    normalized = F.rms_norm(x, layer.normalized_shape, eps=layer.eps)
    return _affine_rules(layer, normalized, g, b, _trailing(layer.normalized_shape))


def transformers_rms_norm_rule(layer, activations, backprops, b):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dimension, in fp32 as transformers computes it."""
    x, g = activations[0].float(), _fp(backprops)
    eps = getattr(layer, "variance_epsilon", getattr(layer, "eps", 1e-6))
    normalized = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return _affine_rules(layer, normalized, g, b, _trailing(x.shape[-1:]))


_TRANSFORMERS_RMS_NORM = RegisteredRule(transformers_rms_norm_rule, "any",
                                        lambda m: isinstance(getattr(m, "weight", None), nn.Parameter))


@register_norm_rule(nn.GroupNorm, "timm.layers.norm.GroupNorm", layouts="batch_first")
def group_norm_rule(layer, activations, backprops, b):
    x, g = _fp(activations[0]), _fp(backprops)
    return _affine_rules(layer, F.group_norm(x, layer.num_groups, eps=layer.eps), g, b, _channels)


@register_norm_rule(_BatchNorm, layouts="batch_first",
                    supports=lambda m: not m.training and m.running_mean is not None)
def eval_batch_norm_rule(layer, activations, backprops, b):
    """BatchNorm in eval mode: the running statistics are constants, so each sample's affine gradient is its own."""
    x, g = _fp(activations[0]), _fp(backprops)
    shape = (1, -1, *[1] * (x.dim() - 2))
    normalized = (x - layer.running_mean.view(shape)) * torch.rsqrt(layer.running_var.view(shape) + layer.eps)
    return _affine_rules(layer, normalized, g, b, _channels)


@register_norm_rule("timm.layers.norm.LayerNorm2d", layouts="batch_first")
def timm_layer_norm_2d_rule(layer, activations, backprops, b):
    """timm's LayerNorm over the channels of ``[N, C, H, W]``."""
    x, g = _fp(activations[0]), _fp(backprops)
    normalized = F.layer_norm(x.permute(0, 2, 3, 1), layer.normalized_shape, eps=layer.eps).permute(0, 3, 1, 2)
    return _affine_rules(layer, normalized, g, b, _channels)


@register_norm_rule("timm.layers.layer_scale.LayerScale", supports=lambda m: not m.inplace)
def timm_layer_scale_rule(layer, activations, backprops, b):
    """``x * gamma``, channels last (the in-place variant overwrites the input the rule needs: not supported)."""
    x, g = _fp(activations[0]), _fp(backprops)
    return {layer.gamma: Dense.of_rows(_trailing(layer.gamma.shape)(x * g), b)}


@register_norm_rule("timm.layers.layer_scale.LayerScale2d", layouts="batch_first", supports=lambda m: not m.inplace)
def timm_layer_scale_2d_rule(layer, activations, backprops, b):
    """``x * gamma``, channels on dimension 1."""
    x, g = _fp(activations[0]), _fp(backprops)
    return {layer.gamma: Dense.of_rows(_channels(x * g), b)}
