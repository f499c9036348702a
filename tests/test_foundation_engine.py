"""The installed plugin, the CLI and the default checkpoint, seen through a real vLLM engine."""
import os
import subprocess
import sys

import pytest

STREAMSINK = [sys.executable, "-m", "streamsink.serving.cli"]


@pytest.fixture(scope="module")
def default_model_path():
    done = subprocess.run(STREAMSINK + ["model-path"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_model_path_is_a_checkpoint(default_model_path):
    assert os.path.isfile(os.path.join(default_model_path, "config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(default_model_path))


@pytest.mark.parametrize("bad", ["/definitely/not/a/model", "./no-such-model-dir"])
def test_bad_model_path_is_one_line_error(bad):
    done = subprocess.run(STREAMSINK + ["model-path", "--model", bad], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_demo_streams_in_bounded_blocks(default_model_path):
    """`make demo`'s command, short: it streams, reports the blocks held, and they stay small."""
    done = subprocess.run(STREAMSINK + ["demo", "--tokens", "600", "--window", "60"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [line for line in done.stdout.splitlines() if "KV blocks held peaked at" in line]
    assert summary and summary[0].startswith("600 tokens"), done.stdout[-2000:]
    peak = int(summary[0].split("peaked at ")[1].split()[0])
    # The sink block and the window blocks of 4+60 at B=128; the whole stream would need 5+.
    assert 1 <= peak <= 3
