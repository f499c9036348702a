"""Sink shadows written into a paged cache: the native op (shadow_op.cpp) and the stock-op path
both equal the definition — sink j's key rotated from its position j to i-C+1+j (features
paired as halves or, GPT-J, as neighbours; not at all for ALiBi models) and its value, copied to
slot i-C+1+j of the request's row — and touch nothing else."""
import pytest
import torch

from streamsink import shadow_op
from streamsink.config import StreamsinkConfig
from streamsink.rope import RopeSpec, rotate
from streamsink.step_plan import plan_step

BLOCK = 32
KV_HEADS = 3
HEAD_DIM = 64


def attention_impl(rope: RopeSpec | None, native):
    """The attention impl's shadow path, with the native op or without (no engine needed)."""
    from streamsink.attention import StreamsinkAttentionImpl

    impl = object.__new__(StreamsinkAttentionImpl)
    impl.num_kv_heads, impl.head_size, impl.rope, impl.native_shadows = (
        KV_HEADS, HEAD_DIM, rope, native)
    return impl


def native_write(writer, caches, shadows, rope: RopeSpec | None) -> None:
    shadow_op.write_shadows(writer, caches, shadows.source_slots, shadows.slots,
                            shadows.positions, shadows.rotation_table_f32, HEAD_DIM,
                            0 if rope is None else rope.rotary_dim,
                            adjacent_pairs=rope is not None and not rope.neox_style)


class Layer:
    isa = "vec"


def make_case(rope: RopeSpec, dtype: torch.dtype):
    """Five decodes past C, windows starting at different offsets (one crossing a block); 20
    shadows, enough for the op to split them over threads."""
    torch.manual_seed(0)
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=60)
    seq_lens = [cfg.cache_tokens + 10, cfg.cache_tokens + 29, 3 * cfg.cache_tokens + 7,
                cfg.cache_tokens + 5, 2 * cfg.cache_tokens + 40]
    blocks_per_row = -(-max(seq_lens) // BLOCK)
    rows = len(seq_lens)
    table = torch.randperm(rows * blocks_per_row + 5)[:rows * blocks_per_row].view(rows, -1) + 2
    cache = torch.randn(table.max() + 3, KV_HEADS, BLOCK, 2 * HEAD_DIM).to(dtype)
    plan = plan_step(cfg, rope, BLOCK, seq_lens, list(range(rows + 1)), table.int(), dtype,
                     kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    assert plan.kernel and len(plan.shadows.slots) == rows * cfg.sink_tokens
    return cfg, seq_lens, table, cache, plan.shadows


def expected_cache(cache, cfg, seq_lens, table, rope):
    """The definition, token by token, in float64 (keys: [D, B] pages; values: [B, D])."""
    from streamsink.kv_cache_layout import split_kv_cache

    out = cache.clone()
    keys, values = split_kv_cache(cache)
    out_keys, out_values = split_kv_cache(out)
    for r, seq_len in enumerate(seq_lens):
        shift = seq_len - 1 - cfg.cache_tokens + 1
        for j in range(cfg.sink_tokens):
            sb, so = int(table[r, j // BLOCK]), j % BLOCK
            dest = shift + j
            db, do = int(table[r, dest // BLOCK]), dest % BLOCK
            key = keys[sb, :, :, so].double()                              # [Hkv, D]
            if rope is not None:
                angle = rope.cos_sin(torch.tensor([shift]), torch.float64)
                key = rotate(key, angle, rope.rotary_dim, rope.neox_style)
            out_keys[db, :, :, do] = key.to(cache.dtype)
            out_values[db, :, do] = values[sb, :, so]
    return out


ROPES = [RopeSpec(head_dim=64, rotary_dim=64, theta=10000.0),     # Llama
         RopeSpec(head_dim=64, rotary_dim=16, theta=10000.0),     # GPT-NeoX (rotary_pct 0.25)
         # GPT-J (adjacent pairs, rotary_dim 32 of 64), with a variant's attention factor, which
         # a shadow must not apply a second time.
         RopeSpec(head_dim=64, rotary_dim=32, theta=10000.0, neox_style=False,
                  frequencies=tuple(0.6 ** k for k in range(16)), attention_factor=1.25),
         None]                                                    # ALiBi: a plain copy
ROPE_IDS = ["full", "partial", "adjacent", "alibi"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rope", ROPES, ids=ROPE_IDS)
def test_native_op_writes_the_definition(rope, dtype, tol):
    writer = shadow_op.shadow_writer(dtype)
    assert writer is not None, "the native shadow op did not build here (see the log)"
    cfg, seq_lens, table, cache, shadows = make_case(rope, dtype)
    expected = expected_cache(cache, cfg, seq_lens, table, rope)
    before = cache.clone()
    native_write(writer, [cache], shadows, rope)
    assert not torch.equal(cache, before)
    torch.testing.assert_close(cache.float(), expected.float(), atol=tol, rtol=tol)
    # Values are copied bit for bit; so are the features past rotary_dim.
    changed = (cache != before).flatten(1).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= {int(s) // BLOCK for s in shadows.slots}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", ROPES, ids=ROPE_IDS)
def test_native_op_equals_stock_op_path(rope, dtype):
    cfg, seq_lens, table, cache, shadows = make_case(rope, dtype)
    native, stock = cache.clone(), cache.clone()
    native_write(shadow_op.shadow_writer(dtype), [native], shadows, rope)
    attention_impl(rope, None)._write_shadows(Layer(), stock, shadows)
    # The stock path rotates with a table in the model's dtype: bf16 may differ by a rounding.
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(native.float(), stock.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_first_layer_writes_every_layers_shadows(dtype, tol):
    """The attention path's native write at a step's first layer covers every layer the
    metadata builder listed, each from its own sinks; a cache not in that list gets its own."""
    rope = ROPES[0]
    cfg, seq_lens, table, first, shadows = make_case(rope, dtype)
    layers = [first] + [torch.randn_like(first, dtype=torch.float32).to(dtype) for _ in range(2)]
    stray = first.clone()
    expected = [expected_cache(c, cfg, seq_lens, table, rope) for c in layers + [stray]]
    shadows.layer_caches = layers
    impl = attention_impl(rope, shadow_op.shadow_writer(dtype))
    impl._write_shadows(Layer(), layers[1], shadows)
    assert shadows.written == {c.data_ptr() for c in layers}
    for cache, want in zip(layers, expected):
        torch.testing.assert_close(cache.float(), want.float(), atol=tol, rtol=tol)
    assert not torch.equal(stray, expected[-1])
    impl._write_shadows(Layer(), stray, shadows)
    torch.testing.assert_close(stray.float(), expected[-1].float(), atol=tol, rtol=tol)
    assert stray.data_ptr() in shadows.written and len(shadows.written) == 4


def test_without_a_compiler_the_stock_path_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(shadow_op, "_library", None)
    monkeypatch.setattr(shadow_op, "_load_tried", False)
    monkeypatch.setenv("STREAMSINK_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")          # a "compiler" that always fails
    assert shadow_op.shadow_writer(torch.float32) is None
    assert shadow_op.shadow_writer(torch.bfloat16) is None   # tried once, not per layer
    assert not list(tmp_path.rglob("*.so"))     # no half-written library left behind
