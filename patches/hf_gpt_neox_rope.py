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

import torch
from transformers.models.gpt_neox import modeling_gpt_neox as hf

from streamsink.engine_setup import engine_being_built
from streamsink.patches._install import require, wrap
from streamsink.rope import rope_spec_from_hf_config


def _init(original, self, config, *args, **kwargs):
    original(self, config, *args, **kwargs)
    self._streamsink_inv_freq = None
    if engine_being_built()[0] is not None:
        self._streamsink_inv_freq = rope_spec_from_hf_config(config).inv_freq()


def _forward(original, self, x, position_ids):
    inv_freq = getattr(self, "_streamsink_inv_freq", None)
    if inv_freq is None:
        return original(self, x, position_ids)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def check_target() -> None:
    """GPTNeoXRotaryEmbedding(config).forward(x, position_ids), NeoX-style (rotate_half)."""
    rotary = hf.GPTNeoXRotaryEmbedding
    require(rotary, "forward", ["self", "x", "position_ids"], exact=True,
            needles=["self.attention_scaling"])
    require(rotary, "__init__", ["self", "config"])
    require(hf, "rotate_half")


def apply() -> None:
    check_target()
    wrap(hf.GPTNeoXRotaryEmbedding, "__init__", _init)
    wrap(hf.GPTNeoXRotaryEmbedding, "forward", _forward)
