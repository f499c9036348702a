"""Tiny random checkpoints for tests where the weights don't matter (vLLM's CPU kernel needs
head_dim 64, so these are as small as that allows)."""
from __future__ import annotations

import torch

VOCAB = 512


def make_tiny_llama(path, seed: int = 0, layers: int = 2, rope_theta: float = 10000.0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM(config), path)


def make_tiny_gpt_neox(path, seed: int = 0, layers: int = 2) -> str:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=layers, num_attention_heads=2,
                           max_position_embeddings=4096, rotary_pct=0.25,
                           use_parallel_residual=True, bos_token_id=1, eos_token_id=2)
    return _save(GPTNeoXForCausalLM(config), path)


def _save(model, path) -> str:
    # Larger-than-default weights so attention is far from uniform: position errors then show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    model.save_pretrained(str(path))
    return str(path)
