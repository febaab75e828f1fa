"""Exact per-sample gradient norms from one backward (`hf_rwsam.sharpness.ghost`), and the weighted gradient from the
same pass, against per-sample gradients from `torch.func`.

The reference: ``vmap(grad(l_i))`` over samples with `functional_call`; for transformers' models, whose mask helpers
branch on tensor values (which vmap refuses), `torch.func.grad` one sample at a time. Models without BatchNorm, so
``l_i`` depends on sample ``i`` only and the batch-of-one gradient is the per-sample one. Everything runs in fp32: the
norms come from the same products summed in another order (ghost norms: Gram matrices), ~1e-7 relative; 1e-4 is the
issue's bound. The weighted gradient is compared as a whole (relative to its norm): some of its entries are zero in
exact arithmetic (attention's key bias: a constant added to every score of a query), so per-entry relative errors of
rounding noise mean nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_rwsam.sharpness import PerSampleGradients, SharpnessAwareStep, SharpnessSettings, exact_sample_grad_norms

TOL = 1e-4


class ConvGroupNorm(nn.Module):
    """conv + GroupNorm + linear, with the convolutions' variety: groups, stride, reflect padding, 'same', Conv1d."""

    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2, padding=1, padding_mode="reflect")
        self.g2 = nn.GroupNorm(4, 8)
        self.c3 = nn.Conv1d(8, 4, 3, padding="same", dilation=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)), inplace=True)
        h = F.relu(self.g2(self.c2(h)))
        return self.fc(self.c3(h.flatten(2)).mean(-1))


class EmbeddingLayerNorm(nn.Module):
    """embedding (padding index, repeated ids, position ids shared by the batch) + LayerNorm + RMSNorm + linear."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(11, 6, padding_idx=0), nn.Embedding(7, 6)
        self.ln, self.rms, self.fc = nn.LayerNorm(6), nn.RMSNorm(6), nn.Linear(6, 4)

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1], device=ids.device)[None]  # [1, t]: broadcast over the batch
        return self.fc(self.rms(self.ln(self.tokens(ids) + self.positions(positions)))).mean(-2)


class WideLayersOnFewPositions(nn.Module):
    """Layers whose per-sample gradient is larger than the Gram matrices: the ghost form (T (d_in + d_out) < d_in d_out)
    rather than the formed gradient, for a convolution (L = 4 positions) and a linear layer on sequences (T = 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.mix = nn.Linear(32, 48)
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x[:, :, :4, :4])).flatten(2).transpose(1, 2)  # [b, 4, 32]
        return self.fc(torch.tanh(self.mix(h[:, :3])).mean(1))


def conv_batch(b=6):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(b, 3, 8, 8, generator=g)}, torch.randint(0, 5, (b,), generator=g)


def token_batch(b=5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (b, 7), generator=g)
    ids[:, 5:] = 0  # padding
    ids[0, :3] = 4  # an id repeated within a sample
    return {"ids": ids}, torch.randint(0, 4, (b,), generator=g)


def tiny_vit():
    """timm's ViT: its class token and position embedding are added to every sample (broadcast parameters)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                             num_classes=5)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(config)


def bert_batch(b=4):
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(b, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(1, 50, (b, 9), generator=g), "attention_mask": mask}, torch.randint(0, 3, (b,), generator=g)


def logits_of(outputs):  # a ModelOutput, or the logits of a timm model
    return outputs.logits if hasattr(outputs, "logits") else outputs


def per_sample_losses(model, inputs, labels):
    return F.cross_entropy(logits_of(model(**inputs)), labels, reduction="none")


def reference_grads(model, inputs, labels, use_vmap=True) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``[b, *shape]`` of every trainable parameter, by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of_one(weights, one_inputs, one_label):
        one_inputs = {k: v.unsqueeze(0) for k, v in one_inputs.items()}
        return F.cross_entropy(logits_of(functional_call(model, weights, (), one_inputs)), one_label.unsqueeze(0))

    if use_vmap:
        return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, labels)
    rows = [grad(loss_of_one)(params, {k: v[i] for k, v in inputs.items()}, labels[i]) for i in range(len(labels))]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def ours(model, inputs, labels, p):
    params = [q for q in model.parameters() if q.requires_grad]
    per_sample = PerSampleGradients(model, params)
    with per_sample.recording(len(labels)):
        losses = per_sample_losses(model, inputs, labels)
    norms = per_sample.norms(losses)
    return norms, per_sample.weighted_gradient(p), per_sample


MODELS = {
    "conv_groupnorm": (ConvGroupNorm, conv_batch, True),
    "ghost_forms": (WideLayersOnFewPositions, conv_batch, True),
    "embedding_layernorm": (EmbeddingLayerNorm, token_batch, True),
    "tiny_bert": (tiny_bert, bert_batch, False),
    "timm_vit": (tiny_vit, conv_batch, True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_norms_and_weighted_gradient_equal_torch_func(name):
    build, batch, use_vmap = MODELS[name]
    torch.manual_seed(0)
    model = build()
    inputs, labels = batch()
    p = torch.softmax(torch.randn(len(labels), generator=torch.Generator().manual_seed(3)), 0)
    norms, weighted, per_sample = ours(model, inputs, labels, p)
    assert per_sample.batched == [], "every layer of these models has per-sample rules"
    reference = reference_grads(model, inputs, labels, use_vmap)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    expected = torch.sqrt(sum(reference[n].flatten(1).double().square().sum(1) for n in names))
    assert ((norms.double() - expected).abs() / expected).max() <= TOL
    flat = torch.cat([w.reshape(-1) for w in weighted]).double()
    expected_weighted = torch.cat([torch.einsum("b,b...->...", p.double(), reference[n].double()).reshape(-1)
                                   for n in names])
    assert (flat - expected_weighted).norm() / expected_weighted.norm() <= TOL
    # the comparison can fail: uniform weights give another gradient
    uniform = torch.cat([reference[n].double().mean(0).reshape(-1) for n in names])
    assert (flat - uniform).norm() / uniform.norm() > 100 * TOL


class Scaled(nn.Module):
    """A layer with its own parameter and forward: no per-sample rule knows it."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain


class TiedWithUnknownLayer(nn.Module):
    """An embedding tied to the output layer (GPT-2's ``wte``), and a layer no rule knows (`Scaled`) between."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.scaled = Scaled(6)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.scaled(self.emb(ids)))).mean(1)


def tied_batch():
    ids = torch.randint(0, 9, (5, 4), generator=torch.Generator().manual_seed(0))
    return {"ids": ids}, torch.randint(0, 9, (5,), generator=torch.Generator().manual_seed(1))


def test_tied_weights_take_cross_terms_and_unknown_layers_the_batched_estimator_named_once():
    """The tied weight's two uses (embedding rows, output layer) add their cross terms from the same pass; the layer no
    rule knows (`Scaled`) takes batched backward passes. The norms stay exact, and one warning names the parameter by
    its path, says why and what it costs."""
    torch.manual_seed(0)
    model = TiedWithUnknownLayer()
    inputs, labels = tied_batch()
    p = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(3)), 0)
    norms, weighted, per_sample = ours(model, inputs, labels, p)
    assert {id(q) for q in per_sample.batched} == {id(model.scaled.gain)}
    reference = reference_grads(model, inputs, labels)
    expected = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in reference.values()))
    assert ((norms.double() - expected).abs() / expected).max() <= TOL
    names = [n for n, q in model.named_parameters()]
    flat = torch.cat([w.reshape(-1) for w in weighted]).double()
    expected_weighted = torch.cat([torch.einsum("b,b...->...", p.double(), reference[n].double()).reshape(-1)
                                   for n in names])
    assert (flat - expected_weighted).norm() / expected_weighted.norm() <= TOL

    step = SharpnessAwareStep(SharpnessSettings(sam_mode="rwsam", rwsam_estimator="exact"))

    def loss_fn(m, batch, return_outputs=False):
        logits = m(batch["ids"])
        loss = F.cross_entropy(logits, batch["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    with CaptureLogger(logging.get_logger("hf_rwsam.sharpness.ghost")) as captured:
        for _ in range(2):
            step(model, {**inputs, "labels": labels}, loss_fn)
    assert captured.out.count("take their per-sample gradients by batched backward passes") == 1, captured.out
    assert "scaled.gain: no per-sample rule for its layer (Scaled" in captured.out, captured.out
    assert "emb.weight" not in captured.out


def test_a_registered_rule_covers_a_users_layer():
    """`register_norm_rule(Scaled)`: the user's layer gets per-sample gradients from the same pass, exactly."""
    from hf_rwsam.sharpness import register_norm_rule
    from hf_rwsam.sharpness.norm_rules import _RULES

    @register_norm_rule(Scaled)
    def scaled_rule(layer, activations, backprops, b):
        (x,) = activations
        return {layer.gain: (x * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    try:
        torch.manual_seed(0)
        model = TiedWithUnknownLayer()
        inputs, labels = tied_batch()
        norms, _, per_sample = ours(model, inputs, labels, torch.full((5,), 0.2))
        assert per_sample.batched == []
        reference = reference_grads(model, inputs, labels)
        expected = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in reference.values()))
        assert ((norms.double() - expected).abs() / expected).max() <= TOL
    finally:
        del _RULES[Scaled]


def test_batchnorm_in_eval_mode_is_per_sample_and_in_training_mode_takes_the_batched_estimator():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = ConvBN()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    inputs, labels = conv_batch()
    p = torch.full((6,), 1 / 6)
    model.eval()  # running statistics: per-sample affine, the layers' rules apply
    norms, _, per_sample = ours(model, inputs, labels, p)
    assert per_sample.batched == [] and per_sample.coupled == []
    expected = torch.sqrt(sum(g.flatten(1).double().square().sum(1)
                              for g in reference_grads(model, inputs, labels).values()))
    assert ((norms.double() - expected).abs() / expected).max() <= TOL
    model.train()  # batch statistics couple the samples: every parameter by batched backward, through them
    norms, _, per_sample = ours(model, inputs, labels, p)
    assert per_sample.coupled == ["bn"] and len(per_sample.batched) == 6
    losses = per_sample_losses(model, inputs, labels)
    batched = exact_sample_grad_norms(losses, list(model.parameters()), chunk_size=4, retain_graph=False)
    torch.testing.assert_close(norms, batched, rtol=1e-5, atol=0)


def test_bf16_autocast_norms_are_fp32_and_close_to_the_fp32_ones():
    """Under bf16 autocast the layers' inputs and output gradients are bf16 (8 bits of mantissa, ~4e-3 relative);
    their products are taken in fp32, and the norms stay within a few bf16 roundings of the fp32 ones."""
    torch.manual_seed(0)
    model = ConvGroupNorm()
    inputs, labels = conv_batch()
    p = torch.full((6,), 1 / 6)
    fp32, _, _ = ours(model, inputs, labels, p)
    per_sample = PerSampleGradients(model, list(model.parameters()))
    with per_sample.recording(6), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = per_sample_losses(model, inputs, labels)
    norms = per_sample.norms(losses)
    assert norms.dtype == torch.float32
    assert ((norms - fp32).abs() / fp32).max() <= 5e-2
