#!/usr/bin/env python
"""Label noise: SGD, SAM, RW-SAM (fd Q=1 and exact) and m-SAM against the symmetric noise rate, each tuned on
validation data, over seeds.

    python experiments/label_noise.py                 # digits, small CNN (BatchNorm), b = 64, noise 0-0.8, 5 seeds
    python experiments/label_noise.py --dataset cifar10 --model cifar_resnet18 --image_size 32 --num_channels 3 \\
        --batch_size 128 --epochs 200 --workers 1 --threads 16 --no-cpu

Every method's rho (and RW-SAM's lambda, then) is chosen per noise rate on a validation split carved from the noisy
training split (common.py), never on the test split; then 5 fresh seeds train at the chosen values. Every run reports
the clean-test accuracy of the final model and of the epoch best on the noisy validation split; RW-SAM runs also
report the share of the Gibbs weight that falls on samples whose label was corrupted (`rwsam/noisy_weight_mass`,
averaged over training; uniform weights, that is SAM, give the noise rate itself). At noise 0, every final run also
reports tr(V) and tr(H) of the training loss at the end (the paper's CIFAR ordering: tr(V) SGD 572 > SAM 198 > RW-SAM
178). Writes experiments/results/label_noise_<dataset>.json and .png, and prints markdown tables.
"""

from __future__ import annotations

import argparse

from common import Tuned, add_common_arguments, chosen_values, finished_or_new, group, save_record, tune_and_run


def grid(values: str) -> list[float]:
    return [float(x) for x in values.split(",")]


def methods(args) -> list[Tuned]:
    rho = ("sam_rho", grid(args.rhos))
    lam = ("rwsam_lambda", grid(args.lambdas))
    m = args.batch_size // args.msam_divisor
    rwsam = {"sam_mode": "rwsam", "sam_rho": args.rho, "rwsam_lambda": 1.0}
    every = [
        Tuned("SGD", {"sam_mode": "none"}),
        Tuned("SAM", {"sam_mode": "sam", "sam_rho": args.rho}, (rho,)),
        Tuned("RW-SAM fd Q=1", {**rwsam, "rwsam_estimator": "fd", "rwsam_num_probes": 1}, (rho, lam)),
        Tuned("RW-SAM exact", {**rwsam, "rwsam_estimator": "exact"}, (rho, lam)),
        Tuned(f"m-SAM m={m}", {"sam_mode": "msam", "sam_rho": args.rho, "msam_micro_batch_size": m,
                               "msam_implementation": "loop"}, (rho,)),
    ]
    if args.methods:
        wanted = args.methods.split(",")
        every = [t for t in every if t.label in wanted]
    return every


def noise_rates(args) -> list[float]:
    return [float(r) for r in args.noise_rates.split(",")]


def experiment(args) -> dict:
    return tune_and_run(args, methods(args), noise_rates(args), diagnostics=lambda rate: rate == 0)


def table(summary: dict, labels: list[str], rates: list[float], scale: float = 100.0, digits: int = 2) -> str:
    lines = ["| method | " + " | ".join(f"{r:.0%} noise" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for label in labels:
        cells = [f"{scale * summary[(label, r)]['mean']:.{digits}f} +- {scale * summary[(label, r)]['std']:.{digits}f}"
                 if (label, r) in summary else "" for r in rates]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chosen_table(record: dict, labels: list[str], rates: list[float]) -> str:
    lines = ["| method | " + " | ".join(f"{r:.0%} noise" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    for label in labels:
        if record["tuned"].get(label):
            lines.append(f"| {label} | " + " | ".join(chosen_values(record, label, r) for r in rates) + " |")
    return "\n".join(lines)


def plot(summaries: list[tuple[str, dict]], labels: list[str], rates: list[float], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5.2 * len(summaries), 4), constrained_layout=True)
    for ax, (name, summary) in zip(axes, summaries):
        for i, label in enumerate(labels):
            points = [(r, summary[(label, r)]) for r in rates if (label, r) in summary]
            if points:
                ax.errorbar([100 * r for r, _ in points], [100 * s["mean"] for _, s in points],
                            yerr=[100 * s["std"] for _, s in points], marker="o", capsize=3, label=label,
                            color=f"C{i}")
        ax.set(xlabel="symmetric label noise (%)", title=name)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("clean test accuracy (%)")
    noisy_rates = [100 * r for r in rates if r > 0]
    axes[-1].plot(noisy_rates, noisy_rates, "k--", lw=1, label="uniform weights (SAM)")
    axes[-1].set_ylabel("Gibbs weight on noisy samples (%)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--noise_rates", default="0,0.2,0.4,0.6,0.8")
    parser.add_argument("--lambdas", default="0.5,2,4", help="RW-SAM's lambda grid, searched at the chosen rho")
    parser.add_argument("--msam_divisor", type=int, default=4, help="m-SAM's m = batch_size / msam_divisor")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the method labels")
    args, record = finished_or_new(parser.parse_args(), experiment)
    results, rates = record["runs"], noise_rates(args)
    labels = list(dict.fromkeys(result["label"] for result in results))
    final = group(results, "accuracy", "label", "noise_rate")
    best_val = group(results, "accuracy_best_val", "label", "noise_rate")
    mass = group(results, "rwsam/noisy_weight_mass", "label", "noise_rate")
    plot([("final model", final), ("epoch best on the noisy validation split", best_val),
          ("RW-SAM weight on corrupted labels", mass)], labels, rates,
         save_record(args, f"label_noise_{args.dataset}", record),
         f"{args.model} on {args.dataset}, b={args.batch_size}, {args.epochs:g} epochs, rho (and lambda) tuned on "
         f"validation, {args.seeds} seeds")
    print(f"\nClean test accuracy (%) of the final model, mean +- std over {args.seeds} seeds\n")
    print(table(final, labels, rates))
    print("\nClean test accuracy (%) at the epoch best on the noisy validation split\n")
    print(table(best_val, labels, rates))
    print("\nChosen on the validation split\n")
    print(chosen_table(record, labels, rates))
    print("\nRW-SAM Gibbs weight on noisy samples (%), mean over training\n")
    print(table(mass, [label for label in labels if any(key[0] == label for key in mass)],
                [r for r in rates if r > 0]))
    ess = group(results, "rwsam/ess", "label", "noise_rate")
    if ess:
        print("\nRW-SAM effective sample size of the Gibbs weights (fraction of the batch), mean over training\n")
        print(table(ess, [label for label in labels if any(key[0] == label for key in ess)], rates, digits=3,
                    scale=1.0))
    curvature = {name: group(results, name, "label") for name in ("trace_V", "trace_H")}
    if curvature["trace_V"]:
        print("\nAt the end of training, noise 0: tr(V) and tr(H) of the training loss\n")
        print("| method | tr(V) | tr(H) |\n|---|---|---|")
        for label in labels:
            v, h = curvature["trace_V"][(label,)], curvature["trace_H"][(label,)]
            print(f"| {label} | {v['mean']:.3g} +- {v['std']:.2g} | {h['mean']:.3g} +- {h['std']:.2g} |")


if __name__ == "__main__":
    main()
