#!/usr/bin/env bash
# Makes sure a C++ compiler is there for the engine's kernels (model/csrc, built on first use;
# ninja comes from pip). Installs g++ with apt-get when missing and we are root; otherwise says
# that the engine will fall back to its slower torch paths.
set -euo pipefail
if command -v c++ >/dev/null || command -v g++ >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing g++ (the engine's C++ kernels are compiled on first use)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
else
  echo "no C++ compiler: the C++ kernels will fall back to torch (install g++ to build them)" >&2
fi
