//! `extract`: a LoRA adapter from a fine-tuned model and its base, the other direction of `merge`.
//!
//! Both models are read through [`checkpoint`] (GGUF, single or split, any codec type; or HF
//! safetensors, single or sharded), and must describe the same architecture and tensor shapes: every
//! mismatch is listed and nothing is written. Then, one tensor at a time (memory is bounded by a
//! tensor, not the model), `Δ = W_ft − W_base` in f32; tensors whose bytes are equal are skipped
//! without decoding. Each differing 2-D LoRA target gets a truncated SVD ([`svd`]) and becomes
//! `A = √S·Vᵀ`, `B = U·√S`, so that `B·A` is the best rank-r approximation of `Δ`. Ranks are fixed or
//! chosen per tensor (`auto:ENERGY`: the smallest rank keeping that share of `‖Δ‖²`, capped).
//!
//! The factors wait for the writer in an anonymous scratch file beside the output
//! ([`crate::adapter::Spool`]), so memory stays bounded by one tensor however large the adapter.
//!
//! Each tensor's alpha is its own rank (scale 1); the GGUF writer ([`crate::adapter::gguf`]) writes
//! the alpha most tensors share and folds `rank_i / alpha` into the `B` of the others, so the scale
//! llama.cpp applies (`alpha / rank` of each tensor's own `B`) gives exactly `B·A` everywhere.
//! Rows stay in the GGUF's order: a GGUF delta of llama `attn_q`/`attn_k` is already RoPE-permuted,
//! and an HF one gets its `B` rows permuted as `convert_hf_to_gguf.py` permutes the weights.
//! The token embedding becomes llama.cpp's token-embedding LoRA unless the model ties its output
//! head to it (llama.cpp would apply it to the head too, with the wrong shape): then it is refused,
//! or left out with `embeddings: false`. Stacked GGUF experts (`ffn_*_exps`) get one SVD per expert
//! and one rank for all, the largest any expert needs; HF per-expert tensors are refused (they would
//! need stacking first). Other tensors that differ (norms, biases) cannot be held by a GGUF LoRA and
//! are reported.

pub mod checkpoint;
pub mod svd;

use std::path::{Path, PathBuf};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

pub use checkpoint::{Checkpoint, CheckpointError, Format, Tensor};

use crate::adapter::gguf::{FactorType, WriteSummary};
use crate::adapter::{self, Adapter, AdapterError, Layout, LoraPair, LoraTensor, Matrix, Spool};
use crate::arch::TargetKind;
use crate::output::OutputError;

/// `--max-rank` when not given.
pub const DEFAULT_MAX_RANK: usize = 128;
/// `--rank auto` without an energy.
pub const DEFAULT_ENERGY: f64 = 0.9;
/// Mismatches listed one by one before "and N more".
const MAX_LISTED: usize = 30;

/// How each tensor's rank is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankChoice {
    /// This rank everywhere (cut to the tensor's smaller dimension and `max_rank`).
    Fixed(usize),
    /// Per tensor, the smallest rank keeping `energy` of `‖Δ‖²`, at most `max_rank`.
    Auto { energy: f64 },
}

impl std::str::FromStr for RankChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<RankChoice, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("auto") {
            let energy = match rest.strip_prefix(':') {
                None if rest.is_empty() => DEFAULT_ENERGY,
                Some(e) => e
                    .parse::<f64>()
                    .ok()
                    .filter(|e| *e > 0.0 && *e <= 1.0)
                    .ok_or_else(|| format!("'{e}' is not an energy share in (0, 1]"))?,
                None => return Err(format!("'{s}': expected auto or auto:ENERGY")),
            };
            return Ok(RankChoice::Auto { energy });
        }
        match s.parse::<usize>() {
            Ok(r) if r > 0 => Ok(RankChoice::Fixed(r)),
            _ => Err(format!(
                "'{s}': expected a rank (a positive integer), auto or auto:ENERGY"
            )),
        }
    }
}

impl std::fmt::Display for RankChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankChoice::Fixed(r) => write!(f, "{r}"),
            RankChoice::Auto { energy } => write!(f, "auto:{energy}"),
        }
    }
}

impl serde::Serialize for RankChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// What to extract and how to write it.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    pub rank: RankChoice,
    pub max_rank: usize,
    pub outtype: FactorType,
    /// Extract `token_embd`/`output` deltas (false: report them and leave them out).
    pub embeddings: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: RankChoice::Fixed(16),
            max_rank: DEFAULT_MAX_RANK,
            outtype: FactorType::F32,
            embeddings: true,
        }
    }
}

/// Why nothing was extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: architecture '{ft_arch}', but the base {} is '{base_arch}'; extract needs a fine-tune of that base", finetuned.display(), base.display())]
    ArchMismatch {
        base: PathBuf,
        base_arch: String,
        finetuned: PathBuf,
        ft_arch: String,
    },
    #[error("{} and {} do not describe the same model ({} mismatch{}); nothing written:\n{}", base.display(), finetuned.display(), count, if *count == 1 { "" } else { "es" }, list(problems, *count))]
    Mismatch {
        base: PathBuf,
        finetuned: PathBuf,
        problems: Vec<String>,
        count: usize,
    },
    #[error("nothing to extract: {} is identical to {} in all {compared} tensors compared; nothing written", finetuned.display(), base.display())]
    Identical {
        base: PathBuf,
        finetuned: PathBuf,
        compared: usize,
    },
    #[error("nothing to extract: {} differs from {} only in tensors a GGUF LoRA cannot hold ({}); nothing written", finetuned.display(), base.display(), names.join(", "))]
    NothingExtractable {
        base: PathBuf,
        finetuned: PathBuf,
        names: Vec<String>,
    },
    #[error("{}: token_embd.weight differs, but the model ties its output head to the embeddings and llama.cpp cannot load a token-embedding LoRA there (it would apply it to the output head too); pass --no-embeddings to extract everything else", finetuned.display())]
    TiedEmbeddings { finetuned: PathBuf },
    #[error("{}: MoE expert tensors differ or cannot be paired ({}); extract handles stacked GGUF experts (ffn_*_exps), not HF per-expert tensors yet; nothing written", finetuned.display(), names.join(", "))]
    Experts {
        finetuned: PathBuf,
        names: Vec<String>,
    },
    #[error("{}: tensor '{tensor}': value {value} at element {index} is not finite", path.display())]
    NonFinite {
        path: PathBuf,
        tensor: String,
        value: f32,
        index: usize,
    },
    #[error("{tensor}: {rows} rows cannot be split into {heads} heads of two rotary halves (config.json's head counts do not fit)")]
    Rope {
        tensor: String,
        rows: usize,
        heads: usize,
    },
    #[error("{tensor}: {error}")]
    Svd {
        tensor: String,
        error: svd::NoConvergence,
    },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// `  - a` lines, at most [`MAX_LISTED`], then how many more.
fn list(problems: &[String], count: usize) -> String {
    let mut lines: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
    if count > problems.len() {
        lines.push(format!("  - ... and {} more", count - problems.len()));
    }
    lines.join("\n")
}

/// One extracted tensor.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExtractedTensor {
    /// GGUF tensor name.
    pub name: String,
    /// Its name in the fine-tune's file.
    pub source: String,
    pub kind: &'static str,
    /// `[n_out, n_in]` of the delta (`[n_vocab, n_embd]` for the embedding; of one expert for
    /// stacked experts).
    pub shape: [usize; 2],
    /// Stacked experts (one rank for all); 1 for a matrix.
    pub experts: usize,
    pub base_type: String,
    pub finetuned_type: String,
    pub rank: usize,
    /// Share of `‖Δ‖²` kept: `Σ_{i<rank} s_i² / ‖Δ‖²`.
    pub energy: f64,
    /// `‖Δ − B·A‖ / ‖Δ‖`, measured on the f32 factors.
    pub residual: f64,
    /// `‖Δ‖` (Frobenius).
    pub delta_norm: f64,
    /// `‖Δ‖ / ‖W_base‖`.
    pub relative_delta: f64,
    /// The leading singular values computed (at least `rank`); empty for stacked experts.
    pub singular_values: Vec<f32>,
    /// Stacked experts: each expert's leading singular values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expert_singular_values: Vec<Vec<f32>>,
    /// `B` rows RoPE-permuted into the GGUF's order (HF llama q/k).
    pub permuted: bool,
    /// The exact SVD was used (small matrix) rather than the randomized one.
    pub exact_svd: bool,
}

/// A tensor that differs but is not in the adapter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeftOut {
    pub name: String,
    pub shape: Vec<u64>,
    /// `‖Δ‖ / ‖W_base‖`.
    pub relative_delta: f64,
    pub reason: &'static str,
}

/// Totals over the extracted tensors.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Totals {
    pub tensors_compared: usize,
    pub tensors_unchanged: usize,
    pub tensors_extracted: usize,
    /// Tensors of one side with no counterpart to compare to (mixed GGUF/safetensors inputs: norms
    /// and biases, which our tables do not map).
    pub tensors_not_compared: usize,
    /// `Σ kept / Σ ‖Δ‖²` over extracted tensors.
    pub energy: f64,
    /// `sqrt(Σ ‖Δ − B·A‖² / Σ ‖Δ‖²)`.
    pub residual: f64,
    pub min_rank: usize,
    pub max_rank: usize,
    /// Parameters of the adapter (`Σ rank·(n_in + n_out)`).
    pub adapter_params: u64,
    pub adapter_bytes: u64,
    pub finetuned_bytes: u64,
    /// `adapter_bytes / finetuned_bytes`.
    pub size_ratio: f64,
}

/// What `extract` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExtractReport {
    pub base: PathBuf,
    pub finetuned: PathBuf,
    pub output: PathBuf,
    pub arch: String,
    pub base_format: Format,
    pub finetuned_format: Format,
    pub rank: RankChoice,
    pub max_rank: usize,
    pub outtype: FactorType,
    /// Both inputs are block-quantized where tensors were extracted.
    pub both_quantized: bool,
    pub notes: Vec<String>,
    pub tensors: Vec<ExtractedTensor>,
    pub left_out: Vec<LeftOut>,
    pub totals: Totals,
    pub written: WriteSummary,
}

/// One tensor present in both models with the same shape.
struct Pair<'a> {
    base: &'a Tensor,
    ft: &'a Tensor,
}

/// Extracts the adapter `finetuned − base` into `output` (see the module docs). `on_tensor(done,
/// total)` is called after each tensor compared.
pub fn extract(
    base_path: &Path,
    ft_path: &Path,
    output: &Path,
    opts: &ExtractOptions,
    on_tensor: &(dyn Fn(usize, usize) + Sync),
) -> Result<ExtractReport, ExtractError> {
    crate::output::check_target(output)?;
    let base = Checkpoint::open(base_path)?;
    let ft = Checkpoint::open(ft_path)?;
    let inputs: Vec<&Path> = base
        .files
        .iter()
        .chain(&ft.files)
        .map(PathBuf::as_path)
        .chain([base_path, ft_path])
        .collect();
    crate::output::check_not_an_input(output, &inputs)?;
    if base.arch != ft.arch {
        return Err(ExtractError::ArchMismatch {
            base: base_path.to_path_buf(),
            base_arch: base.arch.clone(),
            finetuned: ft_path.to_path_buf(),
            ft_arch: ft.arch.clone(),
        });
    }
    if base.format != ft.format {
        // Stacked GGUF experts and HF per-expert tensors cannot be paired by name; both are refused
        // below anyway, so say that rather than list them as mismatches.
        let experts: Vec<String> = [&base, &ft]
            .iter()
            .flat_map(|c| c.tensors.iter())
            .filter(|t| t.target_kind() == Some(TargetKind::Experts))
            .map(|t| t.name.clone())
            .take(MAX_LISTED)
            .collect();
        if !experts.is_empty() {
            return Err(ExtractError::Experts {
                finetuned: ft_path.to_path_buf(),
                names: experts,
            });
        }
    }
    let (pairs, not_compared) = pair_up(&base, &ft)?;
    let tied = base.tensor("output.weight").is_none();
    let mut notes = Vec::new();
    if base.format != ft.format {
        notes.push(format!(
            "GGUF and safetensors inputs: only the LoRA targets our tables map were compared; {not_compared} other tensors (norms, biases) were not"
        ));
    }

    // Refusals that do not need the SVD, found before any of it runs.
    let differs = |p: &Pair<'_>| match (base.raw(p.base), ft.raw(p.ft)) {
        (Some((a, ta)), Some((b, tb))) if ta == tb => a != b,
        _ => true,
    };
    // HF per-expert tensors would have to be stacked into the GGUF's one tensor per layer first.
    let experts: Vec<String> = pairs
        .iter()
        .filter(|p| {
            p.ft.target_kind() == Some(TargetKind::Experts) && p.ft.dims.len() == 2 && differs(p)
        })
        .map(|p| p.ft.name.clone())
        .collect();
    if !experts.is_empty() {
        return Err(ExtractError::Experts {
            finetuned: ft_path.to_path_buf(),
            names: experts,
        });
    }
    if tied && opts.embeddings {
        if let Some(p) = pairs.iter().find(|p| p.ft.name == "token_embd.weight") {
            if differs(p) && delta_of(&base, &ft, p)?.1 > 0.0 {
                return Err(ExtractError::TiedEmbeddings {
                    finetuned: ft_path.to_path_buf(),
                });
            }
        }
    }

    // Factors wait for the writer in a scratch file beside the output, so memory stays one tensor's.
    let out_dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let spool = Spool::new(out_dir).map_err(|error| OutputError::Io {
        op: "create a scratch file",
        path: out_dir.to_path_buf(),
        error,
    })?;
    let spooled = |m: &Matrix| {
        spool.push(m).map_err(|error| {
            ExtractError::Output(OutputError::Io {
                op: "write a scratch file",
                path: out_dir.to_path_buf(),
                error,
            })
        })
    };
    let mut extracted: Vec<ExtractedTensor> = Vec::new();
    let mut lora: Vec<LoraTensor> = Vec::new();
    let mut left_out: Vec<LeftOut> = Vec::new();
    let mut unchanged = 0usize;
    let mut sums = (0f64, 0f64); // Σ‖Δ‖², Σ residual²
    let mut both_quantized = false;
    for (i, p) in pairs.iter().enumerate() {
        let done = || {
            base.release(p.base);
            ft.release(p.ft);
            on_tensor(i + 1, pairs.len())
        };
        if !differs(p) {
            unchanged += 1;
            done();
            continue;
        }
        let kind =
            p.ft.target_kind()
                .filter(|k| p.ft.dims.len() == if *k == TargetKind::Experts { 3 } else { 2 });
        let is_embedding = matches!(p.ft.name.as_str(), "token_embd.weight" | "output.weight");
        let (delta, norm2, base_norm2, hf_rows) = delta_of(&base, &ft, p)?;
        if norm2 == 0.0 {
            unchanged += 1;
            done();
            continue;
        }
        let relative_delta = (norm2 / base_norm2.max(f64::MIN_POSITIVE)).sqrt();
        let reason = match kind {
            None => Some("not a tensor a GGUF LoRA can adapt (norm, bias or other)"),
            Some(_) if is_embedding && !opts.embeddings => Some("left out by --no-embeddings"),
            _ => None,
        };
        if let Some(reason) = reason {
            left_out.push(LeftOut {
                name: p.ft.name.clone(),
                shape: p.ft.dims.clone(),
                relative_delta,
                reason,
            });
            done();
            continue;
        }
        let kind = kind.unwrap_or(TargetKind::Linear);
        // Stacked experts (ne = [n_in, n_out, n_expert]) get one SVD per expert and one rank for
        // all (the GGUF tensor has one): the largest any expert needs.
        let n_exp = match kind {
            TargetKind::Experts => p.ft.dims.get(2).copied().unwrap_or(1).max(1) as usize,
            _ => 1,
        };
        let (m, n) = (p.ft.rows() / n_exp, p.ft.row_len());
        let k_want = match opts.rank {
            RankChoice::Fixed(r) => r.min(opts.max_rank),
            RankChoice::Auto { .. } => opts.max_rank,
        }
        .max(1);
        let slice = |e: usize| &delta[e * m * n..(e + 1) * m * n];
        let mut svds = Vec::with_capacity(n_exp);
        for e in 0..n_exp {
            let seed = svd::seed_of(&p.ft.name).wrapping_add(e as u64);
            let t = svd::truncated_svd(slice(e), m, n, k_want, seed).map_err(|error| {
                ExtractError::Svd {
                    tensor: p.ft.name.clone(),
                    error,
                }
            })?;
            let e_norm2: f64 = slice(e)
                .par_iter()
                .map(|&d| f64::from(d) * f64::from(d))
                .sum();
            svds.push((t, e_norm2));
        }
        let r = svds
            .iter()
            .map(|(t, e_norm2)| choose_rank(&t.s, *e_norm2, opts.rank))
            .max()
            .unwrap_or(1);
        let (mut residual2_sum, mut kept) = (0f64, 0f64);
        let mut parts = Vec::with_capacity(n_exp);
        for (e, (t, _)) in svds.iter().enumerate() {
            let (b, a) = factors(t, r);
            residual2_sum += residual2(slice(e), &b, &a);
            kept += t.s[..r]
                .iter()
                .map(|&s| f64::from(s) * f64::from(s))
                .sum::<f64>();
            parts.push((b, a));
        }
        let residual2 = residual2_sum;
        drop(delta);
        let mut permuted = false;
        if let (Some(heads), [(b, _)]) = (hf_rows, parts.as_mut_slice()) {
            *b = adapter::permute_rows(b, heads).ok_or_else(|| ExtractError::Rope {
                tensor: p.ft.name.clone(),
                rows: m,
                heads,
            })?;
            permuted = true;
        }
        sums.0 += norm2;
        sums.1 += residual2;
        both_quantized |= p.base.quantized && p.ft.quantized;
        let mut pairs_out = Vec::with_capacity(n_exp);
        for (e, (b, a)) in parts.into_iter().enumerate() {
            // The embedding's LoRA is oriented the other way (see the adapter module docs): its A
            // is rank × n_vocab and its B n_embd × rank, so B·A = Δᵀ.
            let (lora_a, lora_b) = if kind == TargetKind::Embedding {
                (b.transposed(), a.transposed())
            } else {
                (a, b)
            };
            pairs_out.push(LoraPair {
                source: if n_exp > 1 {
                    format!("{}[{e}]", p.ft.source)
                } else {
                    p.ft.source.clone()
                },
                a: spooled(&lora_a)?,
                b: spooled(&lora_b)?,
                // Scale alpha / rank = 1: B·A is the delta itself.
                alpha: r as f64,
                b_rows: None,
            });
        }
        let layout = if kind == TargetKind::Experts {
            Layout::Experts(pairs_out)
        } else {
            Layout::Single(Box::new(pairs_out.remove(0)))
        };
        lora.push(LoraTensor {
            target: p.ft.name.clone(),
            layer: crate::gguf::layer_of(&p.ft.name),
            kind,
            layout,
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        });
        let single = svds.len() == 1;
        extracted.push(ExtractedTensor {
            name: p.ft.name.clone(),
            source: p.ft.source.clone(),
            kind: kind.name(),
            shape: [m, n],
            experts: n_exp,
            base_type: p.base.ty.clone(),
            finetuned_type: p.ft.ty.clone(),
            rank: r,
            energy: (kept / norm2).min(1.0),
            residual: (residual2 / norm2).sqrt(),
            delta_norm: norm2.sqrt(),
            relative_delta,
            singular_values: if single {
                svds[0].0.s.clone()
            } else {
                Vec::new()
            },
            expert_singular_values: if single {
                Vec::new()
            } else {
                svds.iter().map(|(t, _)| t.s.clone()).collect()
            },
            permuted,
            exact_svd: svds.iter().all(|(t, _)| t.exact),
        });
        done();
    }

    if lora.is_empty() {
        return Err(if left_out.is_empty() {
            ExtractError::Identical {
                base: base_path.to_path_buf(),
                finetuned: ft_path.to_path_buf(),
                compared: pairs.len(),
            }
        } else {
            ExtractError::NothingExtractable {
                base: base_path.to_path_buf(),
                finetuned: ft_path.to_path_buf(),
                names: left_out.iter().map(|l| l.name.clone()).collect(),
            }
        });
    }
    if both_quantized {
        notes.push(format!(
            "both inputs are quantized ({} and {}): each delta holds the fine-tune plus two independent quantization noises, which a low rank cannot and should not keep; energy and residual count that noise as part of the delta",
            type_summary(&extracted, |t| &t.base_type),
            type_summary(&extracted, |t| &t.finetuned_type)
        ));
    }
    let adapter = Adapter {
        arch: Some(ft.arch.clone()),
        tensors: lora,
        provenance: adapter::Provenance {
            path: ft_path.to_path_buf(),
            base_model: base.name.clone(),
            ..adapter::Provenance::default()
        },
        ..Adapter::default()
    };
    let written = adapter::gguf::write(&adapter, output, &inputs, opts.outtype)?;
    let adapter_bytes = std::fs::metadata(output).map_or(written.bytes, |m| m.len());
    let ranks = extracted.iter().map(|t| t.rank);
    let totals = Totals {
        tensors_compared: pairs.len(),
        tensors_unchanged: unchanged,
        tensors_extracted: extracted.len(),
        tensors_not_compared: not_compared,
        energy: 1.0 - sums.1 / sums.0,
        residual: (sums.1 / sums.0).sqrt(),
        min_rank: ranks.clone().min().unwrap_or(0),
        max_rank: ranks.max().unwrap_or(0),
        adapter_params: extracted
            .iter()
            .map(|t| (t.rank * (t.shape[0] + t.shape[1]) * t.experts) as u64)
            .sum(),
        adapter_bytes,
        finetuned_bytes: ft.bytes,
        size_ratio: adapter_bytes as f64 / ft.bytes.max(1) as f64,
    };
    Ok(ExtractReport {
        base: base_path.to_path_buf(),
        finetuned: ft_path.to_path_buf(),
        output: output.to_path_buf(),
        arch: ft.arch.clone(),
        base_format: base.format,
        finetuned_format: ft.format,
        rank: opts.rank,
        max_rank: opts.max_rank,
        outtype: opts.outtype,
        both_quantized,
        notes,
        tensors: extracted,
        left_out,
        totals,
        written,
    })
}

/// `Q4_K` or `Q4_K/Q6_K`: the distinct types of the extracted tensors on one side.
fn type_summary(ts: &[ExtractedTensor], side: impl Fn(&ExtractedTensor) -> &String) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for t in ts {
        let ty = side(t).as_str();
        if !seen.contains(&ty) {
            seen.push(ty);
        }
    }
    seen.join("/")
}

/// Pairs every compared tensor of `ft` with `base`'s; lists every mismatch. Returns the pairs (in
/// the fine-tune's order) and how many tensors were not compared (mixed formats).
fn pair_up<'a>(
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
) -> Result<(Vec<Pair<'a>>, usize), ExtractError> {
    let mixed = base.format != ft.format;
    // With one GGUF and one HF input only what our tables map can be matched by name.
    let compared = |c: &Checkpoint, t: &Tensor| {
        !mixed
            || match c.format {
                Format::Safetensors => t.mapped.is_some(),
                Format::Gguf => t.target_kind().is_some(),
            }
    };
    let mut problems = Vec::new();
    let mut pairs = Vec::new();
    let mut not_compared = 0;
    let (bn, fnm) = (base.path.display(), ft.path.display());
    for t in &ft.tensors {
        if !compared(ft, t) {
            not_compared += 1;
            continue;
        }
        match base.tensor(&t.name).filter(|b| compared(base, b)) {
            None => problems.push(format!("'{}' is in {fnm} but not in the base {bn}", t.name)),
            Some(b) if !same_shape(&b.dims, &t.dims) => problems.push(format!(
                "'{}': shape {:?} in the base, {:?} in the fine-tune (ggml order)",
                t.name, b.dims, t.dims
            )),
            Some(b) => pairs.push(Pair { base: b, ft: t }),
        }
    }
    for b in &base.tensors {
        if !compared(base, b) {
            not_compared += 1;
        } else if ft.tensor(&b.name).filter(|t| compared(ft, t)).is_none() {
            problems.push(format!("'{}' is in the base {bn} but not in {fnm}", b.name));
        }
    }
    if !problems.is_empty() {
        let count = problems.len();
        problems.truncate(MAX_LISTED);
        return Err(ExtractError::Mismatch {
            base: base.path.clone(),
            finetuned: ft.path.clone(),
            problems,
            count,
        });
    }
    Ok((pairs, not_compared))
}

/// ggml's view of shapes: `[64, 1]` and `[64]` are one shape (llama-export-lora writes the latter
/// for the former).
fn same_shape(a: &[u64], b: &[u64]) -> bool {
    let trim = |d: &[u64]| d.len() - d.iter().rev().take_while(|&&x| x == 1).count();
    a[..trim(a)] == b[..trim(b)]
}

/// `Δ = ft − base` in the GGUF's row order where the two sides differ in it (a GGUF and an HF
/// llama q/k), else in their common order; with `‖Δ‖²`, `‖W_base‖²`, and the head count to permute
/// `B` rows by when both sides are in HF order.
type Delta = (Vec<f32>, f64, f64, Option<usize>);

fn delta_of(base: &Checkpoint, ft: &Checkpoint, p: &Pair<'_>) -> Result<Delta, ExtractError> {
    let non_finite = |c: &Checkpoint, t: &Tensor, v: &[f32]| match first_non_finite(v) {
        Some(index) => Err(ExtractError::NonFinite {
            path: c.path.clone(),
            tensor: t.source.clone(),
            value: v[index],
            index,
        }),
        None => Ok(()),
    };
    let mut delta = ft.values(p.ft)?;
    non_finite(ft, p.ft, &delta)?;
    let (base_norm2, hf_rows) = match (p.base.hf_rope_heads, p.ft.hf_rope_heads) {
        (None, Some(heads)) | (Some(heads), None) => {
            // One side in HF order, the other (a GGUF) permuted: bring the HF one to GGUF order.
            let rows = p.ft.rows();
            let permute = |v: Vec<f32>, t: &Tensor| {
                let m = Matrix::new(rows, t.row_len(), v).unwrap_or_else(|| Matrix::zeros(0, 0));
                adapter::permute_rows(&m, heads)
                    .map(|m| m.data)
                    .ok_or_else(|| ExtractError::Rope {
                        tensor: t.name.clone(),
                        rows,
                        heads,
                    })
            };
            let base_vals = base.values(p.base)?;
            non_finite(base, p.base, &base_vals)?;
            let base_vals = if p.base.hf_rope_heads.is_some() {
                permute(base_vals, p.base)?
            } else {
                base_vals
            };
            if p.ft.hf_rope_heads.is_some() {
                delta = permute(delta, p.ft)?;
            }
            let n2 = delta
                .par_iter_mut()
                .zip(base_vals.par_iter())
                .map(|(d, &w)| {
                    *d -= w;
                    f64::from(w) * f64::from(w)
                })
                .sum();
            (n2, None)
        }
        (heads, _) => (base.subtract_from(p.base, &mut delta)?, heads),
    };
    // A finite fine-tune minus a non-finite base is the only way a non-finite delta arises here.
    if let Some(index) = first_non_finite(&delta) {
        return Err(ExtractError::NonFinite {
            path: base.path.clone(),
            tensor: p.base.source.clone(),
            value: f32::NAN,
            index,
        });
    }
    let norm2 = delta.par_iter().map(|&d| f64::from(d) * f64::from(d)).sum();
    Ok((delta, norm2, base_norm2, hf_rows))
}

/// Index of the first NaN or ±Inf. In blocks: rayon's per-element `position_first` checks a shared
/// atomic at every element and took half of a 7B extraction's time.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1 << 16;
    v.par_chunks(BLOCK)
        .enumerate()
        .find_first(|(_, c)| c.iter().any(|x| !x.is_finite()))
        .and_then(|(i, c)| c.iter().position(|x| !x.is_finite()).map(|j| i * BLOCK + j))
}

/// The rank for a tensor with singular values `s` (non-increasing) and `‖Δ‖² = norm2`.
fn choose_rank(s: &[f32], norm2: f64, choice: RankChoice) -> usize {
    match choice {
        RankChoice::Fixed(r) => r.min(s.len()),
        RankChoice::Auto { energy } => {
            let mut kept = 0f64;
            for (i, &v) in s.iter().enumerate() {
                kept += f64::from(v) * f64::from(v);
                // A relative slack so that an exact rank-r delta with energy 1 stops at r.
                if kept >= energy * norm2 * (1.0 - 1e-6) {
                    return i + 1;
                }
            }
            s.len()
        }
    }
    .max(1)
}

/// `B = U_r·√S_r` (`m × r`) and `A = √S_r·V_rᵀ` (`r × n`).
fn factors(t: &svd::Truncated, r: usize) -> (Matrix, Matrix) {
    let (m, n, k) = (t.m, t.n, t.k());
    let root: Vec<f32> = t.s[..r].iter().map(|s| s.sqrt()).collect();
    let mut b = Matrix::zeros(m, r);
    for (row, u) in b.data.chunks_exact_mut(r).zip(t.u.chunks_exact(k)) {
        for ((x, &u), &w) in row.iter_mut().zip(u).zip(&root) {
            *x = u * w;
        }
    }
    let mut a = Matrix::zeros(r, n);
    for ((row, v), &w) in a
        .data
        .chunks_exact_mut(n)
        .zip(t.vt.chunks_exact(n))
        .zip(&root)
    {
        for (x, &v) in row.iter_mut().zip(v) {
            *x = v * w;
        }
    }
    (b, a)
}

/// `‖Δ − B·A‖²`, a block of rows at a time (the scratch stays a few MiB).
fn residual2(delta: &[f32], b: &Matrix, a: &Matrix) -> f64 {
    let (r, n) = (a.rows, a.cols);
    let rows_per = ((1 << 20) / n.max(1)).max(1);
    let mut scratch = vec![0f32; rows_per.min(b.rows) * n];
    let mut total = 0f64;
    for (k, block) in delta.chunks(rows_per * n).enumerate() {
        let rows = block.len() / n;
        let s = &mut scratch[..block.len()];
        s.copy_from_slice(block);
        let b_block = &b.data[k * rows_per * r..(k * rows_per + rows) * r];
        matmul(
            MatMut::from_row_major_slice_mut(s, rows, n),
            Accum::Add,
            MatRef::from_row_major_slice(b_block, rows, r),
            MatRef::from_row_major_slice(&a.data, r, n),
            -1.0f32,
            Par::rayon(0),
        );
        total += s
            .par_iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_choices_parse() {
        assert_eq!("16".parse(), Ok(RankChoice::Fixed(16)));
        assert_eq!(
            "auto".parse(),
            Ok(RankChoice::Auto {
                energy: DEFAULT_ENERGY
            })
        );
        assert_eq!("auto:0.5".parse(), Ok(RankChoice::Auto { energy: 0.5 }));
        for bad in ["0", "-3", "auto:0", "auto:1.5", "autox", "x"] {
            assert!(bad.parse::<RankChoice>().is_err(), "{bad}");
        }
        assert_eq!(RankChoice::Auto { energy: 0.9 }.to_string(), "auto:0.9");
    }

    #[test]
    fn trailing_unit_dimensions_do_not_change_a_shape() {
        assert!(same_shape(&[64, 1], &[64]));
        assert!(same_shape(&[64, 32, 1, 1], &[64, 32]));
        assert!(!same_shape(&[64, 2], &[64]));
        assert!(!same_shape(&[1, 64], &[64]));
    }

    #[test]
    fn the_first_non_finite_value_is_found_across_blocks() {
        let mut v = vec![0.5f32; 300_000];
        assert_eq!(first_non_finite(&v), None);
        v[200_001] = f32::INFINITY;
        v[150_000] = f32::NAN;
        assert_eq!(first_non_finite(&v), Some(150_000));
    }

    #[test]
    fn auto_rank_keeps_the_asked_energy() {
        // s² = 16, 4, 1, 1 of ‖Δ‖² = 22 (a tail of 0 beyond).
        let s = [4.0, 2.0, 1.0, 1.0];
        let auto = |e| choose_rank(&s, 22.0, RankChoice::Auto { energy: e });
        assert_eq!(auto(0.5), 1);
        assert_eq!(auto(0.9), 2);
        assert_eq!(auto(0.95), 3);
        assert_eq!(auto(1.0), 4);
        assert_eq!(choose_rank(&s, 40.0, RankChoice::Auto { energy: 0.99 }), 4);
        assert_eq!(choose_rank(&s, 22.0, RankChoice::Fixed(8)), 4);
    }

    #[test]
    fn factors_rebuild_the_truncation_and_the_residual_is_measured() {
        let (m, n) = (40, 30);
        let d: Vec<f32> = (0..m * n)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) + if i % n == 3 { 2.0 } else { 0.0 })
            .collect();
        let norm2: f64 = d.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let t = svd::truncated_svd(&d, m, n, 30, 1).unwrap();
        let (b, a) = factors(&t, 30);
        assert!(residual2(&d, &b, &a) < 1e-8 * norm2, "full rank rebuilds Δ");
        let (b, a) = factors(&t, 2);
        let kept: f64 = t.s[..2].iter().map(|&s| f64::from(s) * f64::from(s)).sum();
        let r2 = residual2(&d, &b, &a);
        assert!(
            ((norm2 - kept) - r2).abs() < 1e-4 * norm2,
            "{r2} vs {}",
            norm2 - kept
        );
    }
}
