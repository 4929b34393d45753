//! `verify`: does a merged model behave like its base with the adapters applied at runtime?
//!
//! [`forward`] runs a transformer over GGUF weights (decoded block by block, never whole) with
//! optional runtime LoRA ([`lora`]) exactly as llama.cpp applies it; [`compare`] turns the logits of
//! base, base + runtime LoRA and merged model into the metrics and pass/fail checks of the command.
//!
//! One check is two passes: base and base + adapters as two streams of one pass over the base
//! weights (each weight decoded once for both), then the merged model. Memory beyond the mapped files
//! is the activations of K tokens, the K×vocab logits and one row block of weights per thread.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use gguf_lora::gguf::GgufModel;
//! use gguf_lora::verify::{self, VerifyOptions};
//! let base = GgufModel::open("base.gguf")?;
//! let merged = GgufModel::open("merged.gguf")?;
//! let lora = verify::load_adapters(&base, &[("adapter.gguf".into(), 1.0)])?;
//! let run = verify::run(&base, &lora, &merged, &VerifyOptions::with_tokens(vec![1, 2, 3]))?;
//! assert!(run.report.passed());
//! # Ok(()) }
//! ```

pub mod compare;
pub mod error;
pub mod forward;
pub mod hparams;
pub mod lora;
pub mod matmul;
pub mod npy;
pub mod ops;
pub mod source;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::adapter;
use crate::arch::BaseInfo;
use crate::gguf::GgufModel;
use compare::{Comparison, Fidelity, Thresholds};
pub use error::{Result, VerifyError};
use forward::{Logits, Model};
use lora::RuntimeLora;
use source::WeightSource;

/// Tokens checked when the user gives neither `--tokens` nor `--n-tokens`.
pub const DEFAULT_N_TOKENS: usize = 16;

/// What to check and against which limits.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Token ids, one sequence at positions 0..K-1.
    pub tokens: Vec<u32>,
    /// Overrides of the per-type defaults ([`Thresholds::default_for`]).
    pub max_kl: Option<f64>,
    pub max_kl_ratio: Option<f64>,
    pub min_top1: Option<f64>,
    pub min_share: Option<f64>,
}

impl VerifyOptions {
    pub fn with_tokens(tokens: Vec<u32>) -> VerifyOptions {
        VerifyOptions {
            tokens,
            ..VerifyOptions::default()
        }
    }
}

/// A deterministic token sequence: `n` ids drawn uniformly from `0..n_vocab` by splitmix64(seed).
pub fn seeded_tokens(seed: u64, n: usize, n_vocab: usize) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % n_vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Types of the merged model's adapted tensors, and the fidelity class they allow.
#[derive(Clone, Debug, Serialize)]
pub struct MergedTypes {
    /// ggml type name → number of adapted tensors of that type in the merged model.
    pub types: BTreeMap<String, usize>,
    /// The least precise class among them: it sets the default limits.
    pub fidelity: Fidelity,
}

/// Wall time of each pass, seconds.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    pub base_and_runtime_s: f64,
    pub merged_s: f64,
}

/// Everything `verify` found, as printed or serialized.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub architecture: String,
    pub tokens: Vec<u32>,
    pub n_vocab: usize,
    /// Base tensors the adapters adapt.
    pub adapted_tensors: usize,
    pub merged_types: MergedTypes,
    #[serde(flatten)]
    pub comparison: Comparison,
    pub timings: Timings,
}

impl VerifyReport {
    pub fn passed(&self) -> bool {
        self.comparison.failures.is_empty()
    }
}

/// The report and the three sets of logits it was computed from.
pub struct VerifyRun {
    pub report: VerifyReport,
    pub base: Logits,
    pub runtime: Logits,
    pub merged: Logits,
}

impl VerifyRun {
    /// Writes `base.npy`, `runtime.npy` and `merged.npy` (float32, [K, vocab]) into `dir`.
    pub fn write_logits(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|error| VerifyError::CreateDir {
            path: dir.to_path_buf(),
            error,
        })?;
        for (name, l) in [
            ("base", &self.base),
            ("runtime", &self.runtime),
            ("merged", &self.merged),
        ] {
            npy::write_npy(
                &dir.join(format!("{name}.npy")),
                &[l.n_tokens, l.n_vocab],
                &l.data,
            )?;
        }
        Ok(())
    }
}

fn merged_types(lora: &RuntimeLora, merged: &dyn WeightSource) -> Result<MergedTypes> {
    let mut types = BTreeMap::new();
    let mut fidelity = Fidelity::Float;
    for name in lora.tensors() {
        let t = merged
            .tensor(name)
            .ok_or_else(|| VerifyError::MergedMissing {
                merged: merged.describe(),
                tensor: name.to_string(),
            })?;
        *types.entry(t.ty.name().to_string()).or_insert(0) += 1;
        fidelity = fidelity.max(Fidelity::of(t.ty));
    }
    Ok(MergedTypes { types, fidelity })
}

/// Runs base, base + `lora` and `merged` over `opts.tokens` and compares them.
pub fn run(
    base: &dyn WeightSource,
    lora: &RuntimeLora,
    merged: &dyn WeightSource,
    opts: &VerifyOptions,
) -> Result<VerifyRun> {
    let base_model = Model::new(base)?;
    let merged_model = Model::new(merged)?;
    if base_model.hp.arch != merged_model.hp.arch {
        return Err(VerifyError::ArchDiffers {
            merged: merged.describe(),
            merged_arch: merged_model.hp.arch.name(),
            base: base.describe(),
            base_arch: base_model.hp.arch.name(),
        });
    }
    let n_vocab = base_model.n_vocab()?;
    let merged_vocab = merged_model.n_vocab()?;
    if merged_vocab != n_vocab {
        return Err(VerifyError::VocabDiffers {
            merged: merged.describe(),
            merged_vocab,
            base: base.describe(),
            n_vocab,
        });
    }
    let types = merged_types(lora, merged)?;
    let mut thresholds = Thresholds::default_for(types.fidelity);
    if let Some(v) = opts.max_kl {
        thresholds.max_kl = v;
    }
    if let Some(v) = opts.max_kl_ratio {
        thresholds.max_kl_ratio = v;
    }
    if let Some(v) = opts.min_top1 {
        thresholds.min_top1 = v;
    }
    if let Some(v) = opts.min_share {
        thresholds.min_share = v;
    }

    let t0 = Instant::now();
    // One `Logits` per configuration asked for: [base, runtime], then [merged].
    let [base_logits, runtime]: [Logits; 2] = base_model
        .logits(&opts.tokens, &[None, Some(lora)])?
        .try_into()
        .unwrap_or_else(|_| unreachable!("two configurations give two sets of logits"));
    let t1 = Instant::now();
    let [merged_logits]: [Logits; 1] = merged_model
        .logits(&opts.tokens, &[None])?
        .try_into()
        .unwrap_or_else(|_| unreachable!("one configuration gives one set of logits"));
    let t2 = Instant::now();
    // The tied or untied output heads may differ in rows even when the embeddings agree.
    if merged_logits.n_vocab != base_logits.n_vocab {
        return Err(VerifyError::LogitsDiffer {
            merged: merged.describe(),
            merged_vocab: merged_logits.n_vocab,
            base: base.describe(),
            n_vocab: base_logits.n_vocab,
        });
    }

    let comparison = compare::compare(&base_logits, &runtime, &merged_logits, thresholds);
    Ok(VerifyRun {
        report: VerifyReport {
            architecture: base_model.hp.arch.name().to_string(),
            tokens: opts.tokens.clone(),
            n_vocab,
            adapted_tensors: lora.tensors().count(),
            merged_types: types,
            comparison,
            timings: Timings {
                base_and_runtime_s: (t1 - t0).as_secs_f64(),
                merged_s: (t2 - t1).as_secs_f64(),
            },
        },
        base: base_logits,
        runtime,
        merged: merged_logits,
    })
}

/// Loads adapters given as `(path, user scale)`: GGUF LoRA files, bundle members or PEFT adapters.
/// PEFT adapters are mapped onto `base`; what llama.cpp could not apply at runtime is refused (there
/// would be no reference to verify against).
pub fn load_adapters(base: &GgufModel, specs: &[(String, f32)]) -> Result<RuntimeLora> {
    let mut set = RuntimeLora::new();
    // Only a PEFT adapter needs the base described (mapping); a GGUF adapter is taken as it is.
    let needs_base = specs
        .iter()
        .any(|(s, _)| adapter::detect(Path::new(s)) == adapter::SourceFormat::Peft);
    let info = if needs_base {
        Some(BaseInfo::from_model(base).map_err(VerifyError::Base)?)
    } else {
        None
    };
    for (spec, scale) in specs {
        let path = Path::new(spec);
        let opened = adapter::open(path, info.as_ref())?;
        if opened.format == adapter::SourceFormat::Peft {
            if let Some(issue) = opened.issues.first() {
                return Err(VerifyError::PeftMapping {
                    path: path.to_path_buf(),
                    message: issue.message.clone(),
                    count: opened.issues.len(),
                });
            }
            if let Some(first) = opened.adapter.unrepresentable().into_iter().next() {
                return Err(VerifyError::NotRuntime {
                    path: path.to_path_buf(),
                    what: first,
                });
            }
        }
        set.add_adapter(&opened.adapter, *scale)?;
    }
    if let Some(name) = set.tensors().find(|n| base.tensor(n).is_none()) {
        return Err(VerifyError::BaseMissing {
            tensor: name.to_string(),
        });
    }
    Ok(set)
}

/// The merged model `gguf-lora merge` makes with its defaults (each tensor keeps its type), written
/// to a temporary directory that lives as long as the returned guard; used when the user gives no
/// merged model, so that verify says what a merge would keep.
pub fn merge_to_temp(
    base: &GgufModel,
    specs: &[(String, f32)],
) -> Result<(tempfile::TempDir, GgufModel)> {
    use crate::engine::file::Output;
    use crate::merge::inputs::read_adapter;
    use crate::merge::merge_model;
    let mut adapters = Vec::new();
    for (spec, scale) in specs {
        adapters.push(read_adapter(Path::new(spec), base, spec.clone(), *scale)?);
    }
    let dir = tempfile::tempdir().map_err(VerifyError::TempDir)?;
    let out = dir.path().join("merged.gguf");
    let output = Output {
        path: &out,
        no_split: true,
        other_inputs: &[],
    };
    merge_model(
        base,
        &adapters,
        &crate::merge::MergeOptions::default(),
        &output,
        &|_, _| {},
    )?;
    let merged = GgufModel::open(&out)?;
    Ok((dir, merged))
}

#[cfg(test)]
mod tests {
    use super::forward::tests::{term, tiny, Rng, N_EMBD};
    use super::*;

    /// Regression (issue 11): a merged model whose `output.weight` has other rows than the base's
    /// gave logits of another width, and comparing them panicked; it is an error naming both.
    #[test]
    fn merged_output_of_other_rows_is_an_error() {
        let base = tiny("llama", false);
        let mut merged = tiny("llama", false);
        let rows = 40;
        merged.add(
            "output.weight",
            &[N_EMBD as u64, rows as u64],
            &vec![0.01; N_EMBD * rows],
        );
        let mut lora = RuntimeLora::new();
        lora.add(
            "blk.0.attn_q.weight",
            term(&mut Rng(3), 2, N_EMBD, N_EMBD, 1.0),
        );
        let err = run(
            &base,
            &lora,
            &merged,
            &VerifyOptions::with_tokens(vec![1, 2, 3]),
        )
        .err()
        .expect("refused");
        assert!(
            matches!(
                err,
                VerifyError::LogitsDiffer {
                    merged_vocab: 40,
                    n_vocab: 50,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn seeded_tokens_are_deterministic_in_range_and_seed_dependent() {
        let a = seeded_tokens(7, 100, 1000);
        assert_eq!(a, seeded_tokens(7, 100, 1000));
        assert_ne!(a, seeded_tokens(8, 100, 1000));
        assert!(a.iter().all(|t| *t < 1000));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 80);
    }
}
