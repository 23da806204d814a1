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
# GGML_NATIVE=ON tunes for the machine that builds it, like the `blocks` kernels here, but AMX
# is off: on an AMX machine -march=native turns ggml's AMX kernels on even with GGML_AMX_*=OFF,
# and they crash in these VMs (SIGSEGV at the first matmul, SIGILL elsewhere), so the compiler
# is told -mno-amx-* as well (an explicit -mno- wins over -march=native in GCC and clang).
set -euo pipefail
CACHE="${SPLITSERVE_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve/llama-server}"
JOBS="${JOBS:-2}"
BIN="$CACHE/build/bin/llama-server"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# A build made with other flags (an earlier version of this script) is built again.
STAMP="$CACHE/build/.splitserve-flags"
if [[ -x "$BIN" && "$(cat "$STAMP" 2>/dev/null)" == "$NO_AMX" ]]; then
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
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX"
cmake --build build --config Release --target llama-server -j "$JOBS"
test -x "$BIN"
echo "$NO_AMX" > "$STAMP"
echo "$BIN"
