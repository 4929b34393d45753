#!/usr/bin/env bash
# Issue 15's measurement: does a merge keep the fine-tune, at what size and cost? Two cases:
#   smollm  SmolLM2-135M-Instruct Q4_1 + the trained fact adapter (testdata/merge_quality/adapters/smollm2-facts,
#           converted by gguf-lora convert)
#   gemma-facts  gemma3-270m Q4_K_M + the same facts trained on it (adapters/gemma3-facts)
#   gemma   gemma3-270m Q4_K_M + a rank-16 random adapter on q,k,v,o,gate,up,down (testdata/tools/random_lora.py,
#           alpha 32, seed 0 or $SEED)
# Rows: gguf-lora merge with --requant nearest, the default (and with --adapter-weight 0, the calibration
# tokens alone) and --calibrate CALIB, each alone, with
# --promote auto and with --promote q8_0; llama-export-lora (merged tensors F16); export-lora then
# llama-quantize --allow-requantize Q4_K_M; --promote auto:0 funded by --token-embedding-type q5_1;
# plus the base alone and the adapter at runtime (judge.py's rows).
# Columns: facts / answer-token accuracy (smollm only: the gemma adapter was not trained), mean KL to the
# runtime LoRA over the 48 fact sentences and over heldout.txt (testdata/merge_quality/judge.py, llama.cpp,
# CPU), size ×base, wall and user+sys seconds and peak RSS of the command (/usr/bin/time; the export-lora +
# quantize row is both steps, RSS the larger). A row whose flags this binary lacks prints
# "n/a (flag missing)". Not a timed test: run it on a quiet machine for the times.
# usage: scripts/bench-merge-quality.sh [smollm|gemma-facts|gemma|all]     (env: CALIB=FILE, THREADS=N, SEED=N)
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-all}
eval "$(bash scripts/setup-env.sh --print-env)"
cargo build --release --quiet
BIN=$PWD/target/release/gguf-lora
MQ=$PWD/testdata/merge_quality
CALIB=${CALIB:-$MQ/calibration.txt}
THREADS=${THREADS:-$(nproc)}
WORK=${GGUF_LORA_BENCH:-$HOME/.cache/gguf-lora/bench}/merge-quality
mkdir -p "$WORK"
HELP=$("$BIN" merge --help)

# has FLAG...: whether `merge --help` lists every flag
has() {
    local f
    for f in "$@"; do grep -q -- "$f\b" <<< "$HELP" || return 1; done
}

# timed NAME CMD...: runs CMD under /usr/bin/time; "wall user sys maxrss_kb" in $WORK/NAME.time
timed() {
    local name=$1; shift
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1 ||
        { echo "$name failed, see $WORK/$name.log" >&2; return 1; }
}

export_then_quantize() {
    "$GGUF_LORA_TOOLS/llama-export-lora" -m "$1" --lora "$2" -o "$3.f16.gguf" -t "$THREADS" &&
        "$GGUF_LORA_TOOLS/llama-quantize" --allow-requantize "$3.f16.gguf" "$3" Q4_K_M "$THREADS" &&
        rm -f "$3.f16.gguf"
}
export -f export_then_quantize
export GGUF_LORA_TOOLS THREADS

# bench CASE BASE ADAPTER TRAINED(0|1)
bench() {
    local case=$1 base=$2 adapter=$3 trained=$4
    local -a labels=() files=() missing=() order=()
    local row flags label out
    # label|merge flags ("-" = none); the flags that must exist are those starting with --requant/--calibrate
    local rows=(
        "nearest|--requant nearest"
        "nearest+auto|--requant nearest --promote auto"
        "nearest+q8_0|--requant nearest --promote q8_0"
        "default|-"
        "tokens-only|--adapter-weight 0"
        "default+auto|--promote auto"
        "default+auto0|--promote auto:0"
        "default+q8_0|--promote q8_0"
        "calibrated|--calibrate $CALIB"
        "calibrated+auto|--calibrate $CALIB --promote auto"
        "calibrated+auto0|--calibrate $CALIB --promote auto:0"
        "calibrated+q8_0|--calibrate $CALIB --promote q8_0"
    )
    # Both bases' token_embd is Q8_0 and tied to the output (gemma3: 70% of the file): at Q5_1 it pays
    # for promotions at the base's size.
    rows+=(
        "default+auto0+embd_q5_1|--promote auto:0 --token-embedding-type q5_1"
        "calibrated+auto0+embd_q5_1|--calibrate $CALIB --promote auto:0 --token-embedding-type q5_1"
    )
    for row in "${rows[@]}"; do
        label=${row%%|*}; flags=${row#*|}; [ "$flags" = - ] && flags=
        out=$WORK/$case-$label.gguf
        order+=("$label")
        # shellcheck disable=SC2086
        if ! has $(grep -o -- '--[a-z-]*' <<< "$flags"); then missing+=("$label"); continue; fi
        rm -f "$out"
        # shellcheck disable=SC2086
        timed "$case-$label" "$BIN" merge "$base" --lora "$adapter" -o "$out" -t "$THREADS" $flags
        labels+=("$label"); files+=("$label=$out")
    done
    out=$WORK/$case-export-lora.gguf; rm -f "$out"
    timed "$case-export-lora" "$GGUF_LORA_TOOLS/llama-export-lora" -m "$base" --lora "$adapter" -o "$out" -t "$THREADS"
    labels+=(export-lora); order+=(export-lora); files+=("export-lora=$out")
    out=$WORK/$case-export-lora+q4_k_m.gguf; rm -f "$out"
    timed "$case-export-lora+q4_k_m" bash -c 'export_then_quantize "$@"' _ "$base" "$adapter" "$out"
    labels+=(export-lora+q4_k_m); order+=(export-lora+q4_k_m); files+=("export-lora+q4_k_m=$out")

    "$GGUF_LORA_PYTHON" "$MQ/judge.py" "$base" "$adapter" "${files[@]}" --json > "$WORK/$case-judge.txt" 2> "$WORK/$case-judge.log"
    python3 - "$case" "$trained" "$WORK" "$(tail -1 "$WORK/$case-judge.txt")" "${order[*]}" "${missing[*]:-}" \
        "$(head -1 "$WORK/$case-judge.txt")" <<'EOF'
import json, sys
case, trained, work, js, labels, missing, about = sys.argv[1:8]
j = json.loads(js)
trained = trained == "1"
print(f"\n## {case}  {about.lstrip('# ')}")
print(f"| row | facts | token acc | KL facts | KL heldout | size × | wall s | user+sys s | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
def row(label, r, t):
    acc = (f"{r['fact_acc']:.3f} | {r['token_acc']:.3f}") if trained else "- | -"
    tm = f"{t[0]:.2f} | {t[1] + t[2]:.2f} | {t[3] / 1024:.0f}" if t else "- | - | -"
    print(f"| {label} | {acc} | {r['kl_facts']:.4f} | {r['kl_heldout']:.4f} | {r['size']:.3f} | {tm} |")
row("base alone", j["base"], None)
row("base + adapter at runtime", j["runtime"], None)
missing = set(missing.split())
for label in labels.split():
    if label in missing:
        print(f"| {label} | n/a (flag missing) | | | | | | | |")
        continue
    t = [float(x) for x in open(f"{work}/{case}-{label}.time").read().split()[-4:]]
    row(label, j[label], t)
EOF
}

if [ "$WHICH" = smollm ] || [ "$WHICH" = all ]; then
    A=$WORK/smollm2-facts.gguf
    "$BIN" convert "$MQ/adapters/smollm2-facts" --base "$GGUF_LORA_SMOLLM" -o "$A" > /dev/null
    bench smollm "$GGUF_LORA_SMOLLM" "$A" 1
fi
if [ "$WHICH" = gemma-facts ] || [ "$WHICH" = all ]; then
    A=$WORK/gemma3-facts.gguf
    "$BIN" convert "$MQ/adapters/gemma3-facts" --base "$GGUF_LORA_GEMMA" -o "$A" > /dev/null
    bench gemma-facts "$GGUF_LORA_GEMMA" "$A" 1
fi
if [ "$WHICH" = gemma ] || [ "$WHICH" = all ]; then
    # SEED picks another random adapter: one adapter's KL moves by 0.01-0.03 with any change of the
    # fit, so compare rows over a few seeds before concluding (the README quotes seeds 0-3).
    SEED=${SEED:-0}
    A=$WORK/gemma3-r16-random.gguf
    [ "$SEED" = 0 ] || A=$WORK/gemma3-r16-seed$SEED.gguf
    [ -f "$A" ] || "$GGUF_LORA_PYTHON" testdata/tools/random_lora.py "$GGUF_LORA_GEMMA" "$A" --rank 16 --alpha 32 --seed "$SEED"
    bench gemma "$GGUF_LORA_GEMMA" "$A" 0
fi
echo
echo "(calibration text: $CALIB; threads: $THREADS; outputs and logs in $WORK)"
