"""Training curves from a Trainer's ``log_history``: loss, accuracy and RW-SAM's weight on noisy samples."""

from __future__ import annotations

from pathlib import Path


def _series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training(log_history: list[dict], path: str | Path, noise_rate: float | None = None, title: str = "") -> Path:
    """Save a PNG with three panels: training/eval loss, eval accuracy, and RW-SAM's weight mass on noisy samples.

    The third panel shows ``rwsam/noisy_weight_mass`` (the Gibbs weight on samples whose label was corrupted) against
    `noise_rate`, the mass uniform weights (SAM) would give them, when the run logged it.

    Args:
        log_history (`list[dict]`): ``trainer.state.log_history``.
        path (`str` or `Path`): where to write the PNG.
        noise_rate (`float`, *optional*): the realised fraction of noisy training labels.
        title (`str`): a figure title.

    Returns:
        `Path`: the written file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if any("rwsam/noisy_weight_mass" in entry for entry in log_history) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), constrained_layout=True)
    ax = axes[0]
    for key, label in (("loss", "train loss (clean, x)"), ("eval_loss", "eval loss")):
        steps, values = _series(log_history, key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    steps, values = _series(log_history, "eval_accuracy")
    ax.plot(steps, values, marker="o", color="tab:green")
    ax.set(xlabel="step", ylabel="accuracy", title="eval accuracy (clean labels)", ylim=(0, 1))
    if panels == 3:
        ax = axes[2]
        steps, values = _series(log_history, "rwsam/noisy_weight_mass")
        ax.plot(steps, values, label="weight on noisy samples", color="tab:red")
        ax.plot(steps, [1 - v for v in values], label="weight on clean samples", color="tab:blue")
        if noise_rate is not None:
            ax.axhline(noise_rate, ls="--", color="tab:red", alpha=0.6, label=f"uniform (SAM): {noise_rate:.2f}")
            ax.axhline(1 - noise_rate, ls="--", color="tab:blue", alpha=0.6, label=f"uniform: {1 - noise_rate:.2f}")
        ax.set(xlabel="step", ylabel="Gibbs weight mass", title="RW-SAM weights: noisy vs clean", ylim=(0, 1))
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
