#!/usr/bin/env python
"""m-sharpness on real data: clean-test accuracy of m-SAM against the micro-batch size m, rho tuned per m on
validation data, over seeds, on clean labels and under label noise.

    python experiments/msharpness.py                # digits, small CNN (BatchNorm), b = 64, m in {64 ... 4}, 5 seeds
    python experiments/msharpness.py --dataset cifar10 --model cifar_resnet18 --batch_size 128 --epochs 200 ...

m = b is SAM. Every m gets its own rho, chosen per noise rate on a validation split carved from the (noisy) training
split (common.py): the perturbation of a group of m samples comes from a noisier gradient, and the m-sharpness papers
tune rho per m. Then 5 fresh seeds train at the chosen values; each reports the clean-test accuracy of the final model
and of the epoch best on the noisy validation split. Writes experiments/results/msharpness_<dataset>.json, a PNG of
accuracy against m and prints markdown tables.
"""

from __future__ import annotations

import argparse

from common import Tuned, add_common_arguments, chosen_values, finished_or_new, group, save_record, tune_and_run


def sizes(args) -> list[int]:
    return [args.batch_size // int(d) for d in args.divisors.split(",")]


def noise_rates(args) -> list[float]:
    return [float(r) for r in args.noise_rates.split(",")]


def methods(args) -> list[Tuned]:
    rho = ("sam_rho", [float(x) for x in args.rhos.split(",")])
    return [Tuned(f"m={m}", {"sam_mode": "sam", "sam_rho": args.rho} if m == args.batch_size else
                  {"sam_mode": "msam", "sam_rho": args.rho, "msam_micro_batch_size": m,
                   "msam_implementation": "loop"}, (rho,))
            for m in sizes(args)]


def experiment(args) -> dict:
    return tune_and_run(args, methods(args), noise_rates(args))


def plot(summaries: dict, ms: list[int], rates: list[float], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4), constrained_layout=True)
    for i, rate in enumerate(rates):
        for (name, summary), style in zip(summaries.items(), ("-", ":")):
            points = [summary[(f"m={m}", rate)] for m in ms]
            ax.errorbar(ms, [100 * s["mean"] for s in points], yerr=[100 * s["std"] for s in points], marker="o",
                        capsize=3, ls=style, color=f"C{i}", label=f"{rate:.0%} noise, {name}")
    ax.set(xscale="log", xlabel="m (micro-batch size of the perturbation; m = b is SAM)",
           ylabel="clean test accuracy (%)")
    ax.minorticks_off()
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.legend(fontsize="small")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--divisors", default="1,2,4,8,16", help="m = batch_size / divisor")
    parser.add_argument("--noise_rates", default="0,0.4")
    args, record = finished_or_new(parser.parse_args(), experiment)
    ms, rates = sizes(args), noise_rates(args)
    summaries = {"final model": group(record["runs"], "accuracy", "label", "noise_rate"),
                 "epoch best on validation": group(record["runs"], "accuracy_best_val", "label", "noise_rate")}
    plot(summaries, ms, rates, save_record(args, f"msharpness_{args.dataset}", record),
         f"m-sharpness: {args.model} on {args.dataset}, b={args.batch_size}, rho tuned per m, {args.seeds} seeds")
    for rate in rates:
        print(f"\n{rate:.0%} {args.noise_type} noise: clean test accuracy (%), mean +- std over {args.seeds} seeds\n")
        print("| m | final model | epoch best on validation | chosen rho |\n|---|---|---|---|")
        for m in ms:
            final, best = (summaries[name][(f"m={m}", rate)] for name in summaries)
            print(f"| {m}{' (SAM)' if m == args.batch_size else ''} | {100 * final['mean']:.2f} +- "
                  f"{100 * final['std']:.2f} | {100 * best['mean']:.2f} +- {100 * best['std']:.2f} | "
                  f"{chosen_values(record, f'm={m}', rate)} |")


if __name__ == "__main__":
    main()
