"""Shared helpers of the benchmark scripts: environment, engines, results on disk."""
from __future__ import annotations

import json
import os

import result_files

# In-process engines: the scripts step them directly and build several one after another.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HERE = result_files.HERE
# The team's shared data folder sits beside the repository (books for perplexity).
SHARED_DATA = os.path.join(HERE, "..", "..", "shared", "data")

latest = result_files.latest
load = result_files.load


def book_ids(tokenizer, name: str, skip_chars: int, fallback: str, tokens: int) -> list[int]:
    """Token ids of a book of ../shared/data past its front matter (skip_chars characters), or,
    where that folder is missing, of `fallback` ("{i}" numbered) repeated to about `tokens`."""
    book = os.path.join(SHARED_DATA, name)
    if os.path.exists(book):
        with open(book, encoding="utf-8", errors="replace") as f:
            text = f.read()[skip_chars:]
    else:
        text = " ".join(fallback.format(i=i) for i in range(tokens // 8 + 1))
    return tokenizer(text)["input_ids"]


def kv_bytes_per_token(model_dir: str, dtype: str = "float32") -> int:
    """K and V of every layer for one token of a checkpoint, in a KV cache of `dtype` (float32,
    or any 16-bit type), read from its config.json (no engine needed)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * (4 if dtype == "float32" else 2)


def save(name: str, payload: dict, options=None) -> str:
    """Record one run of benchmark `name` (its measurements and raw samples; `options`: the
    parsed arguments) as a new file under results/<name>/; returns the path."""
    return result_files.write(name, payload, options)


def scratch_dir(prefix: str) -> str:
    """A temporary folder for a run's logs and intermediate files (never the results tree)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"streamsink-{prefix}-")

