"""Engine arguments, the same for every launcher (serve, serve --ray, batch, loadtest, demo,
ppl): streamsink's defaults, vLLM's own parser for pass-through arguments, and a check that
builds the engine's VllmConfig in this process, so that a refused configuration is one line
before any engine process, server or Ray starts.

The KV budget is not set here: a streaming engine given none sizes its own pool
(plugin/kv_budget.py), in every entry point alike.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from streamsink.config import CONFIG_KEY, parse_config
from streamsink.errors import StreamsinkConfigError, UsageError, find_config_error, one_line
from streamsink.model_store import resolve_model
from streamsink.stream_rule import min_row_tokens
from streamsink.weights import AUTO, BFLOAT16, needs_16bit_activations, resolve_weights

# fp32 for a checkpoint of the user's that is dense: exact against the float64 reference, and
# bf16 is ~5x slower than fp32 on CPUs without AVX-512 BF16 (--dtype bfloat16 where
# /proc/cpuinfo lists avx512_bf16). The default model's dtype follows --weights (weights.py).
DEFAULT_DTYPE = "float32"
# What the tools that build engines in Python (make_llm, benchmarks, tests) run when they name
# no format: the dense fp32 checkpoint, exact against the reference on any CPU. The command
# line's default is "auto" (weights.py).
LIBRARY_WEIGHTS = "fp32"
# Streams one engine runs at once unless told (vLLM's CPU default is 128 for its server, 256
# for vllm.LLM); the KV pool is sized for this many streams at full window.
DEFAULT_MAX_NUM_SEQS = 64
# vLLM's KV block size on CPU (platforms/cpu.py default).
BLOCK_SIZE = 128
# vLLM's max_num_batched_tokens for vllm.LLM on CPU when none is given (the rows of a streaming
# engine must fit one such step; vLLM refuses at start-up, with our message, if this drifts).
VLLM_DEFAULT_CHUNK = 4096
# A stock engine built by streamsink's tools (comparisons) gets this KV budget unless told:
# vLLM's own CPU default wants 92% of the node's memory free, which ordinary page cache breaks.
STOCK_KV_CACHE_BYTES = 1 << 30
# Up to this many cores, streamsink's launchers give the worker all of them
# (worker_threads_environment).
SMALL_MACHINE_CORES = 4
# Process-wide: vLLM reads it whenever an engine config is built, here and in engine processes.
# Set only for a streaming engine whose rows are wider than the model's positions (streamsink
# computes RoPE past the model's table, patches/rotary_embedding.py).
LONG_CONTEXT_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


class EngineArgsError(UsageError):
    """Bad vLLM engine arguments; the message is one line, meant for the user."""


def streamsink_entry(sink_tokens: int, window_tokens: int, max_pinned_tokens: int = 0) -> dict:
    """The validated `additional_config` of a streaming engine."""
    return {CONFIG_KEY: parse_config({"sink_tokens": sink_tokens, "window_tokens": window_tokens,
                                      "max_pinned_tokens": max_pinned_tokens}).as_dict()}


class VllmArgParser:
    """vLLM's engine-argument parser (or its OpenAI server's, with frontend=True), with
    argparse's usage-and-exit turned into one-line errors."""

    def __init__(self, prog: str, frontend: bool = False) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        class Parser(FlexibleArgumentParser):
            def error(self, message):  # argparse's hook: no usage text, no exit
                raise EngineArgsError(message)

        parser = Parser(prog=prog)
        if frontend:
            from vllm.entrypoints.launchers.cli_args import make_arg_parser

            self.parser = make_arg_parser(parser)
        else:
            self.parser = AsyncEngineArgs.add_cli_args(parser)

    def parse(self, argv: list[str]):
        args, unknown = self.parser.parse_known_args(argv)
        if unknown:
            raise EngineArgsError(f"unrecognized arguments: {' '.join(unknown)}")
        return args

    def explicit(self, argv: list[str]) -> dict:
        """{dest: value} of the arguments argv gives (defaults left to vLLM)."""
        args = self.parse(argv)
        defaults = vars(self.parser.parse_args([]))
        return {k: v for k, v in vars(args).items() if v != defaults.get(k)}


@dataclass(frozen=True)
class ModelChoice:
    """The checkpoint an engine loads and its activation dtype (the KV cache's too)."""
    path: str
    dtype: str
    weights: str | None   # the default model's format (weights.py); None: the user's checkpoint


def choose_model(model: str | None, weights: str | None = None) -> ModelChoice:
    """--model and --weights into a checkpoint and dtype. --weights chooses the default model's
    format (None: LIBRARY_WEIGHTS); a checkpoint of the user's decides its own (4-bit weights
    need 16-bit activations: bfloat16; else DEFAULT_DTYPE)."""
    if model:
        if weights not in (None, AUTO):
            raise UsageError(f"--weights {weights} chooses the default model's format; with "
                             f"--model the checkpoint decides (--dtype sets its activations)")
        path = resolve_model(model)
        needs_16bit = os.path.isdir(path) and needs_16bit_activations(path)
        return ModelChoice(path, BFLOAT16 if needs_16bit else DEFAULT_DTYPE, None)
    fmt = resolve_weights(weights or LIBRARY_WEIGHTS)
    return ModelChoice(resolve_model(None, fmt.checkpoint), fmt.activation_dtype(), fmt.name)


def engine_kwargs(model: str | None = None, streamsink: dict | None = None,
                  weights: str | None = None, **overrides: Any) -> dict:
    """Keyword arguments for ``vllm.LLM``; ``streamsink=None`` means a stock engine (with
    STOCK_KV_CACHE_BYTES unless overridden; a streaming one sizes its own pool)."""
    choice = choose_model(model, weights)
    kwargs: dict[str, Any] = dict(model=choice.path, dtype=choice.dtype)
    if streamsink is not None:
        kwargs["additional_config"] = {CONFIG_KEY: dict(streamsink)}
    else:
        kwargs["kv_cache_memory_bytes"] = STOCK_KV_CACHE_BYTES
    kwargs.update(overrides)
    if streamsink is not None and "max_model_len" not in overrides:
        kwargs["max_model_len"] = streaming_max_model_len(
            kwargs["model"], parse_config(streamsink),
            kwargs.get("max_num_batched_tokens") or VLLM_DEFAULT_CHUNK)
    return kwargs


def model_positions(model_path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = getattr(config, "get_text_config", lambda: config)()
    return getattr(text, "max_position_embeddings", 0) or 0


def streaming_max_model_len(model_path: str, cfg, chunk: int) -> int:
    """The model's own context length, or the narrowest batch row one streaming step needs
    when that is longer (a dense window wider than the model's positions). Streams run past
    max_model_len either way."""
    return max(model_positions(model_path),
               min_row_tokens(cfg.sink_tokens, cfg.window_tokens, cfg.max_pinned_tokens,
                              BLOCK_SIZE, chunk))


def engine_environment(kwargs: dict) -> dict[str, str]:
    """Environment variables an engine built from kwargs needs (in every process of it)."""
    max_len = kwargs.get("max_model_len")
    if max_len and max_len > model_positions(kwargs["model"]):
        return {LONG_CONTEXT_ENV: "1"}
    return {}


def worker_threads_environment() -> dict[str, str]:
    """Bind the engine's worker threads to every core of a small machine.

    vLLM's CPU worker leaves one core of the machine to the engine-core process (whose loop
    polls the worker's queue), which on 2 cores halves the model's arithmetic; measured here
    (benchmarks/token_time.py, docs/token_time.md), all cores to the worker makes a served token
    faster at 1 stream and about 1.7x the tokens/s at 8, the engine core's polling
    notwithstanding. Applies where the process may use at most SMALL_MACHINE_CORES cores and
    the user has not chosen a binding (VLLM_CPU_OMP_THREADS_BIND); one engine per machine (Ray
    replicas, which may share a machine, keep vLLM's own binding)."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > SMALL_MACHINE_CORES:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    """Set environment variables for the length of the block, then restore the environment
    as it was (vLLM's CPU platform also sets thread and preload variables meant for engine
    processes; processes started later must not inherit them)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_engine_config(kwargs: dict, served_model_name: str | None = None):
    """Build the VllmConfig an engine built from kwargs (AsyncEngineArgs fields, "model"
    included) will have, here; return it. Refusals raise StreamsinkConfigError (ours) or
    EngineArgsError (vLLM's), one line each."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra = {"served_model_name": [served_model_name]} if served_model_name else {}
    with scoped_environ(engine_environment(kwargs)):
        try:
            return AsyncEngineArgs(**kwargs, **extra).create_engine_config()
        except StreamsinkConfigError:
            raise
        except Exception as exc:  # vLLM's refusals: ValueError, pydantic ValidationError
            ours = find_config_error(exc)
            if ours is not None:
                raise StreamsinkConfigError(str(ours)) from None
            raise EngineArgsError(one_line(exc)) from None
