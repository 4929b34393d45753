//! The forward pass's operations besides the products, each as llama.cpp's CPU backend computes it:
//! RMS norm, SiLU and ggml's table GELU, RoPE (`ggml_rope_cache_init` + `rope_yarn`) and causal
//! multi-head attention with GQA, sliding windows and gemma2's soft-cap.

use rayon::prelude::*;

use super::hparams::{HParams, Rope};

/// ggml_rms_norm (sum of squares in f64) then the elementwise weight, on rows of `width`.
pub fn rms_norm(x: &[f32], width: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let sum: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let mean = (sum / width as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((d, v), g) in dst.iter_mut().zip(row).zip(w) {
            *d = v * scale * g;
        }
    }
    out
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// ggml's CPU GELU (tanh approximation) as computed with `GGML_GELU_FP16`: the input is rounded to
/// f16 and the table holds f16 results; saturated outside ±10.
pub fn gelu_ggml(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let xh = half::f16::from_f32(x).to_f32();
        let y = 0.5 * xh * (1.0 + (SQRT_2_OVER_PI * xh * (1.0 + GELU_COEF_A * xh * xh)).tanh());
        half::f16::from_f32(y).to_f32()
    }
}

/// ggml's `ggml_rope_yarn_corr_dims`.
fn yarn_corr_dims(rope: &Rope) -> [f32; 2] {
    let corr_dim = |n_rot: f32| {
        rope.n_dims as f32 * (rope.n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * rope.freq_base.ln())
    };
    let start = corr_dim(rope.beta_fast).floor();
    let end = corr_dim(rope.beta_slow).ceil();
    [start.max(0.0), end.min(rope.n_dims as f32 - 1.0)]
}

/// cos/sin per rotated pair for position `p`, as `ggml_rope_cache_init` + `rope_yarn` compute them.
fn rope_cache(p: usize, rope: &Rope, factors: Option<&[f32]>) -> Vec<(f32, f32)> {
    let theta_scale = rope.freq_base.powf(-2.0 / rope.n_dims as f32);
    let corr = yarn_corr_dims(rope);
    let mut theta = p as f32;
    (0..rope.n_dims / 2)
        .map(|i| {
            let ff = factors.map_or(1.0, |f| f[i]);
            let theta_extrap = theta / ff;
            let mut th = rope.freq_scale * theta_extrap;
            let mut mscale = rope.attn_factor;
            if rope.ext_factor != 0.0 {
                let i0 = (2 * i) as f32;
                let y = ((i0 / 2.0).floor() - corr[0]) / (corr[1] - corr[0]).max(0.001);
                let ramp = (1.0 - y.clamp(0.0, 1.0)) * rope.ext_factor;
                th = th * (1.0 - ramp) + theta_extrap * ramp;
                mscale *= 1.0 + 0.1 * (1.0 / rope.freq_scale).ln();
            }
            theta *= theta_scale;
            (th.cos() * mscale, th.sin() * mscale)
        })
        .collect()
}

/// Rotates the first `n_dims` of every head of `x`, whose rows hold `row_len / head_dim` heads; row
/// `r` is at position `pos0 + r % n_tok` (each stream holds the same `n_tok` positions). NORM pairs
/// adjacent values, NEOX pairs `i` with `i + n_dims/2`.
#[allow(clippy::too_many_arguments)]
pub fn apply_rope(
    x: &mut [f32],
    row_len: usize,
    head_dim: usize,
    n_tok: usize,
    pos0: usize,
    rope: &Rope,
    factors: Option<&[f32]>,
    neox: bool,
) {
    let caches: Vec<Vec<(f32, f32)>> = (pos0..pos0 + n_tok)
        .map(|p| rope_cache(p, rope, factors))
        .collect();
    let half = rope.n_dims / 2;
    x.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
        let cache = &caches[r % n_tok];
        for head in row.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in cache.iter().enumerate() {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    });
}

/// The keys and values of one stream at every position so far (after RoPE): rows of
/// `n_head_kv * head_dim` floats, position `j` at row `j`.
#[derive(Clone, Debug, Default)]
pub struct KvRows {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Causal multi-head attention with GQA for each stream: the `n_tok` query rows of stream `s` (at
/// positions `pos0..pos0 + n_tok`) attend to the keys and values of `kv[s]`, which hold every
/// position up to the last query's. `window` limits how far back a query sees (`q - k < window`,
/// llama.cpp's standard SWA). Scores get the soft-cap (gemma2) before the scale-and-softmax, as
/// `build_attn_mha` does. Each query row is computed alone, so a position's output is the same
/// whether it runs in one batch with the others or after them from a cache.
pub fn attention(
    hp: &HParams,
    q: &[f32],
    kv: &[KvRows],
    n_tok: usize,
    pos0: usize,
    window: usize,
) -> Vec<f32> {
    let (hd_k, hd_v) = (hp.head_dim_k, hp.head_dim_v);
    let (n_head, n_kv) = (hp.n_head, hp.n_head_kv);
    let group = n_head / n_kv;
    let row_q = n_head * hd_k;
    let row_k = n_kv * hd_k;
    let row_v = n_kv * hd_v;
    let row_o = n_head * hd_v;
    let mut out = vec![0f32; kv.len() * n_tok * row_o];
    out.par_chunks_mut(row_o).enumerate().for_each(|(r, dst)| {
        let (s, p) = (r / n_tok, pos0 + r % n_tok);
        let (k, v) = (&kv[s].k, &kv[s].v);
        let first = if window == usize::MAX {
            0
        } else {
            (p + 1).saturating_sub(window)
        };
        let mut scores = vec![0f32; p + 1 - first];
        for h in 0..n_head {
            let kvh = h / group;
            let qh = &q[r * row_q + h * hd_k..r * row_q + (h + 1) * hd_k];
            for (j, sc) in (first..=p).zip(scores.iter_mut()) {
                let kr = j * row_k + kvh * hd_k;
                let mut s = super::matmul::dot(qh, &k[kr..kr + hd_k]);
                if hp.attn_softcap != 0.0 {
                    s = (s / hp.attn_softcap).tanh() * hp.attn_softcap;
                }
                *sc = s * hp.kq_scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc as f64;
            }
            let inv = (1.0 / sum) as f32;
            let oh = &mut dst[h * hd_v..(h + 1) * hd_v];
            for (j, p) in (first..=p).zip(&scores) {
                let vr = j * row_v + kvh * hd_v;
                for (o, vv) in oh.iter_mut().zip(&v[vr..vr + hd_v]) {
                    *o += p * inv * vv;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_keeps_norms_and_position_zero_is_identity() {
        let rope = Rope {
            n_dims: 8,
            freq_base: 10000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 4096,
        };
        for neox in [false, true] {
            let orig: Vec<f32> = (0..2 * 16).map(|i| i as f32 * 0.1 - 1.0).collect();
            let mut x = orig.clone();
            apply_rope(&mut x, 16, 8, 2, 0, &rope, None, neox);
            assert_eq!(&x[..16], &orig[..16]);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x[16..24]) - n(&orig[16..24])).abs() < 1e-4);
            assert_ne!(&x[16..24], &orig[16..24]);
        }
    }

    #[test]
    fn gelu_follows_ggml_table() {
        assert_eq!(gelu_ggml(-11.0), 0.0);
        assert_eq!(gelu_ggml(12.0), 12.0);
        assert!((gelu_ggml(1.0) - 0.8412).abs() < 1e-3);
    }
}
