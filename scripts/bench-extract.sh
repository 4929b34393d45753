#!/usr/bin/env bash
# Extraction benchmark: a rank-16 adapter back out of the 7B-shaped Q4_K base (testdata/tools/make_synthetic.py)
# and llama-export-lora's F16 merge of a rank-16 all-linear adapter (make_synthetic.py lora, gguf-py):
#   export-lora     llama-export-lora -m BASE --lora A -o MERGED           (the fine-tune, made once)
#   extract r16     gguf-lora extract BASE MERGED -o R16 --rank 16 --json  (timed: wall, user+sys, peak RSS)
#   extract r32     the same at rank 32: its singular values give the energy kept at ranks 8, 16 and 32
#   verify          gguf-lora verify BASE --lora R16 --merged MERGED --json (KL of base + extracted adapter
#                   at runtime vs the merged model)
# The machine's load average is printed before and after each timed run (the machine is shared: read
# user+sys, not only wall). Release build.
#   scripts/bench-extract.sh            (needs the interop venv: bash scripts/setup-env.sh; ~20 GB disk)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
BENCH=~/.cache/gguf-lora/bench
OUT=$BENCH/extract
mkdir -p "$OUT"
BASE=$BENCH/llama7b-q4_k.gguf
ADAPTER=$BENCH/llama7b-lora-r16.gguf
MERGED=$OUT/llama7b-export-lora-f16.gguf
if [ ! -f "$BASE" ]; then
  "$GGUF_LORA_PYTHON" testdata/tools/make_synthetic.py model "$BASE" --shape 7b --type q4_k \
    --tokenizer-from "$GGUF_LORA_SMOLLM"
fi
[ -f "$ADAPTER" ] || PYTHONPATH=testdata/tools "$GGUF_LORA_PYTHON" testdata/tools/make_synthetic.py lora \
  "$ADAPTER" --base "$BASE" --rank 16 --seed 1
if [ ! -f "$MERGED" ]; then  # written beside and renamed, so an interrupted merge is never reused
  "$GGUF_LORA_TOOLS/llama-export-lora" -m "$BASE" --lora "$ADAPTER" -o "$MERGED.tmp" -t "$(nproc)" \
    > "$OUT/export-lora.log" 2>&1
  mv "$MERGED.tmp" "$MERGED"
fi
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet   # NO_BUILD=1: use the binary as built
BIN=target/release/gguf-lora

run() { # label, command...  (stdout to $OUT/label.out)
  local label=$1; shift
  echo "$label: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  /usr/bin/time -v "$@" >"$OUT/$label.out" 2>"$OUT/$label.time"
  awk -F': ' -v l="$label" '
    /Elapsed \(wall clock\)/ {n=split($2,t,":"); w=0; for(i=1;i<=n;i++) w=w*60+t[i]}
    /User time/ {u=$2} /System time/ {s=$2} /Maximum resident set size/ {r=$2}
    END {printf "%s: wall %.1f s, user+sys %.1f s, peak RSS %.0f MiB\n", l, w, u+s, r/1024}' "$OUT/$label.time"
  echo "$label: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
}

run extract-r16 "$BIN" extract "$BASE" "$MERGED" -o "$OUT/r16.gguf" --rank 16 --json
run extract-r32 "$BIN" extract "$BASE" "$MERGED" -o "$OUT/r32.gguf" --rank 32 --json
run verify "$BIN" verify "$BASE" --lora "$OUT/r16.gguf" --merged "$MERGED" --json || true

"$GGUF_LORA_PYTHON" - "$OUT" "$ADAPTER" "$MERGED" <<'EOF'
import json, os, sys
out, adapter, merged = sys.argv[1:]
r16 = json.load(open(f"{out}/extract-r16.out"))
r32 = json.load(open(f"{out}/extract-r32.out"))
# Energy kept at rank k over all extracted tensors, from rank 32's singular values and each ‖Δ‖.
total = sum(t["delta_norm"] ** 2 for t in r32["tensors"])
for k in (8, 16, 32):
    kept = sum(sum(s * s for s in t["singular_values"][:k]) for t in r32["tensors"])
    print(f"energy kept at rank {k}: {kept / total:.6f}")
t = r16["totals"]
print(f"rank-16 run: {t['tensors_extracted']} tensors, energy {t['energy']:.6f}, residual {t['residual']:.3e}, "
      f"adapter {t['adapter_bytes'] / 2**20:.1f} MiB = {100 * t['size_ratio']:.2f}% of the F16 merge "
      f"({t['finetuned_bytes'] / 2**30:.2f} GiB); original adapter {os.path.getsize(adapter) / 2**20:.1f} MiB")
try:
    v = json.load(open(f"{out}/verify.out"))
    rep = v["report"]
    print(f"verify: passed {v['passed']}; merged vs runtime mean KL {rep['merged_vs_runtime']['mean_kl']:.3e}, "
          f"max KL {rep['merged_vs_runtime']['max_kl']:.3e}, top-1 {rep['merged_vs_runtime']['top1_agreement']:.3f}; "
          f"base vs runtime mean KL {rep['base_vs_runtime']['mean_kl']:.3e}")
except Exception as e:  # verify failing is a result too: say so
    print(f"verify: no report ({e}); see {out}/verify.time")
EOF
