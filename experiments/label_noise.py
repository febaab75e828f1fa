#!/usr/bin/env python
"""Label noise: SGD, SAM, RW-SAM (fd Q=1, fd Q=4, exact) and m-SAM against the symmetric noise rate, over seeds.

    python experiments/label_noise.py                 # digits, small CNN, b = 64, noise 0/0.2/0.4/0.6/0.8, 5 seeds
    python experiments/label_noise.py --dataset cifar10 --model cifar_resnet18 --image_size 32 --num_channels 3 \\
        --batch_size 128 --epochs 200 --workers 1 --threads 16 --no-cpu

Every run reports the accuracy on the clean test split; RW-SAM runs also report the share of the Gibbs weight that
falls on samples whose label was corrupted (`rwsam/noisy_weight_mass`, averaged over training; uniform weights, that
is SAM, give the noise rate itself). At noise 0, every run also reports tr(V) and tr(H) of the training loss at the
end (the paper's CIFAR ordering: tr(V) SGD 572 > SAM 198 > RW-SAM 178). Writes
experiments/results/label_noise_<dataset>.json and .png, and prints markdown tables.
"""

from __future__ import annotations

import argparse

from common import RunSpec, add_common_arguments, finished_or_new, group, save_record


def methods(batch_size: int, msam_divisor: int) -> dict[str, dict]:
    return {
        "SGD": {"sam_mode": "none"},
        "SAM": {"sam_mode": "sam"},
        "RW-SAM fd Q=1": {"sam_mode": "rwsam", "rwsam_estimator": "fd", "rwsam_num_probes": 1},
        "RW-SAM fd Q=4": {"sam_mode": "rwsam", "rwsam_estimator": "fd", "rwsam_num_probes": 4},
        "RW-SAM exact": {"sam_mode": "rwsam", "rwsam_estimator": "exact"},
        f"m-SAM m={batch_size // msam_divisor}": {"sam_mode": "msam",
                                                  "msam_micro_batch_size": batch_size // msam_divisor},
    }


def noise_rates(args) -> list[float]:
    return [float(r) for r in args.noise_rates.split(",")]


def specs(args) -> list[RunSpec]:
    chosen = methods(args.batch_size, args.msam_divisor)
    if args.methods:
        chosen = {label: chosen[label] for label in args.methods.split(",")}
    return [RunSpec(label, seed, method, rate, diagnostics=rate == 0)
            for rate in noise_rates(args) for seed in range(args.seeds) for label, method in chosen.items()]


def table(summary: dict, labels: list[str], rates: list[float], scale: float = 100.0, digits: int = 2) -> str:
    lines = ["| method | " + " | ".join(f"{r:.0%} noise" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for label in labels:
        cells = [f"{scale * summary[(label, r)]['mean']:.{digits}f} +- {scale * summary[(label, r)]['std']:.{digits}f}"
                 if (label, r) in summary else "" for r in rates]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(accuracy: dict, mass: dict, labels: list[str], rates: list[float], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, label in enumerate(labels):
        points = [(r, accuracy[(label, r)]) for r in rates if (label, r) in accuracy]
        left.errorbar([100 * r for r, _ in points], [100 * s["mean"] for _, s in points],
                      yerr=[100 * s["std"] for _, s in points], marker="o", capsize=3, label=label, color=f"C{i}")
        points = [(r, mass[(label, r)]) for r in rates if (label, r) in mass]
        if points:
            right.errorbar([100 * r for r, _ in points], [100 * s["mean"] for _, s in points],
                           yerr=[100 * s["std"] for _, s in points], marker="o", capsize=3, label=label,
                           color=f"C{i}")
    left.set(xlabel="symmetric label noise (%)", ylabel="clean test accuracy (%)", title="accuracy")
    left.legend(fontsize="small")
    noisy_rates = [100 * r for r in rates if r > 0]
    right.plot(noisy_rates, noisy_rates, "k--", lw=1, label="uniform weights (SAM)")
    right.set(xlabel="symmetric label noise (%)", ylabel="Gibbs weight on noisy samples (%)",
              title="RW-SAM weight mass on corrupted labels")
    right.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--noise_rates", default="0,0.2,0.4,0.6,0.8")
    parser.add_argument("--msam_divisor", type=int, default=4, help="m-SAM's m = batch_size / msam_divisor")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the method labels")
    args, record = finished_or_new(parser.parse_args(), specs)
    results, rates = record["runs"], noise_rates(args)
    labels = list(dict.fromkeys(result["label"] for result in results))
    accuracy = group(results, "accuracy", "label", "noise_rate")
    mass = group(results, "rwsam/noisy_weight_mass", "label", "noise_rate")
    tag = args.dataset
    plot(accuracy, mass, labels, rates, save_record(args, f"label_noise_{tag}", record),
         f"{args.model} on {args.dataset}, b={args.batch_size}, rho={args.rho}, {args.seeds} seeds")
    print(f"\nClean test accuracy (%), mean +- std over {args.seeds} seeds\n")
    print(table(accuracy, labels, rates))
    print("\nRW-SAM Gibbs weight on noisy samples (%), mean over training\n")
    print(table(mass, [label for label in labels if any(key[0] == label for key in mass)],
                [r for r in rates if r > 0]))
    curvature = {name: group(results, name, "label") for name in ("trace_V", "trace_H")}
    if curvature["trace_V"]:
        print("\nAt the end of training, noise 0: tr(V) and tr(H) of the training loss\n")
        print("| method | tr(V) | tr(H) |\n|---|---|---|")
        for label in labels:
            v, h = curvature["trace_V"][(label,)], curvature["trace_H"][(label,)]
            print(f"| {label} | {v['mean']:.3g} +- {v['std']:.2g} | {h['mean']:.3g} +- {h['std']:.2g} |")


if __name__ == "__main__":
    main()
