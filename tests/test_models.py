"""The architectures `hf_rwsam.models` registers in timm, and `create_model`.

Parameter counts are checked against the reference implementations (counted exactly, by instantiating each one as
published, with a 10-class head) and against the figures of the papers; logits after a save/load round trip must be
bit-identical (same weights, same operations, same CPU); everything runs offline (conftest sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    TimmWrapperForImageClassification,
)

from hf_rwsam import RWSAMTrainer
from hf_rwsam.models import create_model

from utils import make_images, sgd_config, tensor_dataset

REGISTERED = ["cifar_resnet18", "cifar_wrn28_10", "cifar_pyramidnet110_a270", "small_cnn", "small_cnn_gn"]

# (architecture, in_chans, input side): the CIFAR models at 32x32, the small CNN on 1-channel 8x8 (digits) and 16x16
CASES = [
    ("cifar_resnet18", 3, 32),
    ("cifar_wrn28_10", 3, 32),
    ("cifar_pyramidnet110_a270", 3, 32),
    ("small_cnn", 1, 8),
    ("small_cnn", 1, 16),
    ("small_cnn_gn", 1, 8),
]

# (architecture, model_args) -> (parameters of the reference implementation, paper figure, its tolerance, num_features).
# Reference counts, 10 classes: kuangliu/pytorch-cifar models/resnet.py ResNet(BasicBlock, [2, 2, 2, 2]);
# xternalz/WideResNet-pytorch wideresnet.py WideResNet(depth, 10, width); dyhan0920/PyramidNet-PyTorch PyramidNet.py
# PyramidNet(depth, alpha, 10, bottleneck=False). Paper figures: the usual 11.2M for the CIFAR ResNet-18; Zagoruyko &
# Komodakis 2016, Table 1 (WRN-28-10 36.5M, WRN-16-4 2.7M); Han et al. 2017, Table 4 (PyramidNet-110, alpha=270, basic
# blocks, 28.3M). Tolerances: the papers round to 0.1M (0.05M); PyramidNet's 28.3M is 0.185M (0.65%) below its
# authors' own PyTorch code, which the exact count follows, so 1% there.
PARAMETER_COUNTS = {
    ("cifar_resnet18", ()): (11_173_962, 11.2e6, 0.05e6, 512),
    ("cifar_wrn28_10", ()): (36_479_194, 36.5e6, 0.05e6, 640),
    ("cifar_wrn28_10", (("depth", 16), ("widen_factor", 4))): (2_748_890, 2.7e6, 0.05e6, 256),
    ("cifar_pyramidnet110_a270", ()): (28_485_477, 28.3e6, 0.283e6, 286),
    ("cifar_pyramidnet110_a270", (("alpha", 48),)): (1_772_706, None, None, 64),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(in_chans, side, b=2, seed=0):
    return torch.randn(b, in_chans, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built():
    """(architecture, in_chans) -> (create_model(...) with 10 labels, timm.create_model(...) from the same seed)."""
    cache = {}

    def build(name, in_chans=3):
        if (name, in_chans) not in cache:
            torch.manual_seed(0)
            wrapped = create_model(name, num_labels=10, in_chans=in_chans)
            torch.manual_seed(0)
            cache[name, in_chans] = wrapped, timm.create_model(name, num_classes=10, in_chans=in_chans)
        return cache[name, in_chans]

    return build


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_in_timm_without_weights(name):
    assert timm.is_model(name)
    cfg = timm.get_pretrained_cfg(name)
    assert not cfg.has_weights
    assert cfg.num_classes == 10 and cfg.input_size == (3, 32, 32)
    assert len(cfg.mean) == len(cfg.std) == 3


@pytest.mark.parametrize("name,in_chans,side", CASES)
def test_create_model_wraps_the_timm_model_with_its_initialisation(built, name, in_chans, side):
    wrapped, plain = built(name, in_chans)
    assert isinstance(wrapped, TimmWrapperForImageClassification)
    assert type(wrapped.timm_model) is type(plain)
    # Same seed, same weights: transformers' generic initialisation (N(0, 0.02) everywhere) did not replace timm's.
    wrapped_state, plain_state = wrapped.timm_model.state_dict(), plain.state_dict()
    assert wrapped_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(wrapped_state[key], value), key


@pytest.mark.parametrize("name,in_chans,side", CASES)
def test_forward_and_backward(built, name, in_chans, side):
    model, plain = built(name, in_chans)
    x, labels = images(in_chans, side), torch.tensor([3, 7])
    out = model.train()(pixel_values=x, labels=labels)
    assert out.logits.shape == (2, 10)
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        assert torch.equal(plain.train()(x), out.logits)  # the model timm.create_model builds computes the same
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), param_name
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name,model_args", list(PARAMETER_COUNTS))
def test_parameter_counts_match_the_references(built, name, model_args):
    reference, paper, tolerance, num_features = PARAMETER_COUNTS[name, model_args]
    model = timm.create_model(name, num_classes=10, **dict(model_args)) if model_args else built(name)[1]
    assert n_params(model) == reference
    if paper is not None:
        assert abs(n_params(model) - paper) <= tolerance
    assert model.num_features == num_features


def test_small_cnn_size():
    counts = {in_chans: n_params(timm.create_model("small_cnn", in_chans=in_chans)) for in_chans in (1, 3)}
    assert 10_000 <= counts[1] < counts[3] <= 50_000
    # conv3x3 without bias, BN (weight, bias) and the 64 -> 10 classifier, widths (16, 32, 64)
    assert counts[1] == 9 * (1 * 16 + 16 * 32 + 32 * 64) + 2 * (16 + 32 + 64) + 64 * 10 + 10


@pytest.mark.parametrize(
    "name,feature_side", [("cifar_resnet18", 4), ("cifar_wrn28_10", 8), ("cifar_pyramidnet110_a270", 8)]
)
def test_timm_interface(built, name, feature_side):
    model = built(name)[1].eval()
    x = images(3, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, feature_side, feature_side)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert model.forward_head(features).shape == (2, 10)
    assert model.get_classifier().weight.shape[0] == 10
    model.train()


def test_reset_classifier_and_grad_checkpointing_of_the_base_class():
    model = timm.create_model("small_cnn", in_chans=1).eval()
    x = images(1, 8)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (2, 5)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)

    torch.manual_seed(0)
    wrapped = create_model("small_cnn", num_labels=3, in_chans=1)
    x, labels = images(1, 8, b=4), torch.tensor([0, 1, 2, 0])

    def grads():
        wrapped.zero_grad(set_to_none=True)
        wrapped(pixel_values=x, labels=labels).loss.backward()
        return [p.grad.clone() for p in wrapped.parameters()]

    plain = grads()
    wrapped.activation_checkpointing_enable()
    assert wrapped.timm_model.grad_checkpointing
    # The checkpointed stages recompute the same operations on the same inputs: identical gradients on a CPU.
    for a, b in zip(grads(), plain):
        assert torch.equal(a, b)


def test_wide_resnet_block_dropout():
    x = images(3, 32)
    for rate, dropouts in ((0.5, 3), (0.0, 0)):  # WRN-10-1: one block per stage
        model = timm.create_model("cifar_wrn28_10", depth=10, widen_factor=1, block_drop_rate=rate)
        assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules()) == dropouts
        with torch.no_grad():
            assert torch.equal(model(x), model(x)) == (rate == 0)
            model.eval()
            assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("side", [15, 17])
def test_pyramidnet_odd_input_sizes(side):
    model = timm.create_model("cifar_pyramidnet110_a270", depth=20, alpha=12, num_classes=4)
    assert model.num_features == 28
    assert model(images(3, side)).shape == (2, 4)


def test_labels_and_invalid_arguments():
    model = create_model("small_cnn", num_labels=2, label2id={"cat": 1, "dog": 0})
    assert model.config.id2label == {0: "dog", 1: "cat"} and model.config.label2id == {"dog": 0, "cat": 1}
    assert model.config.problem_type is None  # the loss follows the labels, as in transformers
    with pytest.raises(ValueError, match="6n \\+ 4"):
        timm.create_model("cifar_wrn28_10", depth=27)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        timm.create_model("cifar_pyramidnet110_a270", depth=111)
    with pytest.raises(ValueError, match="timm architecture"):
        create_model("cifar_resnet19", num_labels=10)
    with pytest.raises(ValueError, match="id2label"):
        create_model("small_cnn", num_labels=3, id2label={0: "a", 1: "b", 3: "c"})
    with pytest.raises(ValueError, match="id2label"):
        create_model("small_cnn", num_labels=2, id2label={0: "a", 1: "a"})
    with pytest.raises(ValueError, match="label2id"):
        create_model("small_cnn", num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0})


@pytest.mark.parametrize(
    "name,kwargs,side",
    [
        ("small_cnn", dict(in_chans=1, image_size=8, drop_rate=0.1, widths=[8, 16]), 8),
        ("cifar_resnet18", dict(), 32),
    ],
)
def test_save_and_load_round_trip(tmp_path, name, kwargs, side):
    id2label = {1: "one", 0: "zero", 2: "two"}
    model = create_model(name, num_labels=3, id2label=id2label, **kwargs)
    in_chans = model.config.model_args["in_chans"]
    with torch.no_grad():
        model(pixel_values=images(in_chans, side, b=4, seed=1))  # moves the BatchNorm running statistics
    model.eval()
    x = images(in_chans, side, seed=2)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert loaded.config.architecture == name
    assert loaded.config.model_args == model.config.model_args
    assert loaded.config.id2label == {0: "zero", 1: "one", 2: "two"}
    assert loaded.config.label2id == {"zero": 0, "one": 1, "two": 2}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixel_values=x).logits, logits)

    # the image processor comes from the same config.json: image_size and in_chans decide its output
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    gray = Image.new("L" if in_chans == 1 else "RGB", (2 * side, 2 * side), color=128 if in_chans == 1 else (128,) * 3)
    pixel_values = processor(gray)["pixel_values"]
    assert pixel_values.shape == (1, in_chans, side, side)
    mean, std = (0.5,), (0.5,)  # small_cnn's
    if name == "cifar_resnet18":
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the CIFAR-10 statistics
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    # a uniform image stays uniform through resizing; float32 rounding of the normalisation is ~1e-7
    torch.testing.assert_close(pixel_values[0].mean((1, 2)), expected, rtol=0, atol=1e-5)

    # AutoModel gives the headless TimmWrapperModel, whose pooled output is the classifier's input
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        features = model.timm_model.forward_head(model.timm_model.forward_features(x), pre_logits=True)
        assert torch.equal(backbone(pixel_values=x).pooler_output, features)


@pytest.mark.slow  # a fresh interpreter imports timm and transformers
def test_import_hf_rwsam_is_what_registers_the_architectures(tmp_path):
    create_model("small_cnn", num_labels=2, in_chans=1).save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoModelForImageClassification

        try:
            AutoModelForImageClassification.from_pretrained(sys.argv[1])
            before = "loaded"
        except Exception as error:
            before = f"{type(error).__name__}: {error}"
        import hf_rwsam

        model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
        print(json.dumps({"before": before, "after": type(model.timm_model).__name__}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, check=True
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["before"] != "loaded" and "small_cnn" in outcome["before"], outcome
    assert outcome["after"] == "SmallCnn", outcome


def test_timm_builtin_architecture_offline():
    model = create_model("resnet18", num_labels=10)
    assert type(model.timm_model).__name__ == "ResNet"
    assert model.config.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model(pixel_values=images(3, 32)).logits.shape == (2, 10)
    resized = create_model("resnet18", num_labels=10, image_size=(64, 48), in_chans=1)
    assert resized.config.pretrained_cfg["input_size"] == (1, 64, 48)
    assert len(resized.config.pretrained_cfg["mean"]) == 1


def test_rwsam_trainer_trains_the_wrapped_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_labels=3, in_chans=1, image_size=8)
    pixels, labels = make_images(n=16, size=8, num_classes=3, seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = RWSAMTrainer(
        model=model,
        args=sgd_config(tmp_path, sam_mode="rwsam", max_steps=2, per_device_train_batch_size=8),
        train_dataset=tensor_dataset(pixels, labels, input_name="pixel_values"),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["rwsam/ess"]) and entry["rwsam/ess"] > 0
    state = model.state_dict()
    assert all(torch.isfinite(value.float()).all() for value in state.values())
    for key in ("timm_model.stem.conv.weight", "timm_model.head.fc.weight", "timm_model.stem.bn.running_mean"):
        assert not torch.equal(state[key], start[key]), f"{key} did not move"


def test_small_cnn_gn_normalises_with_groupnorm_only():
    """`small_cnn_gn` is the small CNN with GroupNorm in place of every BatchNorm (so its samples do not interact),
    with the same parameter count (GroupNorm's affine weights match BatchNorm's)."""
    gn, bn = timm.create_model("small_cnn_gn", in_chans=1), timm.create_model("small_cnn", in_chans=1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in gn.modules()) == 3
    assert n_params(gn) == n_params(bn)
    with pytest.raises(ValueError, match="norm='layer'.*'batch' or 'group'"):
        timm.create_model("small_cnn", norm="layer")
