#!/usr/bin/env bash
# Benchmark (not a test): tokenization throughput of `gguf-lora tokenize` against llama-cpp-python's
# `Llama.tokenize` (llama.cpp's own tokenizer) on a ~1 MiB text, same run, same models (SmolLM2-135M:
# byte-level BPE; gemma3-270m: SentencePiece). The text is llama.cpp's own documentation (English,
# Markdown, code, some Unicode), repeated to 1 MiB. Both sides run as whole processes under
# /usr/bin/time, once with the text and once with an empty file; the difference is the tokenization
# alone (loading the vocabulary is reported separately). Each command runs once to warm up, then RUNS
# times; the table shows medians. Both must print the same ids (checked).
#
# Usage: scripts/bench-tokenize.sh        (RUNS=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
RUNS=${RUNS:-5}
PY=$GGUF_LORA_PYTHON

cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-tokenize.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# The text: llama.cpp's Markdown docs, concatenated and repeated, cut to 1 MiB at a line end.
find "$GGUF_LORA_LLAMA_SRC/docs" "$GGUF_LORA_LLAMA_SRC/README.md" -name '*.md' -type f | sort \
    | xargs cat > "$TMP/docs.txt"
"$PY" - "$TMP/docs.txt" "$TMP/text.txt" <<'PYEOF'
import sys
src = open(sys.argv[1], "rb").read()
out = bytearray()
while len(out) < 1 << 20:
    out += src
cut = out.rfind(b"\n", 0, 1 << 20) + 1
open(sys.argv[2], "wb").write(out[:cut])
PYEOF
: > "$TMP/empty.txt"
BYTES=$(stat -c %s "$TMP/text.txt")

cat > "$TMP/lcpp.py" <<'PYEOF'
import json, sys
import llama_cpp
m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)
text = open(sys.argv[2], "rb").read()
ids = m.tokenize(text, add_bos=True, special=False) if text else []
sys.stdout.write("[" + ", ".join(map(str, ids)) + "]\n")
PYEOF

# sample NAME OUT COMMAND...: runs COMMAND RUNS times (after a warm-up) and appends
# "wall cpu" lines to $TMP/NAME; stdout of the last run goes to OUT.
sample() {
    local name=$1 out=$2 i
    shift 2
    : > "$TMP/$name"
    for i in $(seq 0 "$RUNS"); do
        if ! /usr/bin/time -f "%e %U %S" -o "$TMP/time" "$@" > "$out" 2> "$TMP/err"; then
            echo "failed: $*" >&2
            cat "$TMP/err" >&2
            exit 1
        fi
        if [ "$i" -gt 0 ]; then
            awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' "$TMP/time" >> "$TMP/$name"
        fi
    done
}
median() { # FILE COLUMN
    sort -n -k"$2","$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}

echo "text: llama.cpp docs, $BYTES bytes; $RUNS runs after a warm-up; $(nproc) cores"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '| %-13s | %-20s | %8s | %8s | %9s | %9s | %9s | %7s | %9s |\n' \
    model tokenizer "load s" "load cpu" "tok wall" "tok cpu" "MiB/s" tokens "vs llama"
echo "|---------------|----------------------|----------|----------|-----------|-----------|-----------|---------|-----------|"
for model in "$GGUF_LORA_SMOLLM" "$GGUF_LORA_GEMMA"; do
    label=$(basename "$model" | cut -d- -f1-2 | cut -c1-13)
    sample ours_full "$TMP/ours.ids" "$BIN" tokenize "$model" --file "$TMP/text.txt" --no-special --ids-only
    sample ours_load /dev/null "$BIN" tokenize "$model" --file "$TMP/empty.txt" --no-special --ids-only
    sample lcpp_full "$TMP/lcpp.ids" "$PY" "$TMP/lcpp.py" "$model" "$TMP/text.txt"
    sample lcpp_load /dev/null "$PY" "$TMP/lcpp.py" "$model" "$TMP/empty.txt"
    if ! cmp -s "$TMP/ours.ids" "$TMP/lcpp.ids"; then
        echo "ids differ from llama.cpp on $model" >&2
        exit 1
    fi
    n_tokens=$(tr -cd ',' < "$TMP/ours.ids" | wc -c)
    n_tokens=$((n_tokens + 1))
    lcpp_tok=$(awk -v a="$(median "$TMP/lcpp_full" 1)" -v b="$(median "$TMP/lcpp_load" 1)" 'BEGIN { print a - b }')
    for side in ours lcpp; do
        name=$([ "$side" = ours ] && echo "gguf-lora" || echo "llama-cpp-python")
        lw=$(median "$TMP/${side}_load" 1)
        lc=$(median "$TMP/${side}_load" 2)
        tw=$(awk -v a="$(median "$TMP/${side}_full" 1)" -v b="$lw" 'BEGIN { print a - b }')
        tc=$(awk -v a="$(median "$TMP/${side}_full" 2)" -v b="$lc" 'BEGIN { print a - b }')
        awk -v m="$label" -v n="$name" -v lw="$lw" -v lc="$lc" -v tw="$tw" -v tc="$tc" \
            -v bytes="$BYTES" -v nt="$n_tokens" -v anchor="$lcpp_tok" 'BEGIN {
            mibs = (tw > 0) ? bytes / 1048576 / tw : 0
            ratio = (tw > 0) ? anchor / tw : 0
            printf "| %-13s | %-20s | %8.3f | %8.3f | %9.3f | %9.3f | %9.2f | %7d | %8.2fx |\n",
                m, n, lw, lc, tw, tc, mibs, nt, ratio }'
    done
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "tok = (run on the text) - (run on an empty file), medians; 'vs llama' = llama-cpp-python's tok wall / this row's; ids identical on both models"
