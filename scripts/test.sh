#!/usr/bin/env bash
# Quick start, step 2: the whole test suite, with the services it needs really running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-redis.sh
python3 -m ruff check .
python3 -m ruff format --check .
lint-imports  # the layering in README's layout table (contracts in pyproject.toml)
python3 scripts/check-stubs.py  # the installed gRPC stubs are what the committed .proto makes
# On 2 xdist workers by default, the CI machine's cores (4 measured slower than 2 there: the
# meshes the tests start already fill the cores); tests that share a mesh or a model load
# stay on one worker (tests/conftest.py).
# The 20 slowest tests at the end: where to look when CI time grows.
exec python3 -m pytest -q -p no:cacheprovider --durations=20 \
  -n "${SPLITSERVE_TEST_WORKERS:-2}" --dist loadgroup "$@"
