#!/usr/bin/env bash
# Quick start, step 1: install, then show the engine answering on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== splitserve generate (SmolLM2-135M-Instruct, greedy, streamed) =="
splitserve generate "In one sentence, why does paged attention save memory?" --max-tokens 64 --stats
