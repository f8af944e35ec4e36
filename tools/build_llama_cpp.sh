#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI source distribution once, cache the wheel, install it.
#
# The slow GGUF test (tests/test_gguf_llamacpp.py) uses llama.cpp as an independent oracle
# for our GGUF export. PyPI ships llama-cpp-python for Linux as source only, and compiling
# llama.cpp takes ~10-20 minutes on 2 cores, so the wheel is built once into a cache and
# later runs (or other worktrees) just install it.
#
# Usage: tools/build_llama_cpp.sh [PYTHON]
#   PYTHON          interpreter whose environment gets the package (default: /work/main/.venv/bin/python,
#                   else `python3`)
#   LMLAB_WHEEL_CACHE  wheel cache directory (default: ~/.cache/lmlab/wheels)
#   LLAMA_CPP_PYTHON_VERSION  version to build (default below)
#   CONSTRAINTS     pip constraints file (default: /work/main/constraints.txt when it exists)
set -euo pipefail

PY="${1:-}"
if [[ -z "$PY" ]]; then
    if [[ -x /work/main/.venv/bin/python ]]; then PY=/work/main/.venv/bin/python; else PY=python3; fi
fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LMLAB_WHEEL_CACHE:-$HOME/.cache/lmlab/wheels}"
CONSTRAINTS="${CONSTRAINTS:-/work/main/constraints.txt}"
CONSTRAINT_ARGS=()
[[ -f "$CONSTRAINTS" ]] && CONSTRAINT_ARGS=(-c "$CONSTRAINTS")

for tool in cmake cc c++; do
    command -v "$tool" >/dev/null || {
        echo "error: '$tool' not found; install a C/C++ toolchain and cmake (e.g. apt-get install build-essential cmake)" >&2
        exit 1
    }
done

mkdir -p "$CACHE"
shopt -s nullglob
wheels=("$CACHE"/llama_cpp_python-"$VERSION"-*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "building llama-cpp-python $VERSION from source into $CACHE (this takes a while)..."
    # Only the shared library the Python bindings load: no multimodal (mtmd/llava) library,
    # tools, tests, examples or server, no HTTPS. Native CPU flags: the wheel is for this machine.
    export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    tmp="$(mktemp -d "$CACHE/.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "${CONSTRAINT_ARGS[@]}" \
        -w "$tmp" "llama-cpp-python==$VERSION"
    # Move into the cache only once complete, so an interrupted build never leaves a wheel.
    mv "$tmp"/llama_cpp_python-*.whl "$CACHE"/
    wheels=("$CACHE"/llama_cpp_python-"$VERSION"-*.whl)
fi
echo "installing ${wheels[0]}"
"$PY" -m pip install -q "${CONSTRAINT_ARGS[@]}" "${wheels[0]}"
"$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'ok')"
