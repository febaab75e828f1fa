"""The experiments' plots: clean-test accuracy with 95% intervals (early-stopped model and final model side by side),
and the per-epoch curves of memorisation and clean-test accuracy for every method."""

from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stats import t_interval  # noqa: E402

MODELS = (("accuracy_best_val", "early-stopped model (best noisy-validation epoch)"), ("accuracy", "final model"))


def accuracy_figure(runs: list[dict], labels: list[str], groups: list, group_of, group_names: list[str], path,
                    title: str, xlabel: str) -> None:
    """Clean-test accuracy (mean and 95% t interval over seeds) of every method in every group (a noise setting, an
    m), early-stopped model on the left, final model on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    width = 0.8 / len(labels)
    for ax, (metric, name) in zip(axes, MODELS):
        for i, label in enumerate(labels):
            xs, means, errors = [], [], []
            for j, group in enumerate(groups):
                values = [r[metric] for r in runs if r["label"] == label and group_of(r) == group]
                if values:
                    interval = t_interval(values)
                    xs.append(j + (i - (len(labels) - 1) / 2) * width)
                    means.append(100 * interval["mean"])
                    errors.append(100 * interval["half_width"])
            ax.errorbar(xs, means, yerr=errors, fmt="o", capsize=3, color=f"C{i}", label=label)
        ax.set_xticks(range(len(groups)), group_names)
        ax.set(xlabel=xlabel, title=name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("clean test accuracy (%), mean and 95% CI")
    axes[1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def curves_figure(runs: list[dict], labels: list[str], groups: list, group_of, group_names: list[str], path,
                  title: str) -> None:
    """Per epoch, mean over seeds: the memorised fraction of the corrupted training labels (top row) and the
    clean-test accuracy (bottom row), one column per group."""
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), sharex=True, squeeze=False,
                             constrained_layout=True)
    for j, (group, group_name) in enumerate(zip(groups, group_names)):
        for row, (series, ylabel) in enumerate((("memorised", "memorised noisy labels (%)"),
                                                ("test_accuracy", "clean test accuracy (%)"))):
            ax = axes[row][j]
            for i, label in enumerate(labels):
                histories = [r["history"][series] for r in runs
                             if r["label"] == label and group_of(r) == group and series in r["history"]]
                if histories:
                    mean = [100 * statistics.fmean(epoch) for epoch in zip(*histories)]
                    ax.plot(range(1, len(mean) + 1), mean, color=f"C{i}", label=label)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(group_name)
            else:
                ax.set_xlabel("epoch")
    axes[0][0].axhline(80, color="k", lw=0.8, ls=":")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=80)
    plt.close(fig)
