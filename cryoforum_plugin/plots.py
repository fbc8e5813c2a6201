"""Headless matplotlib and atomic PNG output, shared by every figure the package writes."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (clusters and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG atomically, then close it."""
    from .atomic import atomic_path

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
