"""The streaming rule: which tokens a stream keeps, where they sit, how many blocks that holds.

Every module that needs a piece of this arithmetic asks here: the KV spec and the KV budget (the
per-stream block bound), the KV policy (what to free), prefix caching (the shadow span it
protects, what a cache hit carries), the worker rows (what a rebase keeps, the narrowest row),
the step plan (when vLLM's kernel may take a request, the shadows it writes, the tiles'
visibility) and what a response tells its client (client_state.py: the tokens evicted). A leaf module that imports nothing, not even vLLM: the CLI sizes rows with it
before vLLM loads. tests/test_stream_rule.py checks it alone against the definition below.

A stream's *shape*: S tokens every query sees (the engine's sinks, or the P tokens a request
pins, request_options.py) and a window of W tokens (the engine's, or a request's W_r <= W);
C = S + W. For query token i (docs/architecture.md §1):
- visible keys V(i) = {j <= i : j < S or j > i - W}: the sinks and the W most recent tokens,
  i itself included;
- with n = min(i+1, C) the keys of V(i) sit at in-cache slots 0..n-1 in token order, the query
  at slot n-1: a window key j at n-1-(i-j) (its distance i - j is the positions' difference,
  so keys stored rotated at their positions give the right window logits as they are), a sink
  outside the window at j.

The engine's own shape writes sink *shadows*: a kernel decode of query i >= C+S-1 writes sink
j's K/V, re-rotated to position i-C+1+j, into the slots of tokens i-C+1 .. i-W, which no query
sees any more; the last C positions then hold exactly V(i) at the right distances, and vLLM's
kernel with a sliding window of C computes the step (docs/architecture.md §4). So the KV
manager keeps S+W-1 tokens before the next query (the window's W-1 and the S shadow slots). A
shape of a request's own (writes_shadows False) keeps W_r-1: its steps past its cache run as
PyTorch tiles that read the pinned tokens where they were written.

Example: S = 2, W = 5 (C = 7), block size B = 4; query i = 17 decodes (Q = 1), 17 tokens are
computed.

Tokens:   [  0  1  2  3 |  4  5  6  7 |  8  9 10 11 | 12 13 14 15 | 16 17 ]
           |----| sinks: every query sees them
           |-----------------------------------| skipped: 17 - (S+W-1) = 11 tokens
                                                |--------------------| retained: S+W-1 = 6
                                                |------| shadow span: i-C+1 .. i-W
                                                        |---------------| window of i
Blocks:   [ front:pinned| freed (null)|     held    |     held    |  held ]
           ceil(S/B) = 1 front block, pinned for the stream's life; every block wholly among
           the skipped tokens (here block 1) is freed; held: 4 =
           ceil(S/B) + ceil((S+W-1+Q)/B) + 1 at most (the retained run and the step's tokens
           need not start on a block boundary).

What vLLM's kernel (window C) reads for query 17 once the step's shadows are written, and the
in-cache slots (n = min(i+1, C) = 7):

  position   11  12  13  14  15  16  17
  holds      s0  s1  13  14  15  16  17     s_j: sink j, its key re-rotated to 11 + j
  slot        0   1   2   3   4   5   6     the query at slot n-1 = 6

A request pinning P = 2 with W_r = 5 instead writes no shadows: it retains W_r - 1 = 4 tokens
(13..16), frees blocks 1 and 2, and holds at most ceil(P/B) + ceil((W_r-1+Q)/B) + 1 blocks.

Positions passed to these functions are absolute (the scheduler) or row positions (the worker,
row_window.py): a rebased row keeps the front blocks in place and every query at a row position
>= C-1 past them, so the rule reads the same on both.
"""
from __future__ import annotations

from dataclasses import dataclass


def _cdiv(a: int, b: int) -> int:
    """Ceiling division, as vllm.utils.math_utils.cdiv (the KV manager's)."""
    return -(a // -b)


@dataclass(frozen=True)
class StreamShape:
    """What one request keeps: `sink_tokens` tokens in front that every query sees (the engine's
    S, or the request's pinned P) and a window of `window_tokens`. `writes_shadows`: its kernel
    decodes write sink shadows (only the engine's own shape does), so it keeps S more slots
    before its query."""

    sink_tokens: int
    window_tokens: int
    writes_shadows: bool = True

    @property
    def cache_tokens(self) -> int:
        """C = S + W: the most keys one query attends to."""
        return self.sink_tokens + self.window_tokens

    @property
    def retained_tokens(self) -> int:
        """Tokens the KV manager keeps before the next query (besides the front blocks): the
        window's W-1, plus the S shadow slots where the shape writes them."""
        return self.window_tokens - 1 + (self.sink_tokens if self.writes_shadows else 0)


# -- visibility (query i, key j; ints, or elementwise integer tensors) -----------------------
def in_window(shape: StreamShape, i, j):
    """Key j is one of query i's W most recent tokens (i included)."""
    return (j <= i) & (j > i - shape.window_tokens)


def sink_outside_window(shape: StreamShape, i, j):
    """Key j is a sink that query i sees apart from its window (only these need the query
    moved to its in-cache slot)."""
    return (j < shape.sink_tokens) & (j <= i - shape.window_tokens)


def visible(shape: StreamShape, i, j):
    """j is in V(i) (the step plan's tiles take it as these two disjoint parts)."""
    return in_window(shape, i, j) | sink_outside_window(shape, i, j)


def window_start(shape: StreamShape, i: int) -> int:
    """The oldest key of query i's window."""
    return max(0, i - shape.window_tokens + 1)


def query_slot(shape: StreamShape, i):
    """Query i's in-cache slot n-1 = min(i, C-1) (an int, or elementwise a tensor)."""
    last = shape.cache_tokens - 1
    return i.clamp(max=last) if hasattr(i, "clamp") else min(i, last)


def evicted_tokens(shape: StreamShape, stream_tokens: int) -> int:
    """Tokens of a stream of `stream_tokens` tokens (prompt and generated) that a query at its
    last token no longer sees: all but V(L-1), max(0, L - C). What the client is told (usage);
    a prompt alone "outgrew the cache" when this is > 0 for the prompt's tokens."""
    return max(0, stream_tokens - shape.cache_tokens)


# -- what the scheduler keeps ------------------------------------------------------------------
def front_blocks(shape: StreamShape, block_size: int) -> int:
    """Blocks holding the sinks (or pinned tokens): held for the stream's whole life."""
    return _cdiv(shape.sink_tokens, block_size)


def skipped_tokens(shape: StreamShape, computed_tokens: int,
                   extra_retained_tokens: int = 0) -> int:
    """Tokens before the retained run of a stream that computed `computed_tokens`: no present
    or future query sees them (the front blocks aside), and they are not a decode's shadow
    slots. extra_retained_tokens: vLLM's spec field (tokens kept below the window, never
    attended)."""
    return max(0, computed_tokens - shape.retained_tokens - extra_retained_tokens)


def first_live_block(shape: StreamShape, block_size: int, computed_tokens: int,
                     extra_retained_tokens: int = 0) -> int:
    """The first block past the front blocks that the KV manager still holds: every block in
    between lies wholly among the skipped tokens and is freed."""
    skipped = skipped_tokens(shape, computed_tokens, extra_retained_tokens)
    return max(front_blocks(shape, block_size), skipped // block_size)


def max_blocks_held(shape: StreamShape, block_size: int, step_tokens: int,
                    extra_retained_tokens: int = 0) -> int:
    """The most blocks a stream of this shape holds with `step_tokens` scheduled in a step,
    whatever its length: the front blocks, the retained run and the step's tokens, +1 because
    the retained run need not start on a block boundary."""
    held = shape.retained_tokens + extra_retained_tokens + step_tokens
    return front_blocks(shape, block_size) + _cdiv(held, block_size) + 1


def bounding_shapes(sink_tokens: int, window_tokens: int,
                    max_pinned_tokens: int) -> tuple[StreamShape, StreamShape]:
    """The engine's own shape and the widest one a request may ask for (max_pinned_tokens at
    the full window, no shadows). Every per-stream bound below grows with the front tokens and
    the window, so the larger of the two bounds every request of the engine."""
    return (StreamShape(sink_tokens, window_tokens),
            StreamShape(max_pinned_tokens, window_tokens, writes_shadows=False))


def max_blocks_per_stream(sink_tokens: int, window_tokens: int, max_pinned_tokens: int,
                          block_size: int, step_tokens: int,
                          extra_retained_tokens: int = 0) -> int:
    """The most blocks any one stream of an engine holds (max_blocks_held of the bounding
    shapes)."""
    return max(max_blocks_held(shape, block_size, step_tokens, extra_retained_tokens)
               for shape in bounding_shapes(sink_tokens, window_tokens, max_pinned_tokens))


def cache_hit_window(shape: StreamShape) -> int:
    """The window vLLM's sliding-window hit search is given: it finds a run of
    cdiv(window-1, B) cached blocks ending at the hit, so a hit carries the tokens the shape
    keeps before its next query (C for the engine's shape; the front blocks are looked up on
    their own)."""
    return shape.retained_tokens + 1


# -- shadows and vLLM's kernel ---------------------------------------------------------------
def _decode_clear_of_sinks(shape: StreamShape, first_query: int, num_queries: int) -> bool:
    """One decode whose query i has its C-th most recent position i-C+1 past the sinks, so
    that S shadows written from there on leave the real sinks alone."""
    return num_queries == 1 and first_query - shape.cache_tokens + 1 >= shape.sink_tokens


def shadow_span(shape: StreamShape, first_query: int,
                num_queries: int) -> tuple[int, int] | None:
    """Positions (lowest, highest) a step of `num_queries` queries from `first_query` on
    overwrites with sink shadows: sink j goes to lowest + j, its key rotated by `lowest`
    positions. None when the step writes none: a shape of a request's own, no sinks, or a step
    that is not one decode clear of the sinks (query i >= C+S-1)."""
    if (not shape.writes_shadows or not shape.sink_tokens
            or not _decode_clear_of_sinks(shape, first_query, num_queries)):
        return None
    return first_query - shape.cache_tokens + 1, first_query - shape.window_tokens


def kernel_can_run(engine: StreamShape, shape: StreamShape, seq_len: int,
                   query_len: int) -> bool:
    """vLLM's kernel (a sliding window of the engine's C over the last positions) computes a
    request's step exactly: while it is dense (all its queries < C), or, for the engine's shape,
    a decode clear of the sinks, whose last C positions read as V(i) once its shadows
    (shadow_span) are written (with no sinks, none are needed)."""
    if not shape.writes_shadows:
        # The kernel's window is the engine's C: only while the request is dense in both.
        return seq_len <= min(shape.cache_tokens, engine.cache_tokens)
    return (seq_len <= engine.cache_tokens
            or _decode_clear_of_sinks(engine, seq_len - query_len, query_len))


# -- the worker's rows -------------------------------------------------------------------------
def furthest_row_offset(shape: StreamShape, block_size: int, first_query: int) -> int:
    """The largest row offset (a multiple of B) that keeps every key the step's first query
    and later ones may see or shadow: the retained tokens before it, at row positions past the
    front blocks."""
    front = front_blocks(shape, block_size) * block_size
    lowest_kept = first_query - shape.retained_tokens
    return max(0, (lowest_kept - front) // block_size * block_size)


def row_tokens(shape: StreamShape, block_size: int, step_tokens: int) -> int:
    """The narrowest worker row that always fits one step of this shape: the front blocks, the
    retained tokens before the step's first query, the step's queries, the token it samples and
    one block of alignment slack."""
    return ((front_blocks(shape, block_size) + 1) * block_size + shape.retained_tokens + 1
            + step_tokens)


def min_row_tokens(sink_tokens: int, window_tokens: int, max_pinned_tokens: int,
                   block_size: int, step_tokens: int) -> int:
    """The narrowest row (max_model_len) that fits a step of any request of an engine."""
    return max(row_tokens(shape, block_size, step_tokens)
               for shape in bounding_shapes(sink_tokens, window_tokens, max_pinned_tokens))
