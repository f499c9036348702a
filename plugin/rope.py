"""RoPE arithmetic for streaming: angles in float64, so positions in the millions stay exact.

fp32 angles at position 10^6 are off by ~0.1 rad; here angles are computed in float64 and only
the resulting cos/sin are cast to the model dtype. All rotations are NeoX style (rotate halves of
the first `rotary_dim` features), which is what Llama and GPT-NeoX use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    rotary_dim: int
    theta: float

    def inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        return 1.0 / (self.theta ** exponents)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(positions), rotary_dim] table, cos half then sin half (vLLM's cos_sin_cache
        layout), for integer positions that may be negative (rotations backwards)."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq()[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate x[..., head_dim] by per-row angles; cos_sin broadcasts against x[..., :rotary_dim/2]
    with a trailing [rotary_dim] (cos | sin)."""
    half = rotary_dim // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def rope_spec_from_hf_config(hf_config) -> RopeSpec:
    """RoPE parameters of a Llama-family or GPT-NeoX config; ValueError (one line) otherwise."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"streamsink supports plain RoPE only; this model uses rope_type "
                         f"{rope_type!r}")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    fraction = params.get("partial_rotary_factor",
                          getattr(hf_config, "partial_rotary_factor", 1.0))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return RopeSpec(head_dim=head_dim, rotary_dim=int(head_dim * fraction), theta=float(theta))
