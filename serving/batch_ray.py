"""The Ray side of `streamsink batch`: run the records through a ray.data.llm processor of
streaming vLLM engines, handing each result back as soon as it is done.

Why one record per block and batch_size=1: ray.data.llm's engine stage returns a batch only when
all of its rows are finished, and Ray Data ships a task's output when the task ends. With one row
per task, a finished record reaches the driver (and OUT.jsonl) at once, whatever its neighbours
do, so a kill loses only what was in flight. The engine still batches: up to max_num_seqs rows
run concurrently per replica (max_concurrent_batches), and vLLM schedules them together.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator


def _postprocess(row: dict) -> dict:
    # Only what OUT.jsonl needs travels back to the driver (not the prompt or token lists);
    # the last token tells a stop token from a length cut (see batch.finish_reason).
    tokens = row.get("generated_tokens")
    last = int(tokens[-1]) if tokens is not None and len(tokens) else -1
    return {"idx": row["idx"], "text": row["generated_text"],
            "prompt_tokens": int(row["num_input_tokens"]),
            "generated_tokens": int(row["num_generated_tokens"]), "last_token": last}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars off (ours shows records and tokens/s), its logs quiet."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not verbose:
        for name in ("ray", "ray.data", "ray.llm"):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_rows(rows: list[dict], model_path: str, engine_kwargs: dict[str, Any], replicas: int,
             max_num_seqs: int, env: dict[str, str]) -> Iterator[dict]:
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
        runtime_env={"env_vars": dict(env)} if env else None,
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
