"""The example scripts, run as a user runs them: `python examples/SCRIPT ...` in a subprocess, offline, on tiny local
data for a couple of steps; then their outputs are read back and checked against values recomputed here.

The inputs stand in for the Hub's: a tiny ViT saved in timm's Hub format (as `timm/vit_base_patch16_224.*` is), a
CIFAR-10 copy in `uoft-cs/cifar10`'s schema, a tiny BERT with a WordPiece tokenizer, and GLUE copies in `nyu-mll/glue`'s
schema. The runs the selected tests need (and the main script's failing invocations) start together, two at a time,
when the first of them is asked for: the scripts spend most of their time importing, so this halves the wall time on 2
cores. The other scripts' errors, which end the same way (`sys.exit(f"error: {err}")`), are checked in-process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from safetensors.torch import load_file
from timm.models import save_for_hf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
)

import hf_rwsam  # noqa: F401  (registers small_cnn in timm, for loading the saved checkpoint back)
from hf_rwsam.data import collate_images, load_image_dataset, prepare_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SUBPROCESS_TIMEOUT = 300
PARALLEL_RUNS = 2

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VIT_PRETRAINED_CLASSES = 7  # the checkpoint's own head, which fine-tuning replaces by a 10-class one
VIT_MEAN = VIT_STD = 0.5  # the normalisation in the checkpoint's pretrained_cfg (timm's augreg ViTs')

SST2_ROWS = [
    ("a gripping , funny and moving film", 1), ("dull , lifeless and far too long", 0),
    ("the cast is wonderful", 1), ("i hated every minute of it", 0), ("a warm story with great acting", 1),
    ("a boring mess", 0), ("smart writing and a lovely score", 1), ("flat jokes and a tired plot", 0),
]
MRPC_ROWS = [
    ("the company said profits rose", "profits rose , the company said", 1),
    ("he left the city on monday", "he arrived in the city on friday", 0),
    ("shares fell sharply today", "stock prices dropped a lot today", 1),
    ("the vote was delayed", "the meeting ended early", 0),
    ("rain is expected tomorrow", "tomorrow it will probably rain", 1),
    ("the team won the final", "the team lost the opening match", 0),
]

COMMON = ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
          "--eval_strategy", "steps", "--eval_steps", "1", "--dataloader_num_workers", "0", "--seed", "0"]


# ------------------------------------------------------------------------------------------------------ tiny inputs


def save_tiny_vit(directory: Path) -> Path:
    """A 2-block ViT on 32 x 32 inputs (patches of 8) with a 7-class head, saved by timm in its Hub format."""
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=VIT_PRETRAINED_CLASSES, img_size=32, patch_size=8, depth=2
    )
    save_for_hf(model, str(directory), safe_serialization=True, data_config={"input_size": (3, 32, 32)})
    config = json.loads((directory / "config.json").read_text())
    # timm 1.0.31 also records num_classes in model_args, which the Hub checkpoints do not have and TimmWrapper (which
    # passes num_labels itself) rejects
    config["model_args"].pop("num_classes", None)
    (directory / "config.json").write_text(json.dumps(config))
    assert config["pretrained_cfg"]["mean"] == [VIT_MEAN] * 3 and config["pretrained_cfg"]["std"] == [VIT_STD] * 3
    return directory


def save_cifar10_copy(directory: Path) -> Path:
    """16 train / 8 test random 32 x 32 images in `uoft-cs/cifar10`'s schema, written by `save_to_disk`."""
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_NAMES)})
    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return Dataset.from_dict({"img": list(images), "label": rng.integers(0, 10, n).tolist()}, features=features)

    DatasetDict(train=split(16), test=split(8)).save_to_disk(str(directory))
    return directory


def save_tiny_bert(directory: Path, sentences: list[str]) -> Path:
    """A 1-layer BERT encoder (no classifier, like bert-base-cased) and a WordPiece tokenizer over `sentences`."""
    words = sorted({word for sentence in sentences for word in re.findall(r"\w+|[^\w\s]", sentence.lower())})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    return directory


def save_sst2_copy(directory: Path) -> Path:
    """`nyu-mll/glue` sst2's schema (sentence, label ClassLabel, idx; test labels -1), written by `save_to_disk`."""
    features = Features(
        {"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]), "idx": Value("int32")}
    )

    def split(rows, labelled=True):
        return Dataset.from_dict(
            {"sentence": [s for s, _ in rows], "label": [y if labelled else -1 for _, y in rows],
             "idx": list(range(len(rows)))},
            features=features,
        )

    splits = DatasetDict(train=split(SST2_ROWS * 2), validation=split(SST2_ROWS[1:6]), test=split(SST2_ROWS[:2], False))
    splits.save_to_disk(str(directory))
    return directory


def save_stsb_copy(directory: Path) -> Path:
    """`nyu-mll/glue` stsb's schema: a sentence pair and a float similarity score."""
    features = Features({"sentence1": Value("string"), "sentence2": Value("string"), "label": Value("float32"),
                         "idx": Value("int32")})
    pairs = [(a, b) for a, b, _ in MRPC_ROWS]
    split = Dataset.from_dict(
        {"sentence1": [a for a, _ in pairs], "sentence2": [b for _, b in pairs],
         "label": [4.2, 0.5, 3.8, 1.0, 4.6, 0.8], "idx": list(range(len(pairs)))},
        features=features,
    )
    DatasetDict(train=split, validation=split).save_to_disk(str(directory))
    return directory


def save_glue_repo_with_mrpc_csv(directory: Path) -> Path:
    """A copy laid out like the whole `nyu-mll/glue` repository (one folder per task) whose mrpc files are csv, so the
    labels are bare integers, as in any csv export."""
    (directory / "mrpc").mkdir(parents=True)
    splits = {"train": MRPC_ROWS * 2, "validation": MRPC_ROWS[:5], "test": [(a, b, -1) for a, b, _ in MRPC_ROWS[:2]]}
    for split, rows in splits.items():
        Dataset.from_dict(
            {"sentence1": [a for a, _, _ in rows], "sentence2": [b for _, b, _ in rows],
             "label": [y for _, _, y in rows], "idx": list(range(len(rows)))}
        ).to_csv(str(directory / "mrpc" / f"{split}.csv"), index=False)
    return directory


# ------------------------------------------------------------------------------------------------------------ runs


def script_env(home: Path) -> dict[str, str]:
    """Offline, with an empty Hugging Face cache of its own (so nothing comes from the machine's cache either)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE",
                        "TRANSFORMERS_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_DISABLED="true", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def run_script(script: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


FAILURES = {
    # name: (script, arguments, what the one-line error must say)
    "bad_value": ("train_image_classification.py", ["--sam_mode", "bogus"], ["sam_mode", "bogus"]),
    "unknown_flag": ("train_image_classification.py", ["--no_such_flag", "1"], ["--no_such_flag"]),
    "unreachable_cifar10": (
        "train_image_classification.py", ["--dataset", "cifar10"],
        ["'cifar10'", "uoft-cs/cifar10", "HF_DATASETS_OFFLINE", "hf download uoft-cs/cifar10", "save_to_disk"],
    ),
}


IN_PROCESS_FAILURES = {
    # name: (script, arguments, what the error must say); called in-process
    "unreachable_vit": (
        "finetune_vit", ["--dataset", "cifar10"],
        ["timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "HF_HUB_OFFLINE", "hf download", "--model_name_or_path"],
    ),
    "bad_vit_size": (
        "finetune_vit", ["--model_name_or_path", "{vit}", "--image_size", "48"], ["--image_size 48", "takes only 32"],
    ),
    "unreachable_glue": (
        "run_glue", ["--task_name", "rte", "--model_name_or_path", "{bert}"],
        ["'rte'", "nyu-mll/glue", "HF_DATASETS_OFFLINE", "save_to_disk", "--dataset_path"],
    ),
    "unknown_task": ("run_glue", ["--task_name", "sst3"], ["--task_name", "'sst3'", "sst2"]),
    "noise_on_regression": (
        "run_glue", ["--task_name", "stsb", "--dataset_path", "{stsb}", "--noise_type", "symmetric", "--noise_rate",
                     "0.2"],
        ["add_label_noise", "ClassLabel"],
    ),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("example_inputs")
    return {
        "root": root,
        "vit": save_tiny_vit(root / "tiny-vit"),
        "cifar10": save_cifar10_copy(root / "cifar10"),
        "bert": save_tiny_bert(root / "tiny-bert", [s for s, _ in SST2_ROWS] + [s for r in MRPC_ROWS for s in r[:2]]),
        "sst2": save_sst2_copy(root / "sst2"),
        "glue": save_glue_repo_with_mrpc_csv(root / "glue"),
        "stsb": save_stsb_copy(root / "stsb"),
    }


JOBS_OF_TESTS = {
    "test_image_classification_on_digits": ["image"],
    "test_finetune_vit_on_a_cifar10_copy": ["vit"],
    "test_run_glue_sst2_with_label_noise": ["sst2"],
    "test_run_glue_mrpc_from_csv_files": ["mrpc"],
}


def selected_jobs(session) -> set[str]:
    """The runs that the selected tests of this module read (all of them, unless -k / node ids narrow the session)."""
    jobs = set()
    for item in session.items:
        if item.module.__name__ == __name__:
            jobs.update(JOBS_OF_TESTS.get(item.originalname, []))
            if item.originalname == "test_failures_are_one_line_saying_what_to_do":
                jobs.add(item.callspec.params["name"])
    return jobs


@pytest.fixture(scope="module")
def runs(inputs, request):
    """The invocations the selected tests need, started together (two at a time): name -> future of
    (CompletedProcess, output_dir)."""
    root = inputs["root"]
    env = script_env(root / "hf_home")
    jobs = {
        "image": ("train_image_classification.py", [
            str(EXAMPLES / "configs" / "demo_digits.yaml"),  # `make demo`'s settings, made tiny by the flags after
            "--max_steps", "3", "--warmup_steps", "0", "--max_train_samples", "96", "--per_device_train_batch_size",
            "32", "--max_eval_samples", "40", "--per_device_eval_batch_size", "16", *COMMON,
        ]),
        "vit": ("finetune_vit.py", [
            "--model_name_or_path", str(inputs["vit"]), "--dataset", "cifar10",
            "--dataset_path", str(inputs["cifar10"]),
            "--sam_mode", "rwsam", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "5", "--optim", "sgd", "--learning_rate", "0.001", *COMMON,
        ]),
        "sst2": ("run_glue.py", [
            "--model_name_or_path", str(inputs["bert"]), "--task_name", "sst2", "--dataset_path", str(inputs["sst2"]),
            "--sam_mode", "rwsam", "--noise_type", "symmetric", "--noise_rate", "0.25", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
            *COMMON,
        ]),
        "mrpc": ("run_glue.py", [
            "--model_name_or_path", str(inputs["bert"]), "--task_name", "mrpc", "--dataset_path", str(inputs["glue"]),
            "--sam_mode", "sam", "--sam_adaptive", "true", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3", *COMMON,
        ]),
    }
    for name, (script, args, _) in FAILURES.items():
        jobs[name] = (script, [arg.format(**inputs) for arg in args])
    pool = ThreadPoolExecutor(max_workers=PARALLEL_RUNS)
    futures = {}
    needed = selected_jobs(request.session)
    for name, (script, args) in jobs.items():
        if name not in needed:
            continue
        cwd = root / f"run_{name}"
        cwd.mkdir()
        futures[name] = pool.submit(
            lambda s=script, a=args, c=cwd: (run_script(s, [*a, "--output_dir", "out"], c, env), c / "out")
        )
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def finished(runs, name) -> Path:
    """The run's output directory, once the script has exited 0."""
    result, out = runs[name].result()
    assert result.returncode == 0, f"{name} failed (exit {result.returncode}):\n{result.stderr[-6000:]}"
    return out


# ------------------------------------------------------------------------------------------------------------ checks


def check_outputs(out: Path, eval_keys: list[str]) -> dict:
    """The files every example writes, finite metrics in them; returns the eval results."""
    for name in ("config.json", "model.safetensors", "README.md", "all_results.json", "train_results.json",
                 "eval_results.json", "training_curves.png"):
        assert (out / name).is_file(), name
    train, evaluation, both = (json.loads((out / f"{s}_results.json").read_text()) for s in ("train", "eval", "all"))
    assert both == {**train, **evaluation}
    assert "train_loss" in train and set(eval_keys) <= set(evaluation), sorted(evaluation)
    for name, value in both.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)
    with PILImage.open(out / "training_curves.png") as plot:
        assert plot.format == "PNG" and min(plot.size) > 100
    return evaluation


def check_card(out: Path, sam_mode: str, dataset: str | None = None, tags=(), noise: bool = False) -> ModelCard:
    card = ModelCard.load(out / "README.md")
    assert f'sam_mode="{sam_mode}"' in card.text and card.data.library_name == "transformers"
    if dataset is not None:
        assert card.data.datasets == [dataset]
    assert set(tags) <= set(card.data.tags)
    assert ("Realised rate" in card.text) == noise
    return card


def loss_and_accuracy(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    labels = torch.tensor(labels)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).double().mean().item()


# ------------------------------------------------------------------------------------ train_image_classification.py


@pytest.mark.slow  # runs the example scripts end to end
def test_image_classification_on_digits(runs):
    out = finished(runs, "image")
    evaluation = check_outputs(out, ["eval_accuracy", "eval_loss"])
    card = check_card(out, "rwsam", noise=True)
    assert "Dataset: `digits`." in card.text and card.data.datasets is None  # named, but not a Hub dataset
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in log if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert all(0 <= entry["rwsam/noisy_weight_mass"] <= 1 for entry in steps)

    # the saved checkpoint is the evaluated model: loaded back, it gives the reported loss and accuracy
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == {i: str(i) for i in range(10)}
    test = load_image_dataset("digits")["test"].select(range(40))
    batch = collate_images(list(prepare_dataset(test, "digits", train=False, image_size=16, num_channels=1)))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    loss, accuracy = loss_and_accuracy(logits, test["label"][:])
    assert evaluation["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluation["eval_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow  # runs the example scripts end to end
@pytest.mark.parametrize("name", sorted(FAILURES))
def test_failures_are_one_line_saying_what_to_do(runs, name):
    result, out = runs[name].result()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for hint in FAILURES[name][2]:
        assert hint in lines[0], hint
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- finetune_vit.py


@pytest.mark.slow  # runs the example scripts end to end
def test_finetune_vit_on_a_cifar10_copy(runs, inputs):
    out = finished(runs, "vit")
    evaluation = check_outputs(out, ["eval_accuracy", "eval_loss"])
    check_card(out, "rwsam", "uoft-cs/cifar10")

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == dict(enumerate(CIFAR10_NAMES))
    # fine-tuned from the checkpoint: its weights, moved a little by 2 steps at lr 1e-3, and a new 10-class head
    pretrained = load_file(inputs["vit"] / "model.safetensors")
    tuned = model.timm_model.state_dict()
    assert tuned["head.weight"].shape == (10, 192) and pretrained["head.weight"].shape == (VIT_PRETRAINED_CLASSES, 192)
    body = [name for name in pretrained if not name.startswith("head.")]
    moved = sum((tuned[n] - pretrained[n]).pow(2).sum() for n in body) / sum(pretrained[n].pow(2).sum() for n in body)
    assert 0 < moved < 1e-3

    # evaluated at the model's resolution with the model's normalisation (mean = std = 0.5), not CIFAR's
    test = DatasetDict.load_from_disk(str(inputs["cifar10"]))["test"]
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in test["img"]])
    pixels = torch.from_numpy((pixels - VIT_MEAN) / VIT_STD).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    loss, accuracy = loss_and_accuracy(logits, test["label"][:])
    assert evaluation["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluation["eval_accuracy"] == pytest.approx(accuracy)


# -------------------------------------------------------------------------------------------------------- run_glue.py


def glue_logits(out: Path, pairs: list[tuple[str, ...]]) -> torch.Tensor:
    """Logits of the saved model and tokenizer, one example at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(*texts, return_tensors="pt")).logits for texts in pairs])


@pytest.mark.slow  # runs the example scripts end to end
def test_run_glue_sst2_with_label_noise(runs):
    out = finished(runs, "sst2")
    evaluation = check_outputs(out, ["eval_accuracy", "eval_loss"])
    check_card(out, "rwsam", "nyu-mll/glue", tags=["text-classification", "sst2"], noise=True)
    assert (out / "tokenizer.json").is_file()

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    validation = SST2_ROWS[1:6]
    logits = glue_logits(out, [(sentence,) for sentence, _ in validation])
    loss, accuracy = loss_and_accuracy(logits, [label for _, label in validation])
    assert evaluation["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluation["eval_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow  # runs the example scripts end to end
def test_run_glue_mrpc_from_csv_files(runs):
    out = finished(runs, "mrpc")
    evaluation = check_outputs(out, ["eval_accuracy", "eval_f1", "eval_loss"])
    check_card(out, "sam", "nyu-mll/glue", tags=["mrpc"])

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}  # the csv's integers, named as on the Hub
    validation = MRPC_ROWS[:5]
    logits = glue_logits(out, [(a, b) for a, b, _ in validation])
    labels = np.array([label for _, _, label in validation])
    loss, accuracy = loss_and_accuracy(logits, labels.tolist())
    predicted = logits.argmax(-1).numpy()
    tp, fp, fn = [int(np.sum((predicted == p) & (labels == y))) for p, y in ((1, 1), (1, 0), (0, 1))]
    assert evaluation["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluation["eval_accuracy"] == pytest.approx(accuracy)
    assert evaluation["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)


# ------------------------------------------------------------------------------------- errors and parts, in-process


@pytest.fixture(scope="module")
def scripts():
    """The example scripts as modules (run_glue imports finetune_vit, which imports train_image_classification)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import finetune_vit
        import run_glue
    finally:
        sys.path.remove(str(EXAMPLES))
    return {"finetune_vit": finetune_vit, "run_glue": run_glue}


@pytest.fixture(scope="module")
def run_glue(scripts):
    return scripts["run_glue"]


@pytest.mark.parametrize("name", sorted(IN_PROCESS_FAILURES))
def test_script_errors_say_what_to_do(scripts, inputs, tmp_path, name):
    script, args, hints = IN_PROCESS_FAILURES[name]
    if name.startswith("unreachable") and not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("would download from the Hub: needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)")
    with pytest.raises(SystemExit) as exit_info:
        scripts[script].main([*(arg.format(**inputs) for arg in args), "--output_dir", str(tmp_path / "out")])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for hint in hints:
        assert hint in message, hint
    assert not (tmp_path / "out").exists()


def test_glue_metrics(run_glue):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 2))
    labels = rng.integers(0, 2, 40)
    predicted = logits.argmax(-1)
    tp, tn, fp, fn = [int(np.sum((predicted == p) & (labels == y))) for p, y in ((1, 1), (0, 0), (1, 0), (0, 1))]

    cola = run_glue.glue_metrics("cola", logits, labels)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cola == pytest.approx({"accuracy": (tp + tn) / 40, "matthews_correlation": mcc})
    assert run_glue.glue_metrics("mrpc", logits, labels) == pytest.approx(
        {"accuracy": (tp + tn) / 40, "f1": 2 * tp / (2 * tp + fp + fn)}
    )
    assert set(run_glue.glue_metrics("rte", logits, labels)) == {"accuracy"}

    scores, targets = rng.normal(size=(30, 1)), rng.uniform(0, 5, 30)
    ranks = [np.argsort(np.argsort(v)) for v in (scores[:, 0], targets)]  # no ties
    stsb = run_glue.glue_metrics("stsb", scores, targets)
    assert stsb == pytest.approx(
        {"pearson": np.corrcoef(scores[:, 0], targets)[0, 1], "spearmanr": np.corrcoef(*ranks)[0, 1]}
    )


def test_glue_copy_in_the_hub_layout_keeps_mnli_splits_apart(run_glue, tmp_path, monkeypatch):
    """The repository's parquet files (``mnli/validation_matched-00000-of-00001.parquet``, ...): each file prefix is a
    split, and MNLI is evaluated on validation_matched."""
    names = ["entailment", "neutral", "contradiction"]
    features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                         "label": ClassLabel(names=names), "idx": Value("int32")})
    sizes = {"train": 6, "validation_matched": 3, "validation_mismatched": 2, "test_matched": 1}
    (tmp_path / "glue" / "mnli").mkdir(parents=True)
    for split, n in sizes.items():
        Dataset.from_dict(
            {"premise": [f"{split} p{i}" for i in range(n)], "hypothesis": ["h"] * n,
             "label": [i % 3 for i in range(n)], "idx": list(range(n))},
            features=features,
        ).to_parquet(str(tmp_path / "glue" / "mnli" / f"{split}-00000-of-00001.parquet"))

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")

    splits = run_glue.load_glue("mnli", str(tmp_path / "glue"))

    assert {split: len(ds) for split, ds in splits.items()} == sizes
    train, evaluation = run_glue.build_datasets(
        run_glue.DataArguments(task_name="mnli", dataset_path=str(tmp_path / "glue"))
    )
    assert evaluation["premise"][:] == [f"validation_matched p{i}" for i in range(3)]
    assert train.features["label"].names == names
