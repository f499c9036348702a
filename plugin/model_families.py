"""The model families a streaming engine runs: which Hugging Face architectures, and how each
encodes positions (the supported-models table is rendered from this).

A leaf module (pure data): engine_setup.py refuses what is not here, and benchmarks/families.py
measures every entry against the reference. How the engine treats each kind of position:
- RoPE: keys are cached rotated by vLLM's model code; sink shadows, queries moved to their
  in-cache slot and row rebases rotate by a difference of positions with the variant's
  frequencies (rope.py), in NeoX pairing (halves) or GPT-J pairing (adjacent features).
- ALiBi: nothing positional is cached; vLLM's CPU kernel biases by the difference of logical
  positions, which sink shadows turn into in-cache distances; the PyTorch path adds the bias by
  in-cache distance itself (attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

# RoPE variants by their rope_type; the two length-dependent ones only while the in-cache length
# S + W stays within their threshold (their frequencies are then fixed: rope.py).
ROPE_VARIANTS = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
LENGTH_DEPENDENT = {"dynamic": "S+W <= max_position_embeddings",
                    "longrope": "S+W <= original_max_position_embeddings"}


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    rope_types: tuple[str, ...] = ()   # accepted rope_type values; empty: no RoPE
    rope_pairs: str = "halves"         # "halves" (NeoX) or "adjacent pairs" (GPT-J)
    alibi: bool = False                # a variant of the family uses ALiBi

    def positions(self) -> str:
        """How the family encodes positions, for people."""
        parts = []
        if self.rope_types:
            variants = ", ".join(f"{t} ({LENGTH_DEPENDENT[t]})" if t in LENGTH_DEPENDENT else t
                                 for t in self.rope_types)
            parts.append(f"RoPE rotating {self.rope_pairs}: {variants}")
        if self.alibi:
            parts.append("ALiBi")
        return "; ".join(parts)


FAMILIES = (
    # vLLM runs these five on its Llama-style attention with get_rope: every variant is one of
    # vLLM's rotary classes, whatever the family.
    Family("Llama", ("LlamaForCausalLM",), ROPE_VARIANTS),
    Family("Mistral", ("MistralForCausalLM",), ROPE_VARIANTS),
    Family("Qwen2", ("Qwen2ForCausalLM",), ROPE_VARIANTS),
    Family("Qwen3", ("Qwen3ForCausalLM",), ROPE_VARIANTS),
    Family("Phi-3", ("Phi3ForCausalLM",), ROPE_VARIANTS),
    # Through vLLM's Transformers backend: Hugging Face's rotary module
    # (patches/hf_gpt_neox_rope.py).
    Family("GPT-NeoX", ("GPTNeoXForCausalLM",), ("default",)),
    # vLLM's GPT-J reads no RoPE parameters from the config: base 10000, plain.
    Family("GPT-J", ("GPTJForCausalLM",), ("default",), rope_pairs="adjacent pairs"),
    Family("Falcon", ("FalconForCausalLM",), ("default",), alibi=True),
    Family("BLOOM", ("BloomForCausalLM",), alibi=True),
)

_GEMMA = ("alternates sliding-window and global attention layers, which vLLM keeps in separate "
          "KV cache groups; streamsink streams one full-attention cache")
# Architectures vLLM runs that streamsink refuses with a reason of their own.
REFUSED = {"Gemma2ForCausalLM": _GEMMA, "Gemma3ForCausalLM": _GEMMA,
           "Gemma3ForConditionalGeneration": _GEMMA}


def family_of(architecture: str) -> Family | None:
    return next((f for f in FAMILIES if architecture in f.architectures), None)


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)
