"""README.md as a user reads it: short, its Python example runs as written, and every command it
shows exists. (`streamsink serve` as the README starts it is tested in test_metrics_endpoint.py;
its numbers are generated and checked in test_docs.py.)"""
import os
import re
import subprocess
import sys

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_readme_is_short():
    assert readme().count("\n") < 300


def test_every_command_it_shows_exists():
    from streamsink.serving.cli import COMMANDS

    blocks = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", readme(), re.S))
    shown = set(re.findall(r"\bstreamsink (\w[\w-]*)", blocks))
    assert shown and shown <= set(COMMANDS), shown - set(COMMANDS)


def test_python_example_runs_as_written(tmp_path):
    """The `vllm.LLM` example, run as a user would run it: its own interpreter, no KV budget
    given (the streaming engine sizes its pool), a prompt longer than the window."""
    match = re.search(r"<!-- example:python -->\s*```python\n(.*?)```", readme(), re.S)
    assert match, "README.md has no marked Python example"
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                        "VLLM_LOGGING_LEVEL")}
    done = subprocess.run([sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if " prompt tokens, then: " in ln]
    tokens, _, text = line.partition(" prompt tokens, then: ")
    assert int(tokens) > 1024 and text.strip("'\" ")
    log = done.stdout + done.stderr
    assert "streamsink: KV pool" in log
    # The plugin loads through vLLM's entry point in every vLLM process: the engine core and its
    # worker run apart from this one (multiprocessing on, as users run it).
    loaded = [line for line in log.splitlines() if "streamsink" in line and "plugin loaded" in line]
    assert any("EngineCore" in line for line in loaded), loaded
    assert any("Worker" in line for line in loaded), loaded


def test_pinned_prompt_example_runs_as_written(tmp_path):
    """docs/pinned_prompt.md's `vllm.LLM` example (pin the system prompt through LLM.chat)."""
    with open(os.path.join(ROOT, "docs", "pinned_prompt.md"), encoding="utf-8") as f:
        match = re.search(r"<!-- example:pinned_python -->\s*```python\n(.*?)```", f.read(),
                          re.S)
    assert match, "docs/pinned_prompt.md has no marked Python example"
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    done = subprocess.run([sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("answer:")]
    assert line.removeprefix("answer:").strip()
