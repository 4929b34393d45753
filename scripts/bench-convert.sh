#!/usr/bin/env bash
# convert benchmark (issue 5): gguf-lora convert against llama.cpp's convert_lora_to_gguf.py on the same
# adapters, side by side in one run, wall time and peak RSS from /usr/bin/time, repeated (the machine is
# shared: report the spread). The adapters come from testdata/fixtures/make_bench_adapters.py [--llama7b];
# the Python converter runs in the fixture venv (it needs torch + transformers).
#   bash scripts/bench-convert.sh [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-env.sh --print-env)"
REPEATS=${1:-2}
BENCH=~/.cache/gguf-lora/bench
PY=~/.cache/gguf-lora/fixture-venv/bin/python
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cargo build --release --locked -q
BIN=target/release/gguf-lora

run() { # label, command...
    local label=$1; shift
    /usr/bin/time -f "$label: wall %e s, user %U s, sys %S s, max RSS %M KB" "$@" > /dev/null 2> "$OUT/err" \
        || { cat "$OUT/err"; exit 1; }
    tail -1 "$OUT/err"
}

bench() { # name, adapter dir, base GGUF, HF config dir
    local name=$1 adapter=$2 base=$3 hf=$4
    [ -d "$adapter" ] || { echo "$name: $adapter missing (run make_bench_adapters.py)"; return; }
    for i in $(seq "$REPEATS"); do
        run "$name gguf-lora #$i" "$BIN" convert "$adapter" -o "$OUT/ours.gguf" --base "$base"
        run "$name convert_lora_to_gguf.py #$i" "$PY" "$GGUF_LORA_LLAMA_SRC/convert_lora_to_gguf.py" \
            --base "$hf" --outtype f32 --outfile "$OUT/ref.gguf" "$adapter"
    done
    # Same tensors (names, shapes, values) and alpha as the reference.
    "$GGUF_LORA_PYTHON" - "$OUT/ours.gguf" "$OUT/ref.gguf" <<'PY'
import sys
import numpy as np
from gguf import GGUFReader
a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
same = set(ta) == set(tb) and all(
    list(ta[n].shape) == list(tb[n].shape) and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
    for n in tb)
alpha = lambda r: float(r.fields["adapter.lora.alpha"].parts[-1][0])
print(f"  {len(tb)} tensors, identical to the reference: {same}, alpha {alpha(a)} vs {alpha(b)}")
PY
}

bench gemma3-270m-r16 "$BENCH/gemma3-270m-r16" "$GGUF_LORA_GEMMA" "$BENCH/gemma3-270m-r16/hf-config"
bench llama7b-r64 "$BENCH/llama7b-peft-r64" "$BENCH/llama7b-q4_k.gguf" "$BENCH/llama7b-peft-r64/hf-base"
