"""The independent reference: StreamingLLM exactly as the paper's code computes it.

This follows mit-han-lab/streaming-llm's eval_long_ppl.py literally, and shares no code with the
engine it checks: one token at a time, float64 throughout, keys cached *before* RoPE, the cache
trimmed after every token to the S sinks plus the W-1 most recent keys (so the next query attends
to at most S+W keys, itself included), and RoPE re-applied at cache slots 0..n-1 at every step,
with the query at slot n-1. Weights come from the Hugging Face model; only position-free pieces of
it (norms, projections, MLPs) are called, attention is written out here.

Supported families: Llama (RMSNorm, GQA, full rotary) and GPT-NeoX (parallel residual, fused QKV,
partial rotary).
"""
from __future__ import annotations

import math

import torch


def _rope_parameters(config) -> tuple[float, float]:
    """(theta, rotary fraction of head_dim) from a transformers config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"reference supports plain RoPE only, not {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor",
                          getattr(config, "partial_rotary_factor", 1.0))
    return float(theta), float(fraction)


def rotate(x: torch.Tensor, slots: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """NeoX-style RoPE (rotate_half) of x[..., n, head_dim] at integer positions slots[n]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = slots.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


class _Llama:
    def __init__(self, model):
        cfg = model.config
        self.embed, self.final_norm, self.head = (model.model.embed_tokens, model.model.norm,
                                                  model.lm_head)
        self.layers = list(model.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads

    def qkv(self, layer, x):
        a = layer.self_attn
        return (a.q_proj(x).view(self.num_heads, self.head_dim),
                a.k_proj(x).view(self.num_kv_heads, self.head_dim),
                a.v_proj(x).view(self.num_kv_heads, self.head_dim))

    def block(self, layer, x, attend):
        h = x + layer.self_attn.o_proj(attend(layer.input_layernorm(x)))
        return h + layer.mlp(layer.post_attention_layernorm(h))


class _GPTNeoX:
    def __init__(self, model):
        cfg = model.config
        self.embed, self.final_norm, self.head = (model.gpt_neox.embed_in,
                                                  model.gpt_neox.final_layer_norm,
                                                  model.get_output_embeddings())
        self.layers = list(model.gpt_neox.layers)
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def qkv(self, layer, x):
        fused = layer.attention.query_key_value(x).view(self.num_heads, 3 * self.head_dim)
        return fused.chunk(3, dim=-1)

    def block(self, layer, x, attend):
        attn = layer.attention.dense(attend(layer.input_layernorm(x)))
        if layer.use_parallel_residual:
            return x + attn + layer.mlp(layer.post_attention_layernorm(x))
        h = x + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))


_FAMILIES = {"llama": _Llama, "mistral": _Llama, "gpt_neox": _GPTNeoX}


@torch.no_grad()
def streaming_nll(model, token_ids: list[int], sink_tokens: int, window_tokens: int,
                  progress=None) -> list[float]:
    """NLL (natural log) of token_ids[t+1] given token_ids[<=t] under StreamingLLM(S, W).

    `model` is a transformers causal LM; it is converted to float64 in place.
    """
    model_type = model.config.model_type
    if model_type not in _FAMILIES:
        raise NotImplementedError(f"reference has no {model_type!r} family")
    model.to(torch.float64).eval()
    fam = _FAMILIES[model_type](model)
    theta, fraction = _rope_parameters(model.config)
    rotary_dim = int(fam.head_dim * fraction)
    group = fam.num_heads // fam.num_kv_heads
    scale = 1.0 / math.sqrt(fam.head_dim)
    keep_recent = window_tokens - 1  # after a step, the next query adds itself to the window

    raw_keys = [[] for _ in fam.layers]   # per layer: list of [kv_heads, head_dim], before RoPE
    values = [[] for _ in fam.layers]
    nlls = []
    for t in range(len(token_ids) - 1):
        x = fam.embed(torch.tensor(token_ids[t]))
        for li, layer in enumerate(fam.layers):
            def attend(h, li=li, layer=layer):
                q, k, v = fam.qkv(layer, h)
                raw_keys[li].append(k)
                values[li].append(v)
                n = len(raw_keys[li])
                slots = torch.arange(n)
                keys = rotate(torch.stack(raw_keys[li], dim=1), slots, rotary_dim, theta)
                query = rotate(q[:, None, :], slots[-1:], rotary_dim, theta)  # [H, 1, D]
                keys = keys.repeat_interleave(group, dim=0)                    # [H, n, D]
                vals = torch.stack(values[li], dim=1).repeat_interleave(group, dim=0)
                weights = torch.softmax((query @ keys.transpose(1, 2)) * scale, dim=-1)
                out = (weights @ vals).reshape(-1)
                # Trim for the next token: the sinks plus the W-1 most recent keys.
                if n > sink_tokens + keep_recent:
                    recent = slice(n - keep_recent, n) if keep_recent else slice(n, n)
                    raw_keys[li] = raw_keys[li][:sink_tokens] + raw_keys[li][recent]
                    values[li] = values[li][:sink_tokens] + values[li][recent]
                return out

            x = fam.block(layer, x, attend)
        logits = fam.head(fam.final_norm(x))
        nlls.append(float(-torch.log_softmax(logits, dim=-1)[token_ids[t + 1]]))
        if progress is not None:
            progress(1)
    return nlls
