"""The llama.cpp comparison's docs (benchmarks/reports/peer_llamacpp.py) from small synthetic
results, in the shape of runs from before streamsink's weights were chosen (one streamsink row)
and of runs since (a streamsink row per weight format, each with its llama.cpp peer, the
equal-work row, a 64-stream level, the KV a stream holds): the ratios and goal verdicts shown are
the ones the data gives, a run with only one part renders that part, each block shows the newest
run holding its part, and a smoke run (--quick) is never the one the docs show. No engine, no
server."""
import json
import os
import re
import sys

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import report  # noqa: E402
import result_files  # noqa: E402
from reports import peer_llamacpp  # noqa: E402
from reports.base import Result  # noqa: E402

# tokens/s by (system, streams)
TPS = {("streamsink", 1): 10.0, ("llamacpp-f32", 1): 25.0, ("llamacpp-q4_1", 1): 40.0,
       ("streamsink", 8): 60.0, ("llamacpp-f32", 8): 40.0, ("llamacpp-q4_1", 8): 48.0}
SLOT, PROMPT, OUTPUT = 256, 320, 64


def _summary(tps: float, streams: int, itl_ms: float = 40.0) -> dict:
    pct = lambda v: {"p50": v, "p99": 2 * v, "max": 3 * v, "mean": v}  # noqa: E731
    return {"requests": streams, "ok": streams, "errors": 0, "error_samples": [],
            "tokens_received": streams * OUTPUT, "tokens_per_s": tps, "duration_s": 10.0,
            "ttft_ms": pct(500.0), "itl_ms": pct(itl_ms), "e2el_ms": pct(3000.0)}


def _trace(itl_ms: float, shifts=None) -> dict:
    itl = [itl_ms / 1000] * (OUTPUT - 1)
    tr = {"prompt_tokens": SLOT - 16, "token_times_s": [0.5 + i * itl_ms / 1000
                                                        for i in range(OUTPUT)],
          "itl_s": itl, "usage": {"prompt_tokens": SLOT - 16}, "chunks_without_text": 0}
    if shifts is not None:
        for k in shifts:
            itl[k - 1] = 4 * itl_ms / 1000
        tr.update(shift_before_token=shifts, itl_at_shifts_ms=[4 * itl_ms for _ in shifts])
    return tr


def synthetic(time_utc: str, *, quick: bool = False, load: bool = True,
              ppl: bool = True) -> dict:
    systems = [{"name": "streamsink", "kind": "streamsink"},
               {"name": "llamacpp-f32", "kind": "llamacpp", "gguf": "m-F32.gguf",
                "kv_type": "f32"},
               {"name": "llamacpp-q4_1", "kind": "llamacpp", "gguf": "m.Q4_1.gguf",
                "kv_type": None}]
    runs = []
    if load:
        for (system, streams), tps in TPS.items():
            runs.append({"system": system, "streams": streams,
                         "prompt_tokens": PROMPT if system == "streamsink" else SLOT - 16,
                         "output_tokens": OUTPUT, "loadtest_exit_code": 0,
                         "memory": {"peak_rss_mib": 1000.0, "peak_pss_mib": 900.0},
                         "summary": _summary(tps, streams), "report": None})
    n = 300
    nlls = {"streamsink 4+252": [2.0] * n,
            "llama.cpp f32 context shift keep 4, slot 256": [2.1] * n}
    return {
        "benchmark": "peer_llamacpp",
        "provenance": {"time_utc": time_utc, "commit": "abcdef0", "dirty": False,
                       "options": {"quick": quick}, "machine": {"cores": 2}},
        "args": {"quick": quick, "streams": [1, 8], "prompt_tokens": PROMPT,
                 "output_tokens": OUTPUT, "sink": 4, "window": 252},
        "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "llama_cpp_python_sdist": "0.3.36",
                     "llamacpp_commit": "0c1e57098"},
        "llamacpp_build": {"build_seconds": 1458.5, "jobs": 2, "compiler": "c++"},
        "model": {"checkpoint": "SmolLM2-135M-Instruct", "f32_gguf": "m-F32.gguf",
                  "q4_gguf": "m.Q4_1.gguf",
                  "f32_gguf_vs_q4_dequantized": {"tensors_compared": 272, "max_abs_diff": 0.0}},
        "slot_margin": 16,
        "long_prompt_probe": {"llamacpp-f32": {
            "prompt_tokens": 512, "server_token_count": 512, "fitted_prompt_server_tokens": 240,
            **{k: {"http_status": 400, "body": json.dumps({"error": {
                "code": 400, "type": "exceed_context_size_error",
                "message": "request (512 tokens) exceeds the available context size "
                           "(256 tokens), try increasing it"}})} for k in ("plain", "streamed")},
        }} if load else {},
        "load": {"runs": runs, "traces": {"streamsink": _trace(80.0),
                                          "llamacpp-f32": _trace(40.0, [17, 40])} if load
                 else {}},
        "ppl": {"results": {
            "streamsink 4+252": {"ppl": 7.389, "tokens": n, "what": "x"},
            "llama.cpp f32 context shift keep 4, slot 256": {"ppl": 8.166, "tokens": n,
                                                             "shifts_at": [255],
                                                             "seconds": 30.0, "what": "y"},
            "llama-perplexity f32 ctx 256": {"ppl": 9.5, "stderr": 1.25, "tokens": 127,
                                             "chunks": 1, "what": "z"}},
                "text": "book.txt", "tokens_in": n + 1, "sink": 4, "window": 252,
                "agreement": {"streamsink 4+252 vs llama.cpp f32 shift, before the first "
                              "eviction": {"tokens": 255, "max_abs_diff": 0.00123,
                                           "mean_abs_diff": 0.0001}},
                "nlls": nlls} if ppl else {"results": {}},
        "systems": systems, "wall_s": 5400.0,
    }


# A run since the weights were chosen: tokens/s by (system, streams), ITL p50 by system (the
# same at every level), the KV a stream holds by system (tokens, bytes: 128-token blocks of
# 23,040 bytes a token in bf16, 46,080 in fp32; llama.cpp's 256-token slot).
WEIGHTS_TPS = {
    "streamsink-f32": {1: 10.0, 8: 30.0, 32: 40.0, 64: 45.0},
    "streamsink-q4": {1: 18.0, 8: 50.0, 32: 66.0, 64: 72.0},
    "streamsink-q4-cut": {1: 19.0, 8: 55.0, 32: 60.0, 64: 80.0},
    "llamacpp-f32": {1: 12.5, 8: 25.0, 32: 25.0, 64: 30.0},
    "llamacpp-q4_1": {1: 30.0, 8: 50.0, 32: 60.0, 64: 64.0},
}
WEIGHTS_ITL = {"streamsink-f32": 90.0, "streamsink-q4": 22.0, "streamsink-q4-cut": 21.0,
               "llamacpp-f32": 60.0, "llamacpp-q4_1": 20.0}
WEIGHTS_KV = {"streamsink-f32": (512, 512 * 46080), "streamsink-q4": (512, 512 * 23040),
              "streamsink-q4-cut": (512, 512 * 23040), "llamacpp-f32": (256, 256 * 46080),
              "llamacpp-q4_1": (256, 256 * 23040)}


def synthetic_weights(time_utc: str, tps: dict | None = None) -> dict:
    """synthetic()'s run with the shape of one since streamsink's weights were chosen."""
    tps = tps or WEIGHTS_TPS
    d = synthetic(time_utc)
    ours = {"kind": "streamsink", "checkpoint": "SmolLM2-135M-Instruct-q4", "weights": "q4",
            "dtype": "bfloat16", "peer": "llamacpp-q4_1"}
    d["systems"] = [
        {"name": "streamsink-f32", "kind": "streamsink", "weights": "fp32", "dtype": "float32",
         "checkpoint": "SmolLM2-135M-Instruct", "peer": "llamacpp-f32", "prompts": "full"},
        {"name": "streamsink-q4", **ours, "prompts": "full"},
        {"name": "streamsink-q4-cut", **ours, "prompts": "cut"},
        *(s for s in d["systems"] if s["kind"] == "llamacpp")]
    for system in d["systems"]:
        system["kv_tokens_per_stream"], system["kv_bytes_per_stream"] = WEIGHTS_KV[system["name"]]
    d["args"].update(streams=[1, 8, 32, 64], streamsink_weights=["fp32", "q4"])
    d["load"]["runs"] = [
        {"system": name, "streams": streams,
         "prompt_tokens": PROMPT if name in ("streamsink-f32", "streamsink-q4") else SLOT - 16,
         "output_tokens": OUTPUT, "loadtest_exit_code": 0,
         "kv_tokens_per_stream": WEIGHTS_KV[name][0], "kv_bytes_per_stream": WEIGHTS_KV[name][1],
         "memory": {"peak_rss_mib": 1000.0 + streams, "peak_pss_mib": 900.0},
         "summary": _summary(value, streams, WEIGHTS_ITL[name]), "report": None}
        for name, by_streams in tps.items() for streams, value in by_streams.items()]
    d["load"]["traces"] = {"streamsink-f32": _trace(80.0), "streamsink-q4": _trace(22.0),
                           "llamacpp-f32": _trace(40.0, [17, 40]),
                           "llamacpp-q4_1": _trace(20.0, [17, 40])}
    d["long_prompt_probe"]["llamacpp-q4_1"] = d["long_prompt_probe"]["llamacpp-f32"]
    nlls = d["ppl"]["nlls"]
    nlls.update({"streamsink q4 4+252": [2.05] * 300, "streamsink q4 dense": [2.0] * 300,
                 "llama.cpp q4_1 context shift keep 4, slot 256": [2.15] * 300,
                 "llama.cpp q4_1 dense": [2.02] * 300})
    d["ppl"]["results"].update({
        "streamsink q4 4+252": {"ppl": 7.77, "tokens": 300, "what": "x"},
        "streamsink q4 dense": {"ppl": 7.4, "tokens": 300, "what": "x"},
        "llama.cpp q4_1 context shift keep 4, slot 256": {"ppl": 8.58, "tokens": 300,
                                                          "shifts_at": [255], "seconds": 9.0,
                                                          "what": "y"},
        "llama.cpp q4_1 dense": {"ppl": 7.5, "tokens": 300, "seconds": 12.0, "what": "y"}})
    return d


def write(root, name: str, data: dict) -> str:
    folder = root / "peer_llamacpp"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return str(path)


def parts(path: str) -> dict:
    """One run's file as the result of every part (what an override gives)."""
    return {part: Result.from_file(part, path) for part in (peer_llamacpp.LOAD, peer_llamacpp.PPL)}


def blocks(results: dict) -> dict[str, str]:
    rendered = report.render_blocks(results)
    return {**rendered["docs/peer_llamacpp.md"],
            "peer_headline": rendered["README.md"]["peer_headline"]}


def test_the_ratios_shown_are_the_datas(tmp_path):
    path = write(tmp_path, "2026-12-05-abcdef0.json", synthetic("2026-12-05T10:00:00+00:00"))
    out = blocks(parts(path))
    load = out["peer_load"]
    # The ratio table: one row per stream count, streamsink's tokens/s over each llama.cpp's.
    for streams in (1, 8):
        want = [f"{TPS[('streamsink', streams)] / TPS[(other, streams)]:.2f}×"
                for other in ("llamacpp-f32", "llamacpp-q4_1")]
        assert f"| {streams} | {want[0]} | {want[1]} |" in load, load
        assert peer_llamacpp.tokens_per_s_ratio(
            Result.from_file("peer_llamacpp", path).data, "llamacpp-f32", streams) == \
            TPS[("streamsink", streams)] / TPS[("llamacpp-f32", streams)]
    # Every system at every level, with its tokens/s.
    for (system, streams), tps in TPS.items():
        label = peer_llamacpp.label(result_files.load(path), system)
        assert re.search(rf"\| {re.escape(label)} \| {streams} \| {streams} / {streams} \| "
                         rf"{tps:.1f} \|", load), (label, streams)
    assert "llama.cpp Q4_1, default KV (f16)" in load and "llama.cpp F32, f32 KV" in load
    # The probe's answer, each system's prompts, the stall at a shift against the median.
    assert "HTTP 400 `exceed_context_size_error`" in load
    assert f"{PROMPT} prompt" in load and f"{SLOT - 16} prompt" in load
    assert "| 17, 40 | 160 (4.00×), 160 (4.00×) |" in load
    assert "1,458 s (24 min)" in load and "5,400 s (1.5 h)" in load
    assert "img/peer_llamacpp_trace.png" in load

    # The README's line: the same F32 ratios, and who is faster where.
    head = out["peer_headline"]
    assert "0.40× at 1 stream and 1.50× at 8 streams" in head, head
    assert "llama.cpp faster at 1 stream" in head and "streamsink faster at 8 streams" in head
    # The 4-bit rows too (10/40 and 60/48 tokens/s: neither is ahead everywhere, so no winner).
    assert ("(llama.cpp Q4_1, default KV (f16)): 0.25× at 1 stream and 1.25× at 8 streams"
            in head), head
    assert "faster at every stream count" not in head
    assert "HTTP 400" in head and "300 tokens of book: 7.39 against 8.17" in head
    assert "](docs/peer_llamacpp.md)" in head

    ppl = out["peer_ppl"]
    assert "| 7.39 |" in ppl and "| 8.17 |" in ppl and "9.50 ± 1.25" in ppl
    assert "between 127 and 251 recent tokens" in ppl  # slot 256, keep 4
    assert "max |ΔNLL| 1.2e-03" in ppl
    # 30 s over 300 requests
    assert ("one request a token: `llama.cpp f32 context shift keep 4, slot 256` 100 ms a token"
            in ppl)
    assert "img/peer_llamacpp_ppl.png" in ppl

    img = tmp_path / "img"
    results = parts(path)
    assert sorted(report.render_images(results, str(img))) == \
        ["peer_llamacpp_ppl.png", "peer_llamacpp_trace.png"]
    first = {f: (img / f).read_bytes() for f in os.listdir(img)}
    report.render_images(results, str(img))
    assert first == {f: (img / f).read_bytes() for f in os.listdir(img)}  # deterministic


def test_a_run_with_one_part_renders_that_part(tmp_path):
    only_ppl = write(tmp_path, "a.json", synthetic("2026-12-05T10:00:00+00:00", load=False))
    out = blocks(parts(only_ppl))
    assert "No load result" in out["peer_load"] and "| 7.39 |" in out["peer_ppl"]
    only_load = write(tmp_path, "b.json", synthetic("2026-12-05T10:00:00+00:00", ppl=False))
    out = blocks(parts(only_load))
    assert "No perplexity result" in out["peer_ppl"] and "0.40×" in out["peer_load"]
    assert "7.39" not in out["peer_headline"] and "0.40×" in out["peer_headline"]


def test_quick_runs_are_never_chosen(tmp_path):
    # Only smoke runs: the docs say there is no result.
    write(tmp_path, "2026-12-06-abcdef0-quick.json",
          synthetic("2026-12-06T10:00:00+00:00", quick=True))
    write(tmp_path, "2026-12-06-abcdef0-quick-2.json",
          synthetic("2026-12-06T11:00:00+00:00", quick=True))
    assert not set(report.load_results(root=str(tmp_path))) & {peer_llamacpp.LOAD,
                                                                 peer_llamacpp.PPL}
    shown = blocks(report.load_results(root=str(tmp_path)))
    assert "No full run" in shown["peer_load"] and "no full run" in shown["peer_headline"]
    # A full run, older than the smoke runs and than one whose arguments say --quick though its
    # name does not: the full run is the one shown.
    full = write(tmp_path, "2026-12-05-abcdef0.json", synthetic("2026-12-05T10:00:00+00:00"))
    write(tmp_path, "2026-12-07-abcdef0.json",
          synthetic("2026-12-07T10:00:00+00:00", quick=True))
    assert result_files.latest("peer_llamacpp", str(tmp_path)).endswith("2026-12-07-abcdef0.json")
    assert result_files.latest("peer_llamacpp", str(tmp_path), skip_quick=True) == full
    chosen = report.load_results(root=str(tmp_path))
    assert chosen[peer_llamacpp.LOAD].path.endswith("2026-12-05-abcdef0.json")
    assert chosen[peer_llamacpp.PPL].path.endswith("2026-12-05-abcdef0.json")
    assert "smoke run" not in blocks(chosen)["peer_load"]


def test_each_block_shows_the_newest_run_of_its_part(tmp_path):
    full = write(tmp_path, "2026-12-05-abcdef0.json", synthetic("2026-12-05T10:00:00+00:00"))
    only_ppl = synthetic("2026-12-06T10:00:00+00:00", load=False)
    only_ppl["ppl"]["results"]["streamsink 4+252"]["ppl"] = 6.5
    newer_ppl = write(tmp_path, "2026-12-06-abcdef1.json", only_ppl)
    chosen = report.load_results(root=str(tmp_path))
    assert chosen[peer_llamacpp.LOAD].path.endswith(os.path.basename(full))
    assert chosen[peer_llamacpp.PPL].path.endswith(os.path.basename(newer_ppl))
    out = blocks(chosen)
    assert "0.40×" in out["peer_load"] and "| 6.50 |" in out["peer_ppl"]
    assert "2026-12-05-abcdef0.json" in out["peer_load"]
    assert "2026-12-06-abcdef1.json" in out["peer_ppl"]
    # The README's line: ratios from the load run, perplexities from the newer run.
    assert "0.40× at 1 stream" in out["peer_headline"]
    assert "300 tokens of book: 6.50 against 8.17" in out["peer_headline"]


def test_same_weights_ratios_and_goals_are_the_datas(tmp_path):
    path = write(tmp_path, "2026-12-08-abcdef2.json",
                 synthetic_weights("2026-12-08T10:00:00+00:00"))
    d = result_files.load(path)
    out = blocks(parts(path))
    load, goals = out["peer_load"], out["peer_goals"]
    f32, q4, cut = (peer_llamacpp.label(d, n)
                    for n in ("streamsink-f32", "streamsink-q4", "streamsink-q4-cut"))
    assert (f32, q4, cut) == ("streamsink 4+252, fp32", "streamsink 4+252, q4 (bf16)",
                              "streamsink 4+252, q4 (bf16), cut prompts")
    # One ratio column per streamsink row, each over its own peer, at every stream count.
    pairs = [("streamsink-f32", "llamacpp-f32"), ("streamsink-q4", "llamacpp-q4_1"),
             ("streamsink-q4-cut", "llamacpp-q4_1")]
    assert (f"| streams | tokens/s: {f32} ÷ llama.cpp F32, f32 KV | tokens/s: {q4} ÷ llama.cpp "
            f"Q4_1, default KV (f16) | tokens/s: {cut} ÷ llama.cpp Q4_1, default KV (f16) |"
            in load), load
    for streams in (1, 8, 32, 64):
        want = [f"{WEIGHTS_TPS[a][streams] / WEIGHTS_TPS[b][streams]:.2f}×" for a, b in pairs]
        assert f"| {streams} | {' | '.join(want)} |" in load, (streams, load)
    # ITL p50 at one stream over the peer's (90/60, 22/20; not the cut row's).
    assert (f"{f32} ÷ llama.cpp F32, f32 KV 1.50×; {q4} ÷ llama.cpp Q4_1, default KV (f16) "
            "1.10×." in load), load
    # The KV a stream holds, in the load table (MiB / tokens).
    assert re.search(rf"\| {re.escape(q4)} \| 64 \| 64 / 64 \| 72\.0 \| .* \| 11\.2 / 512 \|",
                     load), load
    assert "TTFT is comparable only between " + cut in load
    assert "llama-server's cut prompts (the same prefill work" in load
    # The goals: q4 against Q4_1 (and the cut row for tokens/s), each verdict from the data.
    rows = {(g["goal"], g["system"]): g for g in peer_llamacpp.goals(d)}
    assert rows[("tokens/s at 1 stream", "streamsink-q4")]["value"] == 18.0 / 30.0
    for row in ([f"tokens/s at 1 stream | {q4} | ≥ 0.90× | 0.60× | missed by 33.3%",  # 18/30
                 f"tokens/s at 1 stream | {cut} | ≥ 0.90× | 0.63× | missed by 29.6%",  # 19/30
                 f"tokens/s at 8 streams | {q4} | ≥ 1.00× | 1.00× | met (0.0% to spare)",
                 f"tokens/s at 32 streams | {q4} | ≥ 1.00× | 1.10× | met (10.0% to spare)",
                 f"tokens/s at 64 streams | {cut} | ≥ 1.00× | 1.25× | met (25.0% to spare)",
                 f"ITL p50 at 1 stream | {q4} | ≤ 1.20× | 1.10× | met (8.3% to spare)",  # 22/20
                 f"KV bytes a stream holds (llama-server: a slot) | {q4} | ≤ 1.00× | "
                 "2.00× (11.2 ÷ 5.6 MiB) | missed by 100.0%"]):
        assert f"| {row} |" in goals, (row, goals)
    assert "the q4 rows against llama.cpp Q4_1, default KV (f16)" in goals
    assert "2026-12-08-abcdef2.json" in goals
    # No ITL or KV goal for the cut row, no goal for fp32.
    assert not any(g["system"] == "streamsink-q4-cut" and not g["goal"].startswith("tokens/s")
                   for g in peer_llamacpp.goals(d))
    assert f32 not in goals

    # The README's line: every pair's ratios at every stream count.
    head = out["peer_headline"]
    assert ("tokens/s, streamsink ÷ llama.cpp on the same weights at 1, 8, 32 and 64 streams "
            "(64 generated tokens a stream): fp32 ÷ F32 0.80×, 1.20×, 1.60×, 1.50×; "
            "q4 (bf16) ÷ Q4_1 0.60×, 1.00×, 1.10×, 1.12×; q4 (bf16) with llama-server's cut "
            "prompts (equal prefill work) ÷ Q4_1 0.63×, 1.10×, 1.00×, 1.25×") in head, head
    assert "peak server memory at 64 streams 1,064 MiB (fp32) against 1,064 MiB (F32" in head
    assert "(q4: 7.77 against 8.58 with Q4_1)" in head

    # The perplexity rows of the q4 weights and of the dense Q4_1 feed, each explained.
    ppl = out["peer_ppl"]
    assert ("| `streamsink q4 4+252` | the same as the `streamsink 4+252` row, with the q4 "
            "checkpoint (4-bit weights re-quantized from the Q4_1 GGUF's, bf16 activations and "
            "KV cache) | 300 | 7.77 |") in ppl, ppl
    assert "| `streamsink q4 dense` | the same as the `streamsink dense` row, with the q4" in ppl
    assert ("| `llama.cpp q4_1 dense` | the same feed in a slot larger than the text, with the "
            "Q4_1 GGUF (its default KV type): what its context shift row loses against |") in ppl
    assert "| `llama.cpp f32 context shift keep 4, slot 256` | the text fed" in ppl

    # Another tokens/s, another verdict: the goals follow the data.
    faster = {**WEIGHTS_TPS, "streamsink-q4": {**WEIGHTS_TPS["streamsink-q4"], 1: 28.0}}
    flipped = write(tmp_path, "2026-12-09-abcdef3.json",
                    synthetic_weights("2026-12-09T10:00:00+00:00", faster))
    goals = blocks(parts(flipped))["peer_goals"]
    assert f"| tokens/s at 1 stream | {q4} | ≥ 0.90× | 0.93× | met (3.7% to spare) |" in goals
    assert f"| tokens/s at 1 stream | {cut} | ≥ 0.90× | 0.63× | missed by 29.6% |" in goals


def test_a_run_before_the_weights_were_chosen_judges_no_goal(tmp_path):
    path = write(tmp_path, "2026-12-05-abcdef0.json", synthetic("2026-12-05T10:00:00+00:00"))
    d = result_files.load(path)
    assert not peer_llamacpp.has_peers(d) and peer_llamacpp.goals(d) == []
    out = blocks(parts(path))
    assert "no goal is judged" in out["peer_goals"]
    assert "2026-12-05-abcdef0.json" in out["peer_goals"]
    # Its one streamsink row keeps its label, no KV column, no ITL ratios.
    assert peer_llamacpp.label(d, "streamsink") == "streamsink 4+252"
    assert "KV a stream holds" not in out["peer_load"] and "ITL p50 at 1 stream" not in \
        out["peer_load"]
