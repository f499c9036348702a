"""The streaming rule (plugin/stream_rule.py) alone, against its contract: no engine, no vLLM.

Over a dense grid — the engine's S sinks and W window, requests pinning P tokens with a window
W_r <= W, block sizes B, step sizes Q — it checks that
(a) the rule's spans are the definition's, written out literally below (docs/architecture.md
    §1): V(i) = {j <= i : j < S or j > i - W}, the keys of V(i) at in-cache slots 0..n-1 in
    token order with n = min(i+1, C), the query at slot n-1, a decode's shadow span, and the
    tokens a stream of i+1 tokens has evicted (those outside V(i));
(b) a stream's life, step by step (chunked prefill of Q tokens, then decodes) with blocks freed
    as the KV manager frees them (kv_policy.remove_skipped_blocks: every block past the front
    blocks below the first live one, newest first), holds at most max_blocks_held blocks at
    every step, and reaches that bound; no freed block holds a token a present or future query
    sees; the front blocks are never freed;
(c) the scheduler's view and the worker's agree along that life: the worker's row, as narrow as
    min_row_tokens allows, always fits and a rebase keeps exactly the blocks the scheduler
    holds; what vLLM's kernel (when kernel_can_run) or the PyTorch tiles read is exactly V(i)
    at its in-cache distances, out of blocks the scheduler holds; the shadows the worker writes
    are the scheduler's shadow span, in held blocks, on no key a query will see; a cache hit
    carries every block a request continuing there keeps.
test_each_check_can_fail changes one formula of the rule at a time by one and sees a check fail.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from streamsink import stream_rule as rule
from streamsink.stream_rule import StreamShape

SINKS = (0, 1, 4, 8, 130)
WINDOWS = (1, 28, 60, 127, 128, 129, 1020)
PINNED = (0, 1, 5, 128, 130, 200)
MAX_PINNED = max(PINNED)
BLOCKS = (16, 32, 128)
EXTRA = 5   # vLLM's extra_retained_tokens, tried beside 0 (B = 16)


def window_sizes(W: int) -> list[int]:
    """A request's own windows W_r <= W."""
    return sorted({1, (W + 1) // 2, W})


def engines() -> list[StreamShape]:
    return [StreamShape(S, W) for S in SINKS for W in WINDOWS]


def request_shapes(engine: StreamShape, index: int) -> list[StreamShape]:
    """The engine's shape and requests of their own on it: P cycled over PINNED, W_r <= W."""
    P = PINNED[index % len(PINNED)]
    return [engine] + [StreamShape(P, w, writes_shadows=False)
                       for w in window_sizes(engine.window_tokens)]


# -- the definition, literally ----------------------------------------------------------------
def literal_visible(S: int, W: int, i: int) -> list[int]:
    return [j for j in range(i + 1) if j < S or j > i - W]


def literal_distances(S: int, W: int, i: int) -> dict[int, int]:
    """Key -> its in-cache distance from query i: the keys of V(i) occupy slots 0..n-1 in token
    order, the query slot n-1."""
    keys = literal_visible(S, W, i)
    n = min(i + 1, S + W)
    assert len(keys) == n
    return {j: (n - 1) - slot for slot, j in enumerate(keys)}


def seen_from(S: int, W: int, c: int, j: int) -> bool:
    """Some query i >= c (present or future) sees token j. The earliest such query that has j
    at all (i >= j) is the one to ask: a later one sees no more old tokens."""
    i = max(c, j)
    return j <= i and (j < S or j > i - W)


def literal_front_blocks(S: int, B: int) -> int:
    """The blocks that hold tokens < S."""
    return len({j // B for j in range(S)})


# -- (a) the spans --------------------------------------------------------------------------
def queries(shape: StreamShape) -> list[int]:
    S, W, C = shape.sink_tokens, shape.window_tokens, shape.cache_tokens
    edges = {0, 1, S - 1, S, S + 1, W - 1, W, W + 1, C - 2, C - 1, C, C + 1, C + S - 2,
             C + S - 1, C + S, 2 * C + 5, 3 * C + 17}
    return sorted(i for i in edges | set(range(0, 3 * C, max(1, C // 9))) if i >= 0)


def check_spans(shape: StreamShape) -> None:
    S, W, C = shape.sink_tokens, shape.window_tokens, shape.cache_tokens
    for i in queries(shape):
        keys = np.arange(i + 2)       # one past the query: never visible
        visible = literal_visible(S, W, i)
        assert np.flatnonzero(rule.visible(shape, i, keys)).tolist() == visible, (shape, i)
        assert not (rule.in_window(shape, i, keys)
                    & rule.sink_outside_window(shape, i, keys)).any(), (shape, i)
        assert rule.window_start(shape, i) == min(j for j in visible if j > i - W), (shape, i)
        # The in-cache slots: a sink outside the window at its own position, a window key at
        # the query's slot minus its distance.
        slot = rule.query_slot(shape, i)
        distances = literal_distances(S, W, i)
        assert slot == len(distances) - 1, (shape, i)
        got = {j: slot - (j if rule.sink_outside_window(shape, i, j) else slot - (i - j))
               for j in visible}
        assert got == distances, (shape, i)
        # What the client is told: a stream of i+1 tokens evicted those its last query does
        # not see.
        assert rule.evicted_tokens(shape, i + 1) == i + 1 - len(visible), (shape, i)
        check_shadow_span(shape, i)


def check_shadow_span(shape: StreamShape, i: int) -> None:
    """A decode at i: its shadows sit on S tokens no query sees any more, and the last C
    positions then read as V(i) at its in-cache distances (what vLLM's kernel computes)."""
    S, W, C = shape.sink_tokens, shape.window_tokens, shape.cache_tokens
    span = rule.shadow_span(shape, i, 1)
    if not shape.writes_shadows or not S:
        assert span is None, (shape, i)
        return
    # Exactly the decodes whose S shadows can lie past the sinks take them.
    assert (span is not None) == (i - C + 1 >= S), (shape, i)
    if span is None:
        return
    lo, hi = span
    assert hi - lo + 1 == S and lo == i - C + 1, (shape, i)
    assert not any(seen_from(S, W, i, p) for p in range(lo, hi + 1)), (shape, i)
    read = {}
    for p in range(i - C + 1, i + 1):
        key = p - lo if lo <= p <= hi else p
        assert key not in read, (shape, i)
        read[key] = i - p
    assert read == literal_distances(S, W, i), (shape, i)


def span_shapes() -> list[StreamShape]:
    shapes = engines()
    shapes += [StreamShape(P, w, writes_shadows=False) for P in PINNED for W in WINDOWS
               for w in window_sizes(W)]
    return sorted(set(shapes), key=lambda s: (s.cache_tokens, s.sink_tokens, s.writes_shadows))


def test_spans_are_the_definitions():
    for shape in span_shapes():
        check_spans(shape)


# -- (b), (c): a stream's life --------------------------------------------------------------
@dataclass
class Tally:
    steady_runs: int = 0              # runs with a steady decode of B steps or more
    attained: int = 0                 # those whose steady decodes reach the block bound
    kinds: set = field(default_factory=set)


def fits(offset: int, end: int, num_blocks: int, width: int, B: int) -> bool:
    """Positions < end, the token sampled at end and the stream's blocks fit a row of `width`
    tokens rebased at `offset`. vLLM's block table row holds cdiv(width, B) blocks or more;
    RowWindow.fits counts width // B, one less when width is no multiple of B, and then refuses
    steps a row of min_row_tokens is meant to fit (left as it is here: no behaviour change)."""
    return end + 1 - offset <= width and num_blocks - offset // B <= -(-width // B)


def stream_life(engine: StreamShape, shape: StreamShape, B: int, Q: int, prompt: int,
                decodes: int, extra: int, tally: Tally) -> None:
    S, W, C = shape.sink_tokens, shape.window_tokens, shape.cache_tokens
    where = (engine, shape, B, Q, prompt, extra)
    front = rule.front_blocks(shape, B)
    assert front == literal_front_blocks(S, B), where
    head = front * B
    width = rule.min_row_tokens(engine.sink_tokens, engine.window_tokens, MAX_PINNED, B, Q)
    engine_bound = rule.max_blocks_per_stream(engine.sink_tokens, engine.window_tokens,
                                              MAX_PINNED, B, Q, extra)
    hit_run = -(-(rule.cache_hit_window(engine) - 1) // B)  # vLLM's run of blocks for a hit
    blocks: list[bool] = []   # the request's blocks: held, or freed (the null block)
    held = 0
    lowest_held = front       # blocks [front, lowest_held) are freed, the later ones held
    offset = 0                # the worker row's
    slack: list[int] = []     # bound - held over steady decodes
    transitions = {C - 2, C - 1, C, C + 1, C + S - 2, C + S - 1, C + S, prompt}
    stride = max(1, (prompt // Q + decodes) // 10)
    hit_stride = max(1, (prompt + decodes) // B // 8)

    def all_held(first: int, last: int) -> bool:
        return last < len(blocks) and (last < front or max(first, front) >= lowest_held)

    c, step, rebases = 0, 0, 0
    while c < prompt + decodes:
        n = min(Q, prompt - c) if c < prompt else 1
        end = c + n
        # -- the scheduler: free what no query sees any more, then the step's blocks --------
        steady = lowest_held > front
        live = rule.first_live_block(shape, B, c, extra)
        for k in range(min(live, len(blocks)) - 1, front - 1, -1):
            if not blocks[k]:
                break
            assert not any(seen_from(S, W, c, j) for j in range(k * B, (k + 1) * B)), \
                (where, c, k)
            blocks[k] = False
            held -= 1
        while lowest_held < len(blocks) and not blocks[lowest_held]:
            lowest_held += 1
        # And it keeps no more (docs/architecture.md §2): the S+W-1 tokens before the query
        # for the engine's shape (the window's W-1, S shadow slots), W_r-1 for a request's own,
        # and vLLM's extra_retained_tokens below them.
        kept = (S + W - 1 if shape.writes_shadows else W - 1) + extra
        assert lowest_held == max(front, max(0, c - kept) // B), (where, c)
        need = -(-end // B)
        held += need - len(blocks)
        blocks += [True] * (need - len(blocks))
        bound = rule.max_blocks_held(shape, B, n, extra)
        assert held <= bound <= engine_bound, (where, c, held, bound)
        if n == 1 and steady:
            slack.append(bound - held)
        scheduler_span = rule.shadow_span(shape, c, n)
        if c and c % B == 0 and extra == 0:
            check_hit(engine, shape, B, c, hit_run, where, literal=(c // B) % hit_stride == 0)

        # -- the worker: its row, then what the kernel or the tiles read ---------------------
        rebased = not fits(offset, end, need, width, B)
        if rebased:
            new = rule.furthest_row_offset(shape, B, c)
            assert new > offset and fits(new, end, need, width, B), (where, c, "row refused")
            # The row keeps from the scheduler's first live block on, past its front blocks.
            assert new // B + front == rule.first_live_block(shape, B, c), (where, c)
            offset = new

        def absolute(p: int) -> int:
            return p if p < head else p + offset

        first, last = c - offset, end - 1 - offset          # the step's queries, row positions
        on_kernel = rule.kernel_can_run(engine, shape, end - offset, n)
        if shape.writes_shadows:
            # The kernel takes every step it computes exactly: dense ones, and one decode whose
            # S shadows can lie past the sinks.
            assert on_kernel == (end <= C or (n == 1 and c - C + 1 >= S)), (where, c)
        worker_span = rule.shadow_span(shape, first, n) if on_kernel else None
        # The shadows the worker writes are the ones the scheduler protects from the prefix
        # cache: no more (a shadow reaching a cached block), no fewer (copies for nothing).
        assert (worker_span is None) == (scheduler_span is None), (where, c)
        if worker_span is not None:
            lo, hi = absolute(worker_span[0]), absolute(worker_span[1])
            assert worker_span[0] >= head or not offset, (where, c)
            assert (lo, hi) == scheduler_span, (where, c)
            assert all_held(lo // B, hi // B), (where, c, "shadow in a freed block")
            # The unseen tokens are one interval (from S up): its ends say it for the span.
            assert not seen_from(S, W, c, lo) and not seen_from(S, W, c, hi), (where, c)
        if on_kernel:
            read_lo = max(0, first - engine.cache_tokens + 1)
        else:
            read_lo = rule.window_start(shape, first)
        # The blocks read, front blocks aside (held for life; the tiles' sinks are there): in
        # a rebased row what lies past them is the stream from the offset on.
        read_from = absolute(max(read_lo, head)) if offset else read_lo
        assert all_held(read_from // B, absolute(last) // B), (where, c, "read a freed block")
        rebases += rebased
        if step % stride == 0 or c in transitions or (rebased and rebases <= 3):
            for i in {first, last}:
                check_reads(engine, shape, i, absolute, on_kernel, worker_span, where)
        c, step = end, step + 1

    assert all(blocks[:literal_front_blocks(S, B)]), where
    if len(slack) >= B:
        tally.steady_runs += 1
        # A long steady decode takes every offset of its retained run within a block: the bound
        # is reached, or missed by the one block its +1 allows for when no offset needs it.
        assert min(slack) <= 1, (where, min(slack))
        if min(slack) == 0:
            tally.attained += 1
            tally.kinds.add(shape.writes_shadows)


def check_reads(engine: StreamShape, shape: StreamShape, i: int, absolute, on_kernel: bool,
                worker_span, where) -> None:
    """What query i (row position) reads, as the step plan has it read: the last C positions
    with the shadows in place on the kernel, else the tile's window keys and its sinks outside
    the window with the query at its slot. Keys and in-cache distances must be V(i)'s."""
    read = {}
    if on_kernel:
        for p in range(max(0, i - engine.cache_tokens + 1), i + 1):
            if worker_span is not None and worker_span[0] <= p <= worker_span[1]:
                key = p - worker_span[0]         # sink j's shadow sits at span start + j
            else:
                key = absolute(p)
            assert key not in read, (where, i)
            read[key] = i - p
    else:
        for p in range(rule.window_start(shape, i), i + 1):
            if rule.in_window(shape, i, p):
                read[absolute(p)] = i - p
        slot = rule.query_slot(shape, i)
        for j in range(shape.sink_tokens):
            if rule.sink_outside_window(shape, i, j):
                assert j not in read, (where, i)
                read[j] = slot - j
    assert read == literal_distances(shape.sink_tokens, shape.window_tokens, absolute(i)), \
        (where, i, on_kernel)


def check_hit(engine: StreamShape, shape: StreamShape, B: int, h: int, hit_run: int, where,
              literal: bool) -> None:
    """A request of `shape` continuing at h from a cache hit gets the front blocks and vLLM's
    run of hit_run blocks ending at h: that must hold every block it keeps and (literal: checked
    token by token) every key its queries see and every shadow its first decode writes."""
    first_carried = h // B - hit_run
    assert rule.first_live_block(shape, B, h) >= first_carried, (where, h)
    if not literal:
        return
    S, W = shape.sink_tokens, shape.window_tokens
    needed = [j for j in range(max(0, h - shape.cache_tokens), h) if seen_from(S, W, h, j)]
    span = rule.shadow_span(shape, h, 1)
    if span is not None:
        needed += [span[0], span[1]]
    front = literal_front_blocks(S, B)
    assert all(j // B >= first_carried or j // B < front for j in needed), (where, h)


def lives(shape: StreamShape, B: int, Q: int):
    """(prompt, decodes) of the streams to live: a long prompt and a steady decode, and (with
    chunks) a short prompt decoding across C and C+S-1."""
    C, S = shape.cache_tokens, shape.sink_tokens
    yield 2 * C + B // 2 + 3, 3 * B + 8
    if Q > 1:
        yield max(1, C // 2), C + S + B + 3


def grid(B: int, Q: int, sinks=SINKS, windows=WINDOWS):
    index = 0
    for S in sinks:
        for W in windows:
            engine = StreamShape(S, W)
            for shape in request_shapes(engine, index):
                for prompt, decodes in lives(shape, B, Q):
                    for extra in (0, EXTRA) if B == 16 else (0,):
                        yield engine, shape, prompt, decodes, extra
            index += 1


def live_grid(B: int, Q: int, **kwargs) -> Tally:
    tally = Tally()
    for engine, shape, prompt, decodes, extra in grid(B, Q, **kwargs):
        stream_life(engine, shape, B, Q, prompt, decodes, extra, tally)
    return tally


@pytest.mark.parametrize("B", BLOCKS)
@pytest.mark.parametrize("Q", ["1", "7", "B", "512"])
def test_stream_lives_keep_the_contract(B, Q):
    tally = live_grid(B, B if Q == "B" else int(Q))
    # The bound is reached (not only never exceeded), by engine-shaped and pinned streams.
    assert tally.kinds == {True, False} and tally.attained * 2 > tally.steady_runs, tally


def test_bounding_shapes_bound_every_request():
    """The engine-wide bounds (pool, admission, row width) hold any request the engine
    accepts: P <= max(S, max_pinned_tokens), W_r <= W."""
    for engine in engines():
        S, W = engine.sink_tokens, engine.window_tokens
        for B in BLOCKS:
            for Q in (1, 7, B, 512):
                bound = rule.max_blocks_per_stream(S, W, MAX_PINNED, B, Q)
                width = rule.min_row_tokens(S, W, MAX_PINNED, B, Q)
                for P in set(PINNED) | {S}:
                    for w in window_sizes(W):
                        shape = StreamShape(P, w, writes_shadows=False)
                        assert rule.max_blocks_held(shape, B, Q) <= bound
                        assert rule.row_tokens(shape, B, Q) <= width
                assert rule.max_blocks_held(engine, B, Q) <= bound
                assert rule.row_tokens(engine, B, Q) <= width


# -- each check can fail --------------------------------------------------------------------
def _changed(name: str, change):
    """rule.<name> with its result changed: a formula off by one."""
    original = getattr(rule, name)
    return rule, name, lambda *args: change(original(*args), *args)


def _changed_property(name: str, change):
    original = getattr(StreamShape, name)
    return StreamShape, name, property(lambda shape: change(original.fget(shape)))


MUTANTS = [
    _changed_property("retained_tokens", lambda r: r + 1),
    _changed_property("retained_tokens", lambda r: r - 1),
    _changed_property("cache_tokens", lambda r: r - 1),
    _changed("max_blocks_held", lambda r, *a: r - 1),
    _changed("max_blocks_held", lambda r, *a: r + 1),
    _changed("max_blocks_per_stream", lambda r, *a: r - 1),
    _changed("front_blocks", lambda r, *a: r + 1),
    _changed("skipped_tokens", lambda r, *a: r + 1),
    _changed("skipped_tokens", lambda r, *a: max(0, r - 1)),
    _changed("first_live_block", lambda r, *a: r + 1),
    _changed("window_start", lambda r, *a: r + 1),
    _changed("window_start", lambda r, *a: max(0, r - 1)),
    _changed("query_slot", lambda r, *a: r + 1),
    _changed("in_window", lambda r, shape, i, j: r | (j == i - shape.window_tokens)),
    _changed("sink_outside_window", lambda r, shape, i, j: r & (j < shape.sink_tokens - 1)),
    _changed("shadow_span", lambda r, *a: r and (r[0] + 1, r[1] + 1)),
    _changed("shadow_span",
             lambda r, shape, q, n: r if q >= shape.cache_tokens + shape.sink_tokens else None),
    _changed("_decode_clear_of_sinks",
             lambda r, shape, q, n: n == 1 and q - shape.cache_tokens + 2 >= shape.sink_tokens),
    _changed("kernel_can_run",
             lambda r, engine, shape, seq, q: r or (not shape.writes_shadows and seq == min(
                 shape.cache_tokens, engine.cache_tokens) + 1)),
    _changed("furthest_row_offset", lambda r, shape, B, q: r + B),
    _changed("furthest_row_offset", lambda r, shape, B, q: max(0, r - B)),
    _changed("cache_hit_window", lambda r, *a: r - 1),
    _changed("min_row_tokens", lambda r, *a: r - 1),
    _changed("row_tokens", lambda r, *a: r - 2),
    _changed("evicted_tokens", lambda r, *a: r + 1),
    _changed("evicted_tokens", lambda r, *a: max(0, r - 1)),
]


@pytest.mark.parametrize("target,name,value", MUTANTS,
                         ids=[f"{name}-{k}" for k, (_, name, _) in enumerate(MUTANTS)])
def test_each_check_can_fail(target, name, value, monkeypatch):
    """Each formula of the rule changed by one fails a check above (the lives on a smaller
    grid). One change passes: row_tokens - 1, a row of min_row_tokens has a token to spare."""
    monkeypatch.setattr(target, name, value)
    with pytest.raises(AssertionError):
        test_spans_are_the_definitions()
        test_bounding_shapes_bound_every_request()
        for B, Q in ((16, 1), (16, 7), (32, 32)):
            tally = live_grid(B, Q, sinks=(0, 1, 4), windows=(28, 60, 129))
            assert tally.attained * 2 > tally.steady_runs
