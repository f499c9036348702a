"""Shared fixtures. Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can look
at the scheduler's KV manager directly; the plugin is still loaded through its entry point."""
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt_neox(tmp_path_factory):
    from tiny_models import make_tiny_gpt_neox

    return make_tiny_gpt_neox(tmp_path_factory.mktemp("tiny_gpt_neox"))


def random_tokens(n: int, seed: int = 1) -> list[int]:
    import torch

    from tiny_models import VOCAB

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def tiny_engine(model_path: str, streamsink: dict | None, **overrides):
    """A vLLM engine on a tiny checkpoint that takes token-id prompts."""
    from vllm import LLM

    kwargs = dict(model=model_path, skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=1 << 28,
                  max_num_seqs=8, max_num_batched_tokens=2048)
    if streamsink is not None:
        kwargs["additional_config"] = {"streamsink": streamsink}
    kwargs.update(overrides)
    return LLM(**kwargs)


def prompt_nlls(llm, prompts: list[list[int]]) -> list[list[float]]:
    """Per-token NLL of each prompt's tokens 1.. under the engine (prompt log-probabilities)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[-o.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
            for o, ids in zip(outs, prompts)]


def compute_references(jobs: list[tuple[str, list[int], int, int]]) -> list[list[float]]:
    """Reference NLLs for (model_path, tokens, S, W) jobs, computed in a fresh interpreter: vLLM's
    Transformers backend decorates Hugging Face model classes in-process (GPT-NeoX), and the
    reference must see them as Hugging Face ships them."""
    import json
    import subprocess

    script = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from reference.streaming_llm import streaming_nll\n"
        "out = []\n"
        "for path, tokens, s, w in json.load(sys.stdin):\n"
        "    out.append(streaming_nll(AutoModelForCausalLM.from_pretrained(path), tokens, s, w))\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(jobs), cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
