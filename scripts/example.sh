#!/usr/bin/env bash
# Builds gguf-lora and runs it on the small committed example: a tiny llama (made with transformers,
# converted by llama.cpp's convert_hf_to_gguf.py) and a PEFT LoRA adapter made by PEFT.
# Nothing outside the checkout is needed; outputs go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo shows its own progress: a first build compiles the dependencies (a few minutes on 2 cores).
cargo build --release
bin=target/release/gguf-lora
base=testdata/fixtures/llama/base-f32.gguf
adapter=testdata/fixtures/llama/adapters/rslora
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set -x
$bin inspect "$base" | head -n 25
# From the per-layer coverage to the verdict (the module table above it is one row per module).
$bin inspect "$adapter" --base "$base" | sed -n '/^Layer coverage/,$p'
$bin convert "$adapter" --base "$base" -o "$out/adapter.gguf"
$bin merge "$base" --lora "$adapter" -o "$out/merged.gguf"
$bin verify "$base" --lora "$out/adapter.gguf" --merged "$out/merged.gguf" --tokens 1,5,9,42,7,3
