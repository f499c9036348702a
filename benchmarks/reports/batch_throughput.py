"""batch_throughput.py: `streamsink batch` (Ray Data) against stock and a plain vllm.LLM."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, image, no_result, num, ratio, source, table

NAMES = ("batch_throughput",)
IMAGE = "batch_throughput.png"
PATHS = (("ray_streamsink", "Ray Data, streamsink"), ("ray_stock", "Ray Data, stock vLLM"),
         ("plain_streamsink", "plain `vllm.LLM`, streamsink"))


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("batch_throughput")
    if not result:
        return no_result("batch_throughput")
    d = result.data
    s, rows_in, r = d["settings"], d["rows"], d["ratios"]
    rows = [[label, num(rows_in[k]["wall_s"], 0), num(rows_in[k]["first_record_s"], 0),
             num(rows_in[k]["tokens_per_s_steady"], 2),
             num(rows_in[k]["tokens_per_s_end_to_end"], 2)] for k, label in PATHS]
    return "\n\n".join([
        f"{s['records']} records of {s['prompt_tokens']:,} prompt + {s['gen_tokens']} generated "
        f"tokens (EOS ignored), {s['sink']}+{s['window']}, KV {s['kv_bytes'] >> 20} MiB, "
        f"max_model_len {s['max_model_len']:,}, {s['chunk']}-token steps ({s['mode']} sizes).",
        table(["path", "wall s", "first record done at s", "steady tokens/s",
               "end-to-end tokens/s"], rows),
        f"streamsink / stock: {ratio(r['streamsink_over_stock_steady'])} steady, "
        f"{ratio(r['streamsink_over_stock_end_to_end'])} end to end; Ray Data / plain: "
        f"{ratio(r['ray_over_plain_wall'])} the wall time, "
        f"{ratio(r['ray_over_plain_steady_rate'], 1)} the steady rate; greedy texts equal "
        f"between Ray Data and plain: {d['greedy_texts_equal_ray_vs_plain']}.",
        image(doc, IMAGE, "batch throughput and where the time goes"),
        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("batch_throughput")
    if not result:
        return []
    rows = result.data["rows"]
    labels = ["Ray Data\nstreamsink", "Ray Data\nstock", "plain vllm.LLM\nstreamsink"]
    keys = [k for k, _ in PATHS]
    x = list(range(len(keys)))
    fig, (ax1, ax2) = plotting.figure(2, size=(11, 4))
    ax1.bar([i - 0.2 for i in x], [rows[k]["tokens_per_s_end_to_end"] for k in keys],
            width=0.4, label="end to end (with start-up)")
    ax1.bar([i + 0.2 for i in x], [rows[k]["tokens_per_s_steady"] or 0 for k in keys],
            width=0.4, label="steady (first to last record)")
    ax1.set_xticks(x, labels)
    ax1.set(ylabel="generated tokens / s", title="throughput")
    first = [rows[k]["first_record_s"] for k in keys]
    rest = [rows[k]["last_record_s"] - rows[k]["first_record_s"] for k in keys]
    tail = [rows[k]["wall_s"] - rows[k]["last_record_s"] for k in keys]
    ax2.bar(x, first, label="until the first record is done (start-up)")
    ax2.bar(x, rest, bottom=first, label="first to last record")
    ax2.bar(x, tail, bottom=[a + b for a, b in zip(first, rest)], label="after the last record")
    ax2.set_xticks(x, labels)
    ax2.set(ylabel="wall seconds", title="where the time goes")
    plotting.save(fig, [ax1, ax2], os.path.join(img_dir, IMAGE))
    return [IMAGE]
