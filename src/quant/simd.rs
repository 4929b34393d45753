//! The one run-time SIMD dispatch of the codecs, and the lane vectors their searches run on.
//!
//! Three levels ([`SimdLevel`]): portable (baseline x86-64, or whatever the target has), AVX2 and
//! AVX-512 (F, VL, BW and DQ). [`simd_dispatch!`] compiles a row function once per level and picks,
//! at each call, the best level the CPU has ([`detected`]), capped on the calling thread by
//! [`with_level`] (which is how tests pin every level to the same bits and benchmarks time each).
//!
//! Same bits at every level. The codecs run independent groups (sub-blocks, blocks) side by side,
//! one group per lane, each lane doing exactly ggml's scalar operations in ggml's order; a level only
//! changes how many lanes one instruction covers. Every lane operation is an IEEE-754 single
//! operation with round-to-nearest-even (add, sub, mul, div, sqrt) or exact (compare, select, min/max
//! with C's `a < b ? a : b` operand order, abs, negation); Rust never contracts `a * b + c` into an
//! FMA, at any level. Where a vector form is not obviously the scalar one (ggml's `nearest_int`
//! rounding trick) its doc says why it is.
//!
//! The vectors ([`F32s`]) are thin wrappers over `std::arch` rather than a portable-SIMD crate: what
//! has to be pinned here is the exact instruction behind each operation (operand order of min/max,
//! NaN and signed-zero behaviour, no reassociation), and a wrapper per instruction keeps that visible
//! and reviewable. [`Pair`] puts two vectors side by side so that two independent dependency chains
//! are in flight (a sum over a group is a chain of adds that must stay in order).

// Lane loops index several arrays in step.
#![allow(clippy::needless_range_loop)]

use std::cell::Cell;
use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Not, Sub};

/// A SIMD dispatch level, from narrowest to widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The target's baseline instruction set (SSE2 on x86-64).
    Portable,
    /// AVX2 (256-bit vectors).
    Avx2,
    /// AVX-512 F, VL, BW and DQ (512-bit vectors).
    Avx512,
}

impl SimdLevel {
    /// Every level, narrowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512];

    /// `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run code built for this level.
    pub fn is_supported(self) -> bool {
        self <= detected()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU supports.
#[inline]
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        // Each macro call is a cached load and a bit test.
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

thread_local! {
    /// The widest level dispatch may pick on this thread. Per thread, so that tests running side by
    /// side do not switch each other's builds.
    static CAP: Cell<SimdLevel> = const { Cell::new(SimdLevel::Avx512) };
}

/// The level [`simd_dispatch!`] functions run at on this thread now: the detected one, capped by
/// [`with_level`].
#[inline]
pub fn active() -> SimdLevel {
    detected().min(CAP.with(Cell::get))
}

/// Runs `f` with the codecs on this thread capped at `level` (the CPU's own limit still applies: ask
/// [`SimdLevel::is_supported`]). Only the calling thread is affected, not rayon's workers, so call
/// row functions directly (or on a one-thread pool) inside `f`. For tests that pin every level to the
/// same bits and for benchmarks that time each level.
pub fn with_level<R>(level: SimdLevel, f: impl FnOnce() -> R) -> R {
    struct Restore(SimdLevel);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(level)));
    f()
}

/// A set of lanes selected by a comparison.
pub(crate) trait Mask:
    Copy + BitAnd<Output = Self> + BitOr<Output = Self> + Not<Output = Self>
{
    /// Whether any lane is set.
    fn any(self) -> bool;
}

/// `LANES` f32 lanes, each operation lane-wise and exactly the scalar IEEE operation of the same name
/// (see the module doc).
pub(crate) trait F32s:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const LANES: usize;
    type Mask: Mask;
    fn splat(v: f32) -> Self;
    /// The first `LANES` values of `s`.
    fn load(s: &[f32]) -> Self;
    /// Into the first `LANES` values of `s`.
    fn store(self, s: &mut [f32]);
    /// Lane `k` from `s[k * stride]`.
    fn gather(s: &[f32], stride: usize) -> Self;
    /// Lanes holding small non-negative integers (levels) into the first `LANES` bytes of `out`.
    fn store_levels(self, out: &mut [u8]);
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    /// `if self < o { self } else { o }` (so `o` when either is NaN or both are zero).
    fn min_c(self, o: Self) -> Self;
    /// `if self > o { self } else { o }`.
    fn max_c(self, o: Self) -> Self;
    fn lt(self, o: Self) -> Self::Mask;
    fn le(self, o: Self) -> Self::Mask;
    fn gt(self, o: Self) -> Self::Mask;
    fn eq(self, o: Self) -> Self::Mask;
    /// C's `!=`: true when unordered (so `x.ne(x)` finds NaNs).
    fn ne(self, o: Self) -> Self::Mask;
    /// `a` where `m` is set, `b` elsewhere.
    fn select(m: Self::Mask, a: Self, b: Self) -> Self;
    /// ggml's `nearest_int(v)` clamped to `lo..=hi`, as a float: exact for every input, including
    /// the meaningless results ggml gets out of range (`|v| > 4194303`, infinities, NaN).
    fn nearest_clamp(self, lo: i32, hi: i32) -> Self;
    /// `v` rounded to the nearest integer, ties to even; may give `-0.0`. Equals `nearest_int` only
    /// for `|v| <= 4194303` ([`NEAREST_INT_EXACT`]): callers check their range first.
    fn round_ne(self) -> Self;
}

/// Below this magnitude ggml's `nearest_int(v)` is the round-to-nearest-even integer of `v`.
pub(crate) const NEAREST_INT_EXACT: f32 = 4_194_303.0;

/// ggml's `nearest_int` magic constant, 1.5·2²³.
const MAGIC: f32 = 12_582_912.0;

/// A compile-time choice of level for a codec body (see [`simd_dispatch!`]): the vector types the
/// body runs its groups on.
pub(crate) trait Level {
    /// One register's worth of lanes (8 for portable and AVX2, 16 for AVX-512).
    type X1: F32s;
    /// Two registers side by side: twice the lanes, two dependency chains in flight.
    type X2: F32s;
    /// Sixteen lanes at every level (one AVX-512 register, two AVX or portable ones): for bodies
    /// whose lane count is fixed by their data layout rather than by the register width.
    type X16: F32s;
}

/// The portable level: lanes are plain arrays, vectorized by the compiler for the baseline target.
pub(crate) struct Portable;

impl Level for Portable {
    type X1 = P8;
    type X2 = Pair<P8>;
    type X16 = Pair<P8>;
}

// ------------------------------------ portable lanes ------------------------------------
// Plain loops rather than `array::map`/`from_fn` closures: everything on a codec's hot path must be
// inlined into the function [`simd_dispatch!`] compiled for the level, and a closure is a separate
// function the compiler may leave out of line (compiled for the baseline target).

/// Eight lanes as an array; every operation is a per-lane loop of the scalar operation.
#[derive(Clone, Copy)]
pub(crate) struct P8([f32; 8]);

/// The mask of a [`P8`]: all-ones lanes where true (integer lanes and bit operations, which the
/// compiler vectorizes, where `bool` lanes come out as scalar branches).
#[derive(Clone, Copy)]
pub(crate) struct P8Mask([u32; 8]);

macro_rules! p8_mask_binop {
    ($tr:ident, $f:ident, $op:tt) => {
        impl $tr for P8Mask {
            type Output = P8Mask;
            #[inline(always)]
            fn $f(self, o: P8Mask) -> P8Mask {
                let mut r = [0u32; 8];
                for k in 0..8 {
                    r[k] = self.0[k] $op o.0[k];
                }
                P8Mask(r)
            }
        }
    };
}
p8_mask_binop!(BitAnd, bitand, &);
p8_mask_binop!(BitOr, bitor, |);

impl Not for P8Mask {
    type Output = P8Mask;
    #[inline(always)]
    fn not(self) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = !self.0[k];
        }
        P8Mask(r)
    }
}

impl Mask for P8Mask {
    #[inline(always)]
    fn any(self) -> bool {
        let mut r = 0u32;
        for k in 0..8 {
            r |= self.0[k];
        }
        r != 0
    }
}

/// All ones where `t`.
#[inline(always)]
fn lane_mask(t: bool) -> u32 {
    (t as u32).wrapping_neg()
}

macro_rules! p8_binop {
    ($tr:ident, $f:ident, $op:tt) => {
        impl $tr for P8 {
            type Output = P8;
            #[inline(always)]
            fn $f(self, o: P8) -> P8 {
                let mut r = [0f32; 8];
                for k in 0..8 {
                    r[k] = self.0[k] $op o.0[k];
                }
                P8(r)
            }
        }
    };
}
p8_binop!(Add, add, +);
p8_binop!(Sub, sub, -);
p8_binop!(Mul, mul, *);
p8_binop!(Div, div, /);

impl Neg for P8 {
    type Output = P8;
    #[inline(always)]
    fn neg(self) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = -self.0[k];
        }
        P8(r)
    }
}

impl F32s for P8 {
    const LANES: usize = 8;
    type Mask = P8Mask;
    #[inline(always)]
    fn splat(v: f32) -> P8 {
        P8([v; 8])
    }
    #[inline(always)]
    fn load(s: &[f32]) -> P8 {
        P8(s[..8].try_into().expect("eight lanes"))
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        s[..8].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn gather(s: &[f32], stride: usize) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = s[k * stride];
        }
        P8(r)
    }
    #[inline(always)]
    fn store_levels(self, out: &mut [u8]) {
        let out = &mut out[..8];
        for k in 0..8 {
            out[k] = self.0[k] as u8;
        }
    }
    #[inline(always)]
    fn sqrt(self) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = self.0[k].sqrt();
        }
        P8(r)
    }
    #[inline(always)]
    fn abs(self) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = self.0[k].abs();
        }
        P8(r)
    }
    #[inline(always)]
    fn min_c(self, o: P8) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = if self.0[k] < o.0[k] {
                self.0[k]
            } else {
                o.0[k]
            };
        }
        P8(r)
    }
    #[inline(always)]
    fn max_c(self, o: P8) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = if self.0[k] > o.0[k] {
                self.0[k]
            } else {
                o.0[k]
            };
        }
        P8(r)
    }
    #[inline(always)]
    fn lt(self, o: P8) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = lane_mask(self.0[k] < o.0[k]);
        }
        P8Mask(r)
    }
    #[inline(always)]
    fn le(self, o: P8) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = lane_mask(self.0[k] <= o.0[k]);
        }
        P8Mask(r)
    }
    #[inline(always)]
    fn gt(self, o: P8) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = lane_mask(self.0[k] > o.0[k]);
        }
        P8Mask(r)
    }
    #[inline(always)]
    fn eq(self, o: P8) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = lane_mask(self.0[k] == o.0[k]);
        }
        P8Mask(r)
    }
    #[inline(always)]
    fn ne(self, o: P8) -> P8Mask {
        let mut r = [0u32; 8];
        for k in 0..8 {
            r[k] = lane_mask(self.0[k] != o.0[k]);
        }
        P8Mask(r)
    }
    #[inline(always)]
    fn select(m: P8Mask, a: P8, b: P8) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = f32::from_bits((a.0[k].to_bits() & m.0[k]) | (b.0[k].to_bits() & !m.0[k]));
        }
        P8(r)
    }
    #[inline(always)]
    fn nearest_clamp(self, lo: i32, hi: i32) -> P8 {
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = super::search::nearest_int(self.0[k]).clamp(lo, hi) as f32;
        }
        P8(r)
    }
    #[inline(always)]
    fn round_ne(self) -> P8 {
        // Adding 1.5·2²³ leaves no fraction bits for |v| < 2²², so the add rounds (ties to even)
        // and the subtraction is exact; never gives -0.0.
        let mut r = [0f32; 8];
        for k in 0..8 {
            r[k] = (self.0[k] + MAGIC) - MAGIC;
        }
        P8(r)
    }
}

// ------------------------------------ pairs ------------------------------------

/// Two vectors side by side: lanes `0..V::LANES` in the first, the rest in the second.
#[derive(Clone, Copy)]
pub(crate) struct Pair<V>(V, V);

macro_rules! pair_binop {
    ($tr:ident, $f:ident) => {
        impl<V: F32s> $tr for Pair<V> {
            type Output = Pair<V>;
            #[inline(always)]
            fn $f(self, o: Pair<V>) -> Pair<V> {
                Pair(self.0.$f(o.0), self.1.$f(o.1))
            }
        }
    };
}
pair_binop!(Add, add);
pair_binop!(Sub, sub);
pair_binop!(Mul, mul);
pair_binop!(Div, div);

impl<V: F32s> Neg for Pair<V> {
    type Output = Pair<V>;
    #[inline(always)]
    fn neg(self) -> Pair<V> {
        Pair(-self.0, -self.1)
    }
}

impl<V: F32s> F32s for Pair<V> {
    const LANES: usize = 2 * V::LANES;
    type Mask = PairMask<V::Mask>;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Pair(V::splat(v), V::splat(v))
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        Pair(V::load(s), V::load(&s[V::LANES..]))
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        self.0.store(s);
        self.1.store(&mut s[V::LANES..]);
    }
    #[inline(always)]
    fn gather(s: &[f32], stride: usize) -> Self {
        Pair(
            V::gather(s, stride),
            V::gather(&s[V::LANES * stride..], stride),
        )
    }
    #[inline(always)]
    fn store_levels(self, out: &mut [u8]) {
        self.0.store_levels(out);
        self.1.store_levels(&mut out[V::LANES..]);
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Pair(self.0.sqrt(), self.1.sqrt())
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Pair(self.0.abs(), self.1.abs())
    }
    #[inline(always)]
    fn min_c(self, o: Self) -> Self {
        Pair(self.0.min_c(o.0), self.1.min_c(o.1))
    }
    #[inline(always)]
    fn max_c(self, o: Self) -> Self {
        Pair(self.0.max_c(o.0), self.1.max_c(o.1))
    }
    #[inline(always)]
    fn lt(self, o: Self) -> Self::Mask {
        PairMask(self.0.lt(o.0), self.1.lt(o.1))
    }
    #[inline(always)]
    fn le(self, o: Self) -> Self::Mask {
        PairMask(self.0.le(o.0), self.1.le(o.1))
    }
    #[inline(always)]
    fn gt(self, o: Self) -> Self::Mask {
        PairMask(self.0.gt(o.0), self.1.gt(o.1))
    }
    #[inline(always)]
    fn eq(self, o: Self) -> Self::Mask {
        PairMask(self.0.eq(o.0), self.1.eq(o.1))
    }
    #[inline(always)]
    fn ne(self, o: Self) -> Self::Mask {
        PairMask(self.0.ne(o.0), self.1.ne(o.1))
    }
    #[inline(always)]
    fn select(m: Self::Mask, a: Self, b: Self) -> Self {
        Pair(V::select(m.0, a.0, b.0), V::select(m.1, a.1, b.1))
    }
    #[inline(always)]
    fn nearest_clamp(self, lo: i32, hi: i32) -> Self {
        Pair(self.0.nearest_clamp(lo, hi), self.1.nearest_clamp(lo, hi))
    }
    #[inline(always)]
    fn round_ne(self) -> Self {
        Pair(self.0.round_ne(), self.1.round_ne())
    }
}

/// The mask of a [`Pair`].
#[derive(Clone, Copy)]
pub(crate) struct PairMask<M>(M, M);

impl<M: Mask> BitAnd for PairMask<M> {
    type Output = Self;
    #[inline(always)]
    fn bitand(self, o: Self) -> Self {
        PairMask(self.0 & o.0, self.1 & o.1)
    }
}

impl<M: Mask> BitOr for PairMask<M> {
    type Output = Self;
    #[inline(always)]
    fn bitor(self, o: Self) -> Self {
        PairMask(self.0 | o.0, self.1 | o.1)
    }
}

impl<M: Mask> Not for PairMask<M> {
    type Output = Self;
    #[inline(always)]
    fn not(self) -> Self {
        PairMask(!self.0, !self.1)
    }
}

impl<M: Mask> Mask for PairMask<M> {
    #[inline(always)]
    fn any(self) -> bool {
        (self.0 | self.1).any()
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

/// The AVX2 and AVX-512 lanes. Their values exist only inside functions compiled for the matching
/// target feature by [`simd_dispatch!`], after [`active`] has checked the CPU: that is the safety
/// argument of every `unsafe` intrinsic call below (loads and stores also check their slice).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{F32s, Level, Mask, Pair, MAGIC};
    use std::arch::x86_64::*;
    use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Not, Sub};

    /// The AVX2 level.
    pub(crate) struct Avx2;

    impl Level for Avx2 {
        type X1 = Ymm;
        type X2 = Pair<Ymm>;
        type X16 = Pair<Ymm>;
    }

    /// The AVX-512 level.
    pub(crate) struct Avx512;

    impl Level for Avx512 {
        type X1 = Zmm;
        type X2 = Pair<Zmm>;
        type X16 = Zmm;
    }

    /// Eight lanes in an AVX register.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm(__m256);

    /// An AVX comparison result: all-ones lanes where true.
    #[derive(Clone, Copy)]
    pub(crate) struct YmmMask(__m256);

    /// Sixteen lanes in an AVX-512 register.
    #[derive(Clone, Copy)]
    pub(crate) struct Zmm(__m512);

    macro_rules! binop {
        ($ty:ident, $tr:ident, $f:ident, $intr:ident) => {
            impl $tr for $ty {
                type Output = $ty;
                #[inline(always)]
                fn $f(self, o: $ty) -> $ty {
                    // SAFETY: see the module doc (the CPU has the feature).
                    $ty(unsafe { $intr(self.0, o.0) })
                }
            }
        };
    }
    binop!(Ymm, Add, add, _mm256_add_ps);
    binop!(Ymm, Sub, sub, _mm256_sub_ps);
    binop!(Ymm, Mul, mul, _mm256_mul_ps);
    binop!(Ymm, Div, div, _mm256_div_ps);
    binop!(Zmm, Add, add, _mm512_add_ps);
    binop!(Zmm, Sub, sub, _mm512_sub_ps);
    binop!(Zmm, Mul, mul, _mm512_mul_ps);
    binop!(Zmm, Div, div, _mm512_div_ps);
    binop!(YmmMask, BitAnd, bitand, _mm256_and_ps);
    binop!(YmmMask, BitOr, bitor, _mm256_or_ps);

    impl Not for YmmMask {
        type Output = YmmMask;
        #[inline(always)]
        fn not(self) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_xor_ps(self.0, _mm256_castsi256_ps(_mm256_set1_epi32(-1))) })
        }
    }

    impl Mask for YmmMask {
        #[inline(always)]
        fn any(self) -> bool {
            // SAFETY: see the module doc.
            unsafe { _mm256_movemask_ps(self.0) != 0 }
        }
    }

    impl Mask for __mmask16 {
        #[inline(always)]
        fn any(self) -> bool {
            self != 0
        }
    }

    impl Neg for Ymm {
        type Output = Ymm;
        #[inline(always)]
        fn neg(self) -> Ymm {
            // SAFETY: see the module doc. Flips the sign bit, as C's unary minus does.
            Ymm(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
        }
    }

    impl Neg for Zmm {
        type Output = Zmm;
        #[inline(always)]
        fn neg(self) -> Zmm {
            // SAFETY: see the module doc. Flips the sign bit, as C's unary minus does.
            Zmm(unsafe {
                _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(self.0),
                    _mm512_set1_epi32(i32::MIN),
                ))
            })
        }
    }

    /// `nearest_int` exactly as ggml computes it (add 1.5·2²³, keep the low 23 bits, subtract 2²²),
    /// clamped and converted back: the integer steps are the scalar function's, lane by lane.
    macro_rules! nearest_clamp {
        ($v:expr, $lo:expr, $hi:expr, $add:ident, $set1_ps:ident, $cast_i:ident, $and:ident,
         $set1_epi32:ident, $sub:ident, $max:ident, $min:ident, $cvt:ident) => {{
            let bits = $cast_i($add($v, $set1_ps(MAGIC)));
            let q = $sub(
                $and(bits, $set1_epi32(0x007f_ffff)),
                $set1_epi32(0x0040_0000),
            );
            $cvt($min($max(q, $set1_epi32($lo)), $set1_epi32($hi)))
        }};
    }

    impl F32s for Ymm {
        const LANES: usize = 8;
        type Mask = YmmMask;
        #[inline(always)]
        fn splat(v: f32) -> Ymm {
            // SAFETY: see the module doc.
            Ymm(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Ymm {
            assert!(s.len() >= 8, "eight lanes");
            // SAFETY: eight floats are readable at s (checked); the CPU has AVX.
            Ymm(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, s: &mut [f32]) {
            assert!(s.len() >= 8, "eight lanes");
            // SAFETY: eight floats are writable at s (checked); the CPU has AVX.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn gather(s: &[f32], stride: usize) -> Ymm {
            assert!(
                stride <= 1 << 20 && s.len() > 7 * stride,
                "eight strided lanes"
            );
            // SAFETY: lane k reads s[k * stride], inside s (checked); the CPU has AVX2.
            Ymm(unsafe {
                let idx = _mm256_mullo_epi32(
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    _mm256_set1_epi32(stride as i32),
                );
                _mm256_i32gather_ps::<4>(s.as_ptr(), idx)
            })
        }
        #[inline(always)]
        fn store_levels(self, out: &mut [u8]) {
            let mut q = [0i32; 8];
            // SAFETY: eight i32 are writable at q; the CPU has AVX. Levels are exact integers.
            unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), _mm256_cvttps_epi32(self.0)) };
            let out = &mut out[..8];
            for k in 0..8 {
                out[k] = q[k] as u8;
            }
        }
        #[inline(always)]
        fn sqrt(self) -> Ymm {
            // SAFETY: see the module doc.
            Ymm(unsafe { _mm256_sqrt_ps(self.0) })
        }
        #[inline(always)]
        fn abs(self) -> Ymm {
            // SAFETY: see the module doc. Clears the sign bit, as fabsf does.
            Ymm(unsafe {
                _mm256_and_ps(self.0, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
            })
        }
        #[inline(always)]
        fn min_c(self, o: Ymm) -> Ymm {
            // SAFETY: see the module doc. vminps(a, b) is `a < b ? a : b`.
            Ymm(unsafe { _mm256_min_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn max_c(self, o: Ymm) -> Ymm {
            // SAFETY: see the module doc. vmaxps(a, b) is `a > b ? a : b`.
            Ymm(unsafe { _mm256_max_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn lt(self, o: Ymm) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn le(self, o: Ymm) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_cmp_ps::<_CMP_LE_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn gt(self, o: Ymm) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn eq(self, o: Ymm) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn ne(self, o: Ymm) -> YmmMask {
            // SAFETY: see the module doc.
            YmmMask(unsafe { _mm256_cmp_ps::<_CMP_NEQ_UQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn select(m: YmmMask, a: Ymm, b: Ymm) -> Ymm {
            // SAFETY: see the module doc. blendv takes its second operand where the mask is set.
            Ymm(unsafe { _mm256_blendv_ps(b.0, a.0, m.0) })
        }
        #[inline(always)]
        fn nearest_clamp(self, lo: i32, hi: i32) -> Ymm {
            // SAFETY: see the module doc.
            Ymm(unsafe {
                nearest_clamp!(
                    self.0,
                    lo,
                    hi,
                    _mm256_add_ps,
                    _mm256_set1_ps,
                    _mm256_castps_si256,
                    _mm256_and_si256,
                    _mm256_set1_epi32,
                    _mm256_sub_epi32,
                    _mm256_max_epi32,
                    _mm256_min_epi32,
                    _mm256_cvtepi32_ps
                )
            })
        }
        #[inline(always)]
        fn round_ne(self) -> Ymm {
            // SAFETY: see the module doc. Round to nearest even, no exceptions.
            Ymm(unsafe {
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
    }

    impl F32s for Zmm {
        const LANES: usize = 16;
        type Mask = __mmask16;
        #[inline(always)]
        fn splat(v: f32) -> Zmm {
            // SAFETY: see the module doc.
            Zmm(unsafe { _mm512_set1_ps(v) })
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Zmm {
            assert!(s.len() >= 16, "sixteen lanes");
            // SAFETY: sixteen floats are readable at s (checked); the CPU has AVX-512F.
            Zmm(unsafe { _mm512_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, s: &mut [f32]) {
            assert!(s.len() >= 16, "sixteen lanes");
            // SAFETY: sixteen floats are writable at s (checked); the CPU has AVX-512F.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn gather(s: &[f32], stride: usize) -> Zmm {
            assert!(
                stride <= 1 << 20 && s.len() > 15 * stride,
                "sixteen strided lanes"
            );
            // SAFETY: lane k reads s[k * stride], inside s (checked); the CPU has AVX-512F.
            Zmm(unsafe {
                let idx = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(stride as i32),
                );
                _mm512_i32gather_ps::<4>(idx, s.as_ptr())
            })
        }
        #[inline(always)]
        fn store_levels(self, out: &mut [u8]) {
            assert!(out.len() >= 16, "sixteen lanes");
            // SAFETY: sixteen bytes are writable at out (checked); the CPU has AVX-512F. Levels are
            // exact integers in 0..=255, which the truncating narrowing keeps.
            unsafe {
                let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(self.0));
                _mm_storeu_si128(out.as_mut_ptr().cast(), bytes);
            }
        }
        #[inline(always)]
        fn sqrt(self) -> Zmm {
            // SAFETY: see the module doc.
            Zmm(unsafe { _mm512_sqrt_ps(self.0) })
        }
        #[inline(always)]
        fn abs(self) -> Zmm {
            // SAFETY: see the module doc. Clears the sign bit, as fabsf does.
            Zmm(unsafe { _mm512_abs_ps(self.0) })
        }
        #[inline(always)]
        fn min_c(self, o: Zmm) -> Zmm {
            // SAFETY: see the module doc. vminps(a, b) is `a < b ? a : b`.
            Zmm(unsafe { _mm512_min_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn max_c(self, o: Zmm) -> Zmm {
            // SAFETY: see the module doc. vmaxps(a, b) is `a > b ? a : b`.
            Zmm(unsafe { _mm512_max_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn lt(self, o: Zmm) -> __mmask16 {
            // SAFETY: see the module doc.
            unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0) }
        }
        #[inline(always)]
        fn le(self, o: Zmm) -> __mmask16 {
            // SAFETY: see the module doc.
            unsafe { _mm512_cmp_ps_mask::<_CMP_LE_OQ>(self.0, o.0) }
        }
        #[inline(always)]
        fn gt(self, o: Zmm) -> __mmask16 {
            // SAFETY: see the module doc.
            unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0) }
        }
        #[inline(always)]
        fn eq(self, o: Zmm) -> __mmask16 {
            // SAFETY: see the module doc.
            unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, o.0) }
        }
        #[inline(always)]
        fn ne(self, o: Zmm) -> __mmask16 {
            // SAFETY: see the module doc.
            unsafe { _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(self.0, o.0) }
        }
        #[inline(always)]
        fn select(m: __mmask16, a: Zmm, b: Zmm) -> Zmm {
            // SAFETY: see the module doc. The blend takes its second vector where the mask is set.
            Zmm(unsafe { _mm512_mask_blend_ps(m, b.0, a.0) })
        }
        #[inline(always)]
        fn nearest_clamp(self, lo: i32, hi: i32) -> Zmm {
            // SAFETY: see the module doc.
            Zmm(unsafe {
                nearest_clamp!(
                    self.0,
                    lo,
                    hi,
                    _mm512_add_ps,
                    _mm512_set1_ps,
                    _mm512_castps_si512,
                    _mm512_and_si512,
                    _mm512_set1_epi32,
                    _mm512_sub_epi32,
                    _mm512_max_epi32,
                    _mm512_min_epi32,
                    _mm512_cvtepi32_ps
                )
            })
        }
        #[inline(always)]
        fn round_ne(self) -> Zmm {
            // SAFETY: see the module doc. Round to nearest even (scale 0), no exceptions.
            Zmm(unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
    }
}

/// Defines the function it is given once per [`SimdLevel`] and dispatches to the [`active`] one at
/// each call. Written `fn name<L>(args) -> ret { body }`: the body is generic over `L:`
/// [`Level`] (whose vector types it may use, or ignore) and goes into an `#[inline(always)]` inner
/// function, so everything it inlines (block codecs, lane searches) is compiled once per level.
macro_rules! simd_dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident<$lvl:ident>($($arg:ident: $ty:ty),* $(,)?)
        $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(dead_code)]
            fn run<$lvl: $crate::quant::simd::Level>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    run::<$crate::quant::simd::Avx512>($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    run::<$crate::quant::simd::Avx2>($($arg),*)
                }
                match $crate::quant::simd::active() {
                    // SAFETY: the CPU has the level's features (`active` never exceeds `detected`).
                    $crate::quant::simd::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::quant::simd::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::quant::simd::SimdLevel::Portable => {}
                }
            }
            run::<$crate::quant::simd::Portable>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    simd_dispatch! {
        /// `nearest_clamp` and `round_ne` of the active level against the scalar definitions.
        fn rounding_mismatches<L>(values: &[f32]) -> usize {
            rounding_mismatches_at::<L::X2>(values)
        }
    }

    fn rounding_mismatches_at<V: F32s>(values: &[f32]) -> usize {
        let mut bad = 0;
        let mut out = [0f32; 32];
        for c in values.chunks_exact(V::LANES) {
            let v = V::load(c);
            v.nearest_clamp(-5, 40).store(&mut out);
            for (o, &x) in out.iter().zip(c) {
                let want = super::super::search::nearest_int(x).clamp(-5, 40) as f32;
                bad += usize::from(o.to_bits() != want.to_bits());
            }
            v.round_ne().max_c(V::splat(0.0)).store(&mut out);
            for (o, &x) in out.iter().zip(c) {
                if x.abs() <= NEAREST_INT_EXACT {
                    let want = super::super::search::nearest_int(x).max(0) as f32;
                    bad += usize::from(o.to_bits() != want.to_bits());
                }
            }
        }
        bad
    }

    #[test]
    fn rounding_matches_nearest_int_at_every_level() {
        let mut values = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            -0.3,
            4194303.0,
            -4194303.0,
            4194303.6,
            8e6,
            -8e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            3e38,
        ];
        let mut s = 0x9E37_79B9u32;
        while values.len() < 32 * 64 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            values.push(match s % 3 {
                0 => f32::from_bits(s),
                1 => (s >> 8) as f32 / 65536.0 - 128.0,
                _ => ((s >> 8) % 200) as f32 * 0.5 - 50.0,
            });
        }
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            assert_eq!(
                with_level(level, || rounding_mismatches(&values)),
                0,
                "{level}"
            );
        }
    }

    #[test]
    fn with_level_caps_this_thread_only_and_restores() {
        let outer = active();
        with_level(SimdLevel::Portable, || {
            assert_eq!(active(), SimdLevel::Portable);
            let other = std::thread::spawn(active).join().unwrap();
            assert_eq!(other, detected());
        });
        assert_eq!(active(), outer);
    }
}
