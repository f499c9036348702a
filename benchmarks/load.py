"""The paper-style serving comparison through `streamsink loadtest --compare-stock`: many concurrent
long streams (64 of 2,048 prompt + 1,024 generated tokens by default), streamsink 4+1020 against
stock vLLM on the same KV budget, with a real Prometheus watching both servers.

The KV budget is, by default, what streamsink needs to hold every stream's window at once
(streams x (ceil(S/B) + ceil((S+W)/B) + 1) blocks, stream_rule.max_blocks_held at Q = 1): stock
vLLM keeps each stream's whole history and fits fewer of them in it (the rest wait or are
preempted). Goodput counts requests that finished with a time per output token <=
--slo-tpot-ms (vLLM's definition).

    .venv/bin/python benchmarks/load.py                 # the full comparison (slow on 2 cores)
    .venv/bin/python benchmarks/load.py --quick         # 16 streams, 512+256 tokens, 4+252
    .venv/bin/python benchmarks/load.py --streams 32 --prompt-tokens 1024 --output-tokens 512 \
        --window 508 --label load_half
Writes benchmarks/results/<label>/<date>-<commit>.json: the load test's report (client figures
and every Prometheus series it sampled; `make docs` draws them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import common
from streamsink.stream_rule import StreamShape, max_blocks_held, row_tokens

BLOCK = 128


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the scaled-down run: 16 streams, 512+256 tokens, 4+252")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=1024)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens, both servers")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="default: streamsink's need for every stream's window at once")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0,
                   help="goodput SLO, time per output token (default 200: 5 tokens/s a stream)")
    p.add_argument("--model", help="checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--label", help="result file name (default load / load_quick)")
    p.add_argument("--eager", action="store_true",
                   help="both servers with --enforce-eager (no torch.compile at start-up: "
                        "minutes less on a busy machine; stock compiled decodes ~10%% faster)")
    p.add_argument("--startup-timeout", type=float, default=3600.0)
    p.add_argument("--keep", help="also keep the load test's folder (logs) here")
    args = p.parse_args()
    if args.quick:
        args.streams, args.prompt_tokens, args.output_tokens, args.window = 16, 512, 256, 252
    label = args.label or ("load_quick" if args.quick else "load")

    model = subprocess.run([sys.executable, "-m", "streamsink.serving.cli", "model-path"]
                           + (["--model", args.model] if args.model else []),
                           capture_output=True, text=True, check=True).stdout.strip()
    shape = StreamShape(args.sink, args.window)
    blocks_per_stream = max_blocks_held(shape, BLOCK, 1)
    per_token = common.kv_bytes_per_token(model)
    kv = args.kv_cache_bytes or args.streams * blocks_per_stream * BLOCK * per_token
    # One row width for both servers: stock needs prompt + output, a streaming engine one step.
    row = max(args.prompt_tokens + args.output_tokens, row_tokens(shape, BLOCK, args.chunk))
    print(f"{label}: {args.streams} streams of {args.prompt_tokens}+{args.output_tokens} tokens, "
          f"streamsink {args.sink}+{args.window} vs stock, KV {kv / 2**30:.2f} GiB "
          f"({kv // (BLOCK * per_token)} blocks; stock needs "
          f"{math.ceil((args.prompt_tokens + args.output_tokens) / BLOCK)} a stream, streamsink "
          f"<= {blocks_per_stream} in decode)", flush=True)

    out = tempfile.mkdtemp(prefix="streamsink-bench-load-")
    try:
        cmd = [sys.executable, "-m", "streamsink.serving.cli", "loadtest", "--compare-stock",
               "--out", out, "--model", model,
               "--concurrency", str(args.streams), "--requests", str(args.streams),
               # every client sends its one request at once; then the servers take their time
               "--duration", "30", "--drain-timeout", str(6 * 3600),
               "--prompt-tokens", str(args.prompt_tokens),
               "--output-tokens", str(args.output_tokens),
               "--sink", str(args.sink), "--window", str(args.window),
               "--kv-cache-bytes", str(kv), "--max-num-batched-tokens", str(args.chunk),
               "--max-model-len", str(row), "--max-num-seqs", str(args.streams),
               "--slo-tpot-ms", str(args.slo_tpot_ms),
               "--startup-timeout", str(args.startup_timeout)]
        if args.eager:
            cmd.append("--server-arg=--enforce-eager")
        code = subprocess.call(cmd)
        if args.keep:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)
        report_path = os.path.join(out, "report.json")
        if not os.path.exists(report_path):
            print(f"{label}: the load test wrote no report (exit {code})", file=sys.stderr)
            return code or 1
        with open(report_path) as f:
            report = json.load(f)
        report["benchmark"] = {"label": label, "quick": args.quick, "streams": args.streams,
                               "prompt_tokens": args.prompt_tokens,
                               "output_tokens": args.output_tokens, "sink": args.sink,
                               "window": args.window, "kv_cache_bytes": kv,
                               "kv_blocks": kv // (BLOCK * per_token),
                               "max_model_len": row, "eager": args.eager,
                               "loadtest_exit_code": code}
        for run in report["runs"]:  # the logs stay in the temporary folder
            run["server"].pop("log", None)
        report.pop("processes", None)
        report.pop("dashboard", None)  # `make docs` draws the series from this result
        # No machine paths in committed results: the checkpoint and the temporary folder.
        text = json.dumps(report).replace(model, os.path.basename(model)).replace(out, "<out>")
        path = common.save(label, json.loads(text), args)
        print(f"{label}: wrote {path}")
        print(json.dumps(report.get("comparison"), indent=1))
        return code
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
