"""Exact per-sample norms on the layouts users' models have: sequence-first attention, position tables shared by the
batch, batches folded into rows, relative position tables, transformers' and timm's own norms, shared parameters.

Every case compares the exact estimator (`PerSampleGradients`) with an independent reference: one autograd backward
of each sample's loss alone, through the same batched forward (none of these models couples samples, so that is the
sample's gradient). Norms and the weighted gradient ``sum_i p_i grad l_i`` must agree within 1e-4 (fp32; the
estimator takes the same products in another order, ~1e-6 relative), or the parameters the rules cannot prove must
take the batched estimator, with the warning naming them. Each case runs at b > 1 and b = 1, and the sequence-first
ones at T = b too, where batch-first and sequence-first shapes look alike.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_rwsam.sharpness import PerSampleGradients

TOL = 1e-4


def reference(model, forward, b):
    """Per-sample gradients of every trainable parameter, one backward of each sample's loss."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses = forward(model)
    assert losses.shape == (b,)
    rows = []
    for i in range(b):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=i < b - 1, allow_unused=True)
        rows.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)})
    return {n: torch.stack([r[n] for r in rows]).double() for n in params}


def check(model, forward, b, covered=(), batched=()):
    """Runs the estimator twice (the first run proves the layouts, the second uses them) against `reference`.

    Args:
        covered: parameter names the rules must cover (not batched).
        batched: parameter names that must take the batched estimator (no rule can prove their rows).
    """
    torch.manual_seed(0)
    expected = reference(model, forward, b)
    names = list(expected)
    expected_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values()))
    p = torch.softmax(torch.randn(b, generator=torch.Generator().manual_seed(3)), 0)
    expected_weighted = torch.cat([torch.einsum("b,b...->...", p.double(), expected[n]).reshape(-1) for n in names])
    params = [q for q in model.parameters() if q.requires_grad]
    per_sample = PerSampleGradients(model, params)
    with CaptureLogger(logging.get_logger("hf_rwsam.sharpness.ghost")) as captured:
        for _ in range(2):
            with per_sample.recording(b):
                losses = forward(model)
            norms = per_sample.norms(losses)
            weighted = per_sample.weighted_gradient(p)
            assert ((norms.double() - expected_norms).abs() / expected_norms).max() <= TOL
            flat = torch.cat([w.reshape(-1) for w in weighted]).double()
            assert (flat - expected_weighted).norm() / expected_weighted.norm() <= TOL
    path = {id(q): n for n, q in model.named_parameters()}
    taken = {path[id(q)] for q in per_sample.batched}
    for name in covered:
        assert name not in taken, f"{name} took the batched estimator:\n{captured.out}"
    for name in batched:
        assert name in taken, f"{name} was not taken by the batched estimator"
        assert name in captured.out, f"the warning does not name {name}:\n{captured.out}"
    return taken


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.float(), labels, reduction="none")


def labels_for(b, classes=5, seed=7):
    return torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ sequence-first layers


class SeqFirstMLP(nn.Module):
    """Linear layers fed ``(T, b, D)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):  # x: (T, b, 6)
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(0))


class Attention(nn.Module):
    """`nn.MultiheadAttention` self- or cross-attention, either layout."""

    def __init__(self, batch_first, cross=False):
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=8, vdim=8)
        self.context = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):  # x: (T, b, 8), or (b, T, 8) when batch_first
        memory = self.context(x[..., :6]) if self.cross else x
        out, _ = self.attention(x, memory, memory, need_weights=False)
        return self.head(out.mean(1 if self.batch_first else 0))


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.layer(x).mean(1 if self.batch_first else 0))


SEQ_CASES = [(b, t) for b in (1, 4) for t in sorted({b, b + 1, 2 * b})]


@pytest.mark.parametrize("b,t", SEQ_CASES)
@pytest.mark.parametrize("build,batch_first", [
    (SeqFirstMLP, False),
    (functools.partial(Attention, False), False),
    (functools.partial(Attention, True), True),
    (functools.partial(Attention, False, cross=True), False),
    (functools.partial(Encoder, False), False),
    (functools.partial(Encoder, True), True),
], ids=["linear_seq_first", "mha_seq_first", "mha_batch_first", "mha_cross_seq_first", "encoder_layer_seq_first",
        "encoder_layer_batch_first"])
def test_sequence_first_and_attention_layouts(build, batch_first, b, t):
    torch.manual_seed(0)
    model = build()
    width = 6 if isinstance(model, SeqFirstMLP) else 8
    x = torch.randn(b, t, width, generator=torch.Generator().manual_seed(1))
    x = x if batch_first else x.transpose(0, 1).contiguous()
    labels = labels_for(b)
    # every parameter of these layers is covered by a rule, in either layout, at T = b too
    check(model, lambda m: cross_entropy(m(x), labels), b,
          covered=[n for n, _ in model.named_parameters()])


class NanoGPT(nn.Module):
    """nanoGPT's embeddings: ``wte(idx) + wpe(arange(T))``, the position table fed ids shared by the batch."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(11, 8), nn.Embedding(16, 8)
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.wte(idx) + self.wpe(positions)).mean(1))


@pytest.mark.parametrize("b,t", SEQ_CASES)
def test_position_table_fed_shared_ids_takes_the_batched_estimator(b, t):
    torch.manual_seed(0)
    model = NanoGPT()
    idx = torch.randint(0, 11, (b, t), generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    batched = ["wpe.weight"] if b > 1 else []  # one sample: its gradient is the batch's, any reading is right
    check(model, lambda m: cross_entropy(m(idx), labels), b, covered=["wte.weight", "ln.weight", "head.weight"],
          batched=batched)


# ----------------------------------------------------------------------------------------------- folded batches


class Frames(nn.Module):
    """Video frames folded into a Conv2d batch, sample-major ``(b F, C, H, W)`` or frame-major ``(F b, ...)``."""

    def __init__(self, frame_major):
        super().__init__()
        self.frame_major = frame_major
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Linear(8, 5)

    def forward(self, video):  # (b, F, C, H, W)
        b, f = video.shape[:2]
        frames = video.transpose(0, 1) if self.frame_major else video
        h = F.relu(self.norm(self.conv(frames.reshape(b * f, *video.shape[2:])))).mean((2, 3))  # (b F, 8)
        h = h.view(f, b, 8).transpose(0, 1) if self.frame_major else h.view(b, f, 8)
        return self.head(h.mean(1))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("frame_major", [False, True], ids=["sample_major", "frame_major"])
def test_frames_folded_into_a_conv_batch(b, frame_major):
    torch.manual_seed(0)
    model = Frames(frame_major)
    video = torch.randn(b, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(video), labels), b, covered=[n for n, _ in model.named_parameters()])


def bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)


@pytest.mark.parametrize("b", [1, 3])
def test_bert_multiple_choice_folds_choices_into_rows(b):
    from transformers import BertForMultipleChoice

    torch.manual_seed(0)
    model = BertForMultipleChoice(bert_config())
    ids = torch.randint(1, 50, (b, 3, 7), generator=torch.Generator().manual_seed(1))
    labels = labels_for(b, classes=3)
    check(model, lambda m: cross_entropy(m(input_ids=ids).logits, labels), b,
          covered=[n for n, _ in model.named_parameters()])


# ------------------------------------------------------------------------------ relative position tables (HF)


def token_losses(logits, ids, shift=True):
    """Each sequence's mean next-token (or same-position) cross-entropy."""
    if shift:
        logits, ids = logits[:, :-1], ids[:, 1:]
    return F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none").mean(1)


@pytest.mark.parametrize("b", [1, 4])
def test_t5_relative_attention_bias_and_t5_layer_norm(b):
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0, num_labels=5, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    model = T5ForSequenceClassification(config)
    ids = torch.randint(2, 40, (b, 6), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 1  # the eos token the classification head reads
    labels = labels_for(b)
    taken = check(model, lambda m: cross_entropy(m(input_ids=ids).logits, labels), b,
                  covered=["transformer.encoder.final_layer_norm.weight",
                           "transformer.encoder.block.0.layer.0.layer_norm.weight",
                           "transformer.encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert all("relative_attention_bias" in n for n in taken), taken


@pytest.mark.parametrize("b", [1, 4])
def test_deberta_v2_relative_embeddings(b):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32, relative_attention=True,
                             position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5)
    model = DebertaV2ForSequenceClassification(config)
    ids = torch.randint(1, 40, (b, 7), generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(input_ids=ids).logits, labels), b,
          covered=["deberta.embeddings.word_embeddings.weight", "deberta.encoder.layer.0.attention.self.query_proj.weight"])


# ----------------------------------------------------------------------- transformers' norms, shared parameters


def check_causal_lm(model, b):
    """`check` on a 40-token causal LM's per-sequence token losses, every parameter covered by a rule."""
    ids = torch.randint(0, 40, (b, 6), generator=torch.Generator().manual_seed(1))
    check(model, lambda m: token_losses(m(input_ids=ids).logits, ids), b,
          covered=[n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("b", [1, 4])
def test_llama_rms_norm(b):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    check_causal_lm(model, b)


@pytest.mark.parametrize("b", [1, 4])
def test_gpt2_tied_word_embeddings(b):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    check_causal_lm(model, b)


@pytest.mark.parametrize("b", [1, 4])
def test_albert_shared_layers(b):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, num_labels=5)
    model = AlbertForSequenceClassification(config)
    ids = torch.randint(1, 40, (b, 6), generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(input_ids=ids).logits, labels), b,
          covered=[n for n, _ in model.named_parameters()])


class LayerCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))).mean(1))


@pytest.mark.parametrize("b", [1, 4])
def test_a_layer_called_twice(b):
    torch.manual_seed(0)
    model = LayerCalledTwice()
    x = torch.randn(b, 5, 6, generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(x), labels), b, covered=[n for n, _ in model.named_parameters()])


# -------------------------------------------------------------------------------------------------- timm models


def timm_model(name, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, drop_path_rate=0.0, **kwargs)


TIMM = {
    "convnext": (functools.partial(timm_model, "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)), 32,
                 ["stem.1.weight", "stages.1.downsample.0.weight", "stages.0.blocks.0.conv_dw.weight"]),
    "swin": (functools.partial(timm_model, "swin_tiny_patch4_window7_224", img_size=28, patch_size=4, window_size=7,
                               embed_dim=8, depths=(1, 1), num_heads=(2, 2)), 28,
             ["layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.norm1.weight", "head.fc.weight"]),
    "beit": (functools.partial(timm_model, "beit_base_patch16_224", img_size=16, patch_size=8, embed_dim=8, depth=1,
                               num_heads=2), 16, ["blocks.0.attn.qkv.weight", "cls_token", "head.weight"]),
    "eva02": (functools.partial(timm_model, "eva02_tiny_patch14_224", img_size=28, patch_size=14, embed_dim=8, depth=1,
                                num_heads=2), 28, ["blocks.0.attn.q_proj.weight", "blocks.0.norm1.weight"]),
}


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_windows_and_relative_position_tables(name, b):
    build, size, covered = TIMM[name]
    model = build()
    x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(x), labels), b, covered=covered)


class ViewsItsPositions(nn.Module):
    """Position embeddings read back as ``[T, d]``: given to every row of the batch, they no longer fit."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions, self.head = nn.Embedding(11, 6), nn.Embedding(8, 6), nn.Linear(6, 5)

    def forward(self, ids):
        t = ids.shape[1]
        positions = self.positions(torch.arange(t)[None]).view(t, -1)
        return self.head(torch.tanh(self.tokens(ids) + positions).mean(1))


def test_a_forward_that_breaks_with_per_row_position_ids_runs_again_without_them():
    torch.manual_seed(0)
    model = ViewsItsPositions()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    labels = labels_for(4)
    per_sample = PerSampleGradients(model, list(model.parameters()))
    calls = []

    def forward():
        calls.append(1)
        return cross_entropy(model(ids), labels)

    with CaptureLogger(logging.get_logger("hf_rwsam.sharpness.ghost")) as captured:
        losses = per_sample.record(forward, 4)
    assert len(calls) == 2 and "the forward failed" in captured.out
    expected = reference(model, lambda m: cross_entropy(m(ids), labels), 4)
    expected_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values()))
    norms = per_sample.norms(losses)
    assert ((norms.double() - expected_norms).abs() / expected_norms).max() <= TOL
    assert [q is model.positions.weight for q in per_sample.batched] == [True]
    per_sample.weighted_gradient(torch.full((4,), 0.25))
    with per_sample.recording(4):  # without the copies for the run: no second failure
        cross_entropy(model(ids), labels)


class TimmSameConvs(nn.Module):
    """timm's TF-"SAME" convolutions (`Conv2dSame`: padding computed from the input at run time) and a depthwise one."""

    def __init__(self):
        super().__init__()
        from timm.layers import create_conv2d

        self.stem = create_conv2d(3, 8, 3, stride=2, padding="same")
        self.dw = create_conv2d(8, 8, 3, stride=2, padding="same", depthwise=True)
        self.norm, self.head = nn.GroupNorm(2, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.norm(self.dw(torch.tanh(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("b", [1, 3])
def test_timm_same_padding_and_depthwise_convolutions(b):
    torch.manual_seed(0)
    model = TimmSameConvs()
    assert type(model.stem).__name__ == "Conv2dSame" and model.dw.groups == 8
    x = torch.randn(b, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    labels = labels_for(b)
    check(model, lambda m: cross_entropy(m(x), labels), b, covered=[n for n, _ in model.named_parameters()])
