"""The resume check of `streamsink batch`: N records on the default model,
a third of the prompts past max_model_len; an uninterrupted run side by side with a run killed
by SIGKILL when half the records are in its output, then the killed run resumed. Checks every id
once, greedy texts (whole rows) equal to the uninterrupted run, the summary lines.

    .venv/bin/python benchmarks/batch_resume_check.py [--records 200] [--model M]
Writes benchmarks/results/batch_resume_check/<date>-<commit>.json (settings, summaries, counts,
times).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import common

MAX_MODEL_LEN = 512  # 4+124 with 128-token chunks needs 512: long prompts stay cheap
ENGINE = ["--window", "124", "--max-model-len", str(MAX_MODEL_LEN),
          "--max-num-batched-tokens", "128", "--max-tokens", "8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--model", help="local checkpoint directory or hub id")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from streamsink.model_store import resolve_model

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    book = os.path.join(common.SHARED_DATA, "log-school-house-14881.txt")
    if os.path.exists(book):
        with open(book, encoding="utf-8") as f:
            text = f.read()
    else:
        text = " ".join(f"Entry {i}: the bell by the mill rang at {i % 24}." for i in range(40000))
    ids = tok(text)["input_ids"]
    records = []
    for i in range(args.records):  # every third prompt 560-760 tokens, the others 30-90
        n = 560 + (i * 37) % 200 if i % 3 == 0 else 30 + (i * 13) % 60
        start = (i * 997) % (len(ids) - n)
        records.append({"id": f"doc-{i:03d}", "prompt": tok.decode(ids[start:start + n])})
    long = sum(len(tok(r["prompt"])["input_ids"]) > MAX_MODEL_LEN for r in records)
    work = tempfile.mkdtemp(prefix="batch_resume_")
    inp, full_out, resumed_out = (os.path.join(work, n) for n in
                                  ("in.jsonl", "full.jsonl", "resumed.jsonl"))
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(records)} records, {long} prompts past max_model_len {MAX_MODEL_LEN}; {work}",
          flush=True)
    cmd = [sys.executable, "-m", "streamsink.serving.cli", "batch", "--input", inp,
           "--model", model, *ENGINE]
    root = os.path.dirname(common.HERE)

    def start(out: str) -> subprocess.Popen:
        return subprocess.Popen(cmd + ["--output", out], cwd=root, stdout=open(out + ".log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    t0 = time.time()
    full, killed = start(full_out), start(resumed_out)
    lines_at_kill = None
    while killed.poll() is None:
        n = open(resumed_out, "rb").read().count(b"\n") if os.path.exists(resumed_out) else 0
        if n >= len(records) // 2:
            os.kill(killed.pid, signal.SIGKILL)  # the driver, as `kill -9 PID`
            killed.wait()
            lines_at_kill = n
            break
        time.sleep(0.05)
    kill_s = time.time() - t0
    raw = open(resumed_out, "rb").read()
    torn = len(raw) - (raw.rfind(b"\n") + 1)
    print(f"SIGKILL at {lines_at_kill} lines after {kill_s:.0f} s (torn tail: {torn} bytes)",
          flush=True)
    full.wait()
    full_s = time.time() - t0
    time.sleep(2)
    try:  # Ray's agents outlive a SIGKILLed driver (its engine goes with the raylet)
        os.killpg(killed.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    t1 = time.time()
    rerun = subprocess.run(cmd + ["--output", resumed_out], cwd=root, capture_output=True,
                           text=True, start_new_session=True)
    rerun_s = time.time() - t1
    full_summary = open(full_out + ".log").read().strip().splitlines()[-1]
    rerun_summary = rerun.stdout.strip().splitlines()[-1] if rerun.stdout.strip() else ""
    a = {r["id"]: r for r in map(json.loads, open(full_out))}
    lines = [json.loads(line) for line in open(resumed_out)]
    b = {r["id"]: r for r in lines}
    result = {
        "settings": {"records": len(records), "prompts_past_max_model_len": long,
                     "engine_args": ENGINE, "model": model},
        "lines_at_kill": lines_at_kill, "kill_after_s": kill_s, "torn_tail_bytes": torn,
        "uninterrupted_s": full_s, "rerun_s": rerun_s, "rerun_rc": rerun.returncode,
        "uninterrupted_summary": full_summary, "rerun_summary": rerun_summary,
        "lines": len(lines), "unique_ids": len(b),
        "all_ids": set(b) == {r["id"] for r in records},
        "texts_equal": sum(a[k].get("text") == b.get(k, {}).get("text") for k in a),
        "rows_equal": sum(a[k] == b.get(k) for k in a),
        "rows_past_max_model_len": sum(r.get("prompt_tokens", 0) > MAX_MODEL_LEN for r in lines),
    }
    print(json.dumps(result, indent=1))
    common.save("batch_resume_check", result, args)
    ok = (result["lines"] == result["unique_ids"] == len(records) and result["all_ids"]
          and result["rows_equal"] == len(records) and rerun.returncode == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
