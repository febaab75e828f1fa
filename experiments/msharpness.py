#!/usr/bin/env python
"""m-sharpness on real data: clean-test accuracy of m-SAM against the micro-batch size m, over several seeds.

    python experiments/msharpness.py                      # digits, small CNN, b = 64, m in {64, 32, 16, 8, 4}, 5 seeds
    python experiments/msharpness.py --dataset cifar10 --model cifar_resnet18 --batch_size 128 --epochs 200 ...

m = b is SAM. Each run trains from a fresh seed (weights and data order; the train/test split is fixed) on the first
multiple-of-b training samples (every batch must split into groups of m; see common.py), then evaluates on the clean
test split. Writes experiments/results/msharpness_<dataset>.json, a PNG of accuracy against m (mean +- std) and
prints a markdown table.
"""

from __future__ import annotations

import argparse

from common import RunSpec, add_common_arguments, finished_or_new, group, save_record


def plot(summary: dict, path, title: str) -> None:
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


def divisor_sizes(args) -> list[int]:
    return [args.batch_size // int(d) for d in args.divisors.split(",")]


def specs(args) -> list[RunSpec]:
    return [
        RunSpec(f"m={m}", seed, {"sam_mode": "sam"} if m == args.batch_size else
                {"sam_mode": "msam", "msam_micro_batch_size": m}, args.noise_rate)
        for seed in range(args.seeds) for m in divisor_sizes(args)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--divisors", default="1,2,4,8,16", help="m = batch_size / divisor")
    parser.add_argument("--noise_rate", type=float, default=0.0)
    args, record = finished_or_new(parser.parse_args(), specs)
    ms = divisor_sizes(args)
    summary = {key[0].removeprefix("m="): value for key, value in group(record["runs"], "accuracy", "label").items()}
    record["accuracy"] = summary
    noise = f", {args.noise_type} noise {args.noise_rate}" if args.noise_rate else ""
    tag = f"{args.dataset}" + (f"_{args.noise_type}{args.noise_rate}" if args.noise_rate else "")
    plot(summary, save_record(args, f"msharpness_{tag}", record),
         f"m-sharpness: {args.model} on {args.dataset}{noise}, b={args.batch_size}, {args.seeds} seeds")
    print(f"\n| m | test accuracy (mean +- std over {args.seeds} seeds) |\n|---|---|")
    for m in ms:
        print(f"| {m}{' (SAM)' if m == args.batch_size else ''} | {summary[str(m)]['mean']:.4f} +- "
              f"{summary[str(m)]['std']:.4f} |")


if __name__ == "__main__":
    main()
