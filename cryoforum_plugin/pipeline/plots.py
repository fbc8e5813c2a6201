"""Headless matplotlib and atomic PNG output, shared by every figure the package writes."""

from __future__ import annotations

import numpy as np

def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (clusters and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG atomically, then close it."""
    from cryoforum_plugin.formats.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def training_curve(log: list[dict]):
    """Median error (degrees) of the training and validation sets per epoch, from a training log."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["epoch"] for r in log], [r["val_median_deg"] for r in log], label="validation")
    ax.plot([r["epoch"] for r in log], np.degrees([r["train_median_rad"] for r in log]), label="train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("median error (°)")
    ax.legend()
    fig.tight_layout()
    return fig


def histogram(values, xlabel: str, bins: int = 50):
    """A histogram of per-particle values."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    fig.tight_layout()
    return fig


def plot_fsc(curves: dict[str, np.ndarray], box: int, pixel_size: float, path, title: str = "FSC") -> None:
    """Write a PNG of one or more FSC curves with the 0.143 and 0.5 thresholds."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(np.arange(len(c)) / (box * pixel_size), c, label=label)
    for t in (0.143, 0.5):
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
