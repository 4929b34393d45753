#!/usr/bin/env bash
# The whole test suite: installs the interop environment (cached in ~/.cache/gguf-lora), then runs
# every Rust test (unit, integration, interop against gguf-py / libggml / llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
# CI and this script run every interop test: a missing environment fails them, never skips them.
export GGUF_LORA_REQUIRE_INTEROP=1
cargo test --all-targets --locked "$@"
