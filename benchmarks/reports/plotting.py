"""Matplotlib without a display, and PNGs that depend only on what is drawn (no timestamps or
version strings in the file)."""
from __future__ import annotations


def figure(ncols: int = 1, size: tuple[float, float] = (6.5, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    return fig, list(axes[0])


def save(fig, axes, path: str, legend: bool = True) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
