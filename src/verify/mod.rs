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
//! # fn main() -> anyhow::Result<()> {
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
pub mod forward;
pub mod hparams;
pub mod lora;
pub mod matmul;
pub mod npy;
pub mod source;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::adapter;
use crate::arch::BaseInfo;
use crate::gguf::GgufModel;
use compare::{Comparison, Fidelity, Thresholds};
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
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
        let t = merged.tensor(name).with_context(|| {
            format!(
                "{}: the adapters adapt {name}, which the merged model does not have",
                merged.describe()
            )
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
        bail!(
            "{} is a {} model but the base {} is {}",
            merged.describe(),
            merged_model.hp.arch.name(),
            base.describe(),
            base_model.hp.arch.name()
        );
    }
    let n_vocab = base_model.n_vocab()?;
    if merged_model.n_vocab()? != n_vocab {
        bail!(
            "{} has {} tokens but the base {} has {n_vocab}",
            merged.describe(),
            merged_model.n_vocab()?,
            base.describe()
        );
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
    let mut out = base_model.logits(&opts.tokens, &[None, Some(lora)])?;
    let runtime = out.pop().context("runtime logits")?;
    let base_logits = out.pop().context("base logits")?;
    let t1 = Instant::now();
    let merged_logits = merged_model.logits(&opts.tokens, &[None])?.remove(0);
    let t2 = Instant::now();

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

/// Reads a PEFT adapter (directory or `.safetensors` with its config), mapped onto `base`, refusing
/// what llama.cpp could not apply at runtime (there would be no reference to verify against).
fn read_peft_adapter(base: &GgufModel, path: &Path) -> Result<adapter::Adapter> {
    let info = BaseInfo::from_model(base).map_err(|m| anyhow::anyhow!("base model: {m}"))?;
    let (adapter, issues) = adapter::peft::read(path, &info)?;
    if let Some(issue) = issues.first() {
        bail!(
            "{}: {} ({} problem(s) mapping it onto the base)",
            path.display(),
            issue.message,
            issues.len()
        );
    }
    if let Some(first) = adapter.unrepresentable().first() {
        bail!(
            "{}: {first} cannot be applied at runtime by llama.cpp, so there is no runtime reference to verify against",
            path.display()
        );
    }
    Ok(adapter)
}

/// Loads adapters given as `(path, user scale)`: GGUF LoRA files or PEFT adapters.
pub fn load_adapters(base: &GgufModel, specs: &[(String, f32)]) -> Result<RuntimeLora> {
    let mut set = RuntimeLora::new();
    for (spec, scale) in specs {
        let path = Path::new(spec);
        let adapter = if adapter::peft::is_peft(path) && !spec.ends_with(".gguf") {
            read_peft_adapter(base, path)?
        } else {
            adapter::gguf::read(path)?
        };
        set.add_adapter(&adapter, *scale)?;
    }
    if let Some(name) = set.tensors().find(|n| base.tensor(n).is_none()) {
        bail!("the adapters adapt {name}, which the base model does not have (hint: wrong base model?)");
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
    use crate::merge::file::{merge_model, Output};
    use crate::merge::inputs::read_adapter;
    let mut adapters = Vec::new();
    for (spec, scale) in specs {
        adapters.push(read_adapter(Path::new(spec), base, spec.clone(), *scale)?);
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory for the merge")?;
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
    use super::*;

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
