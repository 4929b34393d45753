//! Float, legacy and IQ4 codecs against the live libggml on rows generated here: a few hundred rows
//! of many shapes (normal, uniform, exact ties, raw finite bit patterns of any magnitude, sparse on ±0,
//! constant, per-block magnitudes, negative-only, sprinkled with NaNs) quantized without and with a
//! per-row imatrix, and random encoded blocks dequantized, all compared bit for bit with what libggml
//! does in the same run (`testdata/codecs/ggml_legacy_batch.py`), at every SIMD level.

mod common;

use gguf_lora::quant::simd::with_level;
use gguf_lora::quant::{self, GgmlType};

/// SplitMix64: a fixed-seed generator so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-7);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Row shapes of [`make_row`].
const KINDS: usize = 9;

fn make_row(rng: &mut Rng, kind: usize, n_per_row: usize) -> Vec<f32> {
    let mut row = vec![0f32; n_per_row];
    match kind {
        0 => {
            let scale = 10f32.powf(rng.range(-3.0, 3.0));
            row.iter_mut().for_each(|v| *v = rng.normal() * scale);
        }
        1 => {
            let a = 10f32.powf(rng.range(-2.0, 2.0));
            row.iter_mut().for_each(|v| *v = rng.range(-a, a));
        }
        2 => {
            // Halves on a grid whose extreme sets the block scale to a power of two: exact ties.
            let nmax = [8.0f32, 16.0, 127.0, 15.0, 31.0][rng.below(5) as usize];
            let unit = 2f32.powi(rng.below(9) as i32 - 4);
            for block in row.chunks_mut(32) {
                for v in block.iter_mut() {
                    *v = (rng.below(2 * nmax as u64 + 1) as f32 / 2.0 - nmax / 2.0) * unit;
                }
                block[rng.below(32) as usize] = -nmax * unit;
            }
        }
        3 => {
            // Raw bit patterns: any finite value, subnormals and extremes included.
            for v in row.iter_mut() {
                *v = loop {
                    let f = f32::from_bits(rng.next_u64() as u32);
                    if f.is_finite() {
                        break f;
                    }
                };
            }
        }
        4 => {
            // Sparse, on zeros of both signs (which one a block's min/max keeps shows in Q4_1/Q5_1's m).
            row.iter_mut()
                .for_each(|v| *v = if rng.below(2) == 0 { 0.0 } else { -0.0 });
            for _ in 0..rng.below(6) {
                row[rng.below(n_per_row as u64) as usize] = rng.normal() * 5.0;
            }
        }
        5 => {
            let c = rng.normal() * 10f32.powf(rng.range(-5.0, 5.0));
            row.iter_mut().for_each(|v| *v = c);
        }
        6 => {
            for block in row.chunks_mut(32) {
                let scale = 10f32.powf(rng.range(-30.0, 30.0));
                block.iter_mut().for_each(|v| *v = rng.normal() * scale);
            }
        }
        7 => row.iter_mut().for_each(|v| *v = -rng.normal().abs() - 0.01),
        _ => {
            // NaNs, some last in their block: ggml's Q8_0 `MAX(amax, fabsf(v))` keeps a trailing
            // NaN and forgets everything before a NaN that is followed by a value.
            row.iter_mut().for_each(|v| *v = rng.normal());
            for _ in 0..1 + rng.below(6) {
                row[rng.below(n_per_row as u64) as usize] = f32::NAN;
            }
            let block = rng.below((n_per_row / 32) as u64) as usize;
            row[32 * block + 31] = f32::NAN;
        }
    }
    row
}

fn make_imatrix(rng: &mut Rng, n_per_row: usize) -> Vec<f32> {
    (0..n_per_row)
        .map(|_| {
            if rng.below(16) == 0 {
                0.0
            } else {
                rng.range(0.0, 3.0).powi(2)
            }
        })
        .collect()
}

/// Random encoded blocks whose f16 fields are finite (ggml and we agree on NaN scales too, but which
/// NaN payload an `a*b + c` propagates depends on operand order the C compiler may swap).
fn random_blocks(rng: &mut Rng, ty: GgmlType, n_elements: usize) -> Vec<u8> {
    let n_bytes = ty.row_bytes(n_elements as u64).unwrap() as usize;
    let mut b: Vec<u8> = (0..n_bytes).map(|_| rng.next_u64() as u8).collect();
    let f16_fields: &[usize] = match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::F16 | GgmlType::BF16 => &[],
        _ => &[0],
    };
    for block in b.chunks_mut(ty.type_size()) {
        for &at in f16_fields {
            if block[at + 1] & 0x7C == 0x7C {
                block[at + 1] &= !0x40;
            }
        }
    }
    b
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Generates `n_rows` rows of `n_per_row`, has libggml and us quantize them (types `quantized`, with
/// and without a per-row imatrix) and dequantize random blocks (types `dequantized`), and compares.
fn compare_with_live_libggml(
    seed: u64,
    n_per_row: usize,
    n_rows: usize,
    quantized: &[GgmlType],
    dequantized: &[GgmlType],
) {
    let n_deq = 64 * n_per_row;

    let mut rng = Rng(seed);
    let rows: Vec<Vec<f32>> = (0..n_rows)
        .map(|i| make_row(&mut rng, i % KINDS, n_per_row))
        .collect();
    let imats: Vec<Vec<f32>> = (0..n_rows)
        .map(|_| make_imatrix(&mut rng, n_per_row))
        .collect();
    let blocks: Vec<(GgmlType, Vec<u8>)> = dequantized
        .iter()
        .map(|&t| (t, random_blocks(&mut rng, t, n_deq)))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("rows.f32"), le_bytes(&rows.concat())).unwrap();
    std::fs::write(d.join("imatrix.f32"), le_bytes(&imats.concat())).unwrap();
    for (t, b) in &blocks {
        std::fs::write(d.join(format!("{t}.in.bin")), b).unwrap();
    }
    let spec = serde_json::json!({
        "n_per_row": n_per_row,
        "quantize": quantized.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "dequantize": dequantized.iter().map(|t| (t.name().to_string(), serde_json::json!(n_deq))).collect::<serde_json::Map<_, _>>(),
    });
    std::fs::write(d.join("spec.json"), spec.to_string()).unwrap();
    let script = common::repo_root().join("testdata/codecs/ggml_legacy_batch.py");
    common::interop().python(&script, &[d.to_str().unwrap()]);

    let mut failures = Vec::new();
    for level in common::simd_levels() {
        for &ty in quantized {
            let row_bytes = ty.row_bytes(n_per_row as u64).unwrap() as usize;
            for (suffix, with_imatrix) in [("q", false), ("qi", true)] {
                let ggml = std::fs::read(d.join(format!("{ty}.{suffix}.bin"))).unwrap();
                let mut ours = vec![0u8; row_bytes];
                for (i, x) in rows.iter().enumerate() {
                    let imatrix = with_imatrix.then_some(imats[i].as_slice());
                    with_level(level, || quant::quantize_row(ty, x, &mut ours, imatrix)).unwrap();
                    if ours != ggml[i * row_bytes..(i + 1) * row_bytes] {
                        failures.push(format!(
                            "{ty} at {level} imatrix={with_imatrix} row {i} (kind {})",
                            i % KINDS
                        ));
                    }
                }
            }
        }
        for (ty, b) in &blocks {
            let ggml = f32s(&std::fs::read(d.join(format!("{ty}.deq.f32"))).unwrap());
            let row_bytes = ty.row_bytes(n_per_row as u64).unwrap() as usize;
            let mut ours = vec![0f32; n_per_row];
            for (r, (src, want)) in b.chunks(row_bytes).zip(ggml.chunks(n_per_row)).enumerate() {
                with_level(level, || quant::dequantize_row(*ty, src, &mut ours)).unwrap();
                if let Some(i) = ours
                    .iter()
                    .zip(want)
                    .position(|(a, g)| a.to_bits() != g.to_bits())
                {
                    failures.push(format!(
                        "{ty} at {level} dequantize: row {r} element {i} differs"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "differences from libggml: {failures:#?}"
    );
}

#[test]
fn random_rows_match_live_libggml() {
    require_interop!();
    use GgmlType::*;
    let all = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS, F16, BF16];
    // Q8_1 has no `to_float` (ggml only quantizes to it, through `quantize_row_q8_1_ref`).
    let quantized = [&all[..], &[Q8_1]].concat();
    compare_with_live_libggml(0x005E_ED1E_6AC7, 256, 320, &quantized, &all);
}

/// Rows of 11 blocks: the importance-weighted legacy quantizers search 8 blocks at a time in SIMD
/// lanes and the remaining 3 one by one; both paths must match.
#[test]
fn rows_not_a_multiple_of_eight_blocks_match_live_libggml() {
    require_interop!();
    use GgmlType::*;
    let legacy = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL];
    compare_with_live_libggml(0x0BAD_5EED, 11 * 32, 160, &legacy, &legacy);
}
