"""Every model family and RoPE/ALiBi variant through one streaming engine each, for
tests/test_families.py and benchmarks/families.py.

One engine per family runs, in one generate call, three streams several times C = S+W long: one
past max_model_len from its prompt on (chunked prefill past C, row rebases), one that starts
shorter than C and decodes past it (dense, the decode right after C, sink shadows), one in
between; vLLM's scheduler mixes their decodes with the others' prefill chunks. A second call
continues the longest stream from the prefix cache. A step-plan spy counts which attention paths
ran. The NLLs of every prompt and generated token are collected for comparison with the
reference (reference/streaming_llm.py) over the same token sequences.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field

import tiny_models
from conftest import References, random_tokens, tiny_engine

# name -> (builder in tiny_models, keyword arguments). The length-dependent variants get
# thresholds (64) above the in-cache length the streams use, which the engine requires; every
# model's context covers the streams' rows (max_model_len), which vLLM requires.
FAMILY_MODELS = {
    "llama": ("make_tiny_llama", {}),
    "llama_linear": ("make_tiny_llama_scaled", {"rope_type": "linear"}),
    "llama_llama3": ("make_tiny_llama_scaled", {"rope_type": "llama3"}),
    "llama_yarn": ("make_tiny_llama_scaled", {"rope_type": "yarn",
                                              "original_max_positions": 64}),
    "llama_dynamic": ("make_tiny_llama_scaled", {"rope_type": "dynamic",
                                                 "original_max_positions": 64}),
    "mistral": ("make_tiny_mistral", {}),
    "qwen2": ("make_tiny_qwen2", {}),
    "qwen3": ("make_tiny_qwen3", {}),
    "phi3": ("make_tiny_phi3", {"longrope": False, "partial_rotary_factor": 0.75,
                                "max_positions": 256}),
    "phi3_longrope": ("make_tiny_phi3", {"original_max_positions": 64, "max_positions": 256}),
    "gpt_neox": ("make_tiny_gpt_neox", {}),
    "gptj": ("make_tiny_gptj", {}),
    "falcon_multi_query": ("make_tiny_falcon", {"variant": "multi_query"}),
    "falcon_new_decoder": ("make_tiny_falcon", {"variant": "new_decoder"}),
    "falcon_alibi": ("make_tiny_falcon", {"variant": "alibi"}),
    "bloom": ("make_tiny_bloom", {}),
}


def build_model(name: str, directory: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        builder, kwargs = FAMILY_MODELS[name]
        getattr(tiny_models, builder)(path, **kwargs)
    return path


@dataclass(frozen=True)
class StreamShape:
    """S, W, KV block size, row width (max_model_len), step (max_num_batched_tokens); prompt
    lengths and generated tokens of the first call's streams; then the continuation's new
    tokens and generated tokens. Defaults: C = 32 in blocks of 32, the narrowest row a step of
    32 allows, streams up to ~6 C: small, as the float64 reference goes one token at a time."""
    sink: int = 4
    window: int = 28
    block: int = 32
    max_model_len: int = 128
    step: int = 32
    prompts: tuple[int, ...] = (150, 60, 20)
    generated: int = 16
    continuation: int = 20
    continuation_generated: int = 12

    @property
    def cache_tokens(self) -> int:
        return self.sink + self.window


@dataclass
class Sequence:
    """A token sequence and the engine's NLL of tokens[t+1] given tokens[<=t], by t."""
    tokens: list[int]
    nlls: dict[int, float] = field(default_factory=dict)


@dataclass
class FamilyRun:
    sequences: list[Sequence]
    cached_tokens: int = 0          # prefix-cache hit of the continuation
    rebases: int = 0                # worker row rebases
    paths: dict[str, int] = field(default_factory=dict)   # attention paths taken, in steps


class _PlanSpy:
    """Counts the step plans' attention paths (wraps streamsink.attention.plan_step)."""

    def __init__(self) -> None:
        self.paths = {"kernel_shadows": 0, "pytorch": 0, "mixed": 0}

    def __enter__(self):
        from streamsink import attention

        self.module, self.original = attention, attention.plan_step

        def spy(*args, **kwargs):
            plan = self.original(*args, **kwargs)
            self.paths["kernel_shadows"] += plan.shadows is not None
            pytorch = bool(plan.tiles) or plan.decodes is not None
            self.paths["pytorch"] += pytorch
            self.paths["mixed"] += pytorch and bool(plan.kernel_reqs)
            return plan

        attention.plan_step = spy
        return self

    def __exit__(self, *exc) -> None:
        self.module.plan_step = self.original


def _params(max_tokens: int, prompt_logprobs: bool):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, detokenize=False,
                          ignore_eos=True, prompt_logprobs=0 if prompt_logprobs else None)


def _collect(out, prompt: list[int], prompt_logprobs: bool) -> Sequence:
    generated = list(out.outputs[0].token_ids)
    seq = Sequence(prompt + generated)
    if prompt_logprobs:
        for t in range(1, len(prompt)):
            seq.nlls[t - 1] = -out.prompt_logprobs[t][prompt[t]].logprob
    for k, (token, logprobs) in enumerate(zip(generated, out.outputs[0].logprobs)):
        seq.nlls[len(prompt) + k - 1] = -logprobs[token].logprob
    return seq


def run_streaming(model_path: str, shape: StreamShape, seed: int = 0,
                  **engine_overrides) -> FamilyRun:
    from streamsink.row_window import rows_of

    llm = tiny_engine(model_path, {"sink_tokens": shape.sink, "window_tokens": shape.window},
                      block_size=shape.block, max_model_len=shape.max_model_len,
                      max_num_batched_tokens=shape.step, max_num_seqs=len(shape.prompts),
                      enable_prefix_caching=True, **engine_overrides)
    try:
        with _PlanSpy() as spy:
            prompts = [random_tokens(n, seed=seed + n) for n in shape.prompts]
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                _params(shape.generated, True), use_tqdm=False)
            first = [_collect(o, p, True) for o, p in zip(outs, prompts)]
            # The longest stream continues (a next turn): its blocks come from the prefix cache,
            # so its prompt log-probabilities are not asked for (vLLM would bypass the cache).
            longest = first[0]
            prompt = longest.tokens + random_tokens(shape.continuation, seed=seed + 7)
            (out,) = llm.generate([{"prompt_token_ids": prompt}],
                                  _params(shape.continuation_generated, False), use_tqdm=False)
            continued = _collect(out, prompt, False)
        continued.nlls.update(longest.nlls)   # the same tokens: one reference covers both
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        return FamilyRun([continued] + first[1:], cached_tokens=out.num_cached_tokens,
                         rebases=rows_of(runner.input_batch).rebases, paths=spy.paths)
    finally:
        del llm
        gc.collect()


def dense_prefix(model_path: str, shape: StreamShape) -> int:
    """How many tokens of a stream stock vLLM runs against the reference: C + 1 (streaming is
    dense for queries < C), fewer when vLLM's own max_model_len (prompt + 1) would pass a
    length-dependent variant's threshold: stock vLLM then picks LongRoPE's long factors for
    every position, where the reference (Hugging Face on the visible tokens) keeps the short
    ones up to the threshold."""
    from transformers import AutoConfig

    from streamsink.rope import fixed_frequency_limit

    limit = fixed_frequency_limit(AutoConfig.from_pretrained(model_path))
    return shape.cache_tokens + 1 if limit is None else min(shape.cache_tokens + 1, limit[0] - 1)


def run_stock_dense(model_path: str, tokens: list[int], **engine_overrides) -> list[float]:
    """Stock vLLM (no streamsink config) on one prompt: NLL of tokens[t+1] by t."""
    llm = tiny_engine(model_path, None, max_model_len=len(tokens) + 1, max_num_seqs=1,
                      max_num_batched_tokens=max(len(tokens), 64), **engine_overrides)
    try:
        (out,) = llm.generate([{"prompt_token_ids": tokens}], _params(1, True), use_tqdm=False)
        return [-out.prompt_logprobs[t][tokens[t]].logprob for t in range(1, len(tokens))]
    finally:
        del llm
        gc.collect()


def max_difference(run_nlls: dict[int, float], reference: list[float]) -> float:
    assert run_nlls
    return max(abs(nll - reference[t]) for t, nll in run_nlls.items())


@dataclass
class FamilyMeasure:
    run: FamilyRun
    references: list[list[float]]   # the reference's NLLs, one list per sequence of the run
    stock: list[float]              # stock vLLM's NLLs of the dense prefix (dense_prefix)
    seconds: float                  # the family's engines (streaming and stock)


def measure_families(models: dict[str, str], shape: StreamShape,
                     progress=None) -> dict[str, FamilyMeasure]:
    """For each family (name -> checkpoint path): the streaming run, stock vLLM on the dense
    prefix of its longest stream, and the reference over every sequence. The reference runs in
    a background process while the next family's engines work. progress(name, seconds) is
    called as each family's engines finish."""
    references = References([], more_jobs=True)
    pending = {}
    for name, path in models.items():
        started = time.perf_counter()
        run = run_streaming(path, shape)
        jobs = [references.add((path, seq.tokens, shape.sink, shape.window))
                for seq in run.sequences]
        stock = run_stock_dense(path, run.sequences[0].tokens[:dense_prefix(path, shape)])
        pending[name] = (run, jobs, stock, time.perf_counter() - started)
        if progress is not None:
            progress(name, pending[name][-1])
    references.close()
    return {name: FamilyMeasure(run, [references[j] for j in jobs], stock, seconds)
            for name, (run, jobs, stock, seconds) in pending.items()}
