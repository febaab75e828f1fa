#!/usr/bin/env python
"""m-sharpness where SGD memorises: clean-test accuracy of m-SAM against the micro-batch size m, rho chosen per m on the
noisy validation split, paired by seed against SGD and against SAM (m = b).

    python experiments/msharpness.py      # digits 8x8, small_cnn_gn, 40% symmetric noise, b = 64, m in {64, 16, 4}

The GroupNorm model, so that m-SAM's micro-batches do not change any batch statistics. Every m gets its own rho from
``--rhos``, chosen by the early-stopped validation accuracy over the selection seeds (`selection`, ties toward the
default 0.05); then ``--seeds`` fresh seeds. SGD runs beside them, because the m-trend is interpreted only where SAM
(m = b) beats SGD first: where the perturbation does not help at m = b, a smaller m has nothing to sharpen. The runs
share the run store with `label_noise.py` (same settings, same seeds: the same runs). Writes
``msharpness_<dataset>_<model>.json`` and two PNGs to ``--results_dir`` and prints markdown tables.
"""

from __future__ import annotations

import argparse

from common import (add_common_arguments, finished_or_new, floats, msam, noise_name, parse_noise, sam, save_record,
                    sgd, timing, tune_and_run)
from figures import accuracy_figure, curves_figure
from selection import Tuned, describe
from stats import by_seed, format_interval, paired_difference, t_interval


def sizes(args) -> list[int]:
    return [int(m) for m in args.ms.split(",")]


def label(m: int, batch_size: int) -> str:
    return f"m={m} (SAM)" if m == batch_size else f"m={m}"


def methods(args) -> list[Tuned]:
    rho = ("sam_rho", floats(args.rhos))
    return [Tuned("SGD", sgd())] + [
        Tuned(label(m, args.batch_size), sam() if m == args.batch_size else msam(m), (rho,)) for m in sizes(args)]


def experiment(args) -> dict:
    return tune_and_run(args, methods(args), parse_noise(args.noise))


def report(record: dict, labels: list[str], noise: tuple, seeds: int, batch_size: int) -> str:
    runs = {name: [r for r in record["runs"] if r["label"] == name] for name in labels}
    sam_label = label(batch_size, batch_size)
    stages = {entry["label"]: entry["stages"] for entry in record["selection"]}
    lines = [f"{noise_name(noise)} noise: clean test accuracy (%), mean [95% CI] over {seeds} seeds; paired "
             "differences (points), bold where the interval excludes 0\n",
             "| method | early-stopped | final | early-stopped - SGD | final - SGD | early-stopped - SAM "
             "| final - SAM | chosen |", "|---|---|---|---|---|---|---|---|"]
    for name in labels:
        cells = [format_interval(t_interval([r[metric] for r in runs[name]]))
                 for metric in ("accuracy_best_val", "accuracy")]
        for baseline in ("SGD", sam_label):
            for metric in ("accuracy_best_val", "accuracy"):
                cells.append("" if name in ("SGD", baseline) else format_interval(
                    paired_difference(by_seed(runs[name], metric), by_seed(runs[baseline], metric)), signed=True))
        cells.append(", ".join(describe(stage, stage["field"]) for stage in stages.get(name, [])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gate = []
    for metric, model in (("accuracy_best_val", "early-stopped"), ("accuracy", "final")):
        d = paired_difference(by_seed(runs[sam_label], metric), by_seed(runs["SGD"], metric))
        gate.append(f"- {model} model: SAM - SGD = {format_interval(d, signed=True)}: "
                    + ("SAM beats SGD, the m-trend below can be read" if d["verdict"] == "higher" else
                       "SAM does not beat SGD, the m-trend is not interpreted"))
    return "\n".join(lines) + "\n\nThe gate (SAM must beat SGD first)\n\n" + "\n".join(gate)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--ms", default="64,16,4", help="micro-batch sizes m; m = batch_size is SAM")
    parser.add_argument("--rhos", default="0.005,0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--noise", default="symmetric:0.4", help="one noise setting TYPE:RATE")
    args, record = finished_or_new(parser.parse_args(), experiment)
    noises = parse_noise(args.noise)
    if len(noises) != 1:
        raise ValueError(f"--noise: msharpness.py takes one noise setting, got {args.noise!r}")
    labels = ["SGD"] + [label(m, args.batch_size) for m in sizes(args)]
    name = f"msharpness_{args.dataset}_{args.model}"
    results_dir = save_record(args, name, record)
    title = (f"m-sharpness: {args.model} on {args.dataset} {args.image_size}x{args.image_size}, "
             f"{noise_name(noises[0])} noise, b={args.batch_size}, {args.epochs} epochs, rho chosen per m, "
             f"{args.seeds} seeds")
    groups = ["all"]
    accuracy_figure(record["runs"], labels, groups, lambda r: "all", [noise_name(noises[0])],
                    results_dir / f"{name}.png", title, "label noise")
    curves_figure(record["runs"], labels, groups, lambda r: "all", [noise_name(noises[0])],
                  results_dir / f"{name}_curves.png", title)
    print(f"\nm-sharpness, {args.model} on {args.dataset}, {args.epochs} epochs ({timing(record)})\n")
    print(report(record, labels, noises[0], args.seeds, args.batch_size))


if __name__ == "__main__":
    main()
