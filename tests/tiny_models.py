"""Tiny random checkpoints for tests where the weights don't matter (vLLM's CPU kernel needs
head_dim 64, so these are as small as that allows).

The families and RoPE variants besides plain Llama and GPT-NeoX keep their length-dependent
thresholds (original_max_position_embeddings, dynamic NTK's max_position_embeddings) small by
default, so that a few dozen tokens cross them."""
from __future__ import annotations

import os
import shutil

import torch

VOCAB = 512


def make_tiny_llama(path, seed: int = 0, layers: int = 2, rope_theta: float = 10000.0,
                    max_positions: int = 4096) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM(config), path)


def make_tiny_gpt_neox(path, seed: int = 0, layers: int = 2, max_positions: int = 4096) -> str:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=layers, num_attention_heads=2,
                           max_position_embeddings=max_positions, rotary_pct=0.25,
                           use_parallel_residual=True, bos_token_id=1, eos_token_id=2)
    return _save(GPTNeoXForCausalLM(config), path)


def make_tiny_llama_with_tokenizer(path, max_positions: int = 8192, sharp: bool = True) -> str:
    """A 2-layer random Llama that speaks the default model's tokenizer (vocab 49152, its chat
    template too), for what needs text: OpenAI servers, batch records, the benchmark scripts.
    sharp=False keeps the initial weights: near-uniform predictions, so a perplexity over real
    text stays finite (the sharpened model's NLLs overflow exp())."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from streamsink.model_store import resolve_model

    source = resolve_model(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=DEFAULT_VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=max_positions,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=2)
    return add_default_tokenizer(_save(LlamaForCausalLM(config), path, sharpen=sharp), source)


DEFAULT_VOCAB = 49152  # the default model's tokenizer


def add_default_tokenizer(path: str, source: str | None = None) -> str:
    """Give a checkpoint of DEFAULT_VOCAB tokens the default model's tokenizer and chat
    template, so that servers can take text and chat requests for it."""
    if source is None:
        from streamsink.model_store import resolve_model

        source = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), path)
    return path


def _save(model, path, sharpen: bool = True, jitter_vectors: bool = False) -> str:
    # Larger-than-default weights so attention is far from uniform: position errors then show.
    # jitter_vectors moves biases off zero and norm weights off one, so that a family's biases
    # and per-head norms (Qwen2, Qwen3, Falcon, BLOOM) are actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sharpen and p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
            if jitter_vectors and p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path)


# ---- more families and RoPE variants -------------------------------------------------------

def llama_rope_variant(rope_type: str, original_max_positions: int = 16) -> dict:
    """rope_parameters of a scaled-RoPE Llama, stretched from original_max_positions (dynamic
    NTK reads its threshold from max_position_embeddings instead)."""
    variants = {
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 4.0},
        # Llama 3.1's shape; twice the original length puts dimensions of a 64-dim head in all
        # three bands (kept, blended, divided by factor).
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 2 * original_max_positions},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": original_max_positions,
                 "beta_fast": 32.0, "beta_slow": 1.0},
    }
    return {"rope_type": rope_type, "rope_theta": 10000.0, **variants[rope_type]}


def make_tiny_llama_scaled(path, rope_type: str, seed: int = 0, layers: int = 2,
                           original_max_positions: int = 16,
                           max_positions: int | None = None) -> str:
    """Llama with rope_type linear, dynamic, llama3 or yarn. Dynamic NTK starts scaling past
    max_position_embeddings, so for it that defaults to original_max_positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if max_positions is None:  # yarn: the length its factor stretches the original to
        max_positions = {"dynamic": original_max_positions,
                         "yarn": 4 * original_max_positions}.get(rope_type, 4096)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=max_positions,
                         rope_parameters=llama_rope_variant(rope_type, original_max_positions),
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM(config), path)


def make_tiny_mistral(path, seed: int = 0, layers: int = 2, max_positions: int = 4096) -> str:
    """Mistral without a sliding window (as later Mistral releases ship; a streaming engine
    refuses a model with its own window)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64,
                           max_position_embeddings=max_positions, sliding_window=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return _save(MistralForCausalLM(config), path)


def make_tiny_qwen2(path, seed: int = 0, layers: int = 2, max_positions: int = 4096,
                    vocab: int = VOCAB) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         use_sliding_window=False, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    return _save(Qwen2ForCausalLM(config), path, jitter_vectors=True)


def make_tiny_qwen3(path, seed: int = 0, layers: int = 2, max_positions: int = 4096) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         use_sliding_window=False, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    return _save(Qwen3ForCausalLM(config), path, jitter_vectors=True)


def make_tiny_phi3(path, seed: int = 0, layers: int = 2, longrope: bool = True,
                   partial_rotary_factor: float = 1.0, original_max_positions: int = 16,
                   max_positions: int = 64) -> str:
    """Phi-3. With longrope, in Phi-3-mini-128k's config shape: short and long factor lists of
    rotary_dim/2, original_max_position_embeddings below max_position_embeddings (so the
    attention factor sqrt(1 + ln(max/original) / ln(original)) is not 1). Without, plain RoPE
    (Phi-4-mini rotates 3/4 of each head: partial_rotary_factor)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "partial_rotary_factor": partial_rotary_factor}
    if longrope:
        half = int(64 * partial_rotary_factor) // 2
        rope.update(rope_type="longrope",
                    short_factor=[round(1.0 + 0.5 * i / (half - 1), 4) for i in range(half)],
                    long_factor=[round(32.0 ** (i / (half - 1)), 4) for i in range(half)])
    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max_positions,
                        original_max_position_embeddings=original_max_positions,
                        rope_parameters=rope, sliding_window=None, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(Phi3ForCausalLM(config), path)


FALCON_VARIANTS = {
    # Falcon-7B: one shared KV head, attention and MLP in parallel off one LayerNorm.
    "multi_query": dict(hidden_size=128, num_attention_heads=2, multi_query=True,
                        parallel_attn=True, new_decoder_architecture=False),
    # Falcon-40B/180B: grouped KV heads, separate LayerNorms for attention and MLP.
    "new_decoder": dict(hidden_size=256, num_attention_heads=4, num_kv_heads=2,
                        new_decoder_architecture=True, parallel_attn=True),
    # Falcon-RW: ALiBi, a KV head per query head, sequential blocks, biases.
    "alibi": dict(hidden_size=128, num_attention_heads=2, alibi=True, multi_query=False,
                  parallel_attn=False, new_decoder_architecture=False, bias=True),
}


def make_tiny_falcon(path, variant: str, seed: int = 0, layers: int = 2,
                     max_positions: int = 4096) -> str:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=VOCAB, num_hidden_layers=layers,
                          max_position_embeddings=max_positions,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          bos_token_id=1, eos_token_id=2, **FALCON_VARIANTS[variant])
    return _save(FalconForCausalLM(config), path, jitter_vectors=True)


def make_tiny_bloom(path, seed: int = 0, layers: int = 2, vocab: int = VOCAB) -> str:
    """BLOOM with 3 heads: a head count that is not a power of two takes ALiBi's second slope
    sequence for the heads past the largest power of two."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=vocab, hidden_size=192, n_layer=layers, n_head=3,
                         bos_token_id=1, eos_token_id=2)
    return _save(BloomForCausalLM(config), path, jitter_vectors=True)


def make_tiny_gptj(path, seed: int = 0, layers: int = 2, max_positions: int = 4096) -> str:
    """GPT-J: rotation of adjacent pairs on the first rotary_dim (of 64) features."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=VOCAB, n_embd=128, n_layer=layers, n_head=2, rotary_dim=32,
                        n_inner=512, n_positions=max_positions, bos_token_id=1, eos_token_id=2)
    return _save(GPTJForCausalLM(config), path)
