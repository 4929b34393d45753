//! The legacy 32-element block codecs Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1, bit-identical to ggml.
//!
//! Per type, side by side as in `ggml-quants.c`: the reference quantizer (`quantize_row_X_ref`, what
//! `ggml_quantize_chunk` runs without an importance matrix), the importance-weighted quantizer
//! (`quantize_row_X_impl`, what it runs with one) and the dequantizer (`dequantize_row_X`, the type's
//! `to_float`). Every function works on whole blocks; the registry in [`super`] checks the sizes.
//!
//! Bit-identity rests on doing the float operations in ggml's order with no fused multiply-add: the
//! `libggml-base.so` we compare with contains no FMA instruction at all (checked with `objdump`), and
//! Rust never contracts `a * b + c` on its own.

use super::float::{read_f16, write_f16};
use super::lanes::{
    in_passes, lanes_of, levels_from_lanes, qkx_fit, qx_fit, to_lanes, Pass, QkxParams,
    MAX_PASS_VALUES,
};
use super::simd::{simd_dispatch, F32s, Level, Mask};
use super::{Codec, GgmlType};

/// Elements per block of every legacy type (`QK4_0`, `QK4_1`, `QK5_0`, `QK5_1`, `QK8_0`, `QK8_1`).
pub const QK: usize = 32;

/// C's float → `int` conversion of a whole block, as the platform executes it. On x86-64 that is
/// `cvttps2dq`: truncation toward zero, and the "integer indefinite" `i32::MIN` for NaN and out-of-range
/// values, where Rust's `as` would saturate; ggml then narrows to `int8_t`/`uint8_t` by keeping the low
/// byte, which callers do with `as i8`/`as u8`. This only matters for degenerate blocks (a scale whose
/// inverse overflows to inf), but those must match too. Elsewhere (AArch64's `fcvtzs`) C saturates
/// and maps NaN to 0, exactly like Rust's `as`.
#[inline(always)]
fn c_float_to_int_block(v: &[f32; QK]) -> [i32; QK] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_cvttps_epi32, _mm_loadu_ps, _mm_storeu_si128};
        let mut out = [0i32; QK];
        for k in (0..QK).step_by(4) {
            // SAFETY: SSE2 is part of the x86-64 baseline; the unaligned loads and stores stay inside
            // the two 32-element arrays (k + 4 <= QK).
            unsafe {
                let x = _mm_loadu_ps(v.as_ptr().add(k));
                _mm_storeu_si128(
                    out.as_mut_ptr().add(k).cast::<__m128i>(),
                    _mm_cvttps_epi32(x),
                );
            }
        }
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        v.map(|x| x as i32)
    }
}

/// `(int)roundf(x)` for a whole block, as C computes it on this platform: `roundf` rounds half away
/// from zero, then [`c_float_to_int_block`] converts. Done without calling `roundf` (a libm call on
/// baseline x86-64): truncate, then step away from zero when the dropped fraction is at least one
/// half. The fraction `x - trunc(x)` is exact for every float whose truncation fits an `i32`; values
/// that do not fit, infinities and NaN keep the conversion's own result (`roundf` leaves them
/// integral or NaN, so converting them rounded or not gives the same integer).
#[inline(always)]
fn c_round_to_int_block(v: &[f32; QK]) -> [i32; QK] {
    let t = c_float_to_int_block(v);
    let mut out = [0i32; QK];
    for j in 0..QK {
        let frac = v[j] - t[j] as f32;
        let fits = t[j] != i32::MIN && t[j] != i32::MAX;
        out[j] = if fits && frac >= 0.5 {
            t[j] + 1
        } else if fits && frac <= -0.5 {
            t[j] - 1
        } else {
            t[j]
        };
    }
    out
}

/// The value of largest magnitude in a block (a multiple of 8 elements), keeping its sign, exactly as
/// ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` loops find it: the first element whose
/// magnitude is the block's largest, or `+0.0` when every element is zero. The largest magnitude is
/// found in 8 lanes (a maximum does not depend on order), then the first element reaching it.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            let a = c[k].abs();
            lanes[k] = if lanes[k] < a { a } else { lanes[k] };
        }
    }
    let mut amax = 0.0f32;
    for a in lanes {
        if amax < a {
            amax = a;
        }
    }
    if amax == 0.0 {
        return 0.0;
    }
    x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

/// ggml's `amax = MAX(amax, fabsf(v))` over a block, from `amax = 0`. `MAX(a, b)` is
/// `a > b ? a : b`, so a NaN replaces the running maximum and the next value replaces the NaN: only
/// the sequential loop gives ggml's answer then. Without a NaN the magnitudes are ordered
/// non-negative floats, whose maximum does not depend on the order: `L::X1` lanes.
#[inline(always)]
fn c_absmax<L: Level>(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    type W<L> = <L as Level>::X1;
    let zero = W::<L>::splat(0.0);
    let mut m = zero;
    let mut nan = zero.ne(zero);
    for c in x.chunks_exact(W::<L>::LANES) {
        let a = W::<L>::load(c).abs();
        nan = nan | a.ne(a);
        m = m.max_c(a);
    }
    if nan.any() {
        for &v in x {
            let a = v.abs();
            amax = if amax > a { amax } else { a };
        }
    } else {
        for a in &lanes_of(m)[..W::<L>::LANES] {
            amax = if amax > *a { amax } else { *a };
        }
    }
    amax
}

/// Minimum and maximum of a block (a multiple of 8 elements) exactly as ggml's sequential loop finds them (start at
/// `FLT_MAX`/`-FLT_MAX`, replace on strict `<`/`>`), computed in 8 lanes so it vectorizes. The lanes
/// find the right values; which bits represent them is decided after: the sequential loop keeps the
/// first element that compares equal to the extreme, and only ±0 compare equal with different bits,
/// so a zero extreme takes the sign of the first zero in the block.
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut mn = [f32::MAX; 8];
    let mut mx = [-f32::MAX; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            mn[k] = if c[k] < mn[k] { c[k] } else { mn[k] };
            mx[k] = if c[k] > mx[k] { c[k] } else { mx[k] };
        }
    }
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for k in 0..8 {
        if mn[k] < min {
            min = mn[k];
        }
        if mx[k] > max {
            max = mx[k];
        }
    }
    if min == 0.0 || max == 0.0 {
        let first_zero = x.iter().copied().find(|&v| v == 0.0).unwrap_or(0.0);
        if min == 0.0 {
            min = first_zero;
        }
        if max == 0.0 {
            max = first_zero;
        }
    }
    (min, max)
}

/// `sigma2 = Σx²/n` over the whole row: the variance term of every legacy `quantize_row_X_impl`.
#[inline]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// The variance term of a pass: the row's, or each block's own (every block quantized as ggml
/// quantizes a one-block row, see [`quantize_blocks_impl`]).
#[derive(Clone, Copy)]
enum Sigma2 {
    Row(f32),
    PerBlock,
}

/// The per-element weights of the legacy `_impl` quantizers, `qw[j] * sqrtf(sigma2 + x[j]²)`, for a
/// pass of blocks in lanes (block `k` in lane `k`).
#[inline(always)]
fn lane_weights<V: F32s>(xt: &[V; QK], qw: &[f32], sigma2: Sigma2) -> [V; QK] {
    let qwt = to_lanes::<V, QK>(qw);
    let sigma2 = match sigma2 {
        Sigma2::Row(v) => V::splat(v),
        // `row_sigma2` of a one-block row, lane by lane in its order.
        Sigma2::PerBlock => {
            let mut sum = V::splat(0.0);
            for v in xt {
                sum = sum + *v * *v;
            }
            sum / V::splat(QK as f32)
        }
    };
    let mut wt = [V::splat(0.0); QK];
    for i in 0..QK {
        wt[i] = qwt[i] * (sigma2 + xt[i] * xt[i]).sqrt();
    }
    wt
}

/// The levels of every lane of a pass, block `k`'s at `out[QK k..]`.
#[inline(always)]
fn pass_levels<V: F32s>(lt: &[V; QK]) -> [u8; MAX_PASS_VALUES] {
    let mut out = [0u8; MAX_PASS_VALUES];
    levels_from_lanes::<V, QK>(lt, &mut out[..V::LANES * QK]);
    out
}

/// The shared body of `quantize_row_q4_0_impl` and `quantize_row_q5_0_impl`: per block,
/// `make_qx_quants(32, nmax, x, L, 1, w)` with `w = imatrix * sqrt(sigma2 + x²)`, then `write(block,
/// d, L)`, `V::LANES` blocks at a time through [`qx_fit`] (each lane in the scalar function's exact
/// operation order).
struct SymmetricImpl<W> {
    nmax: i32,
    sigma2: Sigma2,
    block_bytes: usize,
    write: W,
}

impl<W: Fn(&mut [u8], f32, &[i8; QK])> Pass for SymmetricImpl<W> {
    #[inline(always)]
    fn pass<L: Level>(&self, xs: &[f32], ys: &mut [u8], qw: Option<&[f32]>) {
        self.pass_in::<L::X2>(xs, ys, qw);
    }
}

impl<W: Fn(&mut [u8], f32, &[i8; QK])> SymmetricImpl<W> {
    #[inline(always)]
    fn pass_in<V: F32s>(&self, xs: &[f32], ys: &mut [u8], qw: Option<&[f32]>) {
        let xt = to_lanes::<V, QK>(xs);
        let wt = lane_weights(&xt, qw.expect("weighted pass"), self.sigma2);
        let fit = qx_fit(self.nmax, &xt, &wt);
        let mut lt = [V::splat(0.0); QK];
        fit.levels(&xt, &mut lt);
        let levels = pass_levels(&lt);
        let d = lanes_of(fit.scale);
        for (k, yb) in ys.chunks_exact_mut(self.block_bytes).enumerate() {
            let mut l = [0i8; QK];
            for i in 0..QK {
                l[i] = levels[QK * k + i] as i8;
            }
            (self.write)(yb, d[k], &l);
        }
    }
}

/// Runs [`SymmetricImpl`] over a row.
#[inline(always)]
fn symmetric_impl<L: Level>(
    nmax: i32,
    sigma2: Sigma2,
    x: &[f32],
    y: &mut [u8],
    block_bytes: usize,
    quant_weights: &[f32],
    write: impl Fn(&mut [u8], f32, &[i8; QK]),
) {
    let p = SymmetricImpl {
        nmax,
        sigma2,
        block_bytes,
        write,
    };
    let lanes = L::X2::LANES;
    in_passes::<L, _>(
        x,
        y,
        Some(quant_weights),
        lanes * QK,
        lanes * block_bytes,
        &p,
    );
}

/// The shared body of `quantize_row_q4_1_impl` and `quantize_row_q5_1_impl`: per block,
/// `make_qkx3_quants(32, nmax, x, w, L, &the_min, Laux, -0.9, 0.05, 36, false)` with
/// `w = imatrix * sqrt(sigma2 + x²)`, then `write(block, d, the_min, L)`, `V::LANES` blocks at a time
/// through [`qkx_fit`].
struct AsymmetricImpl<W> {
    nmax: i32,
    sigma2: Sigma2,
    block_bytes: usize,
    write: W,
}

impl<W: Fn(&mut [u8], f32, f32, &[u8; QK])> Pass for AsymmetricImpl<W> {
    #[inline(always)]
    fn pass<L: Level>(&self, xs: &[f32], ys: &mut [u8], qw: Option<&[f32]>) {
        self.pass_in::<L::X2>(xs, ys, qw);
    }
}

impl<W: Fn(&mut [u8], f32, f32, &[u8; QK])> AsymmetricImpl<W> {
    #[inline(always)]
    fn pass_in<V: F32s>(&self, xs: &[f32], ys: &mut [u8], qw: Option<&[f32]>) {
        let xt = to_lanes::<V, QK>(xs);
        let wt = lane_weights(&xt, qw.expect("weighted pass"), self.sigma2);
        let mut laux = [V::splat(0.0); QK];
        let params = QkxParams {
            rmin: -0.9,
            rdelta: 0.05,
            nstep: 36,
            use_mad: false,
            // make_qkx3_quants' test for a flat block.
            flat_is_le: true,
        };
        let fit = qkx_fit(self.nmax, &xt, &wt, &mut laux, params);
        let mut lt = [V::splat(0.0); QK];
        fit.levels(&xt, &mut lt);
        let levels = pass_levels(&lt);
        let (d, the_min) = (lanes_of(fit.scale), lanes_of(fit.the_min));
        for (k, yb) in ys.chunks_exact_mut(self.block_bytes).enumerate() {
            let mut l = [0u8; QK];
            l.copy_from_slice(&levels[QK * k..QK * (k + 1)]);
            (self.write)(yb, d[k], the_min[k], &l);
        }
    }
}

/// Runs [`AsymmetricImpl`] over a row.
#[inline(always)]
fn asymmetric_impl<L: Level>(
    nmax: i32,
    sigma2: Sigma2,
    x: &[f32],
    y: &mut [u8],
    block_bytes: usize,
    quant_weights: &[f32],
    write: impl Fn(&mut [u8], f32, f32, &[u8; QK]),
) {
    let p = AsymmetricImpl {
        nmax,
        sigma2,
        block_bytes,
        write,
    };
    let lanes = L::X2::LANES;
    in_passes::<L, _>(
        x,
        y,
        Some(quant_weights),
        lanes * QK,
        lanes * block_bytes,
        &p,
    );
}

fn write_q4_0(yb: &mut [u8], d: f32, l: &[i8; QK]) {
    write_f16(&mut yb[0..2], d);
    for j in 0..QK / 2 {
        yb[2 + j] = (l[j] as u8) | ((l[j + 16] as u8) << 4);
    }
}

fn write_q4_1(yb: &mut [u8], d: f32, the_min: f32, l: &[u8; QK]) {
    write_f16(&mut yb[0..2], d);
    write_f16(&mut yb[2..4], -the_min);
    for j in 0..QK / 2 {
        yb[4 + j] = l[j] | (l[j + 16] << 4);
    }
}

fn write_q5_0(yb: &mut [u8], d: f32, l: &[i8; QK]) {
    write_f16(&mut yb[0..2], d);
    let levels = l.map(|q| q as u8);
    let (head, qs) = yb.split_at_mut(6);
    pack_5bit(&levels, qs, &mut head[2..6]);
}

fn write_q5_1(yb: &mut [u8], d: f32, the_min: f32, l: &[u8; QK]) {
    write_f16(&mut yb[0..2], d);
    write_f16(&mut yb[2..4], -the_min);
    let (head, qs) = yb.split_at_mut(8);
    pack_5bit(l, qs, &mut head[4..8]);
}

simd_dispatch! {
    /// Every block of `x` quantized as the type's `quantize_row_X_impl` quantizes a row of that one
    /// block (its variance term over the block alone), with `quant_weights` per element: the
    /// blocks of many rows fitted in one call, side by side in lanes, where one call per block
    /// filled one lane of each pass. `None` for a type that is not one of the four legacy ones.
    pub fn quantize_blocks_impl<L>(
        ty: GgmlType,
        x: &[f32],
        y: &mut [u8],
        quant_weights: &[f32],
    ) -> Option<()> {
        match ty {
            GgmlType::Q4_0 => symmetric_impl::<L>(8, Sigma2::PerBlock, x, y, Q4_0_BYTES, quant_weights, write_q4_0),
            GgmlType::Q4_1 => asymmetric_impl::<L>(15, Sigma2::PerBlock, x, y, Q4_1_BYTES, quant_weights, write_q4_1),
            GgmlType::Q5_0 => symmetric_impl::<L>(16, Sigma2::PerBlock, x, y, Q5_0_BYTES, quant_weights, write_q5_0),
            GgmlType::Q5_1 => asymmetric_impl::<L>(31, Sigma2::PerBlock, x, y, Q5_1_BYTES, quant_weights, write_q5_1),
            _ => return None,
        }
        Some(())
    }
}

/// Packs 32 5-bit levels into `qs` (low nibbles, element j and j+16 share a byte) and the `qh` bit
/// word, as the Q5 quantizers of ggml do.
#[inline]
fn pack_5bit(levels: &[u8; QK], qs: &mut [u8], qh_out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let xi0 = levels[j];
        let xi1 = levels[j + QK / 2];
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    qh_out[..4].copy_from_slice(&qh.to_le_bytes());
}

/// The nibble packing of the Q4_0 and Q4_1 reference quantizers: C's `MIN(15, (int8_t)v)` compared as
/// int and stored as `uint8_t`, element `j` in the low nibble of byte `j`, element `j + 16` in its high
/// nibble.
#[inline(always)]
fn pack_4bit_ref(q: &[i32; QK], out: &mut [u8]) {
    for j in 0..QK / 2 {
        let xi0 = (q[j] as i8).min(15) as u8;
        let xi1 = (q[QK / 2 + j] as i8).min(15) as u8;
        out[j] = xi0 | (xi1 << 4);
    }
}

// ===================================== Q4_0 =====================================
// block_q4_0: d (f16) | qs[16] (element j in the low nibble of byte j, element j+16 in its high nibble)

const Q4_0_BYTES: usize = 18;

simd_dispatch! {
    /// Mirrors `quantize_row_q4_0_ref`: `d = max / -8`, levels `min(15, (int8_t)(x/d + 8.5))`.
    pub fn quantize_row_q4_0_ref<L>(x: &[f32], y: &mut [u8]) {
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q4_0_BYTES)) {
            let max = signed_absmax(xb);
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            write_f16(&mut yb[0..2], d);
            let mut v = [0f32; QK];
            for (vj, &xj) in v.iter_mut().zip(xb) {
                *vj = xj * id + 8.5;
            }
            pack_4bit_ref(&c_float_to_int_block(&v), &mut yb[2..]);
        }
    }
}

simd_dispatch! {
    /// Mirrors `quantize_row_q4_0_impl`: per block, `make_qx_quants(32, 8, x, L, 1, w)` with
    /// `w = imatrix * sqrt(sigma2 + x²)`.
    pub fn quantize_row_q4_0_impl<L>(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
        symmetric_impl::<L>(8, Sigma2::Row(row_sigma2(x)), x, y, Q4_0_BYTES, quant_weights, write_q4_0);
    }
}

/// Mirrors `dequantize_row_q4_0`: `(q - 8) * d`.
///
/// Not dispatched per SIMD level: the compiler vectorizes it best for the baseline target
/// (2100 against 1450-1800 Mw/s built for AVX2/AVX-512 in `cargo bench --bench codecs`).
pub fn dequantize_row_q4_0(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q4_0_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[2 + j];
            lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

// ===================================== Q4_1 =====================================
// block_q4_1: d (f16) | m (f16) | qs[16]

const Q4_1_BYTES: usize = 20;

simd_dispatch! {
    /// Mirrors `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`, levels
    /// `min(15, (int8_t)((x - min)/d + 0.5))`.
    pub fn quantize_row_q4_1_ref<L>(x: &[f32], y: &mut [u8]) {
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q4_1_BYTES)) {
            let (min, max) = min_max(xb);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            write_f16(&mut yb[0..2], d);
            write_f16(&mut yb[2..4], min);
            let mut v = [0f32; QK];
            for (vj, &xj) in v.iter_mut().zip(xb) {
                *vj = (xj - min) * id + 0.5;
            }
            pack_4bit_ref(&c_float_to_int_block(&v), &mut yb[4..]);
        }
    }
}

simd_dispatch! {
    /// Mirrors `quantize_row_q4_1_impl`: per block, `make_qkx3_quants(32, 15, x, w, L, &min, Laux, -0.9,
    /// 0.05, 36, false)` with `w = imatrix * sqrt(sigma2 + x²)`; stores `d` and `m = -min`.
    pub fn quantize_row_q4_1_impl<L>(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
        asymmetric_impl::<L>(15, Sigma2::Row(row_sigma2(x)), x, y, Q4_1_BYTES, quant_weights, write_q4_1);
    }
}

/// Mirrors `dequantize_row_q4_1`: `q * d + m`.
///
/// Not dispatched per SIMD level: the compiler vectorizes it best for the baseline target
/// (2100 against 1450-1800 Mw/s built for AVX2/AVX-512 in `cargo bench --bench codecs`).
pub fn dequantize_row_q4_1(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q4_1_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let m = read_f16(&xb[2..4]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[4 + j];
            lo[j] = (q & 0x0F) as f32 * d + m;
            hi[j] = (q >> 4) as f32 * d + m;
        }
    }
}

// ===================================== Q5_0 =====================================
// block_q5_0: d (f16) | qh[4] (bit j = fifth bit of element j) | qs[16]

const Q5_0_BYTES: usize = 22;

simd_dispatch! {
    /// Mirrors `quantize_row_q5_0_ref`: `d = max / -16`, levels `min(31, (int8_t)(x/d + 16.5))`.
    pub fn quantize_row_q5_0_ref<L>(x: &[f32], y: &mut [u8]) {
        let mut levels = [0u8; QK];
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q5_0_BYTES)) {
            let max = signed_absmax(xb);
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            write_f16(&mut yb[0..2], d);
            let mut v = [0f32; QK];
            for (vj, &xj) in v.iter_mut().zip(xb) {
                *vj = xj * id + 16.5;
            }
            let q = c_float_to_int_block(&v);
            for (level, &qj) in levels.iter_mut().zip(&q) {
                *level = (qj as i8).min(31) as u8;
            }
            let (head, qs) = yb.split_at_mut(6);
            pack_5bit(&levels, qs, &mut head[2..6]);
        }
    }
}

/// Reads the `qh` word of a Q5 block.
#[inline]
fn read_qh(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

simd_dispatch! {
    /// Mirrors `quantize_row_q5_0_impl`: per block, `make_qx_quants(32, 16, x, L, 1, w)` with
    /// `w = imatrix * sqrt(sigma2 + x²)`.
    pub fn quantize_row_q5_0_impl<L>(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
        symmetric_impl::<L>(16, Sigma2::Row(row_sigma2(x)), x, y, Q5_0_BYTES, quant_weights, write_q5_0);
    }
}

simd_dispatch! {
    /// Mirrors `dequantize_row_q5_0`: `(q - 16) * d`.
    pub fn dequantize_row_q5_0<L>(x: &[u8], y: &mut [f32]) {
        for (xb, yb) in x.chunks_exact(Q5_0_BYTES).zip(y.chunks_exact_mut(QK)) {
            let d = read_f16(&xb[0..2]);
            let qh = read_qh(&xb[2..6]);
            let (lo, hi) = yb.split_at_mut(QK / 2);
            for j in 0..QK / 2 {
                let q = xb[6 + j];
                let xh_0 = ((qh >> j) << 4) & 0x10;
                let xh_1 = (qh >> (j + 12)) & 0x10;
                lo[j] = (((q & 0x0F) as u32 | xh_0) as i32 - 16) as f32 * d;
                hi[j] = (((q >> 4) as u32 | xh_1) as i32 - 16) as f32 * d;
            }
        }
    }
}

// ===================================== Q5_1 =====================================
// block_q5_1: d (f16) | m (f16) | qh[4] | qs[16]

const Q5_1_BYTES: usize = 24;

simd_dispatch! {
    /// Mirrors `quantize_row_q5_1_ref`: `d = (max - min) / 31`, `m = min`, levels
    /// `(uint8_t)((x - min)/d + 0.5)` (no clamp in ggml).
    pub fn quantize_row_q5_1_ref<L>(x: &[f32], y: &mut [u8]) {
        let mut levels = [0u8; QK];
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q5_1_BYTES)) {
            let (min, max) = min_max(xb);
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            write_f16(&mut yb[0..2], d);
            write_f16(&mut yb[2..4], min);
            let mut v = [0f32; QK];
            for (vj, &xj) in v.iter_mut().zip(xb) {
                *vj = (xj - min) * id + 0.5;
            }
            let q = c_float_to_int_block(&v);
            for (level, &qj) in levels.iter_mut().zip(&q) {
                *level = qj as u8;
            }
            let (head, qs) = yb.split_at_mut(8);
            pack_5bit(&levels, qs, &mut head[4..8]);
        }
    }
}

simd_dispatch! {
    /// Mirrors `quantize_row_q5_1_impl`: per block, `make_qkx3_quants(32, 31, x, w, L, &min, Laux, -0.9,
    /// 0.05, 36, false)` with `w = imatrix * sqrt(sigma2 + x²)`; stores `d` and `m = -min`.
    pub fn quantize_row_q5_1_impl<L>(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
        asymmetric_impl::<L>(31, Sigma2::Row(row_sigma2(x)), x, y, Q5_1_BYTES, quant_weights, write_q5_1);
    }
}

simd_dispatch! {
    /// Mirrors `dequantize_row_q5_1`: `q * d + m`.
    pub fn dequantize_row_q5_1<L>(x: &[u8], y: &mut [f32]) {
        for (xb, yb) in x.chunks_exact(Q5_1_BYTES).zip(y.chunks_exact_mut(QK)) {
            let d = read_f16(&xb[0..2]);
            let m = read_f16(&xb[2..4]);
            let qh = read_qh(&xb[4..8]);
            let (lo, hi) = yb.split_at_mut(QK / 2);
            for j in 0..QK / 2 {
                let q = xb[8 + j];
                let xh_0 = ((qh >> j) << 4) & 0x10;
                let xh_1 = (qh >> (j + 12)) & 0x10;
                lo[j] = ((q & 0x0F) as u32 | xh_0) as f32 * d + m;
                hi[j] = ((q >> 4) as u32 | xh_1) as f32 * d + m;
            }
        }
    }
}

// ===================================== Q8_0 =====================================
// block_q8_0: d (f16) | qs[32] (int8). ggml has no importance-weighted Q8_0: `quantize_q8_0` ignores
// the imatrix.

const Q8_0_BYTES: usize = 34;

/// The scale and levels of one Q8_0/Q8_1 block as their reference quantizers compute them:
/// `d = amax / 127`, `q = roundf(x / d)` (ties away from zero).
#[inline(always)]
fn q8_block<L: Level>(xb: &[f32]) -> (f32, [i32; QK]) {
    let amax = c_absmax::<L>(xb);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut v = [0f32; QK];
    for (vj, &xj) in v.iter_mut().zip(xb) {
        *vj = xj * id;
    }
    (d, c_round_to_int_block(&v))
}

simd_dispatch! {
    /// Mirrors `quantize_row_q8_0_ref`: `d = amax / 127`, `q = roundf(x / d)` (ties away from zero).
    pub fn quantize_row_q8_0_ref<L>(x: &[f32], y: &mut [u8]) {
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_0_BYTES)) {
            let (d, q) = q8_block::<L>(xb);
            write_f16(&mut yb[0..2], d);
            for (out, &qj) in yb[2..].iter_mut().zip(&q) {
                *out = qj as u8;
            }
        }
    }
}

simd_dispatch! {
    /// Mirrors `dequantize_row_q8_0`: `q * d`.
    pub fn dequantize_row_q8_0<L>(x: &[u8], y: &mut [f32]) {
        for (xb, yb) in x.chunks_exact(Q8_0_BYTES).zip(y.chunks_exact_mut(QK)) {
            let d = read_f16(&xb[0..2]);
            for (out, &q) in yb.iter_mut().zip(&xb[2..]) {
                *out = (q as i8) as f32 * d;
            }
        }
    }
}

// ===================================== Q8_1 =====================================
// block_q8_1: d (f16) | s = d * Σq (f16) | qs[32]. ggml has no `to_float` for Q8_1 (it only feeds dot
// products), so only the quantizer exists here.

const Q8_1_BYTES: usize = 36;

simd_dispatch! {
    /// Mirrors `quantize_row_q8_1_ref`: as Q8_0, plus `s = Σq * d`.
    pub fn quantize_row_q8_1_ref<L>(x: &[f32], y: &mut [u8]) {
        for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_1_BYTES)) {
            let (d, q) = q8_block::<L>(xb);
            write_f16(&mut yb[0..2], d);
            let mut sum = 0i32;
            for (out, &qj) in yb[4..].iter_mut().zip(&q) {
                *out = qj as u8;
                sum += (qj as i8) as i32;
            }
            write_f16(&mut yb[2..4], sum as f32 * d);
        }
    }
}

/// Q4_0's entry in the type table.
pub const Q4_0: Codec = Codec {
    dequantize: Some(dequantize_row_q4_0),
    quantize: Some(quantize_row_q4_0_ref),
    quantize_imatrix: Some(quantize_row_q4_0_impl),
};

/// Q4_1's entry in the type table.
pub const Q4_1: Codec = Codec {
    dequantize: Some(dequantize_row_q4_1),
    quantize: Some(quantize_row_q4_1_ref),
    quantize_imatrix: Some(quantize_row_q4_1_impl),
};

/// Q5_0's entry in the type table.
pub const Q5_0: Codec = Codec {
    dequantize: Some(dequantize_row_q5_0),
    quantize: Some(quantize_row_q5_0_ref),
    quantize_imatrix: Some(quantize_row_q5_0_impl),
};

/// Q5_1's entry in the type table.
pub const Q5_1: Codec = Codec {
    dequantize: Some(dequantize_row_q5_1),
    quantize: Some(quantize_row_q5_1_ref),
    quantize_imatrix: Some(quantize_row_q5_1_impl),
};

/// Q8_0's entry in the type table (`quantize_q8_0` ignores an imatrix).
pub const Q8_0: Codec = Codec {
    dequantize: Some(dequantize_row_q8_0),
    quantize: Some(quantize_row_q8_0_ref),
    quantize_imatrix: None,
};

/// Q8_1's entry in the type table: quantize only, like ggml (no `to_float`, no imatrix variant).
pub const Q8_1: Codec = Codec {
    dequantize: None,
    quantize: Some(quantize_row_q8_1_ref),
    quantize_imatrix: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's loop, restated plainly.
    fn sequential_min_max(x: &[f32]) -> (f32, f32) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        (min, max)
    }

    #[test]
    fn lane_signed_absmax_picks_the_first_extreme_like_ggml() {
        let mut state = 11u32;
        for _ in 0..3000 {
            let mut block = [0f32; QK];
            for v in block.iter_mut() {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                // Few distinct magnitudes of both signs, so ties between +m and -m are common.
                let m = [0.0f32, 1.5, 2.0, 1e-40][((state >> 20) % 4) as usize];
                *v = if state >> 31 == 0 { m } else { -m };
            }
            let (a, b) = (
                signed_absmax(&block),
                crate::quant::search::first_absmax(&block).0,
            );
            assert_eq!(a.to_bits(), b.to_bits(), "{block:?}");
        }
    }

    #[test]
    fn lane_min_max_keeps_the_sign_of_the_first_zero_like_ggml() {
        let mut state = 7u32;
        for case in 0..2000 {
            let mut block = [0f32; QK];
            for v in block.iter_mut() {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *v = match (state >> 24) % 5 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => (state >> 8) as f32 / 1e6,
                    3 => -((state >> 8) as f32) / 1e6,
                    _ => f32::MAX,
                };
            }
            if case % 3 == 0 {
                // Zero (of either sign, kept) is the minimum.
                block
                    .iter_mut()
                    .filter(|v| **v != 0.0)
                    .for_each(|v| *v = v.abs());
            } else if case % 3 == 1 {
                // Zero (of either sign, kept) is the maximum.
                block
                    .iter_mut()
                    .filter(|v| **v != 0.0)
                    .for_each(|v| *v = -v.abs());
            }
            let (a, b) = (min_max(&block), sequential_min_max(&block));
            assert_eq!(
                (a.0.to_bits(), a.1.to_bits()),
                (b.0.to_bits(), b.1.to_bits()),
                "{block:?}"
            );
        }
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        use crate::quant::simd::{with_level, SimdLevel};
        // 11 and 45 blocks per row: passes of 16 or 32 blocks end padded.
        let x: Vec<f32> = (0..45 * 32 * 12)
            .map(|i| (((i * 2654435761usize) % 10007) as f32 / 5000.0 - 1.0) * (1 + i % 7) as f32)
            .collect();
        let w: Vec<f32> = (0..45 * 32).map(|i| (i % 5) as f32 * 0.7).collect();
        let levels: Vec<SimdLevel> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect();
        let same_at_every_level = |run: &dyn Fn() -> Vec<u8>, what: &str| {
            let portable = with_level(SimdLevel::Portable, run);
            for &level in &levels {
                assert!(with_level(level, run) == portable, "{what} at {level}");
            }
        };
        type Impl = fn(&[f32], &mut [u8], &[f32]);
        type Ref = fn(&[f32], &mut [u8]);
        let impls: [(Impl, Ref, usize); 4] = [
            (quantize_row_q4_0_impl, quantize_row_q4_0_ref, Q4_0_BYTES),
            (quantize_row_q4_1_impl, quantize_row_q4_1_ref, Q4_1_BYTES),
            (quantize_row_q5_0_impl, quantize_row_q5_0_ref, Q5_0_BYTES),
            (quantize_row_q5_1_impl, quantize_row_q5_1_ref, Q5_1_BYTES),
        ];
        for n_per_row in [11 * 32, 45 * 32] {
            for (f, r, bytes) in impls {
                let row_bytes = n_per_row / QK * bytes;
                let run = || {
                    let mut y = vec![0u8; x.len() / n_per_row * row_bytes];
                    for (xr, yr) in x.chunks(n_per_row).zip(y.chunks_mut(row_bytes)) {
                        f(xr, yr, &w[..n_per_row]);
                    }
                    y
                };
                same_at_every_level(&run, "impl");
                let run = || {
                    let mut y = vec![0u8; x.len() / QK * bytes];
                    r(&x, &mut y);
                    y
                };
                same_at_every_level(&run, "ref");
            }
        }
        let run = || {
            let mut y = vec![0u8; x.len() / QK * Q8_0_BYTES];
            quantize_row_q8_0_ref(&x, &mut y);
            y
        };
        same_at_every_level(&run, "q8_0");
        // Dequantization, on random bytes with finite scales.
        type Deq = fn(&[u8], &mut [f32]);
        let deqs: [(Deq, usize); 5] = [
            (dequantize_row_q4_0, Q4_0_BYTES),
            (dequantize_row_q4_1, Q4_1_BYTES),
            (dequantize_row_q5_0, Q5_0_BYTES),
            (dequantize_row_q5_1, Q5_1_BYTES),
            (dequantize_row_q8_0, Q8_0_BYTES),
        ];
        for (deq, bytes) in deqs {
            let b: Vec<u8> = (0..bytes * 64)
                .map(|i| ((i * 2654435761usize) >> 7) as u8)
                .enumerate()
                .map(|(i, b)| {
                    if i % bytes == 1 || i % bytes == 3 {
                        b & 0x7B
                    } else {
                        b
                    }
                })
                .collect();
            let run = || {
                let mut y = vec![0f32; 64 * QK];
                deq(&b, &mut y);
                y.iter()
                    .flat_map(|v| v.to_bits().to_le_bytes())
                    .collect::<Vec<_>>()
            };
            same_at_every_level(&run, "dequantize");
        }
    }
}
