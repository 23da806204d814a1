#!/usr/bin/env bash
# Quick start, step 2: the whole test suite, with the services it needs really running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-redis.sh
python3 -m ruff check .
python3 -m ruff format --check .
# The 20 slowest tests at the end: where to look when CI time grows.
exec python3 -m pytest -q -p no:cacheprovider --durations=20 "$@"
