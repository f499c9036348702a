"""The independent reference: StreamingLLM exactly as the paper's code computes it.

This follows mit-han-lab/streaming-llm's eval_long_ppl.py literally, and shares no code with the
engine it checks: one token at a time, float64 throughout, keys cached *before* their position is
applied, the cache trimmed after every token to the S sinks plus the W-1 most recent keys (so the
next query attends to at most S+W keys, itself included), and positions re-applied at cache slots
0..n-1 at every step, with the query at slot n-1. Weights come from the Hugging Face model; only
position-free pieces of it (projections, LayerNorms, MLPs) are called; attention, RMSNorm (which
Hugging Face computes in float32 even in a float64 model) and positions are written out here.

Families: Llama and Mistral (RMSNorm, GQA), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm
before RoPE), Phi-3 (fused qkv and gate/up), GPT-NeoX (parallel residual, partial rotary), GPT-J
(interleaved pairs, partial rotary, theta 10000), Falcon (multi-query, new decoder architecture
with grouped KV, parallel or sequential blocks; RoPE or ALiBi) and BLOOM (ALiBi).

Positions, at in-cache slots:
- RoPE rotates query and keys by their slot (rotate-half pairs (i, i + d/2), or GPT-J's adjacent
  pairs (2i, 2i+1)); variants change only the frequencies and a factor on cos/sin ("attention
  factor"), both computed here from the config's rope_parameters by Hugging Face's definitions.
  "linear", "llama3" and "yarn" do not depend on the length. Two variants do, and in a stream the
  cache holds n <= S+W tokens, so their streaming meaning is what Hugging Face computes for a
  sequence of exactly the n visible tokens at positions 0..n-1 (its rotary modules take the
  length as max(position_ids) + 1, which is n here), re-decided at every step for all n keys:
  * "longrope" (Phi-3's "su"): long factors when n > original_max_position_embeddings, short
    factors otherwise; the attention factor sqrt(1 + ln(f) / ln(original)), with
    f = max_position_embeddings / original unless the config gives `factor`, applies to both.
  * "dynamic" (NTK): base * (factor * L / max_position_embeddings - (factor - 1)) ** (d / (d - 2))
    with L = max(n, max_position_embeddings), so the plain base while n fits the table.
  Only the rotation follows n: the unrotated keys and the values are what each layer computed
  when its token was processed, as with any KV cache (so past the first layer this is not a
  forward over the visible tokens recomputed under the new frequencies). Hugging Face's own
  incremental decoding differs: it keeps keys rotated under the frequencies of the step that
  cached them, and its dynamic module keeps the base of the longest length it has seen.
- ALiBi adds -slope * (n-1-j) to the score of the key at slot j: the distance *in the cache*.
  BLOOM adds slope * (key position) instead, which differs by a constant per query and so gives
  the same softmax. Falcon adds the bias before dividing by sqrt(head_dim), so its slopes are
  divided by sqrt(head_dim) here.

A model's own sliding window (Mistral, Phi-3, Qwen's use_sliding_window) has no effect while the
cache fits in it; a cache longer than that window is refused rather than given a meaning.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# ---- positions -----------------------------------------------------------------------------

def rope_frequencies(params: dict, dim: int, n: int, max_positions: int):
    """(inverse frequencies [dim/2], attention factor) of the RoPE variant `params` (a
    transformers rope_parameters dict) for a sequence of n tokens."""
    kind = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=F64) / dim
    plain = 1.0 / base ** exponents
    factor = params.get("factor")
    if kind == "default":
        return plain, 1.0
    if kind == "linear":
        return plain / factor, 1.0
    if kind == "dynamic":
        length = max(n, max_positions)
        scaled_base = base * (factor * length / max_positions - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / scaled_base ** exponents, 1.0
    original = params["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelength = 2 * math.pi / plain
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * plain / factor + smooth * plain
        inv_freq = torch.where(wavelength > original / low, plain / factor,
                               torch.where(wavelength < original / high, plain, blended))
        return inv_freq, 1.0
    if factor is None:
        factor = max_positions / original
    if kind == "yarn":
        return _yarn(params, dim, base, plain, factor, original)
    if kind == "longrope":
        attention = params.get("attention_factor")
        if attention is None:
            attention = (1.0 if factor <= 1 else
                         math.sqrt(1 + math.log(factor) / math.log(original)))
        chosen = params["long_factor"] if n > original else params["short_factor"]
        return plain / torch.tensor(chosen, dtype=F64), attention
    raise NotImplementedError(f"reference has no RoPE variant {kind!r}")


def _yarn(params, dim, base, plain, factor, original):
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dimension_of(rotations):  # the dimension whose wavelength fits `rotations` in original
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dimension_of(params.get("beta_fast") or 32)
    high = dimension_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=F64) - low) / (high - low)).clamp(0, 1)
    return plain / factor * ramp + plain * (1 - ramp), attention


class RoPE:
    """Rotation of the first rotary_dim features of each head by its slot."""

    def __init__(self, params: dict, rotary_dim: int, max_positions: int,
                 adjacent_pairs: bool = False):
        self.params, self.rotary_dim, self.max_positions = params, rotary_dim, max_positions
        self.adjacent_pairs = adjacent_pairs

    def rotate(self, x: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
        """x[..., len(slots), head_dim] rotated to slots, in a sequence of n tokens."""
        inv_freq, attention = rope_frequencies(self.params, self.rotary_dim, n, self.max_positions)
        angles = slots.to(F64)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos() * attention, angles.sin() * attention
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        if self.adjacent_pairs:
            first, second = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1)
            rotated = rotated.flatten(-2)
        else:
            first, second = rot.chunk(2, dim=-1)
            rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al.): 2^(-8/c), its powers, for the largest power of two
    c <= num_heads; the remaining heads take every other slope of the 2c-head sequence."""
    def geometric(count):
        start = 2.0 ** (-8.0 / count)
        return [start ** (i + 1) for i in range(count)]

    c = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(c) + geometric(2 * c)[0::2][:num_heads - c]
    return torch.tensor(slopes, dtype=F64)


class ALiBi:
    def __init__(self, slopes: torch.Tensor):
        self.slopes = slopes

    def bias(self, n: int) -> torch.Tensor:
        """[heads, 1, n]: the query sits at slot n-1, the key at slot j is n-1-j behind it."""
        distance = (n - 1 - torch.arange(n, dtype=F64))
        return -(self.slopes[:, None] * distance[None, :])[:, None, :]


def _rope_from_config(config, head_dim: int) -> RoPE:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return RoPE(params, int(head_dim * fraction), config.max_position_embeddings)


# ---- families: where each model keeps its position-free pieces ------------------------------

class _Llama:
    """Llama, Mistral and Qwen2 (its q/k/v biases live in the projections)."""

    def __init__(self, model):
        cfg = model.config
        self.embed, self.head = model.model.embed_tokens, model.lm_head
        self.layers = list(model.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.positions = _rope_from_config(cfg, self.head_dim)
        self._final_norm = model.model.norm

    def final_norm(self, x):
        return _rms_norm(self._final_norm, x)

    def qkv(self, layer, x):
        a = layer.self_attn
        return (a.q_proj(x).view(self.num_heads, self.head_dim),
                a.k_proj(x).view(self.num_kv_heads, self.head_dim),
                a.v_proj(x).view(self.num_kv_heads, self.head_dim))

    def block(self, layer, x, attend):
        h = x + layer.self_attn.o_proj(attend(_rms_norm(layer.input_layernorm, x)))
        return h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))


class _Qwen3(_Llama):
    def qkv(self, layer, x):
        q, k, v = super().qkv(layer, x)
        a = layer.self_attn
        return _rms_norm(a.q_norm, q), _rms_norm(a.k_norm, k), v


class _Phi3(_Llama):
    def qkv(self, layer, x):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = layer.self_attn.qkv_proj(x).split([q_size, kv_size, kv_size])
        return (q.view(self.num_heads, self.head_dim), k.view(self.num_kv_heads, self.head_dim),
                v.view(self.num_kv_heads, self.head_dim))


class _GPTNeoX:
    def __init__(self, model):
        cfg = model.config
        self.embed, self.final_norm, self.head = (model.gpt_neox.embed_in,
                                                  model.gpt_neox.final_layer_norm,
                                                  model.get_output_embeddings())
        self.layers = list(model.gpt_neox.layers)
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.positions = _rope_from_config(cfg, self.head_dim)

    def qkv(self, layer, x):
        fused = layer.attention.query_key_value(x).view(self.num_heads, 3 * self.head_dim)
        return fused.chunk(3, dim=-1)

    def block(self, layer, x, attend):
        attn = layer.attention.dense(attend(layer.input_layernorm(x)))
        if layer.use_parallel_residual:
            return x + attn + layer.mlp(layer.post_attention_layernorm(x))
        h = x + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))


class _GPTJ:
    def __init__(self, model):
        cfg = model.config
        t = model.transformer
        self.embed, self.final_norm, self.head = t.wte, t.ln_f, model.lm_head
        self.layers = list(t.h)
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        # GPT-J's sinusoid table has its base written in, not configured.
        self.positions = RoPE({"rope_type": "default", "rope_theta": 10000.0},
                              cfg.rotary_dim or self.head_dim, cfg.n_positions,
                              adjacent_pairs=True)

    def qkv(self, layer, x):
        a = layer.attn
        return tuple(proj(x).view(self.num_heads, self.head_dim)
                     for proj in (a.q_proj, a.k_proj, a.v_proj))

    def block(self, layer, x, attend):
        h = layer.ln_1(x)
        return x + layer.attn.out_proj(attend(h)) + layer.mlp(h)


class _Falcon:
    def __init__(self, model):
        cfg = self.cfg = model.config
        t = model.transformer
        self.embed, self.final_norm, self.head = t.word_embeddings, t.ln_f, model.lm_head
        self.layers = list(t.h)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        if cfg.new_decoder_architecture:
            self.num_kv_heads = cfg.num_kv_heads
        else:
            self.num_kv_heads = 1 if cfg.multi_query else self.num_heads
        if cfg.alibi:  # Falcon adds the bias to the unscaled scores
            self.positions = ALiBi(alibi_slopes(self.num_heads) / math.sqrt(self.head_dim))
        else:
            self.positions = _rope_from_config(cfg, self.head_dim)

    def qkv(self, layer, x):
        fused = layer.self_attention.query_key_value(x)
        d = self.head_dim
        if self.cfg.new_decoder_architecture:  # per KV group: its queries, then k, then v
            groups = fused.view(self.num_kv_heads, -1, d)
            return groups[:, :-2].reshape(self.num_heads, d), groups[:, -2], groups[:, -1]
        if self.cfg.multi_query:  # all queries, then the one k and v
            heads = fused.view(-1, d)
            return heads[:-2], heads[-2:-1], heads[-1:]
        heads = fused.view(self.num_heads, 3, d)  # per head: q, k, v
        return heads[:, 0], heads[:, 1], heads[:, 2]

    def block(self, layer, x, attend):
        cfg = self.cfg
        if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2:
            attn_in, mlp_in = layer.ln_attn(x), layer.ln_mlp(x)
        else:
            attn_in = mlp_in = layer.input_layernorm(x)
        attn = layer.self_attention.dense(attend(attn_in))
        if cfg.new_decoder_architecture or cfg.parallel_attn:
            return x + attn + layer.mlp(mlp_in)
        h = x + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))


class _Bloom:
    def __init__(self, model):
        cfg = self.cfg = model.config
        t = model.transformer
        self.word_embeddings, self.embed_norm = t.word_embeddings, t.word_embeddings_layernorm
        self.final_norm, self.head = t.ln_f, model.lm_head
        self.layers = list(t.h)
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.hidden_size // cfg.n_head
        self.positions = ALiBi(alibi_slopes(self.num_heads))

    def embed(self, token):
        return self.embed_norm(self.word_embeddings(token))

    def qkv(self, layer, x):
        heads = layer.self_attention.query_key_value(x).view(self.num_heads, 3, self.head_dim)
        return heads[:, 0], heads[:, 1], heads[:, 2]

    def block(self, layer, x, attend):
        post_norm_residual = self.cfg.apply_residual_connection_post_layernorm
        h_in = layer.input_layernorm(x)
        h = layer.self_attention.dense(attend(h_in)) + (h_in if post_norm_residual else x)
        m_in = layer.post_attention_layernorm(h)
        return layer.mlp(m_in, m_in if post_norm_residual else h)  # its MLP adds the residual


_FAMILIES = {"llama": _Llama, "mistral": _Llama, "qwen2": _Llama, "qwen3": _Qwen3,
             "phi3": _Phi3, "gpt_neox": _GPTNeoX, "gptj": _GPTJ, "falcon": _Falcon,
             "bloom": _Bloom}


def _refuse_native_window(config, longest_cache: int) -> None:
    window = getattr(config, "sliding_window", None)
    if window is not None and longest_cache > window:
        raise NotImplementedError(f"the model's own sliding window ({window}) is shorter than "
                                  f"the cache ({longest_cache})")


@torch.no_grad()
def streaming_nll(model, token_ids: list[int], sink_tokens: int, window_tokens: int,
                  progress=None) -> list[float]:
    """NLL (natural log) of token_ids[t+1] given token_ids[<=t] under StreamingLLM(S, W).

    `model` is a transformers causal LM; it is converted to float64 in place.
    """
    model_type = model.config.model_type
    if model_type not in _FAMILIES:
        raise NotImplementedError(f"reference has no {model_type!r} family")
    _refuse_native_window(model.config, min(sink_tokens + window_tokens, len(token_ids)))
    model.to(F64).eval()
    fam = _FAMILIES[model_type](model)
    positions = fam.positions
    group = fam.num_heads // fam.num_kv_heads
    scale = 1.0 / math.sqrt(fam.head_dim)
    keep_recent = window_tokens - 1  # after a step, the next query adds itself to the window

    raw_keys = [[] for _ in fam.layers]   # per layer: list of [kv_heads, head_dim], unpositioned
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
                keys = torch.stack(raw_keys[li], dim=1)                        # [KV, n, D]
                query = q[:, None, :]                                          # [H, 1, D]
                if isinstance(positions, RoPE):
                    keys = positions.rotate(keys, slots, n)
                    query = positions.rotate(query, slots[-1:], n)
                keys = keys.repeat_interleave(group, dim=0)                    # [H, n, D]
                vals = torch.stack(values[li], dim=1).repeat_interleave(group, dim=0)
                scores = (query @ keys.transpose(1, 2)) * scale
                if isinstance(positions, ALiBi):
                    scores = scores + positions.bias(n)
                out = (torch.softmax(scores, dim=-1) @ vals).reshape(-1)
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
