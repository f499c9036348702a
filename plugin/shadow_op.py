"""The sink-shadow write of a decode step as one native loop over every layer (shadow_op.cpp),
built on first use.

Why: a decode step past C writes S shadows per request per layer (docs/architecture.md §4, option
4). Done with stock ops (a gather of every element, vLLM's rotary op, vLLM's cache write) that
costs ~6 ms of a ~146 ms batch-16 step (30 layers): three passes, each paying PyTorch's per-element
overhead on ~25K scattered elements and re-reading the column-major key pages. One loop that reads
each sink key once, rotates it in registers and writes it to its shadow slot touches each cache
line once. The shadows' slots are the same in every layer, and no layer reads them before its own
attention, so the first layer of a step writes them for all (attention.py): one call and one share
of work per core a step instead of thirty small ones (batch 16: ~2.6 -> ~1.7 ms).

How: the C++ source ships in the package; the first streaming engine on a machine compiles it
with the system C++ compiler (the one torch.compile's inductor already needs on CPU) into the
per-user cache (model_store.cache_dir()/native), named by a hash of the source, compiler and
flags, so later processes only load it (ctypes, plain C ABI: no torch headers, a sub-second
build). Concurrent builds are safe (each writes a private file and renames it into place).
Without a compiler, or with STREAMSINK_NATIVE_SHADOWS=0, the plugin keeps the stock-op path
(same results to rounding, about twice the time) and says so once in the log.

What would let us delete it: a vLLM CPU op that copies-and-rotates cache slots, or (better) its
CPU attention kernel taking the sink blocks as a separate range at their own positions.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from vllm.logger import init_logger

from streamsink.model_store import cache_dir

logger = init_logger("vllm.plugins.streamsink")

_SOURCE = Path(__file__).with_name("shadow_op.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fopenmp"]
_FUNCTIONS = {torch.float32: "streamsink_write_shadows_f32",
              torch.bfloat16: "streamsink_write_shadows_bf16"}
_ARGTYPES = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 4

# A valid table pointer for plain copies (rotary_dim 0 reads no row of it).
_NO_ROTATION = torch.zeros(1, dtype=torch.float32)

_library: ctypes.CDLL | None = None
_load_tried = False
_calls = _layers_written = 0   # for benchmarks and tests: how the engine used the op


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler] + _FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"shadow_op-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", partial], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load() -> ctypes.CDLL | None:
    """The native library, building it if needed; None (logged once) when it cannot be had."""
    global _library, _load_tried
    if _load_tried:
        return _library
    _load_tried = True
    if os.environ.get("STREAMSINK_NATIVE_SHADOWS", "1") == "0":
        logger.info("streamsink: native shadow op off (STREAMSINK_NATIVE_SHADOWS=0)")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("streamsink: no C++ compiler found; sink shadows use stock ops (slower)")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.warning("streamsink: building the native shadow op failed (%s); sink shadows use "
                       "stock ops (slower)", str(detail).strip().splitlines()[-1:])
        return None
    for name in _FUNCTIONS.values():
        getattr(library, name).argtypes = _ARGTYPES
        getattr(library, name).restype = None
    _library = library
    logger.info("streamsink: native shadow op loaded")
    return library


def loaded() -> bool:
    """True when this process writes shadows with the native op (for benchmarks to record)."""
    return _library is not None


def shadow_writer(dtype: torch.dtype):
    """The native op for caches of this dtype (looked up once per layer, not per call), or None:
    the stock-op path (no library, or a dtype it does not handle)."""
    if dtype not in _FUNCTIONS:
        return None
    library = load()
    return None if library is None else getattr(library, _FUNCTIONS[dtype])


def write_shadows(writer, kv_caches: Sequence[torch.Tensor], source_slots: torch.Tensor,
                  dest_slots: torch.Tensor, rotation_rows: torch.Tensor,
                  rotation_table: torch.Tensor | None, head_dim: int, rotary_dim: int,
                  adjacent_pairs: bool = False) -> None:
    """Shadow n, in every cache of kv_caches: the K/V at slot source_slots[n] (every KV head),
    keys rotated by row rotation_rows[n] of rotation_table (fp32, cos|sin; features paired as
    halves, or as neighbours with adjacent_pairs), to slot dest_slots[n]. rotary_dim 0 (no
    table): a plain copy. writer: shadow_writer(dtype of the caches). kv_caches: one step's
    layers, [blocks, kv_heads, B, 2*head_dim] each, one shape and dtype; index tensors:
    contiguous int64 on CPU."""
    global _calls, _layers_written
    _, kv_heads, block_size, _ = kv_caches[0].shape
    pointers = (ctypes.c_void_p * len(kv_caches))(*[c.data_ptr() for c in kv_caches])
    if rotation_table is None:
        rotary_dim, rotation_table = 0, _NO_ROTATION
    writer(pointers, len(kv_caches), len(source_slots), kv_heads, head_dim, block_size,
           rotary_dim, int(adjacent_pairs), source_slots.data_ptr(), dest_slots.data_ptr(),
           rotation_rows.data_ptr(), rotation_table.data_ptr())
    _calls += 1
    _layers_written += len(kv_caches)


def layers_per_call() -> float | None:
    """Layers written per call so far in this process (None before the first call): the model's
    layer count when the engine writes a step's shadows in one call, as it should."""
    return _layers_written / _calls if _calls else None
