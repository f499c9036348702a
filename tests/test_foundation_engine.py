"""The installed plugin, the CLI and the default checkpoint, seen through a real vLLM engine."""
import os
import subprocess
import sys
import textwrap

import pytest

STREAMSINK = [sys.executable, "-m", "streamsink.serving.cli"]

ENGINE_SCRIPT = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512,
                  kv_cache_memory_bytes=1 << 28)
        out = llm.generate(["The capital of France is"],
                           SamplingParams(max_tokens=8, temperature=0))
        print("GENERATED:" + repr(out[0].outputs[0].text))
""")


@pytest.fixture(scope="module")
def default_model_path():
    done = subprocess.run(STREAMSINK + ["model-path"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_model_path_is_a_checkpoint(default_model_path):
    assert os.path.isfile(os.path.join(default_model_path, "config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(default_model_path))


def test_plugin_loaded_in_every_vllm_process_and_checkpoint_generates(default_model_path,
                                                                      tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    # Multiprocessing on (as users run it): the engine core and the worker are separate processes.
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([sys.executable, str(script), default_model_path], env=env,
                          capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    loaded = [line for line in log.splitlines() if "streamsink" in line and "plugin loaded" in line]
    assert any("EngineCore" in line for line in loaded), loaded
    assert any("Worker" in line for line in loaded), loaded
    generated = [line for line in log.splitlines() if line.startswith("GENERATED:")]
    assert generated and "Paris" in generated[0], generated


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
