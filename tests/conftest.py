"""Shared fixtures. Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can look
at the scheduler's KV manager directly; the plugin is still loaded through its entry point."""
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _one_core_per_worker() -> None:
    """`make test` runs two pytest workers (pytest-xdist, a module per worker at a time). vLLM's
    CPU worker runs one OpenMP thread per core it is bound to and waits at a barrier after every
    parallel region, so two engines spread over the same cores stall each other (a descheduled
    thread holds up its engine's whole step: seconds per step). Each worker's engines therefore
    get one core of their own (vLLM's VLLM_CPU_OMP_THREADS_BIND, inherited by every server,
    Ray replica and script the worker starts); everything else (imports, Ray, HTTP) floats."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[int(worker[2:]) % len(cores)])
    os.environ["OMP_NUM_THREADS"] = "1"


_one_core_per_worker()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt_neox(tmp_path_factory):
    from tiny_models import make_tiny_gpt_neox

    return make_tiny_gpt_neox(tmp_path_factory.mktemp("tiny_gpt_neox"))


def random_tokens(n: int, seed: int = 1) -> list[int]:
    import torch

    from tiny_models import VOCAB

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def tiny_engine(model_path: str, streamsink: dict | None, **overrides):
    """A vLLM engine on a tiny checkpoint that takes token-id prompts."""
    from vllm import LLM

    kwargs = dict(model=model_path, skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=1 << 28,
                  max_num_seqs=8, max_num_batched_tokens=2048)
    if streamsink is not None:
        kwargs["additional_config"] = {"streamsink": streamsink}
    kwargs.update(overrides)
    return LLM(**kwargs)


def prompt_nlls(llm, prompts: list[list[int]]) -> list[list[float]]:
    """Per-token NLL of each prompt's tokens 1.. under the engine (prompt log-probabilities)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[-o.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
            for o, ids in zip(outs, prompts)]


class References:
    """Reference NLLs for (model_path, tokens, S, W) jobs, computed in a fresh interpreter: vLLM's
    Transformers backend decorates Hugging Face model classes in-process (GPT-NeoX), and the
    reference must see them as Hugging Face ships them.

    The interpreter starts at once and works in the background, reading one job and printing
    one job's result per line; `refs[i]` waits for job i only. With more_jobs=True, add() queues
    jobs that are known only later (the tokens an engine generates) until close(). It runs one thread (the float64 reference goes one token
    at a time and is bound by Python, not arithmetic) at the lowest priority, on any core (an
    in-process engine may have bound this thread to one): engines under test keep their cores
    when they compute (a descheduled OpenMP thread stalls every barrier of theirs), and the
    reference takes up the time they leave idle (start-ups, scheduling, tokenization)."""

    # Jobs are read as they come by a thread of their own, so that the parent never waits to
    # write one while the interpreter computes (nor both wait on full pipes).
    SCRIPT = ("import json, queue, sys, threading\n"
              "jobs = queue.Queue()\n"
              "def read():\n"
              "    for line in iter(sys.stdin.readline, ''):\n"
              "        jobs.put(json.loads(line))\n"
              "    jobs.put(None)\n"
              "threading.Thread(target=read, daemon=True).start()\n"
              "from transformers import AutoModelForCausalLM\n"
              "from reference.streaming_llm import streaming_nll\n"
              "for path, tokens, s, w in iter(jobs.get, None):\n"
              "    nlls = streaming_nll(AutoModelForCausalLM.from_pretrained(path), tokens, s, w)\n"
              "    print(json.dumps(nlls), flush=True)\n")
    TIMEOUT = 3600

    def __init__(self, jobs: list[tuple[str, list[int], int, int]],
                 more_jobs: bool = False) -> None:
        import atexit
        import subprocess
        import tempfile
        import time

        self.count = 0
        self.results: list[list[float]] = []
        self.deadline = time.monotonic() + self.TIMEOUT
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True,
                                     preexec_fn=self._background_priority)
        for job in jobs:
            self.add(job)
        if not more_jobs:
            self.close()
        atexit.register(self.stop)  # a module that failed early leaves no reference behind

    def add(self, job: tuple[str, list[int], int, int]) -> int:
        """Queue one more job; returns its index."""
        import json

        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        """No more jobs (the interpreter exits after the last one)."""
        self.proc.stdin.close()

    def stop(self) -> None:
        if not self.proc.stdin.closed:
            self.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @staticmethod
    def _background_priority() -> None:
        os.nice(19)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))

    def __getitem__(self, i: int) -> list[float]:
        import json
        import select
        import time

        while len(self.results) <= i:
            left = self.deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(left, 0))[0]
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                self.proc.kill()
                self.stderr.seek(0)
                raise AssertionError(f"reference stopped after {len(self.results)} of "
                                     f"{self.count} jobs ({'timeout' if not ready else 'exit'}):"
                                     f"\n{self.stderr.read()[-2000:]}")
            self.results.append(json.loads(line))
        return self.results[i]

    def all(self) -> list[list[float]]:
        return [self[i] for i in range(self.count)]

    def keyed(self, keys: list) -> "KeyedReferences":
        return KeyedReferences(self, keys)


class KeyedReferences:
    """References looked up by a key per job (waiting for that job only)."""

    def __init__(self, refs: References, keys: list) -> None:
        self.refs, self.index = refs, {k: i for i, k in enumerate(keys)}

    def __getitem__(self, key) -> list[float]:
        return self.refs[self.index[key]]


def compute_references(jobs: list[tuple[str, list[int], int, int]]) -> list[list[float]]:
    """Reference NLLs for the jobs, waiting for all of them."""
    return References(jobs).all()


# Modules that take minutes (measured, one worker on one core each), longest first: `make test`'s
# two workers take whole modules in collection order, so starting the long ones first keeps one
# worker from running a long module alone at the end (the two Ray Serve modules not side by side
# from the start: each slows the other's replica starts). The rest keep their order.
LONG_MODULES = ["test_ray_cluster", "test_soak", "test_ray_serve", "test_stops",
                "test_benchmarks_smoke", "test_batch", "test_quantized_streams", "test_families",
                "test_metrics_endpoint", "test_foundation_engine", "test_loadtest",
                "test_usage_served", "test_cli_refusals", "test_streaming_exactness",
                "test_ppl_cli", "test_chat_cache", "test_multiturn_cache", "test_readme"]


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: tests keep their order inside a module
