"""RoPE arithmetic for streaming: angles in float64, so positions in the millions stay exact.

fp32 angles at position 10^6 are off by ~0.1 rad; here angles are computed in float64 and only
the resulting cos/sin are cast to the model dtype.

A RopeSpec is one model's rotary embedding: the features it rotates (the first `rotary_dim` of
each head), how they pair up (NeoX: halves, i with i + rotary_dim/2; GPT-J: adjacent, 2i with
2i+1), the inverse frequencies of its RoPE variant and the variant's attention factor. Two kinds
of tables come out of it, and mixing them up applies the factor twice:
- `model_table`: what the model multiplies q and k by at a position (cos and sin times the
  attention factor, as vLLM's and Hugging Face's tables carry it);
- `cos_sin`: a pure rotation by a number of positions. Everything streamsink does to keys and
  queries that the model has already rotated (sink shadows, the query moved to its in-cache slot,
  re-rotations at row rebases) is such a *difference* rotation, R(a+d) = R(d) R(a), which holds
  because each variant's frequencies are fixed: dynamic NTK and LongRoPE are accepted only while
  every in-cache length stays on one side of their threshold (`fixed_frequency_limit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Every rope_type a RopeSpec can be built for (length-dependent ones within their limit).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    rotary_dim: int
    theta: float
    neox_style: bool = True
    # Inverse frequencies of a scaled variant (float64 values); None: plain theta ** (-2i/d).
    frequencies: tuple[float, ...] | None = None
    # Multiplies cos and sin in the model's own table (YaRN, LongRoPE); never in a rotation.
    attention_factor: float = 1.0

    def inv_freq(self) -> torch.Tensor:
        if self.frequencies is not None:
            return torch.tensor(self.frequencies, dtype=torch.float64)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        return 1.0 / (self.theta ** exponents)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(positions), rotary_dim] rotation table, cos half then sin half (vLLM's
        cos_sin_cache layout), for integer positions that may be negative (rotations
        backwards). No attention factor: a rotation only."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq()[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)

    def model_table(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The model's RoPE table at these positions: the rotation times the attention factor."""
        table = self.cos_sin(positions, torch.float64)
        if self.attention_factor != 1.0:
            table = table * self.attention_factor
        return table.to(dtype)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int,
           neox_style: bool = True) -> torch.Tensor:
    """Rotate x[..., head_dim] by per-row angles; cos_sin broadcasts against x[..., :rotary_dim/2]
    with a trailing [rotary_dim] (cos | sin)."""
    half = rotary_dim // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    if neox_style:
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def uses_alibi(hf_config) -> bool:
    """True for models whose attention takes ALiBi biases instead of rotary positions."""
    return hf_config.model_type == "bloom" or bool(getattr(hf_config, "alibi", False))


def rope_parameters(hf_config) -> dict:
    """The config's rope_parameters with rope_type filled in ("type" is its older name)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_type_of(hf_config) -> str:
    """The RoPE variant vLLM applies to this (RoPE) model."""
    # vLLM's GPT-J reads no variant from the config.
    return "default" if hf_config.model_type == "gptj" else rope_parameters(hf_config)["rope_type"]


def rope_spec_from_hf_config(hf_config) -> RopeSpec | None:
    """The RoPE of a model config as vLLM applies it (None for an ALiBi model); ValueError (one
    line) for a variant this module does not define."""
    if uses_alibi(hf_config):
        return None
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if hf_config.model_type == "gptj":
        # vLLM's GPT-J: adjacent pairs over the first rotary_dim features, base 10000 (neither
        # it nor Hugging Face's GPT-J reads a base or a variant from the config).
        return RopeSpec(head_dim=head_dim, rotary_dim=hf_config.rotary_dim or head_dim,
                        theta=10000.0, neox_style=False)
    params = rope_parameters(hf_config)
    fraction = params.get("partial_rotary_factor",
                          getattr(hf_config, "partial_rotary_factor", 1.0))
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rotary_dim = int(params.get("rope_dim") or int(head_dim * fraction))
    plain = RopeSpec(head_dim=head_dim, rotary_dim=rotary_dim, theta=theta)
    kind = rope_type_of(hf_config)
    if kind == "default":
        return plain
    if kind not in ROPE_TYPES:
        raise ValueError(f"streamsink does not support rope_type {kind!r} (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    frequencies, factor = _variant(kind, params, plain.inv_freq(), rotary_dim, theta, hf_config)
    return RopeSpec(head_dim=head_dim, rotary_dim=rotary_dim, theta=theta,
                    frequencies=tuple(frequencies.tolist()), attention_factor=factor)


def fixed_frequency_limit(hf_config) -> tuple[int, str] | None:
    """For a RoPE variant whose frequencies depend on the sequence length: the longest in-cache
    length for which they are the ones rope_spec_from_hf_config uses, and what that limit is
    called. None when the frequencies never change."""
    if uses_alibi(hf_config) or hf_config.model_type == "gptj":
        return None
    params = rope_parameters(hf_config)
    if params["rope_type"] == "dynamic":
        return hf_config.max_position_embeddings, "max_position_embeddings"
    if params["rope_type"] == "longrope":
        return _longrope_original(params, hf_config), "original_max_position_embeddings"
    return None


# ---- the variants' inverse frequencies and attention factors -------------------------------
# Hugging Face's definitions (modeling_rope_utils), which vLLM's rotary classes follow; fixed
# for a whole stream (see fixed_frequency_limit for the two length-dependent ones).

def _variant(kind: str, params: dict, plain: torch.Tensor, dim: int, theta: float, hf_config):
    if kind == "linear":
        return plain / params["factor"], 1.0
    if kind == "dynamic":
        # The base is scaled only past max_position_embeddings; up to it (the limit) it is
        # plain RoPE. vLLM scales by max_trained_positions instead when the config has one.
        if "max_trained_positions" in params or "alpha" in params:
            raise ValueError("streamsink supports dynamic NTK RoPE given by `factor` only")
        return plain, 1.0
    if kind == "llama3":
        return _llama3(params, plain), 1.0
    if kind == "yarn":
        return _yarn(params, plain, dim, theta)
    return _longrope_short(params, plain, hf_config)


def _llama3(params: dict, plain: torch.Tensor) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / plain
    # Long wavelengths are divided by factor, short ones kept, the band between blended.
    smooth = (original / wavelength - low) / (high - low) if low != high else 0.0
    blended = (1 - smooth) * plain / factor + smooth * plain
    return torch.where(wavelength < original / high, plain,
                       torch.where(wavelength > original / low, plain / factor, blended))


def _yarn(params: dict, plain: torch.Tensor, dim: int, theta: float):
    factor = params["factor"]
    original = params["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dimension(rotations: float) -> float:  # whose wavelength fits `rotations` in original
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(params.get("beta_fast") or 32), dimension(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # 0: extrapolate (keep the frequency), 1: interpolate (divide it by factor).
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return plain / factor * ramp + plain * (1 - ramp), float(attention)


def _longrope_original(params: dict, hf_config) -> int:
    return int(params.get("original_max_position_embeddings")
               or getattr(hf_config, "original_max_position_embeddings", None)
               or hf_config.max_position_embeddings)


def _longrope_short(params: dict, plain: torch.Tensor, hf_config):
    """Short factors (every in-cache length within original_max_position_embeddings) and the
    attention factor; refused where vLLM's factor and Hugging Face's differ (vLLM reads
    short_mscale, Hugging Face attention_factor and factor)."""
    original = _longrope_original(params, hf_config)
    ratio = hf_config.max_position_embeddings / original

    def recommended(f: float) -> float:
        return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(original))

    hugging_face = params.get("attention_factor")
    if hugging_face is None:
        hugging_face = recommended(params.get("factor") or ratio)
    vllm = params.get("short_mscale")
    vllm = recommended(ratio) if vllm is None else vllm
    if abs(hugging_face - vllm) > 1e-12 * max(1.0, abs(vllm)):
        raise ValueError(f"streamsink does not support this longrope config: vLLM's attention "
                         f"factor ({vllm}) differs from Hugging Face's ({hugging_face})")
    short = torch.tensor(params["short_factor"], dtype=torch.float64)
    return plain / short, float(vllm)
