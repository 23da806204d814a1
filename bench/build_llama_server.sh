#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the peer of `splitserve bench serve --compare`) from the
# llama.cpp sources vendored in PyPI's `llama-cpp-python` sdist, into a cache directory outside
# the repository, and prints the binary's path on the last line of its output.
#
#   bash bench/build_llama_server.sh                  # -> ~/.cache/splitserve/llama-server/...
#   LLAMA_CPP_PYTHON_VERSION=0.3.16 JOBS=2 bash bench/build_llama_server.sh
#
# Takes ~12+ minutes on 2 cores; never run from CI. A finished build is reused (the script
# exits at once if the binary is already there). Environment:
#   SPLITSERVE_LLAMA_CACHE   where to build (default ${XDG_CACHE_HOME:-~/.cache}/splitserve/llama-server)
#   LLAMA_CPP_PYTHON_VERSION the sdist version (default: the newest pip finds)
#   JOBS                     make -j (default 2)
# Only llama-cpp-python itself is taken as source (--no-binary llama-cpp-python); `:all:` would
# also build each of its build tools from source just to read its metadata.
# AMX is off (its kernels need a newer assembler than many distributions ship and a CPU with
# AMX); GGML_NATIVE=ON tunes for the machine that builds it, like the `blocks` kernels here.
set -euo pipefail
CACHE="${SPLITSERVE_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve/llama-server}"
JOBS="${JOBS:-2}"
BIN="$CACHE/build/bin/llama-server"
if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$CACHE"
cd "$CACHE"
if [[ ! -d src ]]; then
  spec="llama-cpp-python"
  [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]] && spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  rm -rf dl && mkdir dl
  python3 -m pip download --no-deps --no-binary llama-cpp-python -d dl "$spec"
  sdist=$(ls dl/llama_cpp_python-*.tar.gz | head -1)
  rm -rf unpack && mkdir unpack && tar -xzf "$sdist" -C unpack
  vendor=$(ls -d unpack/*/vendor/llama.cpp)
  mv "$vendor" src
  echo "$(basename "$sdist")" > src/.from-sdist
  rm -rf unpack dl
fi
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_NATIVE=ON
cmake --build build --config Release --target llama-server -j "$JOBS"
test -x "$BIN"
echo "$BIN"
