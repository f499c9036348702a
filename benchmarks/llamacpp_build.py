"""llama.cpp's `llama-server` and `llama-perplexity`, built once from the source a PyPI sdist vendors.

Machines here reach only the package registries, so the source comes from the llama-cpp-python
sdist (its vendor/llama.cpp is a plain llama.cpp checkout at a known commit), fetched with pip and
compiled with cmake for this CPU (GGML_NATIVE). The result lives in the project's cache directory:

    <cache>/llamacpp/<llama-cpp-python version>/bin/llama-server
                                                 bin/llama-perplexity
                                                 convert/convert_hf_to_gguf.py (+ conversion/, gguf-py/)
                                                 build-info.json

It is built in a temporary sibling directory and renamed into place only when complete, so an
interrupted build never leaves a directory that a later run would trust.

    .venv/bin/python benchmarks/llamacpp_build.py          # build if missing; print the directory
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Pinned: the sdist of this version vendors llama.cpp at LLAMACPP_COMMIT (its CHANGELOG says so).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMACPP_COMMIT = "0c1e57098"
TARGETS = ("llama-server", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    # Self-contained executables: the binaries are moved after the build.
    "-DBUILD_SHARED_LIBS=OFF",
    # Nothing fetched at build time: no prebuilt web UI download, no HTTPS client.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
BUILD_JOBS = 2
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# What the GGUF conversion needs from the source tree.
_CONVERT_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
_COMPLETE_MARKER = "build-info.json"


def install_dir() -> Path:
    from streamsink.model_store import cache_dir

    return cache_dir() / "llamacpp" / LLAMA_CPP_PYTHON_VERSION


def binary(name: str = "llama-server") -> Path:
    return install_dir() / "bin" / name


def is_built() -> bool:
    d = install_dir()
    return (d / _COMPLETE_MARKER).exists() and all((d / "bin" / t).exists() for t in TARGETS)


def build_info() -> dict:
    return json.loads((install_dir() / _COMPLETE_MARKER).read_text())


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, **kw)


def _fetch_sdist(dest: Path, log) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)], log)
    found = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if len(found) != 1:
        raise RuntimeError(f"expected one llama-cpp-python sdist in {dest}, found {found}")
    return found[0]


def _extract_vendored_source(sdist: Path, dest: Path) -> Path:
    """Only vendor/llama.cpp, with the sdist prefix removed."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(_VENDOR) or m.name == _VENDOR:
                continue
            m.name = m.name[len(_VENDOR):]
            members.append(m)
        tar.extractall(dest, members=members, filter="data")
    if not (dest / "CMakeLists.txt").exists():
        raise RuntimeError(f"{sdist.name} holds no {_VENDOR}")
    return dest


def _compiler_version() -> str:
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(progress: bool = True) -> Path:
    """Return the install directory, fetching and building llama.cpp the first time."""
    target = install_dir()
    if is_built():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{LLAMA_CPP_PYTHON_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and find it built
        if is_built():
            return target
        if target.exists():  # incomplete, left by something else than us
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{LLAMA_CPP_PYTHON_VERSION}.", dir=target.parent))
        log_path = target.parent / f"build-{LLAMA_CPP_PYTHON_VERSION}.log"
        if progress:
            print(f"llama.cpp: building {', '.join(TARGETS)} from llama-cpp-python=="
                  f"{LLAMA_CPP_PYTHON_VERSION} (once; log: {log_path})", flush=True)
        try:
            with open(log_path, "w") as log:
                t0 = time.monotonic()
                sdist = _fetch_sdist(tmp / "sdist", log)
                t_fetch = time.monotonic() - t0
                src = _extract_vendored_source(sdist, tmp / "src")
                build = tmp / "build"
                nice = ["nice", "-n", "10"]
                t1 = time.monotonic()
                _run(nice + ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log)
                _run(nice + ["cmake", "--build", str(build), "--config", "Release",
                             "-j", str(BUILD_JOBS), "--target", *TARGETS], log)
                t_build = time.monotonic() - t1
            out = tmp / "out"
            (out / "bin").mkdir(parents=True)
            for t in TARGETS:
                shutil.copy2(build / "bin" / t, out / "bin" / t)
            (out / "convert").mkdir()
            for part in _CONVERT_PARTS:
                (shutil.copytree if (src / part).is_dir() else shutil.copy2)(
                    src / part, out / "convert" / part)
            info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llamacpp_commit": LLAMACPP_COMMIT,
                    "cmake_flags": list(CMAKE_FLAGS), "jobs": BUILD_JOBS, "targets": list(TARGETS),
                    "compiler": _compiler_version(), "machine": platform.machine(),
                    "fetch_seconds": round(t_fetch, 1), "build_seconds": round(t_build, 1)}
            (out / _COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            os.rename(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"llama.cpp: built in {t_build:.0f} s (source fetched in {t_fetch:.0f} s) "
                  f"-> {target}", flush=True)
    return target


if __name__ == "__main__":
    print(prepare())
