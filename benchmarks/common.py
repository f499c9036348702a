"""Shared helpers of the benchmark scripts: environment, engines, results on disk."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

# In-process engines: the scripts step them directly and build several one after another.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# The team's shared data folder sits beside the repository (books for perplexity).
SHARED_DATA = os.path.join(HERE, "..", "..", "shared", "data")


def machine() -> dict:
    import torch
    import vllm

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "vllm": vllm.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**payload, "machine": machine()}, f, indent=2)
    return path
