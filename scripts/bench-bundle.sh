#!/usr/bin/env bash
# Bundle benchmark: four rank-16 all-linear adapters of a 7B-shaped model (made by
# testdata/tools/make_synthetic.py against the synthetic 7B Q4_K base), bundled concat and named
# with the release build; wall time, peak RSS (/usr/bin/time -v) and output sizes. Also extracts one
# adapter back and checks it is byte-identical.
#   scripts/bench-bundle.sh            (needs the interop venv: bash scripts/setup-env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
BENCH=~/.cache/gguf-lora/bench
BASE=$BENCH/llama7b-q4_k.gguf
if [ ! -f "$BASE" ]; then
  "$GGUF_LORA_PYTHON" testdata/tools/make_synthetic.py model "$BASE" --shape 7b --type q4_k \
    --tokenizer-from "$GGUF_LORA_SMOLLM"
fi
for k in 1 2 3 4; do
  f=$BENCH/llama7b-lora-r16-s$k.gguf
  [ -f "$f" ] || PYTHONPATH=testdata/tools "$GGUF_LORA_PYTHON" testdata/tools/make_synthetic.py lora "$f" \
    --base "$BASE" --rank 16 --seed $k
done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet   # NO_BUILD=1: use the binary as built
BIN=target/release/gguf-lora
OUT=$BENCH/bundle-out
mkdir -p "$OUT"
INPUTS=()
for k in 1 2 3 4; do INPUTS+=("$BENCH/llama7b-lora-r16-s$k.gguf:0.$((k + 4))"); done
run() { # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" >/dev/null 2>"$OUT/$label.time"
  local wall rss
  wall=$(grep 'Elapsed (wall clock)' "$OUT/$label.time" | awk '{print $NF}')
  rss=$(grep 'Maximum resident set size' "$OUT/$label.time" | awk '{print $NF}')
  echo "$label: wall $wall, peak RSS $((rss / 1024)) MiB"
}
echo "inputs: $(du -ch "$BENCH"/llama7b-lora-r16-s[1-4].gguf | tail -1 | cut -f1) in 4 files"
run concat "$BIN" bundle "${INPUTS[@]}" -o "$OUT/concat.gguf"
run concat-base "$BIN" bundle "${INPUTS[@]}" -o "$OUT/concat-base.gguf" --base "$BASE"
run named "$BIN" bundle "${INPUTS[@]}" --mode named -o "$OUT/named.gguf"
run extract "$BIN" bundle --extract llama7b-lora-r16-s3 "$OUT/named.gguf" -o "$OUT/s3.gguf"
cmp "$OUT/s3.gguf" "$BENCH/llama7b-lora-r16-s3.gguf" && echo "extract: byte-identical to the input"
ls -l "$OUT"/*.gguf | awk '{printf "%s %.1f MB\n", $NF, $5 / 1e6}'
