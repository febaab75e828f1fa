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
import json

from common import RESULTS, RunSpec, add_common_arguments, command_line, group, run_all


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--divisors", default="1,2,4,8,16", help="m = batch_size / divisor")
    parser.add_argument("--noise_rate", type=float, default=0.0)
    args = parser.parse_args()
    ms = [args.batch_size // int(d) for d in args.divisors.split(",")]
    specs = [
        RunSpec(f"m={m}", seed, {"sam_mode": "sam"} if m == args.batch_size else
                {"sam_mode": "msam", "msam_micro_batch_size": m}, args.noise_rate)
        for seed in range(args.seeds) for m in ms
    ]
    results = run_all(args, specs)
    summary = {key[0].removeprefix("m="): value for key, value in group(results, "accuracy", "label").items()}
    noise = f", {args.noise_type} noise {args.noise_rate}" if args.noise_rate else ""
    tag = f"{args.dataset}" + (f"_{args.noise_type}{args.noise_rate}" if args.noise_rate else "")
    RESULTS.mkdir(exist_ok=True)
    record = {"command": command_line(), "settings": vars(args), "accuracy": summary}
    (RESULTS / f"msharpness_{tag}.json").write_text(json.dumps(record, indent=2))
    plot(summary, RESULTS / f"msharpness_{tag}.png",
         f"m-sharpness: {args.model} on {args.dataset}{noise}, b={args.batch_size}, {args.seeds} seeds")
    print(f"\n| m | test accuracy (mean +- std over {args.seeds} seeds) |\n|---|---|")
    for m in ms:
        print(f"| {m}{' (SAM)' if m == args.batch_size else ''} | {summary[str(m)]['mean']:.4f} +- "
              f"{summary[str(m)]['std']:.4f} |")


if __name__ == "__main__":
    main()
