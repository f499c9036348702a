"""Tiny random checkpoints for tests where the weights don't matter (vLLM's CPU kernel needs
head_dim 64, so these are as small as that allows)."""
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
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=max_positions,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=2)
    path = _save(LlamaForCausalLM(config), path, sharpen=sharp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), path)
    return path


def _save(model, path, sharpen: bool = True) -> str:
    # Larger-than-default weights so attention is far from uniform: position errors then show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sharpen and p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    model.save_pretrained(str(path))
    return str(path)
