#!/usr/bin/env bash
# The main job: set up (first run only), then CIPO on the embedded model with vLLM rollouts (configs/quickstart.yaml).
# Extra arguments are passed to the CLI, e.g. --trainer.max_steps 5 --trainer.default_root_dir runs/try1
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m cipo_lightning fit --config configs/quickstart.yaml "$@"
