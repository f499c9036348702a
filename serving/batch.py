"""`streamsink batch`: offline generation over a JSONL file of prompts on Ray Data
(ray.data.llm, N streaming vLLM engines), resumable after any kill.

    streamsink batch --input IN.jsonl --output OUT.jsonl [--replicas N] [--sink S] [--window W]
                     [--model M] [--max-tokens N] [--temperature T] [vLLM engine arguments]

Order of work, so that bad input costs nothing: read and check all of IN, read OUT (which ids
are done; a torn last line is dropped), check the engine arguments, and only then start Ray
and the engines. Results are appended to OUT one whole line at a time as they complete.
"""
from __future__ import annotations

import json
import sys
import time

PASSES_THROUGH = True  # other arguments are vLLM engine arguments (--max-model-len, ...)

DEFAULT_MAX_TOKENS = 256


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="JSONL of {\"id\", \"prompt\"} or "
                        "{\"id\", \"messages\"} (+ optional max_tokens, temperature, top_p, "
                        "seed, ignore_eos)")
    parser.add_argument("--output", required=True, help="JSONL of results, appended to; a "
                        "rerun skips every id already there")
    parser.add_argument("--replicas", type=int, default=1,
                        help="engine replicas (Ray Data actors), default 1")
    parser.add_argument("--model", help="local checkpoint directory or hub id")
    parser.add_argument("--sink", type=int, default=4, help="attention sink tokens S (default 4)")
    parser.add_argument("--window", type=int, default=1020, help="window tokens W (default 1020)")
    parser.add_argument("--stock", action="store_true",
                        help="stock vLLM engines (no streaming), for comparisons")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"tokens to generate per record unless it says (default "
                             f"{DEFAULT_MAX_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature unless a record says (default 0: greedy)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and vLLM's logs from the engine processes")


def _fail(message: str) -> int:
    print(f"streamsink batch: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import os

    from streamsink.serving.batch_io import BatchInputError, read_input, scan_output

    if not args.verbose:  # before vLLM is imported here or in Ray's workers (they inherit it)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    if args.replicas < 1:
        return _fail("--replicas must be at least 1")
    if args.max_tokens < 1:
        return _fail("--max-tokens must be at least 1")
    try:
        records = read_input(args.input)
        state = scan_output(args.output)
    except BatchInputError as exc:
        return _fail(str(exc))
    pending = [r for r in records if r.key not in state.done]
    skipped = len(records) - len(pending)
    if not pending:
        print(summary_line(len(records), 0, 0, skipped, 0, 0.0), flush=True)
        return 0
    try:
        setup = prepare(args, pending)
    except BatchInputError as exc:
        return _fail(str(exc))
    from streamsink.serving.batch_io import OutputWriter

    try:
        writer = OutputWriter(args.output, state)
    except BatchInputError as exc:
        return _fail(str(exc))
    try:
        ok, errors, generated, seconds = _generate(args, setup, pending, writer)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # an engine that could not start or died: what is done is kept
        print(f"streamsink batch: error: the batch stopped: {type(exc).__name__}: "
              f"{_one_line(exc)} (finished records are in {args.output}; run the same command "
              "to resume; --verbose shows the engines' logs)", file=sys.stderr)
        return 1
    finally:
        writer.close()
    print(summary_line(len(records), ok, errors, skipped, generated,
                       generated / seconds if seconds > 0 else 0.0), flush=True)
    return 0


def summary_line(records: int, ok: int, errors: int, skipped: int, generated: int,
                 tokens_per_s: float) -> str:
    return (f"records={records} ok={ok} errors={errors} skipped={skipped} "
            f"generated_tokens={generated} tokens_per_s={tokens_per_s:.2f}")


class Setup:
    """What the run needs, worked out before any engine starts."""

    def __init__(self, model_path, engine_kwargs, max_num_seqs, rows, stop_ids):
        self.model_path = model_path
        self.engine_kwargs = engine_kwargs
        self.max_num_seqs = max_num_seqs
        self.rows = rows
        self.stop_ids = stop_ids


def prepare(args, pending) -> "Setup":
    """Engine arguments checked by vLLM's own config code (streamsink's refusals included),
    chat templates applied, per-record sampling parameters filled in."""
    from streamsink.serving.batch_io import BatchInputError
    from streamsink.serving.engine import engine_kwargs

    overrides = engine_overrides(args.vllm_args)
    streamsink = None if args.stock else {"sink_tokens": args.sink, "window_tokens": args.window}
    try:
        kwargs = engine_kwargs(args.model, streamsink, **overrides)
    except ValueError as exc:  # StreamsinkConfigError: the CLI prints it, exit 2
        raise BatchInputError(_one_line(exc)) from None
    model_path = kwargs.pop("model")
    max_num_seqs = check_engine_config(model_path, kwargs)
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
                                      f"{_one_line(exc)}") from None
        rows.append({"idx": idx, "prompt": prompt, "sampling_params": {
            # Every row carries every key (Ray Data stores rows as Arrow: one schema).
            "max_tokens": record.max_tokens if record.max_tokens is not None else args.max_tokens,
            "temperature": float(record.temperature if record.temperature is not None
                                 else args.temperature),
            "top_p": float(record.top_p if record.top_p is not None else 1.0),
            "seed": record.seed,
            "ignore_eos": bool(record.ignore_eos),
        }})
    return Setup(model_path, kwargs, max_num_seqs, rows, stop_token_ids(model_path, tokenizer))


def engine_overrides(argv: list[str]) -> dict:
    """vLLM engine arguments given on the command line (only those given), parsed by vLLM's
    own parser so every engine flag means what it means for `vllm serve`."""
    from streamsink.serving.batch_io import BatchInputError

    if not argv:
        return {}
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="streamsink batch"))
    defaults = vars(parser.parse_args([]))
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        raise BatchInputError(f"unrecognized arguments: {' '.join(unknown)}")
    given = {k: v for k, v in vars(known).items() if defaults.get(k) != v}
    if "model" in given:
        raise BatchInputError("use --model before any vLLM engine argument")
    return given


def check_engine_config(model_path: str, kwargs: dict) -> int:
    """Build the engine config here (seconds) so a refused setting is a one-line error before
    Ray and the engines start; returns the engine's max_num_seqs."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from streamsink.serving.batch_io import BatchInputError

    try:
        config = AsyncEngineArgs(model=model_path, **kwargs).create_engine_config()
    except Exception as exc:
        raise BatchInputError(f"engine: {_one_line(exc)}") from None
    return config.scheduler_config.max_num_seqs


def _tokenizer(model_path: str, kwargs: dict):
    from transformers import AutoTokenizer

    from streamsink.serving.batch_io import BatchInputError

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


def _one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic ValidationError: the validator's own message
        try:
            message = str(errors()[0].get("msg", exc))
            return message.removeprefix("Value error, ").splitlines()[0]
        except Exception:
            pass
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _generate(args, setup: Setup, pending, writer) -> tuple[int, int, int, float]:
    from tqdm import tqdm

    from streamsink.serving.batch_ray import run_rows, start_ray, stop_ray

    ok = errors = generated = 0
    bar = tqdm(total=len(pending), unit="rec", desc="batch (starting engines)", file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    start_ray(args.verbose)
    try:
        for result in run_rows(setup.rows, setup.model_path, setup.engine_kwargs,
                               args.replicas, setup.max_num_seqs):
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
            bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s, {errors} errors",
                                refresh=False)
            bar.update(1)
    finally:
        bar.close()
        stop_ray()
    return ok, errors, generated, time.perf_counter() - start
