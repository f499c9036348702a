"""The Ray side of `streamsink batch`: start or join Ray, and run the records through a
ray.data.llm processor of streaming vLLM engines, handing each result back as soon as it is done.

Why one record per block and batch_size=1: ray.data.llm's engine stage returns a batch only when
all of its rows are finished, and Ray Data ships a task's output when the task ends. With one row
per task, a finished record reaches the driver (and OUT.jsonl) at once, whatever its neighbours
do, so a kill loses only what was in flight. The engine still batches: up to max_num_seqs rows
run concurrently per replica (max_concurrent_batches), and vLLM schedules them together.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator

# Logical CPUs for a Ray instance we start ourselves: more than the physical cores, or on a
# 2-core machine the engine replica and Ray Data's small tasks wait for each other.
MIN_LOGICAL_CPUS = 8
OBJECT_STORE_BYTES = 512 << 20
LOCAL_START_ATTEMPTS = 5


def start_ray(verbose: bool) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a private local instance (never another
    process's: address="local" skips Ray's auto-detection of clusters started by `ray start`)."""
    import ray

    quiet = dict(log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        for attempt in range(LOCAL_START_ATTEMPTS):
            try:
                ray.init(address="local", num_cpus=max(MIN_LOGICAL_CPUS, os.cpu_count() or 1),
                         include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                         **quiet)
                break
            except Exception as exc:
                # Ray gives its raylet a fixed 30 s to register; a busy machine misses that.
                if "timed out during startup" not in str(exc) or \
                        attempt == LOCAL_START_ATTEMPTS - 1:
                    raise
                ray.shutdown()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (records, tokens/s) replaces Ray Data's
    ctx.print_on_execution_start = False
    if not verbose:
        for name in ("ray", "ray.data", "ray.llm"):
            logging.getLogger(name).setLevel(logging.ERROR)


def stop_ray() -> None:
    """Shut down the instance we started, or disconnect from the cluster we joined."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _postprocess(row: dict) -> dict:
    # Only what OUT.jsonl needs travels back to the driver (not the prompt or token lists);
    # the last token tells a stop token from a length cut (see batch.finish_reason).
    tokens = row.get("generated_tokens")
    last = int(tokens[-1]) if tokens is not None and len(tokens) else -1
    return {"idx": row["idx"], "text": row["generated_text"],
            "prompt_tokens": int(row["num_input_tokens"]),
            "generated_tokens": int(row["num_generated_tokens"]), "last_token": last}


def run_rows(rows: list[dict], model_path: str, engine_kwargs: dict[str, Any], replicas: int,
             max_num_seqs: int) -> Iterator[dict]:
    """Yield one dict per row as it completes (any order): the row's "idx" and either its
    result fields or "error". rows: {"idx", "prompt", "sampling_params"}."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs,
        concurrency=(replicas, replicas),  # a fixed pool: N engines from the start
        batch_size=1,
        max_concurrent_batches=max(1, min(max_num_seqs, len(rows))),
        # Prompts go in as text (chat templates are applied by the driver), the engine
        # tokenizes and detokenizes: no extra tokenizer actors on a small machine.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundles": [{"CPU": 1}]},
        should_continue_on_error=True,  # a failed record becomes a row with the error
        log_engine_metrics=False,
    )
    processor = build_processor(config, postprocess=_postprocess)
    dataset = processor(ray.data.from_items(rows, override_num_blocks=len(rows)))
    for row in dataset.iter_rows():
        error = row.get("__inference_error__") or ""
        if error:
            yield {"idx": int(row["idx"]), "error": str(error)}
        else:
            yield {k: row[k] for k in ("idx", "text", "prompt_tokens", "generated_tokens",
                                       "last_token")}
