"""Patch: exact float64 RoPE for GPT-NeoX (Pythia) streams, which run on HF modeling code.

Why: vLLM 0.32.0 runs GPT-NeoX through its Transformers backend, so RoPE is Hugging Face's
GPTNeoXRotaryEmbedding: fp32 angles from fp32 inverse frequencies, off by ~0.06 rad at position
10^6. vLLM's RotaryEmbedding is not involved, so patches/rotary_embedding.py does not reach it.
How: GPTNeoXRotaryEmbedding.forward is wrapped; when the step's attention metadata carries a
streamsink plan, it returns the plan's float64-angle table (the step's positions, the same rows
vLLM passes as position_ids) in HF's (cos, sin) layout. Other engines and plain transformers use
the original.
Delete when: vLLM has a native GPT-NeoX model using its own RotaryEmbedding, or transformers
computes RoPE angles in float64.
"""
from __future__ import annotations

import inspect

import torch

from streamsink.patches import PatchTargetMoved
from streamsink.patches.rotary_embedding import current_plan

_original_forward = None


def _streaming_forward(self, x, position_ids):
    plan = current_plan()
    if plan is None:
        return _original_forward(self, x, position_ids)
    table = plan.rope_cos_sin
    if position_ids.numel() != table.shape[0]:
        raise RuntimeError("streamsink: RoPE table does not match the step's positions")
    half = table.shape[1] // 2
    cos = torch.cat([table[:, :half], table[:, :half]], dim=-1).view(*position_ids.shape, -1)
    sin = torch.cat([table[:, half:], table[:, half:]], dim=-1).view(*position_ids.shape, -1)
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def apply() -> None:
    global _original_forward
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    if _original_forward is not None:
        return
    target = hf.GPTNeoXRotaryEmbedding.forward
    if list(inspect.signature(target).parameters) != ["self", "x", "position_ids"] or \
            not callable(getattr(hf, "rotate_half", None)):
        raise PatchTargetMoved("transformers GPTNeoXRotaryEmbedding.forward(self, x, "
                               "position_ids) with NeoX-style rotate_half changed")
    _original_forward = target
    hf.GPTNeoXRotaryEmbedding.forward = _streaming_forward
