"""`streamsink batch`: bad input refused before anything starts; per-record errors, prompts and
generations past max_model_len; SIGTERM mid-way stops everything within 30 s (exit 0, nothing of
the run left), and the resume gives every id once with the same greedy text as an uninterrupted
run (a write cut short by a harder kill is simulated: a torn last line).

Cost: the bad-input and file tests start no engine (fractions of a second each). The engine tests
share three runs of the command on a tiny random Llama that carries the default model's tokenizer
(the command takes text): an uninterrupted run and a run stopped with SIGTERM mid-way go side by
side (their start-up is mostly single-threaded imports), then the stopped run is resumed.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import tagged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMSINK = [sys.executable, "-m", "streamsink.serving.cli", "batch"]

SUMMARY = re.compile(r"^records=(\d+) ok=(\d+) errors=(\d+) skipped=(\d+) "
                     r"generated_tokens=(\d+) tokens_per_s=(\d+\.\d+)$")

# A streaming engine with narrow worker rows: 4+252 needs max_model_len >= 768 with 256-token
# chunks, so 1024 lets prompts and generations run past it cheaply.
MAX_MODEL_LEN = 1024
ENGINE_ARGS = ["--window", "252", "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(1 << 28),
               # two streams at a time: the batch runs in waves, so a kill lands mid-way
               "--max-num-seqs", "2", "--enforce-eager"]


def batch(args, timeout=900, **kwargs):
    return subprocess.run(STREAMSINK + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


# ---------------------------------------------------------------- bad input: no engine, fast

BAD_INPUTS = [
    # (lines of IN.jsonl, what the one-line error must name)
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}', '{"id": 3, "prompt": '],
     ["line 3", "not valid JSON"]),
    (['{"id": 1, "prompt": "a"}', '{"prompt": "no id"}'], ["line 2", "id"]),
    (['{"id": 1, "prompt": "a"}', '{"id": 2}'], ["line 2", "prompt"]),
    (['{"id": "x", "prompt": "a"}', '{"id": "y", "prompt": "b"}', '{"id": "x", "prompt": "c"}'],
     ["line 3", "duplicate id", "line 1"]),
    (['{"id": 1, "prompt": "a", "max_tokens": "many"}'], ["line 1", "max_tokens"]),
    (['[1, 2]'], ["line 1", "object"]),
]


@pytest.mark.parametrize("lines,expected", BAD_INPUTS)
@pytest.mark.parametrize("out_exists", [False, True])
def test_bad_input_refused_before_anything_starts(tmp_path, lines, expected, out_exists):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    before = b'{"id": 0, "text": "done before"}\n{"id": 9, "te'  # with a torn last line
    if out_exists:
        out.write_bytes(before)
    t0 = time.monotonic()
    done = batch(["--input", str(inp), "--output", str(out)], timeout=60)
    assert done.returncode == 2, done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("streamsink: error:"), done.stderr
    for word in expected:
        assert word in errors[0], errors[0]
    # OUT untouched: not created, or byte for byte what it was (its torn line too).
    assert out.read_bytes() == before if out_exists else not out.exists()
    assert time.monotonic() - t0 < 30  # refused up front, not after an engine start


def test_missing_input_file(tmp_path):
    done = batch(["--input", str(tmp_path / "nope.jsonl"), "--output",
                  str(tmp_path / "out.jsonl")], timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"streamsink: error: input file {tmp_path / 'nope.jsonl'} not found"]
    assert not (tmp_path / "out.jsonl").exists()


def test_output_that_is_not_ours_is_refused(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": 1, "prompt": "a"}])
    out.write_text('{"id": 1, "text": "x"}\nnot json at all\n')
    done = batch(["--input", str(inp), "--output", str(out)], timeout=60)
    assert done.returncode == 2 and "line 2" in done.stderr
    assert out.read_text() == '{"id": 1, "text": "x"}\nnot json at all\n'


def test_everything_done_already_starts_nothing(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": 1, "prompt": "a"}, {"id": "2", "prompt": "b"}])
    write_jsonl(out, [{"id": "2", "error": "x"}, {"id": 1, "text": "t"}])
    done = batch(["--input", str(inp), "--output", str(out)], timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "records=2 ok=0 errors=0 skipped=2 generated_tokens=0 tokens_per_s=0.00")


def test_scan_output_drops_only_a_torn_last_line(tmp_path):
    from streamsink.serving.batch_io import OutputWriter, id_key, scan_output

    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "text": "a"}\n{"id": "1", "error": "e"}\n{"id": 3, "tex')
    state = scan_output(str(out))
    assert state.done == {id_key(1), id_key("1")} and state.torn  # 1 and "1" differ
    writer = OutputWriter(str(out), state)
    writer.write({"id": 3, "text": "c"})
    writer.close()
    assert [r["id"] for r in read_jsonl(out)] == [1, "1", 3]


def test_finish_reason():
    from streamsink.serving.batch import finish_reason

    assert finish_reason(5, 16, 7, {2}) == "stop"      # ended early: a stop token
    assert finish_reason(16, 16, 7, {2}) == "length"   # ran to the cap
    assert finish_reason(16, 16, 2, {2}) == "stop"     # EOS as the last allowed token


# ------------------------------------------------------- engine runs (shared by the tests below)

def _text(n_sentences: int, seed: int) -> str:
    words = ["river", "lamp", "stone", "harbour", "winter", "letter", "garden", "bell", "road",
             "candle", "orchard", "mill", "sail", "meadow", "clock", "bridge"]
    out = []
    for i in range(n_sentences):
        k = (seed * 7919 + i * 104729) % 9973
        out.append(f"Line {i}: the {words[k % 16]} by the {words[(k // 16) % 16]} was "
                   f"{words[(k // 256) % 16]}.")
    return " ".join(out)


def make_records():
    records = [{"id": f"r{i}", "prompt": _text(4 + i % 5, i), "max_tokens": 24}
               for i in range(16)]
    records += [
        # prompt alone past max_model_len
        {"id": "long-prompt", "prompt": _text(120, 101), "max_tokens": 16},
        # prompt + generation past max_model_len
        {"id": "long-generation", "prompt": _text(75, 102), "max_tokens": 160},
        # a chat record (template applied)
        {"id": 7, "messages": [{"role": "user", "content": "Name three rivers."}],
         "max_tokens": 12},
        # vLLM refuses this record's sampling value: an error line, the batch goes on
        {"id": "bad-temperature", "prompt": "Hello", "temperature": -1.0},
        # sampled with a seed (not compared across runs: only greedy text is promised)
        {"id": "sampled", "prompt": _text(3, 5), "temperature": 0.8, "seed": 3, "max_tokens": 8},
    ]
    return records


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"))


@pytest.fixture(scope="module")
def runs(tok_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    records = make_records()
    inp = d / "in.jsonl"
    write_jsonl(inp, records)
    common = ["--input", str(inp), "--model", tok_model] + ENGINE_ARGS

    tags = {"full": tagged.new_tag(), "stopped": tagged.new_tag()}

    def start(out, log, tag):
        return subprocess.Popen(STREAMSINK + common + ["--output", str(out)], cwd=ROOT,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=tagged.tagged_env(tag))

    full = start(d / "full.jsonl", d / "full.log", tags["full"])
    stopped = start(d / "resumed.jsonl", d / "stopped.log", tags["stopped"])
    lines_at_stop = stop_took = left_after_stop = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and stopped.poll() is None:
            path = d / "resumed.jsonl"
            n = path.read_bytes().count(b"\n") if path.exists() else 0
            if n >= 3:
                stop_took = tagged.stop_and_time(stopped, signal.SIGTERM, timeout_s=120)
                left_after_stop = tagged.leftovers(tags["stopped"])
                lines_at_stop = n
                break
            time.sleep(0.05)
        full.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in (full, stopped):
            if proc.poll() is None:
                proc.kill()
        for tag in tags.values():
            tagged.kill_tagged(tag)
    # A kill can cut a line short; make sure the resume sees one (what a write cut mid-way
    # leaves: no newline at the end).
    with open(d / "resumed.jsonl", "ab") as f:
        f.write(b'{"id": "r3", "text": "cut sh')
    done_before = read_jsonl_complete(d / "resumed.jsonl")
    resume = subprocess.run(STREAMSINK + common + ["--output", str(d / "resumed.jsonl")],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            start_new_session=True)
    return dict(records=records, full_rc=full.returncode, full_log=(d / "full.log").read_text(),
                full=read_jsonl(d / "full.jsonl"), lines_at_stop=lines_at_stop,
                stop_rc=stopped.returncode, stop_took=stop_took, left=left_after_stop,
                stop_log=(d / "stopped.log").read_text(),
                done_before=done_before, resume=resume,
                resumed_raw=(d / "resumed.jsonl").read_bytes())


def read_jsonl_complete(path):
    data = path.read_bytes()
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line]


def summary(output: str):
    last = output.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"no summary line: {last!r}"
    return [int(g) for g in match.groups()[:5]] + [float(match.group(6))]


def test_uninterrupted_run(runs):
    assert runs["full_rc"] == 0, runs["full_log"][-3000:]
    records, full = runs["records"], runs["full"]
    n, ok, errors, skipped, generated, rate = summary(runs["full_log"])
    assert (n, ok, errors, skipped) == (len(records), len(records) - 1, 1, 0)
    assert sorted(map(json.dumps, (r["id"] for r in full))) == \
        sorted(map(json.dumps, (r["id"] for r in records)))
    assert generated == sum(r.get("generated_tokens", 0) for r in full) and rate > 0
    for row in full:
        if "error" not in row:
            assert set(row) == {"id", "text", "prompt_tokens", "generated_tokens",
                                "finish_reason"}
            assert row["finish_reason"] in ("stop", "length")


def test_per_record_error_does_not_stop_the_batch(runs):
    by_id = {json.dumps(r["id"]): r for r in runs["full"]}
    bad = by_id['"bad-temperature"']
    assert set(bad) == {"id", "error"} and "temperature" in bad["error"]
    assert sum("error" in r for r in runs["full"]) == 1


def test_records_past_max_model_len_complete(runs):
    by_id = {r["id"]: r for r in runs["full"]}
    long_prompt, long_gen = by_id["long-prompt"], by_id["long-generation"]
    assert long_prompt["prompt_tokens"] > MAX_MODEL_LEN
    assert long_prompt["generated_tokens"] == 16 and long_prompt["finish_reason"] == "length"
    assert long_gen["prompt_tokens"] < MAX_MODEL_LEN
    assert long_gen["prompt_tokens"] + long_gen["generated_tokens"] > MAX_MODEL_LEN
    assert long_gen["generated_tokens"] == 160
    assert by_id[7]["prompt_tokens"] > 10  # the chat template wrapped the message


def test_sigterm_mid_batch_stops_everything(runs):
    assert runs["lines_at_stop"] is not None, "the run finished before it could be stopped"
    assert runs["stop_rc"] == 0, runs["stop_log"][-3000:]
    assert runs["stop_took"] < 30
    assert runs["left"] == []


def test_resume_after_a_stop(runs):
    records, resume = runs["records"], runs["resume"]
    assert runs["lines_at_stop"] is not None, "the run finished before it could be stopped"
    before = runs["done_before"]
    assert 3 <= len(before) < len(records), "the stop did not land mid-way"
    assert resume.returncode == 0, resume.stderr[-3000:]
    n, ok, errors, skipped, _, _ = summary(resume.stdout)
    assert skipped == len(before) and n == len(records) and ok + errors + skipped == n
    # Every id exactly once, the torn line gone, nothing but whole lines.
    raw = runs["resumed_raw"]
    assert raw.endswith(b"\n") and b"cut sh" not in raw
    final = [json.loads(line) for line in raw.splitlines()]
    ids = [json.dumps(r["id"]) for r in final]
    assert len(ids) == len(set(ids)) == len(records)
    # What the stopped run finished was kept, not redone: it is the start of the file.
    assert final[:len(before)] == before
    # Greedy records: the same text as the uninterrupted run, whichever run produced them.
    full = {json.dumps(r["id"]): r for r in runs["full"]}
    greedy = [json.dumps(r["id"]) for r in records if "temperature" not in r]
    for row in final:
        key = json.dumps(row["id"])
        if key in greedy:
            assert row == full[key], key
