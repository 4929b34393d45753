#!/usr/bin/env bash
# The whole test suite: installs the interop environment (cached in ~/.cache/gguf-lora), then runs
# every Rust test (unit, integration, interop against gguf-py / libggml / llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
cargo test --all-targets --locked "$@"
