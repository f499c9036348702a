"""Patch: a streaming engine whose user did not choose max_num_batched_tokens gets one that fits.

Why: a streaming engine's max_model_len is the width of the worker's per-request rows, which must
hold the sinks, the window and one step (engine_setup._check_row_width). vLLM's default step
(4,096 tokens for vllm.LLM on CPU) does not fit max_model_len=4096 with 4+1020, so
`vllm.LLM(model, max_model_len=4096, additional_config={"streamsink": {}})` was refused. Only a
step size the user set explicitly should be refused; a default should adapt.
How: EngineArgs._set_default_max_num_seqs_and_batched_tokens_args (where vLLM picks the defaults,
with max_model_len resolved) is wrapped: when the user left max_num_batched_tokens unset and the
default does not fit a streaming engine's row, it becomes the largest step that fits
(engine_setup.fit_default_chunk, logged). Explicit values are untouched (and refused with the
one-line reason when they do not fit).
Delete when: vLLM lets a plugin adjust engine defaults (a config hook), or streamsink's rows stop
depending on the step size.
"""
from __future__ import annotations

from vllm.engine.arg_utils import EngineArgs

from streamsink.engine_setup import fit_default_chunk
from streamsink.patches._install import require, wrap

_NAME = "_set_default_max_num_seqs_and_batched_tokens_args"


def _set_defaults(original, self, usage_context, model_config, parallel_config):
    user_chunk, user_seqs = self.max_num_batched_tokens, self.max_num_seqs
    original(self, usage_context, model_config, parallel_config)
    if user_chunk is not None or self.max_num_batched_tokens is None:
        return
    chunk = fit_default_chunk(self, model_config.max_model_len, self.max_num_batched_tokens)
    if chunk is not None:
        self.max_num_batched_tokens = chunk
        if user_seqs is None:  # as vLLM derives it from the step size
            self.max_num_seqs = min(self.max_num_seqs, chunk)


def check_target() -> None:
    require(EngineArgs, _NAME, ["self", "usage_context", "model_config", "parallel_config"],
            exact=True,
            needles=["orig_max_num_batched_tokens = self.max_num_batched_tokens",
                     "self.max_num_batched_tokens = default_max_num_batched_tokens.get("])
    require(EngineArgs, "create_engine_config", needles=[f"self.{_NAME}("])


def apply() -> None:
    check_target()
    wrap(EngineArgs, _NAME, _set_defaults)
