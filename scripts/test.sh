#!/usr/bin/env bash
# The test command: set up (first run only), lint, then the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. -m "not slow" or -k loss.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check cipo_lightning tests benchmarks experiments
.venv/bin/ruff format --check cipo_lightning tests benchmarks experiments
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
