"""token_time.py: where a served token's CPU time goes, by process and stage, at 1 and 32
streams, beside the client's inter-token latency."""
from __future__ import annotations

from .base import Doc, image, ms, no_result, num, percent, source, table

NAMES = ("token_time",)
KINDS = ("worker", "engine core", "API process")


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("token_time")
    if not result:
        return no_result("token_time")
    d = result.data
    env = d.get("env") or {}
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND")
    parts = [f"`streamsink serve --weights {d['weights']}` ({d['checkpoint']}, {d['dtype']}), "
             f"{d['sink_tokens']}+{d['window_tokens']}; worker threads bound to "
             + (f"cores {bind}" if bind else "the cores the thread table shows") + "."]
    unprofiled = all(level.get("unprofiled") for level in d["levels"])
    summary = []
    for level in d["levels"]:
        quiet = level.get("unprofiled") or {}
        itl, quiet_itl = level.get("itl_ms") or {}, quiet.get("itl_ms") or {}
        summary.append([str(level["streams"]),
                        *([ms(quiet_itl.get("p50")), num(quiet["tokens_per_s"])]
                          if unprofiled else []),
                        ms(itl.get("p50")), num(level["tokens_per_s"]),
                        *[f"{num(level['processes'][k]['cores_busy'], 2)} / "
                          f"{ms(level['processes'][k]['cpu_ms_per_token'])}"
                          if k in level["processes"] else "–" for k in KINDS]])
    sampled = " while sampled" if unprofiled else ""
    parts.append(table(["streams",
                        *(["ITL p50 (ms)", "tokens/s"] if unprofiled else []),
                        f"ITL p50{sampled} (ms)", f"tokens/s{sampled}",
                        *[f"{k}: cores busy / CPU-ms per token{sampled}" for k in KINDS]],
                       summary))
    for level in d["levels"]:
        rows = []
        for kind in KINDS:
            proc = level["processes"].get(kind)
            if not proc:
                continue
            for category, share in sorted(proc["share"].items(), key=lambda kv: -kv[1]):
                if share < 0.005:
                    continue
                rows.append([kind, category, percent(share, 1),
                             ms(share * proc["cpu_ms_per_token"])])
        parts.append(f"**{level['streams']} stream{'s' if level['streams'] > 1 else ''}**: "
                     f"what each process spends its CPU time on (py-spy samples over "
                     f"{num(level['window_s'], 0)} s)")
        parts.append(table(["process", "stage", "share of its samples", "CPU-ms per token"],
                           rows))
        threads = []
        for kind in KINDS:
            for t in (level["processes"].get(kind) or {}).get("threads", []):
                threads.append([kind, f"`{t['name']}`", f"{100 * t['cpu_s'] / level['window_s']:.0f}%",
                                t["allowed"], str(t["last_core"])])
        if threads:
            parts.append(table(["process", "thread", "CPU (of one core)", "may run on cores",
                                "last ran on"], threads))
    parts.append(image(doc, "token_time.png", "CPU-ms per generated token by process and stage"))
    parts.append(source(result, doc))
    return "\n\n".join(parts)


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("token_time")
    if not result:
        return []
    import os

    from .plotting import figure, save

    d = result.data
    levels = d["levels"]
    fig, axes = figure(ncols=len(levels), size=(5.5 * len(levels), 4))
    for ax, level in zip(axes, levels):
        kinds = [k for k in KINDS if k in level["processes"]]
        categories = []
        for k in kinds:
            for c in level["processes"][k]["share"]:
                if (k, c) not in categories:
                    categories.append((k, c))
        bottoms = [0.0] * len(kinds)
        for k, c in categories:
            proc = level["processes"][k]
            value = proc["share"].get(c, 0.0) * proc["cpu_ms_per_token"]
            if value <= 0:
                continue
            i = kinds.index(k)
            ax.bar([i], [value], bottom=[bottoms[i]], label=f"{k}: {c}"[:60])
            bottoms[i] += value
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_ylabel("CPU-ms per generated token")
        itl = (level.get("itl_ms") or {}).get("p50")
        ax.set_title(f"{level['streams']} stream(s); ITL p50 {ms(itl)} ms", fontsize=9)
        ax.legend(fontsize=6)
    save(fig, axes, os.path.join(img_dir, "token_time.png"), legend=False)
    return ["token_time.png"]
