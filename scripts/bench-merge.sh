#!/usr/bin/env bash
# Benchmark of `gguf-lora merge` against llama.cpp's tools on the real gemma3-270m Q4_K_M with a rank-16
# adapter on every attention and MLP projection (written by gguf-py: testdata/merge/make_lora.py):
#   ours (keep)            gguf-lora merge BASE --lora A -o OUT                 (Q4_K_M mix kept)
#   ours (--promote auto)  the same, buying back fidelity within 5% size
#   export-lora            llama-export-lora -m BASE --lora A -o OUT            (merged tensors F16)
#   export-lora + quantize then llama-quantize --allow-requantize OUT Q4_K_M    (back to Q4_K_M)
#   cp                     cp BASE OUT                                           (the floor)
# Each command runs RUNS times (default 3) under /usr/bin/time -v; the table gives the median wall time,
# the largest peak RSS and the output size, then the mean KL of each output's logits to llama.cpp's
# runtime LoRA (base + adapter) over 20 tokens (testdata/merge/check_merge.py logits).
# usage: scripts/bench-merge.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
eval "$(bash scripts/setup-env.sh --print-env)"
export PYTHONPATH=$PWD/testdata/tools
cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
WORK=${GGUF_LORA_BENCH:-$HOME/.cache/gguf-lora/bench}/merge
mkdir -p "$WORK"
BASE=$GGUF_LORA_GEMMA
ADAPTER=$WORK/gemma3-270m-r16.gguf
[ -f "$ADAPTER" ] || "$GGUF_LORA_PYTHON" testdata/merge/make_lora.py "$BASE" "$ADAPTER" --rank 16 --alpha 32
THREADS=$(nproc)

# run NAME OUT CMD...: RUNS timed runs; records "wall rss" per run in $WORK/NAME.times
run() {
    local name=$1 out=$2; shift 2
    : > "$WORK/$name.times"
    for _ in $(seq "$RUNS"); do
        rm -f "$out"
        /usr/bin/time -v -o "$WORK/$name.tv" "$@" > /dev/null 2> "$WORK/$name.log"
        local wall rss
        wall=$(awk -F': ' '/Elapsed \(wall clock\)/{n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; print s}' "$WORK/$name.tv")
        rss=$(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/$name.tv")
        echo "$wall $rss" >> "$WORK/$name.times"
    done
}

# two-step pipeline, timed as one: export-lora then llama-quantize
export_then_quantize() {
    "$GGUF_LORA_TOOLS/llama-export-lora" -m "$BASE" --lora "$ADAPTER" -o "$WORK/el-tmp.gguf" -t "$THREADS" &&
    "$GGUF_LORA_TOOLS/llama-quantize" --allow-requantize "$WORK/el-tmp.gguf" "$WORK/el-q4km.gguf" Q4_K_M "$THREADS"
}
export -f export_then_quantize
export BASE ADAPTER WORK THREADS GGUF_LORA_TOOLS

run ours-keep "$WORK/ours-keep.gguf" "$BIN" merge "$BASE" --lora "$ADAPTER" -o "$WORK/ours-keep.gguf"
run ours-auto "$WORK/ours-auto.gguf" "$BIN" merge "$BASE" --lora "$ADAPTER" -o "$WORK/ours-auto.gguf" --promote auto
run export-lora "$WORK/el-f16.gguf" "$GGUF_LORA_TOOLS/llama-export-lora" -m "$BASE" --lora "$ADAPTER" -o "$WORK/el-f16.gguf" -t "$THREADS"
run export+quantize "$WORK/el-q4km.gguf" bash -c export_then_quantize
run cp "$WORK/cp.gguf" cp "$BASE" "$WORK/cp.gguf"

median() { sort -n | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
KL=$("$GGUF_LORA_PYTHON" testdata/merge/check_merge.py logits "$BASE" "$ADAPTER:1" \
    "$WORK/ours-keep.gguf" "$WORK/ours-auto.gguf" "$WORK/el-f16.gguf" "$WORK/el-q4km.gguf" 2>/dev/null | tail -1)
kl_of() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.4f" % d[sys.argv[2]]["kl"]) if sys.argv[2] in d else print("-")' "$KL" "$1"; }

base_size=$(stat -c %s "$BASE")
echo "gemma3-270m Q4_K_M ($(numfmt --to=iec "$base_size")) + rank-16 adapter on q,k,v,o,gate,up,down; $RUNS runs each, $THREADS threads"
printf '%-18s %10s %12s %14s %8s %10s\n' "command" "wall s" "peak RSS MB" "output MB" "×base" "KL"
for name in ours-keep ours-auto export-lora export+quantize cp; do
    case $name in
        ours-keep) out=$WORK/ours-keep.gguf; kl=$(kl_of "$out") ;;
        ours-auto) out=$WORK/ours-auto.gguf; kl=$(kl_of "$out") ;;
        export-lora) out=$WORK/el-f16.gguf; kl=$(kl_of "$out") ;;
        export+quantize) out=$WORK/el-q4km.gguf; kl=$(kl_of "$out") ;;
        cp) out=$WORK/cp.gguf; kl=$(kl_of base) ;;
    esac
    wall=$(awk '{print $1}' "$WORK/$name.times" | median)
    rss=$(awk '{print $2}' "$WORK/$name.times" | sort -n | tail -1)
    size=$(stat -c %s "$out")
    printf '%-18s %10.2f %12.0f %14.1f %8.3f %10s\n' "$name" "$wall" "$((rss / 1024))" \
        "$(echo "$size / 1048576" | bc -l)" "$(echo "$size / $base_size" | bc -l)" "$kl"
done
echo "(KL of cp = the base without the adapter; export+quantize: wall is both steps, RSS the larger)"
