#!/usr/bin/env python
"""m-sharpness on real data: clean-test accuracy of m-SAM against the micro-batch size m, over several seeds.

    python experiments/msharpness.py                      # digits, small CNN, b = 64, m in {64, 32, 16, 8, 4}, 5 seeds
    python experiments/msharpness.py --dataset cifar10 --model cifar_resnet18 --batch_size 128 --epochs 200 ...

m = b is SAM. Each run trains from a fresh seed (weights and data order; the train/test split is fixed) on the first
multiple-of-b training samples (every batch must split into groups of m), then evaluates on the clean test split. Writes experiments/results/msharpness_<dataset>.json, a PNG of accuracy against m
(mean +- std) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from train_image_classification import DataArguments, ModelArguments, build_datasets, image_classification_trainer  # noqa: E402

from hf_rwsam import RWSAMConfig  # noqa: E402
from hf_rwsam.models import create_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(args, m: int, seed: int, train_ds, test_ds, class_names) -> float:
    set_seed(seed)
    model = create_model(args.model, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                         image_size=args.image_size, in_chans=args.num_channels)
    with tempfile.TemporaryDirectory() as out:
        config = RWSAMConfig(
            output_dir=out, sam_mode="sam" if m == args.batch_size else "msam",
            msam_micro_batch_size=None if m == args.batch_size else m, sam_rho=args.rho, seed=seed,
            num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=512,
            learning_rate=args.lr, lr_scheduler_type="cosine", optim="sgd", optim_args="momentum=0.9",
            weight_decay=args.weight_decay, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=args.cpu,
        )
        trainer = image_classification_trainer(model, config, train_ds, test_ds, args.dataset)
        trainer.train()
        return trainer.evaluate()["eval_accuracy"]


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted(summary, key=int)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    ax.errorbar([int(m) for m in ms], [summary[m]["mean"] for m in ms], yerr=[summary[m]["std"] for m in ms],
                marker="o", capsize=4)
    ax.set(xscale="log", xlabel="m (micro-batch size of the perturbation; m = b is SAM)",
           ylabel="clean test accuracy")
    ax.set_title(title, fontsize="medium")
    ax.minorticks_off()
    ax.set_xticks([int(m) for m in ms], [str(m) for m in ms])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--num_channels", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--divisors", default="1,2,4,8,16", help="m = batch_size / divisor")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--noise_type", default=None)
    parser.add_argument("--noise_rate", type=float, default=None)
    parser.add_argument("--cpu", action="store_true", default=True)
    args = parser.parse_args()
    logging.set_verbosity_error()
    data_args = DataArguments(dataset=args.dataset, dataset_path=args.dataset_path, noise_type=args.noise_type,
                              noise_rate=args.noise_rate)
    model_args = ModelArguments(model=args.model, image_size=args.image_size, num_channels=args.num_channels)
    train_ds, test_ds, class_names, _ = build_datasets(data_args, model_args, seed=0)
    # every batch must split into groups of m: keep a multiple of the batch size (digits: 1408 of 1437 samples)
    train_ds = train_ds.select(range(len(train_ds) - len(train_ds) % args.batch_size))
    ms = [args.batch_size // int(d) for d in args.divisors.split(",")]
    accuracies = {m: [] for m in ms}
    for seed in range(args.seeds):
        for m in ms:
            start = time.perf_counter()
            accuracies[m].append(run(args, m, seed, train_ds, test_ds, class_names))
            print(f"seed {seed} m={m:<4d} accuracy {accuracies[m][-1]:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    summary = {
        str(m): {"mean": statistics.mean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0, "runs": a}
        for m, a in accuracies.items()
    }
    noise = f", {args.noise_type} noise {args.noise_rate}" if args.noise_type else ""
    tag = f"{args.dataset}" + (f"_{args.noise_type}{args.noise_rate}" if args.noise_type else "")
    RESULTS.mkdir(exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "settings": vars(args), "accuracy": summary}
    (RESULTS / f"msharpness_{tag}.json").write_text(json.dumps(record, indent=2))
    plot(summary, RESULTS / f"msharpness_{tag}.png",
         f"m-sharpness: {args.model} on {args.dataset}{noise}, b={args.batch_size}, {args.seeds} seeds")
    print(f"\n| m | test accuracy (mean +- std over {args.seeds} seeds) |\n|---|---|")
    for m in ms:
        print(f"| {m}{' (SAM)' if m == args.batch_size else ''} | {summary[str(m)]['mean']:.4f} +- "
              f"{summary[str(m)]['std']:.4f} |")


if __name__ == "__main__":
    main()
