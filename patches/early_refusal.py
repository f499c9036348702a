"""Patch: request options an engine cannot honour are refused before a streamed response begins.

Why: a request's ``streamsink`` options are resolved against its prompt tokens, and refused when
the engine cannot honour them (a window wider than the engine's, a pin over max_pinned_tokens or
longer than the prompt, "pin": "system" without a system message, options on a stock engine), in
InputProcessor.process_inputs (patches/input_length.py). AsyncLLM.generate is an async generator:
it calls process_inputs only when first iterated. A non-streamed handler iterates it before it
answers, so the refusal is an HTTP 400; a streamed one hands it to a StreamingResponse that has
already sent "200 OK" by then, so the refusal came as an SSE error event inside a 200 stream.
How: AsyncLLM.generate is wrapped by a plain function that, when the request carries streamsink
options and its prompt tokens are known (the OpenAI handlers pass the rendered EngineInput),
resolves them at once, as process_inputs will, and raises the one-line RefusedRequestOptions
from the call itself: out of the handler, before any response exists, so vLLM's exception
handler answers HTTP 400 whether the request streams or not. Otherwise it returns the original
generator unchanged; process_inputs still resolves (and checks) every request.
Delete when: vLLM validates a request's inputs before it starts a streamed response (or gives
plugins a hook at request admission).
"""
from __future__ import annotations

from vllm.sampling_params import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from streamsink.config import CONFIG_KEY
from streamsink.patches._install import require, wrap
from streamsink.patches.input_length import resolved_options


def _prompt_token_ids(prompt) -> list[int] | None:
    """The token ids of a rendered decoder-only prompt (the handlers' EngineInput); None for
    anything process_inputs still has to render (it checks those itself)."""
    if not isinstance(prompt, dict) or prompt.get("type") == "enc_dec":
        return None
    ids = prompt.get("prompt_token_ids")
    return ids if isinstance(ids, list) else None


def _generate(original, self, prompt, sampling_params, request_id, *args, **kwargs):
    extra = sampling_params.extra_args if isinstance(sampling_params, SamplingParams) else None
    if extra and CONFIG_KEY in extra:
        ids = _prompt_token_ids(prompt)
        if ids is not None:
            resolved_options(self.input_processor, extra[CONFIG_KEY], ids)
    return original(self, prompt, sampling_params, request_id, *args, **kwargs)


def check_target() -> None:
    """Raise PatchTargetMoved unless AsyncLLM.generate is the one this patch was written for:
    it takes (prompt, sampling_params, request_id), adds the request (process_inputs) when first
    iterated, and keeps the InputProcessor the check asks."""
    require(AsyncLLM, "generate", ["self", "prompt", "sampling_params", "request_id"],
            needles=["q = await self.add_request("])
    require(AsyncLLM, "add_request", needles=["self.input_processor.process_inputs("])


def apply() -> None:
    check_target()
    wrap(AsyncLLM, "generate", _generate)
