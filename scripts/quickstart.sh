#!/usr/bin/env bash
# Quick start, step 1: install, bring up the mesh (router, kvstore, prefill and decode workers
# as separate processes) on the default model, ask it one question over HTTP, then stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
splitserve up --demo
