#!/usr/bin/env bash
# Benchmark (not a test): `gguf-lora quantize` against llama.cpp's `llama-quantize --pure` on the same
# input in the same run, wall time and peak RSS from farm-bench (runs alternate A B A B, the ratio is
# taken pair by pair). Input: the F32 dequantization of the gemma3-270m Q4_K_M model (made with our
# own `quantize --type f32`; llama-quantize refuses to requantize without --allow-requantize), and
# the Q4_K_M file itself for the requantize case. After timing, every tensor of both outputs is
# compared with gguf-py (testdata/quantize/compare.py): they must be byte-identical.
#
# Usage: scripts/bench-quantize.sh [MODEL.gguf]     (RUNS=3, THREADS=$(nproc) by default)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
MODEL=${1:-$GGUF_LORA_GEMMA}
RUNS=${RUNS:-3}
THREADS=${THREADS:-$(nproc)}
LQ=$GGUF_LORA_TOOLS/llama-quantize

cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-quantize.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

echo "model: $MODEL ($(du -h "$MODEL" | cut -f1)), $RUNS runs after a warm-up, $THREADS threads, $(nproc) cores"
"$BIN" quantize "$MODEL" -o "$TMP/f32.gguf" --type f32 > /dev/null
echo "F32 input: $(du -h "$TMP/f32.gguf" | cut -f1)"

# bench LABEL INPUT OURS_TYPE LLAMA_FTYPE [LLAMA_FLAGS...]
bench() {
    local label=$1 input=$2 ty=$3 ftype=$4
    shift 4
    echo
    echo "== $label: gguf-lora quantize --type $ty (A) vs llama-quantize --pure $* $ftype (B)"
    farm-bench -n "$RUNS" --timeout 1800 \
        --vs "$LQ --pure $* $input $TMP/theirs.gguf $ftype $THREADS" \
        -- "$BIN" quantize "$input" -o "$TMP/ours.gguf" --type "$ty" --threads "$THREADS"
    "$GGUF_LORA_PYTHON" testdata/quantize/compare.py "$TMP/ours.gguf" "$TMP/theirs.gguf" --check
}

bench "F32 -> Q8_0" "$TMP/f32.gguf" q8_0 Q8_0
bench "F32 -> Q4_K" "$TMP/f32.gguf" q4_k Q4_K_M
bench "Q4_K_M -> Q8_0 (requantize)" "$MODEL" q8_0 Q8_0 --allow-requantize
