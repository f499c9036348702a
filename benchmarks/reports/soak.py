"""soak.py: `streamsink serve` under a mixed load for hours, a real Prometheus watching; the
checks it recorded and the server-side series."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, image, integer, no_result, num, percent, source, table

NAMES = ("soak",)
IMAGE = "soak.png"
PANELS = (("gen_tokens_per_s", "generated tokens per second (server)"),
          ("rss_mib", "server process tree RSS (MiB)"),
          ("held_blocks", "streamsink: KV blocks held by streams"),
          ("pool_used_blocks", "streamsink: KV pool blocks used"),
          ("running", "requests running"),
          ("itl_p99_ms", "inter-token latency p99 (ms)"))
KINDS = ("chat", "pinned", "long", "windowed", "bad")


def _value(check: dict) -> str:
    """A check's recorded value, in words."""
    v = check["value"]
    name = check["name"]
    if name == "rss_growth":
        return (f"{percent(v.get('growth'), 1)} ({num(v.get('first_window_max_mib'), 0)} → "
                f"{num(v.get('last_window_max_mib'), 0)} MiB)")
    if name == "tokens_per_s":
        return (f"{percent(v.get('change'), 1)} ({num(v.get('first'))} → "
                f"{num(v.get('last'))} tokens/s)")
    if name == "answered":
        return (f"{integer(v['requests'])} requests: {integer(v.get('ok'))} ok, "
                f"{integer(v.get('aborted_planned'))} dropped by the client, "
                f"{integer(v.get('aborted_deadline'))} cut at the end, "
                f"{integer(v['not_answered'])} not answered")
    if name == "bad_refused":
        return f"{integer(v['refused_4xx'])} of {integer(v['sent'])} answered 4xx"
    if name == "no_errors":
        return (f"{integer(v['http_5xx'])} HTTP 5xx, {integer(v['failed'])} failed, "
                f"{integer(v['log_tracebacks'])} tracebacks in the log")
    if isinstance(v, bool):
        return "yes" if v else "no"
    return integer(v) if v is None or isinstance(v, (int, float)) else str(v)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("soak")
    if not result:
        return no_result("soak")
    d = result.data
    opts = (d.get("provenance") or {}).get("options") or {}
    head = (f"{d['duration_s'] / 3600:g} h of load ({d['load_s'] / 60:,.0f} min with the last "
            f"requests), then {d['drain_s']:,.0f} s to drain; windows compared: "
            f"{d['window_s'] / 60:g} min after {d['warmup_s'] / 60:g} min of warm-up and the "
            f"last {d['window_s'] / 60:g} min"
            + (f"; streamsink {opts['sink']}+{opts['window']}, drop fraction "
               f"{opts['drop_fraction']:g}" if opts.get("sink") is not None else "")
            + f". **{'All checks passed' if d['passed'] else 'Some checks failed'}.**")
    checks = table(["check", "recorded", "limit", "ok"],
                   [[c["name"], _value(c), c["limit"], "yes" if c["ok"] else "**no**"]
                    for c in d["checks"]])
    counts = d["outcomes"]
    kinds = [k for k in KINDS if k in counts]
    share = d.get("cached_share") or {}
    rows = [[k, integer(counts[k]["requests"]), integer(counts[k].get("ok")),
             integer(counts[k].get("aborted_planned")),
             integer(counts[k].get("refused")), integer(counts[k].get("error")),
             integer(counts[k]["tokens"]),
             percent(share.get(k), 0) if k in share else "–"] for k in kinds]
    per_kind = table(["kind", "requests", "ok", "dropped", "refused 4xx", "errors",
                      "tokens received", "prompt tokens from the cache"], rows)
    return "\n\n".join([head, checks, per_kind,
                        image(doc, IMAGE, "server-side series and RSS during the soak"),
                        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("soak")
    if not result:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result.data
    fig, axes = plt.subplots(3, 2, figsize=(12, 8), sharex=True)
    flat = [ax for row in axes for ax in row]
    first = (d["warmup_s"] / 60, (d["warmup_s"] + d["window_s"]) / 60)
    last = ((d["duration_s"] - d["window_s"]) / 60, d["duration_s"] / 60)
    for ax, (key, title) in zip(flat, PANELS):
        points = d["series"].get(key) or []
        if points:
            xs, ys = zip(*points)
            ax.plot([x / 60 for x in xs], ys, color="tab:orange", linewidth=1.0)
        for span in (first, last):  # the windows the checks compare
            ax.axvspan(*span, color="tab:gray", alpha=0.15)
        ax.set_title(title, fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the load started (shaded: the windows compared)")
    plotting.save(fig, flat, os.path.join(img_dir, IMAGE), legend=False)
    return [IMAGE]
