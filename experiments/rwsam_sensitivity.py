#!/usr/bin/env python
"""RW-SAM's temperature: clean-test accuracy against a fixed lambda and against `rwsam_target_ess`, over seeds.

    python experiments/rwsam_sensitivity.py     # digits 8x8, small_cnn_gn, b = 64, 40% symmetric noise, fd Q=1, 8 seeds

The runs of `loop` (the package's step on preloaded tensors, no augmentation); the 2026-11-22 numbers in RESULTS.md came
from the Trainer with augmentation, at commit 0d75d9c. lambda = 0 is SAM. With `rwsam_target_ess` the effective lambda
is chosen every step so that the weights' effective sample size is that fraction of the batch; the runs report the mean
effective lambda, the mean ESS and the Gibbs weight on corrupted labels. Writes
``rwsam_sensitivity_<dataset>_<estimator>_noise<rate>.json`` and .png to ``--results_dir`` and prints markdown tables.
"""

from __future__ import annotations

import argparse

from common import add_common_arguments, finished_or_new, rwsam, run_all, save_record
from loop import RunSpec
from stats import t_interval

METRICS = ("accuracy", "rwsam/noisy_weight_mass", "rwsam/lambda", "rwsam/ess")


def plot(by_lambda: dict, by_ess: dict, lambdas, targets, noise_rate: float, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, summary, xs, xlabel in ((axes[0], by_lambda, lambdas, "fixed lambda (0 is SAM)"),
                                    (axes[1], by_ess, targets, "rwsam_target_ess")):
        acc = [summary["accuracy"][(x,)] for x in xs]
        ax.errorbar(xs, [100 * s["mean"] for s in acc], yerr=[100 * s["half_width"] for s in acc], marker="o",
                    capsize=3, color="C0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("clean test accuracy (%)", color="C0")
        if noise_rate:
            twin = ax.twinx()
            mass = [(x, summary["rwsam/noisy_weight_mass"].get((x,))) for x in xs]
            mass = [(x, s) for x, s in mass if s is not None]
            twin.errorbar([x for x, _ in mass], [100 * s["mean"] for _, s in mass],
                          yerr=[100 * s["half_width"] for _, s in mass], marker="s", ls="--", capsize=3, color="C3")
            twin.axhline(100 * noise_rate, color="C3", lw=0.8, ls=":")
            twin.set_ylabel("Gibbs weight on noisy samples (%)", color="C3")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict, keys, key_name: str) -> str:
    lines = [f"| {key_name} | accuracy (%) | weight on noisy (%) | effective lambda | ESS / b |",
             "|---|---|---|---|---|"]
    for key in keys:
        cells = []
        for metric, digits in zip(METRICS, ("%", "%", ".3f", ".3f")):
            s = summary[metric].get((key,))
            scale, fmt = (100, ".2f") if digits == "%" else (1, digits)
            cells.append(f"{scale * s['mean']:{fmt}} +- {scale * s['half_width']:{fmt}}" if s else "")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(values: str) -> list[float]:
    return [float(x) for x in values.split(",")]


def group(results: list[dict], metric: str, key: str) -> dict:
    """``{(value of key,): t_interval(metric over the seeds)}``."""
    grouped: dict = {}
    for result in results:
        if metric in result:
            grouped.setdefault((result[key],), []).append(result[metric])
    return {k: t_interval(values) for k, values in grouped.items()}


def specs(args) -> list[RunSpec]:
    base = {**rwsam(args.estimator, rho=args.rho), "rwsam_num_probes": args.num_probes}
    if args.estimator == "exact":
        del base["rwsam_num_probes"]
    target = {k: v for k, v in base.items() if k != "rwsam_lambda"}
    return [RunSpec(f"lambda={lam:g}", seed, {**base, "rwsam_lambda": lam}, "symmetric", args.noise_rate)
            for lam in grid(args.lambdas) for seed in range(args.seeds)] + [
        RunSpec(f"target_ess={t:g}", seed, {**target, "rwsam_target_ess": t}, "symmetric", args.noise_rate)
        for t in grid(args.target_ess) for seed in range(args.seeds)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--noise_rate", type=float, default=0.4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lambdas", default="0,0.5,1,2,4,8")
    parser.add_argument("--target_ess", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--estimator", default="fd", choices=["fd", "exact"])
    parser.add_argument("--num_probes", type=int, default=1)
    args, record = finished_or_new(parser.parse_args(), lambda args: {"runs": run_all(args, specs(args))})
    lambdas, targets = grid(args.lambdas), grid(args.target_ess)
    for result in record["runs"]:  # the label says which setting: "lambda=2" or "target_ess=0.5"
        name, value = result["label"].split("=")
        result[name] = float(value)
    by_lambda = {metric: group([r for r in record["runs"] if "lambda" in r], metric, "lambda") for metric in METRICS}
    by_ess = {metric: group([r for r in record["runs"] if "target_ess" in r], metric, "target_ess")
              for metric in METRICS}
    tag = f"{args.dataset}_{args.estimator}_noise{args.noise_rate:g}"
    path = save_record(args, f"rwsam_sensitivity_{tag}", record) / f"rwsam_sensitivity_{tag}.png"
    plot(by_lambda, by_ess, lambdas, targets, args.noise_rate, path,
         f"RW-SAM ({args.estimator}, Q={args.num_probes}) on {args.dataset}, {args.noise_rate:.0%} symmetric noise, "
         f"{args.model}, b={args.batch_size}, {args.seeds} seeds")
    print(f"\nFixed lambda, mean +- 95% CI half-width over {args.seeds} seeds\n")
    print(table(by_lambda, lambdas, "lambda"))
    print("\nTarget ESS (lambda chosen every step)\n")
    print(table(by_ess, targets, "target_ess"))


if __name__ == "__main__":
    main()
