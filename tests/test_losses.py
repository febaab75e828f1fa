"""Per-sample losses agree with the losses transformers' heads compute (their mean is the model's loss)."""

import pytest
import torch
import torch.nn.functional as F

from hf_rwsam.losses import per_sample_loss


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_single_label_cross_entropy(smoothing):
    logits = torch.randn(6, 4, generator=_gen())
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    losses = per_sample_loss({"logits": logits}, labels, "single_label_classification", smoothing)
    # reference: one sample at a time, written out: (1 - eps) * nll + eps * mean_c(-log p_c)
    logp = logits.log_softmax(-1)
    expected = torch.stack([(1 - smoothing) * -logp[i, labels[i]] - smoothing * logp[i].mean() for i in range(6)])
    torch.testing.assert_close(losses, expected)


def test_multi_label_bce_averaged_over_labels():
    logits = torch.randn(5, 3, generator=_gen())
    targets = (torch.rand(5, 3, generator=_gen()) > 0.5).float()
    losses = per_sample_loss((logits,), targets, "multi_label_classification")
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean(1)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(losses.mean(), F.binary_cross_entropy_with_logits(logits, targets))


def test_regression_squared_error():
    preds = torch.randn(5, 1, generator=_gen())
    targets = torch.randn(5, generator=_gen())
    losses = per_sample_loss({"logits": preds}, targets, None)  # one output: inferred as regression
    torch.testing.assert_close(losses, (preds.squeeze(1) - targets) ** 2)


@pytest.mark.parametrize("shift", [False, True])
def test_token_level_losses_are_each_sequences_share_of_the_token_mean(shift):
    """docs/ALGORITHMS.md: l_i = b * (sequence i's summed token losses) / (tokens in the batch), so that their mean is
    the token mean the models and the Trainer's label smoother compute (not the mean of per-sequence means)."""
    logits = torch.randn(3, 5, 7, generator=_gen())
    labels = torch.randint(0, 7, (3, 5), generator=_gen())
    labels[0, 3:] = -100
    labels[2, 1] = -100
    losses = per_sample_loss({"logits": logits}, labels, None, shift_labels=shift)
    sums, tokens = [], 0
    for i in range(3):
        lg, lb = (logits[i, :-1], labels[i, 1:]) if shift else (logits[i], labels[i])
        keep = lb != -100
        sums.append(F.cross_entropy(lg[keep], lb[keep], reduction="sum"))
        tokens += int(keep.sum())
    torch.testing.assert_close(losses, 3 * torch.stack(sums) / tokens)
    # their mean is the batch's token mean, as one cross-entropy over every kept token computes it
    lg, lb = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
    torch.testing.assert_close(losses.mean(), F.cross_entropy(lg.reshape(-1, 7), lb.reshape(-1), ignore_index=-100))


def test_tuple_outputs_in_the_transformers_convention():
    """(loss, logits) from a model given labels and (logits,) from one without give the same per-sample losses; a
    regression head with 1-D outputs and float labels is regression, not multi-label classification."""
    logits = torch.randn(4, 3, generator=_gen())
    labels = torch.tensor([0, 2, 1, 1])
    expected = F.cross_entropy(logits, labels, reduction="none")
    loss = F.cross_entropy(logits, labels)
    torch.testing.assert_close(per_sample_loss((loss, logits), labels), expected)
    torch.testing.assert_close(per_sample_loss((logits,), labels), expected)
    preds, targets = torch.randn(5, generator=_gen()), torch.randn(5, generator=_gen())
    for outputs in ((F.mse_loss(preds, targets), preds), (preds,), preds):
        torch.testing.assert_close(per_sample_loss(outputs, targets), (preds - targets) ** 2)


def test_bf16_logits_give_fp32_losses():
    logits = torch.randn(4, 3, generator=_gen()).bfloat16()
    losses = per_sample_loss({"logits": logits}, torch.tensor([0, 1, 2, 0]))
    assert losses.dtype == torch.float32


def test_unknown_problem_type_is_refused_by_name():
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        per_sample_loss({"logits": torch.zeros(2, 3)}, torch.tensor([0, 1]), "ranking")
