#!/usr/bin/env bash
# The main job: tile-prune the embedded all-MiniLM-L6-v2 to 50% on STS-B and compare dense against pruned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/glue}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/etformer demo "$@"
