"""The load test's dashboard picture: one panel per server-side series (as Prometheus recorded
it), the runs (streamsink, stock) overlaid on a common "seconds since load start" axis."""
from __future__ import annotations

import math

COLORS = {"streamsink": "tab:orange", "stock": "tab:blue"}


def render(path: str, runs: list[dict], panels: list[tuple[str, str]], title: str = "") -> str:
    """runs: [{"name", "load_start", "load_end", "series": {key: [[t_rel_s, value], ...]}}];
    panels: [(key, panel title)]. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 2.6 * nrows), squeeze=False,
                             sharex=True)
    flat = [ax for row in axes for ax in row]
    for ax, (key, label) in zip(flat, panels):
        for i, run in enumerate(runs):
            points = run["series"].get(key) or []
            color = COLORS.get(run["name"], f"C{i}")
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=color, label=run["name"], linewidth=1.4)
            else:
                ax.plot([], [], color=color, label=f"{run['name']} (no data)")
            # The load window: requests were sent between these lines.
            ax.axvline(run["load_end"] - run["load_start"], color=color, linestyle=":",
                       linewidth=0.8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the load started (dotted: load ended)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
