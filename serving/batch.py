"""`streamsink batch`: offline generation over a JSONL file of prompts on Ray Data
(ray.data.llm, N streaming vLLM engines), resumable after any kill.

    streamsink batch --input IN.jsonl --output OUT.jsonl [--replicas N] [--sink S] [--window W]
                     [--model M] [--max-tokens N] [--temperature T] [vLLM engine arguments]

Order of work, so that bad input costs nothing: read and check all of IN, read OUT (which ids
are done; a torn last line is dropped), check the engine arguments, and only then start Ray
and the engines. Results are appended to OUT one whole line at a time as they complete.
"""
from __future__ import annotations

import os
import sys
import time

from streamsink.errors import one_line
from streamsink.serving import processes, ray_cluster
from streamsink.serving.batch_io import (
    BatchInputError,
    OutputWriter,
    read_input,
    scan_output,
)
from streamsink.serving.batch_ray import quiet_ray_data, run_rows
from streamsink.serving.engine_args import (
    DEFAULT_MAX_NUM_SEQS,
    VllmArgParser,
    check_engine_config,
    engine_environment,
    engine_kwargs,
    streamsink_entry,
)


def run(args) -> int:
    if not args.verbose:  # before vLLM is imported here or in Ray's workers (they inherit it)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if args.replicas < 1:
        raise BatchInputError("--replicas must be at least 1")
    if args.max_tokens < 1:
        raise BatchInputError("--max-tokens must be at least 1")
    records = read_input(args.input)
    state = scan_output(args.output)
    pending = [r for r in records if r.key not in state.done]
    skipped = len(records) - len(pending)
    if not pending:
        print(summary_line(len(records), 0, 0, skipped, 0, 0.0), flush=True)
        return 0
    setup = prepare(args, pending)
    writer = OutputWriter(args.output, state)
    processes.become_subreaper()
    stop = processes.StopRequest().install()
    try:
        ok, errors, generated, seconds = _generate(args, setup, pending, writer, stop)
    except processes.Interrupted:
        return 0
    except Exception as exc:  # an engine that could not start or died: what is done is kept
        if stop.requested:
            return 0
        print(f"streamsink: error: the batch stopped: {one_line(exc)} (finished records are "
              f"in {args.output}; run the same command to resume; --verbose shows the "
              "engines' logs)", file=sys.stderr)
        return 1
    finally:
        writer.close()
    if stop.requested:
        print(f"streamsink batch: stopped; finished records are in {args.output} (run the same "
              "command to resume)", file=sys.stderr)
        return 0
    print(summary_line(len(records), ok, errors, skipped, generated,
                       generated / seconds if seconds > 0 else 0.0), flush=True)
    return 0


def summary_line(records: int, ok: int, errors: int, skipped: int, generated: int,
                 tokens_per_s: float) -> str:
    return (f"records={records} ok={ok} errors={errors} skipped={skipped} "
            f"generated_tokens={generated} tokens_per_s={tokens_per_s:.2f}")


class Setup:
    """What the run needs, worked out before any engine starts."""

    def __init__(self, model_path, engine_kwargs, max_num_seqs, rows, stop_ids, env):
        self.model_path = model_path
        self.engine_kwargs = engine_kwargs
        self.max_num_seqs = max_num_seqs
        self.rows = rows
        self.stop_ids = stop_ids
        self.env = env  # environment the engine processes need


def prepare(args, pending) -> "Setup":
    """Engine arguments checked by vLLM's own config code (streamsink's refusals included),
    chat templates applied, per-record sampling parameters filled in."""
    overrides = VllmArgParser("streamsink batch").explicit(args.vllm_args)
    if "model" in overrides:
        raise BatchInputError("use --model before any vLLM engine argument")
    overrides.setdefault("max_num_seqs", DEFAULT_MAX_NUM_SEQS)
    entry = streamsink_entry(args.sink, args.window)["streamsink"]
    kwargs = engine_kwargs(args.model, entry, args.weights, **overrides)
    config = check_engine_config(kwargs)
    if args.stock:
        # The stock engines get the budget the streaming ones would size for themselves:
        # a comparison differs only in streaming.
        kwargs.pop("additional_config")
        kwargs.setdefault("kv_cache_memory_bytes", config.cache_config.kv_cache_memory_bytes)
        config = check_engine_config(kwargs)
    env = engine_environment(kwargs)
    model_path = kwargs.pop("model")
    tokenizer = _tokenizer(model_path, kwargs)
    rows = []
    for idx, record in enumerate(pending):
        prompt = record.prompt
        if record.messages is not None:
            try:
                prompt = tokenizer.apply_chat_template(record.messages, tokenize=False,
                                                       add_generation_prompt=True)
            except Exception as exc:  # a template that rejects these messages: bad input
                raise BatchInputError(f"{args.input} line {record.line}: chat template: "
                                      f"{one_line(exc)}") from None
        rows.append({"idx": idx, "prompt": prompt, "sampling_params": {
            # Every row carries every key (Ray Data stores rows as Arrow: one schema).
            "max_tokens": record.max_tokens if record.max_tokens is not None else args.max_tokens,
            "temperature": float(record.temperature if record.temperature is not None
                                 else args.temperature),
            "top_p": float(record.top_p if record.top_p is not None else 1.0),
            "seed": record.seed,
            "ignore_eos": bool(record.ignore_eos),
        }})
    return Setup(model_path, kwargs, config.scheduler_config.max_num_seqs, rows,
                 stop_token_ids(model_path, tokenizer), env)


def _tokenizer(model_path: str, kwargs: dict):
    from transformers import AutoTokenizer

    if kwargs.get("skip_tokenizer_init"):
        raise BatchInputError("streamsink batch takes text prompts: the model needs its "
                              "tokenizer (drop --skip-tokenizer-init)")
    return AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model_path)


def stop_token_ids(model_path: str, tokenizer) -> set[int]:
    """Token ids that end a generation by themselves (vLLM stops on the tokenizer's EOS and on
    the generation config's eos_token_id list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except Exception:
        pass  # no generation_config.json: the tokenizer's EOS only
    return ids


def finish_reason(generated: int, max_tokens: int, last_token: int, stop_ids: set[int],
                  ignore_eos: bool = False) -> str:
    """ray.data.llm returns no finish reason; with no stop strings it follows from the output:
    vLLM checks stop tokens before the length cap, so a stop token at the cap is still "stop"."""
    if generated < max_tokens or (last_token in stop_ids and not ignore_eos):
        return "stop"
    return "length"


def _generate(args, setup: Setup, pending, writer, stop) -> tuple[int, int, int, float]:
    from tqdm import tqdm

    bar = tqdm(total=len(pending), unit="rec", desc="batch (starting engines)", file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    handle = None
    try:
        handle = ray_cluster.start_or_join(verbose=args.verbose, address=args.address)
        stop.install()  # after ray.init, which installs Ray's own SIGTERM handler
        quiet_ray_data(args.verbose)
        results = run_rows(setup.rows, setup.model_path, setup.engine_kwargs, args.replicas,
                           setup.max_num_seqs, setup.env)
        with processes.ray_sigterm_is_a_stop():  # Ray may install its handler again meanwhile
            ok, errors, generated = _write_results(results, setup, pending, writer, bar, stop,
                                                   start)
    finally:
        bar.close()
        ray_cluster.stop(handle)
        processes.stop_descendants()
    return ok, errors, generated, time.perf_counter() - start


def _write_results(results, setup: Setup, pending, writer, bar, stop,
                   start: float) -> tuple[int, int, int]:
    """Append each result to OUT as it arrives; stop early when a stop was requested."""
    ok = errors = generated = 0
    for result in results:
        row = setup.rows[result["idx"]]
        record = pending[result["idx"]]
        if "error" in result:
            writer.write({"id": record.id, "error": result["error"]})
            errors += 1
        else:
            max_tokens = row["sampling_params"]["max_tokens"]
            writer.write({
                "id": record.id, "text": result["text"],
                "prompt_tokens": int(result["prompt_tokens"]),
                "generated_tokens": int(result["generated_tokens"]),
                "finish_reason": finish_reason(
                    int(result["generated_tokens"]), max_tokens, int(result["last_token"]),
                    setup.stop_ids, row["sampling_params"]["ignore_eos"]),
            })
            ok += 1
            generated += int(result["generated_tokens"])
        elapsed = time.perf_counter() - start
        bar.set_description_str("batch", refresh=False)
        bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s, {errors} errors", refresh=False)
        bar.update(1)
        if stop.requested:
            break
    return ok, errors, generated
