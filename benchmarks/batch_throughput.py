"""Batch throughput of many long streams through `streamsink batch` (Ray Data, ray.data.llm):
streamsink against a stock engine on the same KV budget, and the Ray Data path against a plain
in-process vllm.LLM.generate of the same records with the same streaming engine.

    .venv/bin/python benchmarks/batch_throughput.py [--quick | --full] [--records N]
        [--prompt-tokens P] [--gen-tokens G] [--window W] [--kv-bytes B] [--model M]

Sizes: the issue's run is --full (256 records × 2,048-token prompt + 512 generated, 4+1020,
the default 1 GiB KV budget). The default is a scaled-down version of the same regime (records
longer than the cache, a KV pool that holds only a few stock histories at once) that fits a
shared 2-core machine; --quick is a smoke run. Every generation ignores EOS, so each path
generates exactly records × G tokens.

Each path runs as its users run it, in a process of its own, one after another: the two
`streamsink batch` runs (streaming, --stock) and the plain vllm.LLM script. Wall times include
start-up (Ray, engine, compilation for stock). The steady rate leaves start-up out: generated
tokens of records 2..N over the time from the first record's completion to the last one's
(the batch command's output file is watched for new lines; the plain script steps its engine
and notes when each request finishes).
Writes benchmarks/results/batch_throughput[_quick|_full]/<date>-<commit>.json (with when each
record finished; plot: `make docs`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import common

SIZES = {
    # records, prompt tokens, generated tokens, window, KV bytes, max_model_len, chunk
    "quick": dict(records=4, prompt_tokens=300, gen_tokens=8, window=124, kv_bytes=64 << 20,
                  max_model_len=512, chunk=128),
    "scaled": dict(records=16, prompt_tokens=512, gen_tokens=64, window=252,
                   kv_bytes=128 << 20, max_model_len=1024, chunk=256),
    "full": dict(records=256, prompt_tokens=2048, gen_tokens=512, window=1020,
                 kv_bytes=1 << 30, max_model_len=4096, chunk=1024),
}
SUMMARY = re.compile(r"records=(\d+) ok=(\d+) errors=(\d+) skipped=(\d+) "
                     r"generated_tokens=(\d+) tokens_per_s=([\d.]+)")
ROOT = os.path.dirname(common.HERE)


def make_records(model_path: str, n: int, prompt_tokens: int, gen_tokens: int) -> list[dict]:
    """n prompts of ~prompt_tokens tokens each: different stretches of a book (or of generated
    text when the shared books are not there)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    book = os.path.join(common.SHARED_DATA, "katrine-14263.txt")
    if os.path.exists(book):
        with open(book, encoding="utf-8") as f:
            text = f.read()
    else:
        text = " ".join(f"Entry {i}: the lamp by the harbour was lit at {i % 24} o'clock."
                        for i in range(40000))
    ids = tokenizer(text)["input_ids"]
    stride = max(1, (len(ids) - prompt_tokens) // max(1, n))
    return [{"id": i, "prompt": tokenizer.decode(ids[i * stride:i * stride + prompt_tokens]),
             "max_tokens": gen_tokens, "ignore_eos": True} for i in range(n)]


def engine_argv(size: dict) -> list[str]:
    return ["--window", str(size["window"]), "--max-model-len", str(size["max_model_len"]),
            "--max-num-batched-tokens", str(size["chunk"]),
            "--kv-cache-memory-bytes", str(size["kv_bytes"])]


def run_command(label: str, inp: str, out: str, model: str, argv: list[str]) -> dict:
    """One `streamsink batch` run: wall time, when each record landed in OUT, the summary."""
    cmd = [sys.executable, "-m", "streamsink.serving.cli", "batch", "--input", inp,
           "--output", out, "--model", model, *argv]
    print(f"[{label}] {' '.join(cmd[2:])}", flush=True)
    log = open(out + ".log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seen, done_at = 0, []
    while True:
        finished = proc.poll() is not None
        n = open(out, "rb").read().count(b"\n") if os.path.exists(out) else 0
        done_at += [time.perf_counter() - t0] * (n - seen)
        seen = n
        if finished:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    log.close()
    with open(out + ".log") as f:
        lines = f.read().strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"[{label}] failed ({proc.returncode}): {lines[-5:]}")
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    print(f"[{label}] {wall:.1f} s: {lines[-1]}", flush=True)
    return {"path": label, "wall_s": wall, "summary": SUMMARY.search(lines[-1]).group(0),
            "done_at_s": done_at, "records": len(rows),
            "errors": sum("error" in r for r in rows),
            "generated_tokens": sum(r.get("generated_tokens", 0) for r in rows),
            "texts": {str(r["id"]): r.get("text") for r in rows}}


def plain_worker(args) -> None:
    """Child process: the same records through a vllm.LLM with the same engine settings, all
    submitted at once as LLM.generate does, stepped here to note when each one finishes."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from streamsink.serving.engine import make_llm

    size = json.loads(args.plain_worker[2])
    with open(args.plain_worker[0]) as f:
        records = [json.loads(line) for line in f]
    t0 = time.perf_counter()
    llm = make_llm(args.model, {"sink_tokens": 4, "window_tokens": size["window"]},
                   max_model_len=size["max_model_len"],
                   max_num_batched_tokens=size["chunk"], kv_cache_memory_bytes=size["kv_bytes"])
    started = time.perf_counter()
    engine = llm.llm_engine
    for r in records:
        engine.add_request(str(r["id"]), r["prompt"], SamplingParams(
            max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True))
    texts, tokens, done_at = {}, 0, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done_at.append(time.perf_counter() - t0)
                texts[out.request_id] = out.outputs[0].text
                tokens += len(out.outputs[0].token_ids)
    with open(args.plain_worker[1], "w") as f:
        json.dump({"start_s": started - t0, "wall_s": time.perf_counter() - t0,
                   "done_at_s": done_at, "generated_tokens": tokens, "texts": texts}, f)


def run_plain(inp: str, model: str | None, size: dict) -> dict:
    out = inp + ".plain.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-worker", inp, out,
           json.dumps(size)] + (["--model", model] if model else [])
    print("[plain vllm.LLM] generate", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=common.HERE, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"[plain] failed: {done.stderr[-2000:]}")
    with open(out) as f:
        result = json.load(f)
    # Interpreter start and imports happen before the worker's clock starts: add them.
    lag = wall - result["wall_s"]
    result["done_at_s"] = [t + lag for t in result["done_at_s"]]
    print(f"[plain vllm.LLM] {wall:.1f} s (engine start {result['start_s']:.1f} s)", flush=True)
    return {**result, "path": "plain vllm.LLM (streamsink)", "wall_s": wall}


def rates(r: dict, gen_tokens: int) -> dict:
    done = sorted(r["done_at_s"])
    steady_s = done[-1] - done[0]
    return {"wall_s": r["wall_s"], "first_record_s": done[0], "last_record_s": done[-1],
            "generated_tokens": r["generated_tokens"],
            "tokens_per_s_end_to_end": r["generated_tokens"] / r["wall_s"],
            "tokens_per_s_steady": (len(done) - 1) * gen_tokens / steady_s
            if steady_s > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run (4 short records)")
    mode.add_argument("--full", action="store_true",
                      help="the issue's sizes: 256 × (2,048 + 512), 4+1020, 1 GiB KV")
    for name in ("records", "prompt_tokens", "gen_tokens", "window", "kv_bytes",
                 "max_model_len", "chunk"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--model", help="local checkpoint directory or hub id")
    parser.add_argument("--plain-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        return plain_worker(args)

    from streamsink.model_store import resolve_model

    name = "quick" if args.quick else "full" if args.full else "scaled"
    size = dict(SIZES[name])
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    model = resolve_model(args.model)
    work = tempfile.mkdtemp(prefix="batch_throughput_")
    records = make_records(model, size["records"], size["prompt_tokens"], size["gen_tokens"])
    inp = os.path.join(work, "in.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    argv = engine_argv(size)
    ray_ss = run_command("ray streamsink", inp, os.path.join(work, "ss.out"), model, argv)
    ray_stock = run_command("ray stock", inp, os.path.join(work, "stock.out"), model,
                            argv + ["--stock"])
    plain = run_plain(inp, args.model, size)

    expected = size["records"] * size["gen_tokens"]
    rows = {}
    for key, r in (("ray_streamsink", ray_ss), ("ray_stock", ray_stock),
                   ("plain_streamsink", plain)):
        assert r["generated_tokens"] == expected, (key, r["generated_tokens"], expected)
        rows[key] = {**rates(r, size["gen_tokens"]), "done_at_s": r["done_at_s"]}
    same_text = sum(ray_ss["texts"][k] == plain["texts"][k] for k in plain["texts"])

    def ratio(a: str, b: str, field: str):
        x, y = rows[a][field], rows[b][field]
        return x / y if x and y else None

    ratios = {
        "streamsink_over_stock_end_to_end": ratio("ray_streamsink", "ray_stock",
                                                  "tokens_per_s_end_to_end"),
        "streamsink_over_stock_steady": ratio("ray_streamsink", "ray_stock",
                                              "tokens_per_s_steady"),
        "ray_over_plain_wall": rows["ray_streamsink"]["wall_s"]
        / rows["plain_streamsink"]["wall_s"],
        "ray_over_plain_steady_rate": ratio("ray_streamsink", "plain_streamsink",
                                            "tokens_per_s_steady"),
    }
    suffix = "" if name == "scaled" else "_" + name
    result = {"settings": {**size, "mode": name, "sink": 4, "model": model},
              "rows": rows, "ratios": ratios,
              "greedy_texts_equal_ray_vs_plain": f"{same_text}/{len(plain['texts'])}"}
    path = common.save("batch_throughput" + suffix, result, args)
    print(json.dumps({"rows": rows, "ratios": ratios,
                      "greedy_texts_equal_ray_vs_plain": result[
                          "greedy_texts_equal_ray_vs_plain"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
