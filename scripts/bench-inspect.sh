#!/usr/bin/env bash
# Benchmark (not a test): `gguf-lora inspect` time and peak RSS, and the read + write-back round-trip
# time, on the gemma3-270m Q4_K_M model, side by side with gguf-py's gguf-dump and gguf_new_metadata
# on the same file in the same run. Each command runs once to warm the page cache, then RUNS times;
# wall time and peak RSS come from /usr/bin/time -v, and the table shows the median (min-max).
#
# Usage: scripts/bench-inspect.sh [MODEL.gguf]     (RUNS=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
MODEL=${1:-$GGUF_LORA_GEMMA}
RUNS=${RUNS:-5}
PY=$GGUF_LORA_PYTHON

cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-inspect.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# measure NAME COMMAND...: prints one table row.
measure() {
    local name=$1 i
    shift
    : > "$TMP/samples"
    for i in $(seq 0 "$RUNS"); do
        rm -f "$TMP"/out.gguf
        if ! /usr/bin/time -v -o "$TMP/time" "$@" > /dev/null 2> "$TMP/err"; then
            echo "failed: $*" >&2
            cat "$TMP/err" >&2
            exit 1
        fi
        if [ "$i" -gt 0 ]; then
            local wall rss
            wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,p,":"); s=0; for(k=1;k<=n;k++) s=s*60+p[k]; print s}' "$TMP/time")
            rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$TMP/time")
            echo "$wall $rss" >> "$TMP/samples"
        fi
    done
    sort -n -k1,1 "$TMP/samples" | awk -v name="$name" '
        { w[NR]=$1; r[NR]=$2 } END {
          n=NR; m=int((n+1)/2)
          cell = sprintf("%.3f (%.3f-%.3f)", w[m], w[1], w[n])
          printf "| %-44s | %-24s |", name, cell }'
    sort -n -k2,2 "$TMP/samples" | awk '{ r[NR]=$2 } END { m=int((NR+1)/2); printf " %12.1f |\n", r[m]/1024 }'
}

echo "model: $MODEL ($(du -h "$MODEL" | cut -f1)), $RUNS runs after a warm-up, $(nproc) cores"
echo
echo "| command                                      | wall s, median (min-max) | peak RSS MiB |"
echo "|----------------------------------------------|--------------------------|--------------|"
measure "gguf-lora inspect (tables)" "$BIN" inspect "$MODEL"
measure "gguf-lora inspect --json" "$BIN" inspect "$MODEL" --json
measure "gguf-dump (gguf-py)" "$PY" -m gguf.scripts.gguf_dump "$MODEL"
measure "gguf-dump --json (gguf-py)" "$PY" -m gguf.scripts.gguf_dump --json "$MODEL"
measure "gguf-lora rewrite (round trip, with fsync)" "$BIN" rewrite "$MODEL" -o "$TMP/out.gguf"
measure "gguf_new_metadata (gguf-py round trip)" "$PY" -m gguf.scripts.gguf_new_metadata --force "$MODEL" "$TMP/out.gguf"
measure "cp (floor for the round trip, no fsync)" cp "$MODEL" "$TMP/out.gguf"

"$BIN" rewrite "$MODEL" -o "$TMP/check.gguf"
if cmp -s "$MODEL" "$TMP/check.gguf"; then
    echo; echo "round trip: byte-identical"
else
    echo; echo "round trip: DIFFERS" >&2; exit 1
fi
