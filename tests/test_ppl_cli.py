"""`streamsink ppl` on a real book and the default model, against the literal reference."""
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, References

BOOK = os.path.join(ROOT, "..", "shared", "data", "katrine-14263.txt")
SINK, WINDOW, OFFSET, TOKENS = 4, 60, 1000, 240  # ~4 caches of 64: the float64 reference is slow


@pytest.fixture(scope="module")
def default_model():
    done = subprocess.run([sys.executable, "-m", "streamsink.serving.cli", "model-path"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not os.path.exists(BOOK), reason="shared book data not present")
def test_ppl_matches_reference_on_a_book(default_model, tmp_path):
    from transformers import AutoTokenizer

    with open(BOOK, encoding="utf-8") as f:
        ids = AutoTokenizer.from_pretrained(default_model)(f.read())["input_ids"]
    reference = References([(default_model, ids[OFFSET:OFFSET + TOKENS], SINK, WINDOW)])
    out = tmp_path / "nll.txt"
    done = subprocess.run(
        [sys.executable, "-m", "streamsink.serving.cli", "ppl", "--text", BOOK,
         "--sink", str(SINK), "--window", str(WINDOW), "--offset", str(OFFSET),
         "--max-tokens", str(TOKENS), "--out", str(out), "--chunk", "256",
         "--weights", "fp32"],  # the reference computes in float32
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("ppl=") and last.endswith(f"tokens={TOKENS - 1}"), last
    got = [float(v) for v in out.read_text().split()]
    expected = reference[0]
    assert len(got) == len(expected) == TOKENS - 1
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3
    ppl = float(last.split()[0].split("=")[1])
    assert math.isclose(ppl, math.exp(sum(expected) / len(expected)), rel_tol=1e-4)


def test_ppl_missing_text_is_one_line_error(default_model, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "streamsink.serving.cli", "ppl", "--text",
         str(tmp_path / "nope.txt"), "--model", default_model],
        capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "nope.txt" in done.stderr
