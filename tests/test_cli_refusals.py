"""Every command turns a refused configuration into one line, `streamsink: error: <reason>`,
and exit 2, before anything starts; and every server binds loopback unless told otherwise,
beyond loopback only with an API key."""
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSAL = "streamsink does not support GPT2LMHeadModel"


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory):
    """A tiny GPT-2 (an architecture streamsink refuses) that carries a tokenizer, so every
    command gets as far as building the engine config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from streamsink.model_store import resolve_model

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=1, n_head=2, vocab_size=49152,
                               n_positions=2048)).save_pretrained(path)
    source = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), path)
    return str(path)


def streamsink(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "streamsink.serving.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def assert_one_line_refusal(done, reason):
    errors = [line for line in done.stderr.splitlines() if line.startswith("streamsink: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and reason in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout


def test_every_command_refuses_an_unsupported_model(unsupported_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    records = tmp_path / "in.jsonl"
    records.write_text('{"id": 1, "prompt": "Hello"}\n')
    commands = {
        "ppl": ["ppl", "--text", str(text), "--model", unsupported_model],
        "demo": ["demo", "--model", unsupported_model, "--tokens", "5"],
        "serve": ["serve", "--model", unsupported_model],
        "serve --ray": ["serve", "--ray", "--model", unsupported_model],
        "batch": ["batch", "--input", str(records), "--output", str(tmp_path / "out.jsonl"),
                  "--model", unsupported_model],
    }
    from streamsink.serving.loadtest.prometheus import find_prometheus

    if find_prometheus() is not None:  # without it, loadtest refuses for that reason first
        commands["loadtest"] = ["loadtest", "--out", str(tmp_path / "load"), "--model",
                                unsupported_model]
    from concurrent.futures import ThreadPoolExecutor

    # Mostly single-threaded imports: a few at a time use the cores.
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(commands, pool.map(lambda a: streamsink(*a), commands.values())))
    for name, done in results.items():
        assert_one_line_refusal(done, REFUSAL)
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "load" / "report.json").exists()


def test_bad_values_are_one_line_in_every_command(tmp_path):
    """Values the streamsink config rejects, before any model is loaded."""
    for args in (["ppl", "--text", "x", "--sink", "-1"], ["demo", "--window", "0"],
                 ["serve", "--window", "0"]):
        assert_one_line_refusal(streamsink(*args), "must be >= ")


def test_servers_bind_loopback_unless_told(monkeypatch):
    from streamsink.serving.serve import plain_server_argv

    monkeypatch.delenv("STREAMSINK_API_KEY", raising=False)
    args = SimpleNamespace(vllm_args=[], host=None, port=None, api_key=None, model=None,
                           weights="auto", sink=4, window=1020)
    argv = plain_server_argv(args)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--api-key" not in argv
    monkeypatch.setenv("STREAMSINK_API_KEY", "k3y")
    argv = plain_server_argv(SimpleNamespace(**{**vars(args), "host": "0.0.0.0"}))
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--api-key") + 1] == "k3y"


@pytest.mark.parametrize("ray", [False, True])
def test_open_host_needs_an_api_key(ray):
    env = dict(os.environ)
    env.pop("STREAMSINK_API_KEY", None)
    done = streamsink("serve", *(["--ray"] if ray else []), "--host", "0.0.0.0", env=env,
                      timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "streamsink: error: --host 0.0.0.0 opens the API beyond this machine; give --api-key "
        "KEY (or $STREAMSINK_API_KEY) so clients must authenticate"]
