"""Shared helpers of the benchmark scripts: environment, engines, results on disk."""
from __future__ import annotations

import os

import result_files

# In-process engines: the scripts step them directly and build several one after another.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HERE = result_files.HERE
# STREAMSINK_BENCH_RESULTS redirects output (the CI smoke test keeps the committed results).
RESULTS = result_files.results_root()
# The team's shared data folder sits beside the repository (books for perplexity).
SHARED_DATA = os.path.join(HERE, "..", "..", "shared", "data")

latest = result_files.latest
load = result_files.load


def save(name: str, payload: dict, options=None) -> str:
    """Record one run of benchmark `name` (its measurements and raw samples; `options`: the
    parsed arguments) as a new file under results/<name>/; returns the path."""
    return result_files.write(name, payload, options)


def scratch_dir(prefix: str) -> str:
    """A temporary folder for a run's logs and intermediate files (never the results tree)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"streamsink-{prefix}-")


def figure(ncols: int = 1, size: tuple[float, float] = (6.5, 4)):
    """A matplotlib figure without a display (Agg) and its axes (a list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, axes, path: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
