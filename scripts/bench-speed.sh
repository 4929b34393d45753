#!/usr/bin/env bash
# Merge speed and memory at two model sizes and two thread counts, against llama.cpp's tools and cp
# (issue 16's table). Models: the 1B- and 7B-shaped synthetic Q4_K bases with rank-16 adapters on every
# linear tensor (testdata/tools/make_synthetic.py; made on first use, about 40 s):
#   ours nearest      gguf-lora merge BASE --lora A --requant nearest -t T   (ggml's requantization)
#   export-lora       llama-export-lora -m BASE --lora A -t T                  (merged tensors F16)
#   export+quantize   then llama-quantize --allow-requantize OUT Q4_K_M T       (back to 4 bits; largest T only)
#   cp                cp BASE OUT                                               (the floor)
# Every command runs once per (size, threads) under /usr/bin/time -v; the table gives wall, user+sys
# CPU, peak RSS and the 1-minute load average before each command. Ratios are to export-lora and to
# cp measured in the same run. The default merge (the adapter-preserving one) is held to the merge
# issue's time targets and measured by scripts/bench-merge-quality.sh, not here.
# SIZES may also name gemma: the real gemma3-270m Q4_K_M (issue 16's first case), where the nearest merge
# also runs with --promote auto.
# usage: scripts/bench-speed.sh [SIZES (default "gemma 1b 7b")] [THREADS (default "1 2")]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-gemma 1b 7b}
THREAD_COUNTS=${2:-1 2}
eval "$(bash scripts/setup-env.sh --print-env)"
cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
DATA=${GGUF_LORA_BENCH:-$HOME/.cache/gguf-lora/bench}
# Outputs go beside the inputs (the same disk), deleted after each command.
WORK=$DATA/speed
mkdir -p "$WORK"

# inputs SIZE: "BASE ADAPTER" for a size; gemma is the real gemma3-270m Q4_K_M with a rank-16 adapter on
# every attention and MLP projection (testdata/merge/make_lora.py, as scripts/bench-merge.sh)
inputs() {
    if [ "$1" = gemma ]; then echo "$GGUF_LORA_GEMMA $DATA/merge/gemma3-270m-r16.gguf"
    else echo "$DATA/llama$1-q4_k.gguf $DATA/llama$1-lora-r16.gguf"; fi
}
for size in $SIZES; do
    if [ "$size" = gemma ]; then
        read -r _ lora < <(inputs gemma)
        mkdir -p "$DATA/merge"
        [ -f "$lora" ] || PYTHONPATH=testdata/tools "$GGUF_LORA_PYTHON" testdata/merge/make_lora.py \
            "$GGUF_LORA_GEMMA" "$lora" --rank 16 --alpha 32
        continue
    fi
    [ -f "$DATA/llama$size-q4_k.gguf" ] || PYTHONPATH=testdata/tools "$GGUF_LORA_PYTHON" \
        testdata/tools/make_synthetic.py model "$DATA/llama$size-q4_k.gguf" --shape "$size" \
        --tokenizer-from "$GGUF_LORA_SMOLLM"
    [ -f "$DATA/llama$size-lora-r16.gguf" ] || PYTHONPATH=testdata/tools "$GGUF_LORA_PYTHON" \
        testdata/tools/make_synthetic.py lora "$DATA/llama$size-lora-r16.gguf" \
        --base "$DATA/llama$size-q4_k.gguf" --rank 16
done

load() { awk '{print $1}' /proc/loadavg; }
# run LABEL CMD...: one timed run; appends "LABEL wall cpu rss_mb load" to $WORK/rows
run() {
    local label=$1; shift
    local before; before=$(load)
    /usr/bin/time -v -o "$WORK/time.txt" "$@" > /dev/null 2> "$WORK/${label//\//-}.log"
    awk -v label="$label" -v load="$before" -F': ' '
        /Elapsed \(wall clock\)/ {n = split($2, t, ":"); w = 0; for (i = 1; i <= n; i++) w = w * 60 + t[i]}
        /User time/ {u = $2} /System time/ {s = $2}
        /Maximum resident set size/ {r = $2 / 1024}
        END {printf "%s %.2f %.2f %.0f %s\n", label, w, u + s, r, load}' "$WORK/time.txt" >> "$WORK/rows"
    rm -f "$WORK"/out*.gguf
}
export_then_quantize() {
    "$GGUF_LORA_TOOLS/llama-export-lora" -m "$1" --lora "$2" -o "$WORK/out-f16.gguf" -t "$3" &&
        "$GGUF_LORA_TOOLS/llama-quantize" --allow-requantize "$WORK/out-f16.gguf" "$WORK/out-q.gguf" Q4_K_M "$3"
}
export -f export_then_quantize
export WORK GGUF_LORA_TOOLS

: > "$WORK/rows"
MAX_THREADS=$(printf '%s\n' $THREAD_COUNTS | sort -n | tail -1)
for size in $SIZES; do
    read -r base lora < <(inputs "$size")
    for t in $THREAD_COUNTS; do
        run "$size/t$t/ours-nearest" "$BIN" merge "$base" --lora "$lora" --requant nearest -t "$t" -o "$WORK/out.gguf"
        [ "$size" = gemma ] && run "$size/t$t/ours-nearest+auto" "$BIN" merge "$base" --lora "$lora" \
            --requant nearest --promote auto -t "$t" -o "$WORK/out.gguf"
        run "$size/t$t/export-lora" "$GGUF_LORA_TOOLS/llama-export-lora" -m "$base" --lora "$lora" -t "$t" -o "$WORK/out.gguf"
        # llama-quantize alone takes about 5 CPU-minutes at 7B: run at the largest thread count only.
        [ "$t" = "$MAX_THREADS" ] && run "$size/t$t/export+quantize" bash -c 'export_then_quantize "$@"' _ "$base" "$lora" "$t"
    done
    run "$size/cp" cp "$base" "$WORK/out.gguf"
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); binary $(git rev-parse --short HEAD)"
printf '| %-26s | %8s | %13s | %12s | %9s | %10s | %8s | %8s | %5s |\n' \
    run "wall s" "user+sys s" "peak RSS MiB" "wall/cp" "CPU/e-l" "RSS/e-l" "wall/e+q" load
printf '|%s|\n' "----------------------------|----------|---------------|--------------|-----------|------------|----------|----------|-------"
# ratio A B: A/B to two places, or "-" without a B (cp's own row has no anchors)
ratio() { if [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; else echo -; fi; }
while read -r label wall cpu rss ld; do
    size=${label%%/*}
    rest=${label#*/}
    threads=${rest%%/*}
    cp_wall='' el_cpu='' el_rss='' eq_wall=''
    if [ "$label" != "$size/cp" ]; then
        cp_wall=$(awk -v k="$size/cp" '$1 == k {print $2}' "$WORK/rows")
        read -r el_cpu el_rss < <(awk -v k="$size/$threads/export-lora" '$1 == k {print $3, $4}' "$WORK/rows") || true
        eq_wall=$(awk -v k="$size/$threads/export+quantize" '$1 == k {print $2}' "$WORK/rows")
    fi
    printf '| %-26s | %8.2f | %13.2f | %12.0f | %9s | %10s | %8s | %8s | %5s |\n' "$label" "$wall" "$cpu" "$rss" \
        "$(ratio "$wall" "$cp_wall")" "$(ratio "$cpu" "$el_cpu")" "$(ratio "$rss" "$el_rss")" \
        "$(ratio "$wall" "$eq_wall")" "$ld"
done < "$WORK/rows"
echo "(wall/cp: to cp of the same base; CPU/e-l and RSS/e-l: to llama-export-lora with the same threads; wall/e+q: to export-lora + llama-quantize with the same threads (largest only); load: 1-min average before the command)"
