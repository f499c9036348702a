"""How vLLM's CPU attention backend lays out one layer's paged KV cache ("vec" ISA), and the
few operations streamsink does on it directly.

Per block and KV head, keys are stored as [head_dim, block_size] (column-major) and values as
[block_size, head_dim]; the tensor is [num_blocks, kv_heads, block_size, 2 * head_dim]. A leaf
module: the attention path (tiles read it) and the worker rows (rebases rotate keys in it) share
it without importing each other.
"""
from __future__ import annotations

import numpy as np
import torch


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views: keys [blocks, kv_heads, head_dim, B] and values [blocks, kv_heads, B, head_dim]."""
    num_blocks, kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    pages = kv_cache.view(num_blocks, kv_heads, 2, block_size * d)
    keys = pages[:, :, 0].unflatten(-1, (d, block_size))
    values = pages[:, :, 1].unflatten(-1, (block_size, d))
    return keys, values


def rotate_cached_keys(kv_cache: torch.Tensor, blocks: torch.Tensor, cos_sin: torch.Tensor,
                       rotary_dim: int, neox_style: bool = True) -> None:
    """Rotate every key stored in `blocks` of one layer's cache by one angle set, in place
    (cos_sin: [rotary_dim], cos | sin; features paired as halves (NeoX) or neighbours (GPT-J)).
    Keys are [head_dim, B] per (block, KV head), so the rotated features are rows of that
    page."""
    keys, _ = split_kv_cache(kv_cache)
    half = rotary_dim // 2
    cos = cos_sin[:half, None].to(kv_cache.dtype)
    sin = cos_sin[half:, None].to(kv_cache.dtype)
    k = keys[blocks]                                          # [N, Hkv, D, B]
    if neox_style:
        first, second = slice(0, half), slice(half, rotary_dim)
    else:
        first, second = slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
    x1, x2 = k[:, :, first], k[:, :, second]
    rotated_1, rotated_2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    k[:, :, first], k[:, :, second] = rotated_1, rotated_2
    keys[blocks, :, :rotary_dim] = k[:, :, :rotary_dim]


def flat_kv_index(blocks: np.ndarray, offsets: np.ndarray, kv_heads: int, head_dim: int,
                  block_size: int) -> np.ndarray:
    """Flat indices into one layer's cache tensor of the keys, then the values, of tokens
    (block, offset), each [N, Hkv, D]."""
    page = 2 * block_size * head_dim
    base = (blocks.astype(np.int64)[:, None, None] * kv_heads
            + np.arange(kv_heads)[None, :, None]) * page
    dims = np.arange(head_dim)[None, None, :]
    offsets = offsets[:, None, None]
    keys = base + dims * block_size + offsets
    values = base + block_size * head_dim + offsets * head_dim + dims
    return np.concatenate([keys.ravel(), values.ravel()])
