"""Patch: float64 RoPE angles for GPT-NeoX (Pythia) streams, which run on HF modeling code.

Why: vLLM 0.32.0 runs GPT-NeoX through its Transformers backend, so RoPE is Hugging Face's
GPTNeoXRotaryEmbedding: fp32 angles from fp32 inverse frequencies (~3e-4 rad off at position
4096), while streamsink re-rotates cached keys and sink logits with float64 angles; the two must
agree. vLLM's RotaryEmbedding is not involved, so patches/rotary_embedding.py does not reach it.
How: GPTNeoXRotaryEmbedding.__init__ is wrapped to mark the instances a streaming engine builds
(and keep their inverse frequencies in float64); their forward computes cos/sin from float64
angles of the same position_ids, as plain tensor ops (a compiled graph traces them like HF's
own). Other engines and plain transformers use the original.
Delete when: transformers computes RoPE angles in float64, or vLLM has a native GPT-NeoX model
using its own RotaryEmbedding.
"""
from __future__ import annotations

import inspect

import torch
from transformers.models.gpt_neox import modeling_gpt_neox as hf

from streamsink.engine_setup import engine_being_built
from streamsink.errors import PatchTargetMoved
from streamsink.rope import rope_spec_from_hf_config

_original_init = None
_original_forward = None


def _init(self, config, *args, **kwargs):
    _original_init(self, config, *args, **kwargs)
    self._streamsink_inv_freq = None
    if engine_being_built()[0] is not None:
        self._streamsink_inv_freq = rope_spec_from_hf_config(config).inv_freq()


def _forward(self, x, position_ids):
    inv_freq = getattr(self, "_streamsink_inv_freq", None)
    if inv_freq is None:
        return _original_forward(self, x, position_ids)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def apply() -> None:
    global _original_init, _original_forward
    if _original_forward is not None:
        return
    cls = hf.GPTNeoXRotaryEmbedding
    if list(inspect.signature(cls.forward).parameters) != ["self", "x", "position_ids"] or \
            list(inspect.signature(cls.__init__).parameters)[:2] != ["self", "config"] or \
            "self.attention_scaling" not in inspect.getsource(cls.forward) or \
            not callable(getattr(hf, "rotate_half", None)):
        raise PatchTargetMoved("transformers GPTNeoXRotaryEmbedding(config).forward(x, "
                               "position_ids) with NeoX-style rotate_half changed")
    _original_init, _original_forward = cls.__init__, cls.forward
    cls.__init__, cls.forward = _init, _forward
