"""Codec test vectors made by the real libggml (llama-cpp-python's vendored ggml) through ctypes.

Writes, next to this script:
  legacy_inputs.f32        NROWS x N_PER_ROW float32 rows (little-endian), one named case per row
  legacy_imatrix.f32       N_PER_ROW float32 per-column importance weights
  float_inputs.f32         one row of float edge values (ties, overflow, subnormals, inf, NaN) for f16/bf16
  <type>.q                 ggml_quantize_chunk bytes of legacy_inputs without an imatrix
  <type>.imatrix.q         the same with legacy_imatrix, written only where ggml's bytes differ (for the
                           types ggml quantizes alike with and without, the manifest lists them under
                           "imatrix_ignored")
  float_<type>.q / float_<type>.f32  ggml's bytes and to_float for float_inputs (f16, bf16)
  manifest.json            shapes, case names, ggml version; per type and row the sha256 of ggml's
                           to_float (little-endian f32) of the bytes above; sha256 of to_float over every
                           16-bit pattern for f16 and bf16 (input: the patterns 0..65535 in order)

Run with the project venv: `python testdata/codecs/make_legacy_vectors.py` (PYTHONPATH=testdata/tools).
The output is deterministic: seeded numpy generator, fixed case list.
"""
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from ggml_ctypes import Ggml  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N_PER_ROW = 256
SEED = 20261123

# Types quantized here (through ggml_quantize_chunk), with and without an imatrix.
QUANT_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "f16", "bf16"]


def halves(rng, lo, hi, n, first):
    """n values on the 0.5 grid in [lo, hi] (so x/d lands exactly on .5 ties), block max forced first."""
    v = rng.integers(int(lo * 2), int(hi * 2) + 1, size=n).astype(np.float32) / 2
    v[0] = first
    return v


def cases(rng):
    n = N_PER_ROW
    rows = []

    def add(name, v):
        v = np.asarray(v, dtype=np.float32)
        assert v.shape == (n,), name
        assert np.all(np.isfinite(v)), name
        rows.append((name, v))

    add("normal", rng.standard_normal(n))
    outl = rng.standard_normal(n) * 0.02
    outl[rng.choice(n, 6, replace=False)] = rng.choice([-1, 1], 6) * rng.uniform(5, 40, 6)
    add("outliers", outl)
    add("zeros", np.zeros(n))
    add("constant", np.full(n, 0.37))
    add("constant_negative", np.full(n, -2.5))
    # Exact ties for each family: the block's extreme value fixes d to 1 (or 0.5), the others sit on
    # the 0.5 grid, so x/d + 0.5-style rounding sees exact halves.
    add("ties_q4_0", np.concatenate([halves(rng, -8, 7.5, 32, -8) for _ in range(n // 32)]))
    add("ties_q5_0", np.concatenate([halves(rng, -16, 15.5, 32, -16) for _ in range(n // 32)]))
    add("ties_q8_0", np.concatenate([halves(rng, -127, 127, 32, 127) for _ in range(n // 32)]))
    t41 = np.concatenate([halves(rng, 0, 15, 32, 15) for _ in range(n // 32)])
    t41[1::32] = 0
    add("ties_q4_1", t41)
    t51 = np.concatenate([halves(rng, 0, 31, 32, 31) for _ in range(n // 32)])
    t51[1::32] = 0
    add("ties_q5_1", t51)
    add("huge", rng.standard_normal(n) * 1e37)
    hug = rng.standard_normal(n) * 1e30
    hug[3] = 3.0e38
    hug[100] = -3.3e38
    add("huge_extremes", hug)
    add("f16_scale_overflow", rng.standard_normal(n) * 3e5)
    add("tiny_subnormal", rng.standard_normal(n) * 1e-39)
    add("tiny_normal", rng.standard_normal(n) * 1e-30)
    add("below_group_eps", rng.standard_normal(n) * 1e-17)
    add("negative_only", -np.abs(rng.standard_normal(n)) - 0.1)
    add("positive_only", np.abs(rng.standard_normal(n)) + 0.1)
    add("mixed_block_scales",
        np.concatenate([rng.standard_normal(32) * 10.0 ** rng.uniform(-20, 20) for _ in range(n // 32)]))
    add("uniform_small_ints", rng.integers(-3, 4, n).astype(np.float32))
    return rows


def float_edges():
    """Values that stress f32 → f16/bf16 rounding: ties, overflow, subnormals, infinities and NaNs."""
    b = lambda u: np.array([u], dtype=np.uint32).view(np.float32)[0]  # noqa: E731
    vals = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, -1e30, 3.4e38,
            np.float32(1 + 2**-11), np.float32(1 + 3 * 2**-11), np.float32(1 + 2**-11 + 2**-20),
            6.0e-8, 2.98e-8, 2.9802322e-8, 5.96e-8, 1e-10, 1e-40, -1e-45,
            b(0x3F808000), b(0x3F818000), b(0x3F808001), b(0x7F7FFFFF), b(0x7F7F8000), b(0x00008000),
            b(0x00018000), b(0x807FFFFF),
            np.inf, -np.inf, b(0x7FC00000), b(0xFFC00000), b(0x7F800001), b(0x7FA12345), b(0xFF812345)]
    v = np.array(vals, dtype=np.float32)
    return np.concatenate([v, np.zeros(64 - len(v), dtype=np.float32)])


def main():
    g = Ggml()
    rng = np.random.default_rng(SEED)
    rows = cases(rng)
    x = np.stack([v for _, v in rows])
    imatrix = rng.uniform(0.0, 4.0, N_PER_ROW).astype(np.float32) ** 2
    imatrix[rng.choice(N_PER_ROW, 8, replace=False)] = 0.0  # unused columns happen in real imatrices

    def write(name, data):
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)

    write("legacy_inputs.f32", x.astype("<f4").tobytes())
    write("legacy_imatrix.f32", imatrix.astype("<f4").tobytes())
    to_float_sha256 = {}
    imatrix_ignored = []

    def row_hashes(t, q):
        f = g.dequantize(t, q, x.size).astype("<f4").reshape(x.shape)
        return [hashlib.sha256(r.tobytes()).hexdigest() for r in f]

    for t in QUANT_TYPES:
        q = g.quantize(t, x)
        write(f"{t}.q", q)
        to_float_sha256[t] = row_hashes(t, q)
        qi = g.quantize(t, x, imatrix)
        if qi == q:
            imatrix_ignored.append(t)
        else:
            write(f"{t}.imatrix.q", qi)
            to_float_sha256[f"{t}.imatrix"] = row_hashes(t, qi)

    fe = float_edges()
    write("float_inputs.f32", fe.astype("<f4").tobytes())
    for t in ("f16", "bf16"):
        q = g.quantize(t, fe.reshape(1, -1))
        write(f"float_{t}.q", q)
        write(f"float_{t}.f32", g.dequantize(t, q, fe.size).astype("<f4").tobytes())

    all_patterns = np.arange(65536, dtype="<u2").tobytes()
    exhaustive = {
        t: hashlib.sha256(g.dequantize(t, all_patterns, 65536).astype("<f4").tobytes()).hexdigest()
        for t in ("f16", "bf16")
    }

    import llama_cpp
    manifest = {
        "generator": "testdata/codecs/make_legacy_vectors.py",
        "libggml": f"llama-cpp-python {llama_cpp.__version__} (vendored ggml, libggml-base.so)",
        "seed": SEED,
        "n_per_row": N_PER_ROW,
        "cases": [name for name, _ in rows],
        "quant_types": QUANT_TYPES,
        "imatrix_ignored": imatrix_ignored,
        "to_float_row_sha256": to_float_sha256,
        "float_inputs": int(fe.size),
        "to_float_all_16bit_patterns_sha256": exhaustive,
    }
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
