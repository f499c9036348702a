"""Shared helpers of the benchmark scripts: environment, engines, results on disk."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

# In-process engines: the scripts step them directly and build several one after another.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HERE = os.path.dirname(os.path.abspath(__file__))
# STREAMSINK_BENCH_RESULTS redirects output (the CI smoke test keeps the committed results).
RESULTS = os.environ.get("STREAMSINK_BENCH_RESULTS") or os.path.join(HERE, "results")
os.makedirs(RESULTS, exist_ok=True)
# The team's shared data folder sits beside the repository (books for perplexity).
SHARED_DATA = os.path.join(HERE, "..", "..", "shared", "data")


def machine() -> dict:
    import torch
    import vllm

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "vllm": vllm.__version__,
            # These machines are not all one CPU (AVX2 or AVX-512): speeds differ between them.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**payload, "machine": machine()}, f, indent=2)
    return path


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
