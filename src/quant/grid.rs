//! The grid a quantized block puts its values on, and the codes that pick points of it.
//!
//! Every type a merge keeps (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q6_K) stores a block as a few
//! parameters (scales, mins, sub-block scales) and one small integer *code* per element; element `i`
//! decodes to `scale[i]·(code[i] − zero) + offset[i]` with `code ∈ 0..=qmax`. This module reads a
//! block's grid and codes and writes new codes into a block without touching its parameters, so a
//! requantization can move codes on a grid it chose (the base's own, or one a ggml quantizer fitted)
//! and still write a standard ggml block. The bit layouts mirror `dequantize_row_*` in
//! `ggml-quants.c`; the tests pin them to our (libggml-exact) dequantizers.

use super::float::read_f16;
use super::kquants::{get_scale_min_k4, q3_k_scale};
use super::GgmlType;

/// Largest block (elements): a K-quant super-block.
pub const MAX_BLOCK: usize = 256;

/// The grid of one block: per element scale and offset, shared zero point and code range.
#[derive(Clone, Debug)]
pub struct BlockGrid {
    pub scale: [f32; MAX_BLOCK],
    pub offset: [f32; MAX_BLOCK],
    pub zero: i32,
    pub qmax: i32,
    pub len: usize,
}

impl Default for BlockGrid {
    fn default() -> Self {
        BlockGrid {
            scale: [0.0; MAX_BLOCK],
            offset: [0.0; MAX_BLOCK],
            zero: 0,
            qmax: 0,
            len: 0,
        }
    }
}

impl BlockGrid {
    /// The value code `q` stands for at element `i`.
    #[inline]
    pub fn value(&self, i: usize, q: i32) -> f32 {
        self.scale[i] * (q - self.zero) as f32 + self.offset[i]
    }

    /// The code whose value is nearest to `v` at element `i` (ties away from zero, as `roundf`).
    #[inline]
    pub fn nearest(&self, i: usize, v: f32) -> i32 {
        let s = self.scale[i];
        if s == 0.0 || !s.is_finite() {
            return self.zero.clamp(0, self.qmax);
        }
        let q = ((v - self.offset[i]) / s).round() as i32 + self.zero;
        q.clamp(0, self.qmax)
    }
}

/// Whether [`read_grid`] and [`write_codes`] know `ty`'s layout.
pub fn has_grid(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K
    )
}

/// Where element `o`'s code lives: low bits (byte, shift, width) and optional high bits.
#[derive(Clone, Copy)]
struct CodeBits {
    lo: (usize, u32, u32),
    hi: Option<(usize, u32, u32)>,
}

fn bits(ty: GgmlType, o: usize) -> CodeBits {
    use GgmlType::*;
    let nib = |base: usize| (base + o % 16, 4 * (o / 16) as u32, 4);
    match ty {
        Q4_0 => CodeBits {
            lo: nib(2),
            hi: None,
        },
        Q4_1 => CodeBits {
            lo: nib(4),
            hi: None,
        },
        Q5_0 => CodeBits {
            lo: nib(6),
            hi: Some((2 + o / 8, (o % 8) as u32, 1)),
        },
        Q5_1 => CodeBits {
            lo: nib(8),
            hi: Some((4 + o / 8, (o % 8) as u32, 1)),
        },
        Q8_0 => CodeBits {
            lo: (2 + o, 0, 8),
            hi: None,
        },
        Q2_K => {
            let (half, s, k) = (o / 128, (o % 128) / 32, o % 32);
            CodeBits {
                lo: (16 + 32 * half + k, 2 * s as u32, 2),
                hi: None,
            }
        }
        Q3_K => {
            let (half, s, k) = (o / 128, (o % 128) / 32, o % 32);
            CodeBits {
                lo: (32 + 32 * half + k, 2 * s as u32, 2),
                hi: Some((k, (4 * half + s) as u32, 1)),
            }
        }
        Q4_K => {
            let (jb, r) = (o / 64, o % 64);
            CodeBits {
                lo: (16 + 32 * jb + r % 32, 4 * (r / 32) as u32, 4),
                hi: None,
            }
        }
        Q5_K => {
            let (jb, r) = (o / 64, o % 64);
            CodeBits {
                lo: (48 + 32 * jb + r % 32, 4 * (r / 32) as u32, 4),
                hi: Some((16 + r % 32, (2 * jb + r / 32) as u32, 1)),
            }
        }
        Q6_K => {
            let (h, g, l) = (o / 128, (o % 128) / 32, o % 32);
            CodeBits {
                lo: (64 * h + l + 32 * (g % 2), 4 * (g / 2) as u32, 4),
                hi: Some((128 + 32 * h + l, 2 * g as u32, 2)),
            }
        }
        _ => unreachable!("has_grid() is checked first"),
    }
}

#[inline]
fn get_field(block: &[u8], (byte, shift, width): (usize, u32, u32)) -> u32 {
    (u32::from(block[byte]) >> shift) & ((1 << width) - 1)
}

#[inline]
fn set_field(block: &mut [u8], (byte, shift, width): (usize, u32, u32), v: u32) {
    let mask = (((1u32 << width) - 1) << shift) as u8;
    block[byte] = (block[byte] & !mask) | (((v << shift) as u8) & mask);
}

/// Reads `block`'s grid into `grid` and its codes into `codes` (one per element).
/// `ty` must satisfy [`has_grid`]; `block` is one block of `ty`.
pub fn read_grid(ty: GgmlType, block: &[u8], grid: &mut BlockGrid, codes: &mut [i32]) {
    use GgmlType::*;
    let n = ty.block_size();
    grid.len = n;
    let (zero, qmax) = match ty {
        Q4_0 => (8, 15),
        Q4_1 | Q4_K => (0, 15),
        Q5_0 => (16, 31),
        Q5_1 | Q5_K => (0, 31),
        Q8_0 => (128, 255),
        Q2_K => (0, 3),
        Q3_K => (4, 7),
        Q6_K => (32, 63),
        _ => unreachable!("has_grid() is checked first"),
    };
    grid.zero = zero;
    grid.qmax = qmax;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => {
            let d = read_f16(block);
            grid.scale[..n].fill(d);
            grid.offset[..n].fill(0.0);
        }
        Q4_1 | Q5_1 => {
            let (d, m) = (read_f16(block), read_f16(&block[2..]));
            grid.scale[..n].fill(d);
            grid.offset[..n].fill(m);
        }
        Q2_K => {
            let (d, dmin) = (read_f16(&block[80..]), read_f16(&block[82..]));
            for o in 0..n {
                let sc = block[o / 16];
                grid.scale[o] = d * (sc & 0xF) as f32;
                grid.offset[o] = -(dmin * (sc >> 4) as f32);
            }
        }
        Q3_K => {
            let d = read_f16(&block[108..]);
            for o in 0..n {
                grid.scale[o] = d * q3_k_scale(&block[96..108], o / 16) as f32;
                grid.offset[o] = 0.0;
            }
        }
        Q4_K | Q5_K => {
            let (d, dmin) = (read_f16(block), read_f16(&block[2..]));
            for o in 0..n {
                let (sc, m) = get_scale_min_k4(o / 32, &block[4..16]);
                grid.scale[o] = d * sc as f32;
                grid.offset[o] = -(dmin * m as f32);
            }
        }
        Q6_K => {
            let d = read_f16(&block[208..]);
            for o in 0..n {
                grid.scale[o] = d * (block[192 + o / 16] as i8) as f32;
                grid.offset[o] = 0.0;
            }
        }
        _ => unreachable!("has_grid() is checked first"),
    }
    for (o, c) in codes[..n].iter_mut().enumerate() {
        *c = read_code(ty, block, o);
    }
}

fn read_code(ty: GgmlType, block: &[u8], o: usize) -> i32 {
    let b = bits(ty, o);
    let mut v = get_field(block, b.lo);
    if let Some(hi) = b.hi {
        v |= get_field(block, hi) << b.lo.2;
    }
    if ty == GgmlType::Q8_0 {
        v ^= 0x80; // stored as i8; code = q + 128
    }
    v as i32
}

/// Writes `codes` (one per element, each in `0..=qmax`) into `block`, leaving its parameters as
/// they are.
pub fn write_codes(ty: GgmlType, block: &mut [u8], codes: &[i32]) {
    for (o, &c) in codes[..ty.block_size()].iter().enumerate() {
        let mut v = c as u32;
        if ty == GgmlType::Q8_0 {
            v ^= 0x80;
        }
        let b = bits(ty, o);
        set_field(block, b.lo, v & ((1 << b.lo.2) - 1));
        if let Some(hi) = b.hi {
            set_field(block, hi, v >> b.lo.2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_row, quantize_row};

    const TYPES: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                ((s % 20000) as f32 / 10000.0 - 1.0) * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    /// The grid and codes we read decode to exactly what the dequantizer gives, and writing
    /// other codes changes exactly those elements, to the grid's values.
    #[test]
    fn grids_decode_like_the_dequantizers() {
        for ty in TYPES {
            let n = ty.block_size();
            for seed in 0..20 {
                let x = values(n, seed);
                let mut block = vec![0u8; ty.type_size()];
                quantize_row(ty, &x, &mut block, None).unwrap();
                let mut grid = BlockGrid::default();
                let mut codes = vec![0i32; n];
                read_grid(ty, &block, &mut grid, &mut codes);
                let mut y = vec![0f32; n];
                dequantize_row(ty, &block, &mut y).unwrap();
                for o in 0..n {
                    let v = grid.value(o, codes[o]);
                    assert!((v - y[o]).abs() <= 1e-6 * y[o].abs().max(1.0), "{ty} {o}");
                }
                // New codes: every element changed, parameters kept.
                let new: Vec<i32> = codes
                    .iter()
                    .enumerate()
                    .map(|(o, &c)| (c + 1 + (o as i32 % 3)) % (grid.qmax + 1))
                    .collect();
                let mut b2 = block.clone();
                write_codes(ty, &mut b2, &new);
                let mut g2 = BlockGrid::default();
                let mut c2 = vec![0i32; n];
                read_grid(ty, &b2, &mut g2, &mut c2);
                assert_eq!(c2, new, "{ty}: codes round-trip");
                assert_eq!(g2.scale[..n], grid.scale[..n], "{ty}: scales kept");
                dequantize_row(ty, &b2, &mut y).unwrap();
                for o in 0..n {
                    let v = grid.value(o, new[o]);
                    assert!((v - y[o]).abs() <= 1e-6 * y[o].abs().max(1.0), "{ty} {o}");
                }
            }
        }
    }

    #[test]
    fn nearest_is_the_grid_point_closest() {
        for ty in TYPES {
            let n = ty.block_size();
            let x = values(n, 7);
            let mut block = vec![0u8; ty.type_size()];
            quantize_row(ty, &x, &mut block, None).unwrap();
            let mut grid = BlockGrid::default();
            let mut codes = vec![0i32; n];
            read_grid(ty, &block, &mut grid, &mut codes);
            for (o, &v) in x.iter().enumerate() {
                let q = grid.nearest(o, v);
                let best = (0..=grid.qmax)
                    .map(|c| (grid.value(o, c) - v).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!((grid.value(o, q) - v).abs() <= best + 1e-5, "{ty} {o}");
            }
        }
    }
}
