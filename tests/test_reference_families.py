"""The reference (reference/streaming_llm.py) on every model family and RoPE variant it knows,
against Hugging Face's own forward of the same tiny random checkpoint.

- Dense: with a window as long as the sequence, the reference's NLLs are Hugging Face's (model in
  float64, one forward, log-softmax). For the length-dependent RoPE variants (dynamic NTK,
  LongRoPE) the reference's meaning is "as Hugging Face computes for a sequence of the in-cache
  length", so token t is compared with a forward over tokens 0..t, in a one-layer model: in a
  deeper one the upper layers' cached keys and values were computed at earlier steps, under the
  frequencies of those steps, while a forward over 0..t recomputes them under its own.
- Streaming, without trusting the reference's streaming code: in a one-layer model a token's keys
  and values depend on that token alone, so the streaming NLL after query i equals Hugging Face's
  forward over just the visible tokens (sinks, then the window; positions 0..n-1), last position.

Hugging Face's float64 models still compute a few things in float32 on purpose (RoPE angles,
RMSNorm, some softmaxes, GPT-J's sinusoid table), which moves NLLs of these sharpened models by
about 1e-6; the comparison runs its forward with float32 standing for float64, so that what is
left is the reference's own error. Everything runs in a fresh interpreter: vLLM's Transformers
backend, once an engine has used it in a process, rewrites Hugging Face model classes there.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, random_tokens

TOLERANCE = 1e-6
DENSE_TOKENS = 48
STREAM_TOKENS = 40
SINK = 4  # dense runs: window >= length, so the sinks change nothing

# family -> (builder in tiny_models, keyword arguments)
FAMILIES = {
    "llama": ("make_tiny_llama", {}),
    "llama_linear": ("make_tiny_llama_scaled", {"rope_type": "linear"}),
    "llama_dynamic": ("make_tiny_llama_scaled", {"rope_type": "dynamic"}),
    "llama_llama3": ("make_tiny_llama_scaled", {"rope_type": "llama3"}),
    "llama_yarn": ("make_tiny_llama_scaled", {"rope_type": "yarn"}),
    "phi3": ("make_tiny_phi3", {"longrope": False, "partial_rotary_factor": 0.75}),
    "phi3_longrope": ("make_tiny_phi3", {}),
    "qwen2": ("make_tiny_qwen2", {}),
    "qwen3": ("make_tiny_qwen3", {}),
    "gpt_neox": ("make_tiny_gpt_neox", {}),
    "gptj": ("make_tiny_gptj", {}),
    "falcon_multi_query": ("make_tiny_falcon", {"variant": "multi_query"}),
    "falcon_new_decoder": ("make_tiny_falcon", {"variant": "new_decoder"}),
    "falcon_alibi": ("make_tiny_falcon", {"variant": "alibi"}),
    "bloom": ("make_tiny_bloom", {}),
}
LENGTH_DEPENDENT = ["llama_dynamic", "phi3_longrope"]  # thresholds at 16 tokens (tiny_models)
ALIBI = ["falcon_alibi", "bloom"]

# (S, W) for the streaming check; C = 24 takes the length-dependent variants past 16.
SMALL_CACHE = (2, 6)
LONG_CACHE = (4, 20)
STREAM_CASES = ([(f, SMALL_CACHE) for f in FAMILIES] + [(f, LONG_CACHE) for f in LENGTH_DEPENDENT])


def checked_queries(sink: int, window: int) -> list[int]:
    """Queries past C = S+W (every one of them has evicted keys), the last one included."""
    cache = sink + window
    candidates = {cache, cache + 3, 2 * cache + 1, STREAM_TOKENS - 2}
    return sorted(i for i in candidates if cache <= i < STREAM_TOKENS - 1)


# ---- the parent: one fresh interpreter computes everything, the tests read it --------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    jobs = ([["dense", f] for f in FAMILIES]
            + [["stream", f, s, w] for f, (s, w) in STREAM_CASES])
    workdir = str(tmp_path_factory.mktemp("families"))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    script = ("import sys, json\n"
              "from test_reference_families import measure\n"
              "workdir, jobs = json.load(sys.stdin)\n"
              "print(json.dumps([measure(workdir, job) for job in jobs]))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                          input=json.dumps([workdir, jobs]), capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {tuple(job): result for job, result in zip(jobs, results)}


def max_diff(a, b) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_reference_equals_hugging_face(measured, family):
    got = measured[("dense", family)]
    assert max_diff(got["reference"], got["hugging_face"]) <= TOLERANCE


@pytest.mark.parametrize("family", LENGTH_DEPENDENT)
def test_length_dependent_variants_cross_their_threshold_in_these_sequences(measured, family):
    """One forward over all the tokens puts every token on the long-sequence frequencies; the
    in-cache meaning uses the plain (or short) ones for the first 16. If the two agreed, the
    dense check above would not be testing the length dependence at all."""
    got = measured[("dense", family)]
    assert max_diff(got["hugging_face_one_forward"], got["hugging_face"]) > 1e-3


@pytest.mark.parametrize("family,cache", STREAM_CASES,
                         ids=[f"{f}-S{s}W{w}" for f, (s, w) in STREAM_CASES])
def test_streaming_equals_hugging_face_on_the_visible_tokens(measured, family, cache):
    got = measured[("stream", family, *cache)]
    assert [int(i) for i in got["reference"]] == checked_queries(*cache)
    assert max_diff(list(got["reference"].values()),
                    list(got["hugging_face_visible"].values())) <= TOLERANCE


@pytest.mark.parametrize("family,cache", STREAM_CASES,
                         ids=[f"{f}-S{s}W{w}" for f, (s, w) in STREAM_CASES])
def test_the_streaming_check_tells_eviction_and_positions_apart(measured, family, cache):
    """The checked queries really have evicted keys (their NLL differs from the dense one), and,
    for RoPE families, rotating the visible tokens by their positions in the stream instead of
    their cache slots would have failed the check above."""
    got = measured[("stream", family, *cache)]
    assert max_diff(list(got["reference"].values()),
                    list(got["reference_dense"].values())) > 1e-3
    if family not in ALIBI:
        assert max_diff(list(got["reference"].values()),
                        list(got["hugging_face_stream_positions"].values())) > 1e-3


# ---- the child: builds the checkpoints and runs the reference and Hugging Face -------------

def measure(workdir: str, job: list) -> dict:
    kind, family = job[0], job[1]
    if kind == "dense":
        layers = 1 if family in LENGTH_DEPENDENT else 2
        return _measure_dense(_checkpoint(workdir, family, layers), family)
    return _measure_stream(_checkpoint(workdir, family, layers=1), *job[2:])


def _checkpoint(workdir: str, family: str, layers: int) -> str:
    import tiny_models

    path = os.path.join(workdir, f"{family}-{layers}")
    if not os.path.exists(path):
        builder, kwargs = FAMILIES[family]
        getattr(tiny_models, builder)(path, layers=layers, **kwargs)
    return path


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).to(torch.float64).eval()


def _measure_dense(path: str, family: str) -> dict:
    from reference.streaming_llm import streaming_nll

    tokens = random_tokens(DENSE_TOKENS, seed=3)
    model = _load(path)
    one_forward = _hf_nlls(model, tokens)
    prefixes = [_hf_next_nll(model, tokens[:t + 1], tokens[t + 1]) for t in range(len(tokens) - 1)]
    return {"reference": streaming_nll(_load(path), tokens, SINK, DENSE_TOKENS),
            "hugging_face": prefixes if family in LENGTH_DEPENDENT else one_forward,
            "hugging_face_one_forward": one_forward}


def _measure_stream(path: str, sink: int, window: int) -> dict:
    from reference.streaming_llm import streaming_nll

    tokens = random_tokens(STREAM_TOKENS, seed=4)
    model = _load(path)
    streamed = streaming_nll(_load(path), tokens, sink, window)
    dense = streaming_nll(_load(path), tokens, sink, STREAM_TOKENS)
    got = {"reference": {}, "reference_dense": {}, "hugging_face_visible": {},
           "hugging_face_stream_positions": {}}
    for i in checked_queries(sink, window):
        visible = list(range(sink)) + list(range(i - window + 1, i + 1))
        context = [tokens[j] for j in visible]
        got["reference"][i] = streamed[i]
        got["reference_dense"][i] = dense[i]
        got["hugging_face_visible"][i] = _hf_next_nll(model, context, tokens[i + 1])
        if model.config.model_type != "bloom" and not getattr(model.config, "alibi", False):
            got["hugging_face_stream_positions"][i] = _hf_next_nll(model, context, tokens[i + 1],
                                                                   positions=visible)
    return got


@contextlib.contextmanager
def _float32_means_float64():
    import torch
    from unittest import mock

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with mock.patch.object(torch, "float32", torch.float64), \
                mock.patch.object(torch, "float", torch.float64), \
                mock.patch.object(torch.Tensor, "float", torch.Tensor.double):
            yield
    finally:
        torch.set_default_dtype(default)


def _rebuild_position_tables(model) -> None:
    """Rebuild what Hugging Face computes at construction in float32 (rotary inverse
    frequencies, GPT-J's sin/cos table), inside _float32_means_float64. A fresh rotary module
    per forward also forgets the longest sequence dynamic NTK has seen (it keeps its scaled base
    for any shorter sequence that is still past max_position_embeddings), so that every forward
    means what it would for a freshly loaded model."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, type(module)(module.config))
        if hasattr(module, "embed_positions"):
            table = sys.modules[type(module).__module__].create_sinusoidal_positions
            module.embed_positions = table(module.max_positions, module.pos_embd_dim)


def _hf_log_probs(model, tokens, positions=None):
    import torch

    with torch.no_grad(), _float32_means_float64():
        _rebuild_position_tables(model)
        kwargs = {} if positions is None else {"position_ids": torch.tensor([positions])}
        logits = model(input_ids=torch.tensor([tokens]), **kwargs).logits[0]
        return torch.log_softmax(logits.to(torch.float64), dim=-1)


def _hf_nlls(model, tokens) -> list[float]:
    log_probs = _hf_log_probs(model, tokens)
    return [-float(log_probs[t, tokens[t + 1]]) for t in range(len(tokens) - 1)]


def _hf_next_nll(model, context, next_token, positions=None) -> float:
    return -float(_hf_log_probs(model, context, positions)[-1, next_token])
