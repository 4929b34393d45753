//! `verify`: does a merged model behave like its base with the adapters applied at runtime?
//!
//! [`forward`] runs a transformer over GGUF weights (decoded block by block, never whole) with
//! optional runtime LoRA ([`lora`]) exactly as llama.cpp applies it; [`compare`] turns the logits of
//! base, base + runtime LoRA and merged model into the metrics and pass/fail checks of the command.
//!
//! One check is two passes: base and base + adapters as two streams of one pass over the base
//! weights (each weight decoded once for both), then the merged model. A long input runs in chunks
//! of at most `ctx` positions, each an independent sequence from position 0 (a text's BOS starts
//! every chunk), and every statistic is over all positions of all chunks. Logits are computed and
//! compared a block of positions at a time, so memory beyond the mapped files is the activations
//! and KV caches of one chunk, a block of logits and one row block of weights per thread.
//!
//! With `generate`, the KV caches of the last chunk then continue it greedily, one token per step,
//! under base, runtime LoRA and merged model: what a person looks at first.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use gguf_lora::gguf::GgufModel;
//! use gguf_lora::verify::{self, VerifyOptions};
//! let base = GgufModel::open("base.gguf")?;
//! let merged = GgufModel::open("merged.gguf")?;
//! let lora = verify::load_adapters(&base, &[("adapter.gguf".into(), 1.0)])?;
//! let report = verify::run(&base, &lora, &merged, &VerifyOptions::with_tokens(vec![1, 2, 3]))?;
//! assert!(report.passed());
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::adapter;
use crate::arch::BaseInfo;
use crate::gguf::GgufModel;
use crate::tokenizer::{Tokenizer, TokenizerError};
use compare::{argmax, Accumulator, Comparison, Fidelity, Thresholds};
pub use error::{Result, VerifyError};
use forward::{Logits, Model, Session};
use lora::RuntimeLora;
use npy::NpyRows;
use source::WeightSource;

/// Tokens checked when the user gives neither `--tokens` nor `--n-tokens`.
pub const DEFAULT_N_TOKENS: usize = 16;

/// Positions per chunk when the user gives no `--ctx` (clamped to the model's context length).
pub const DEFAULT_CTX: usize = 512;

/// Logit values computed per block of positions (base, runtime and merged together): 256 MB.
const BLOCK_VALUES: usize = 1 << 26;

/// What to check and against which limits.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Token ids of the input, in order.
    pub tokens: Vec<u32>,
    /// Positions per chunk (0 = [`DEFAULT_CTX`]), clamped to the model's context length.
    pub ctx: usize,
    /// The token every chunk after the first starts with (the model's BOS, for an input that
    /// starts with it), so that each chunk reads as a sequence of its own; `None` = plain cuts.
    pub chunk_start: Option<u32>,
    /// Length of the greedy continuations (0 = none).
    pub generate: usize,
    /// Tokens that end a continuation (the model's end-of-generation tokens).
    pub stop: BTreeSet<u32>,
    /// Write `base.npy`, `runtime.npy` and `merged.npy` (float32, [positions, vocab]) here.
    pub logits_out: Option<PathBuf>,
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

/// The chunks `tokens` runs in: consecutive pieces of at most `ctx` positions; with `start`, every
/// chunk after the first begins with that token and holds `ctx - 1` input tokens (for `ctx` ≥ 2).
/// Every input token is in exactly one chunk, in order.
pub fn chunks(tokens: &[u32], ctx: usize, start: Option<u32>) -> Vec<Vec<u32>> {
    let ctx = ctx.max(1);
    let mut out = Vec::new();
    let first = tokens.len().min(ctx);
    out.push(tokens[..first].to_vec());
    let start = start.filter(|_| ctx >= 2);
    let per = ctx - usize::from(start.is_some());
    for piece in tokens[first..].chunks(per) {
        let mut c = Vec::with_capacity(ctx);
        c.extend(start);
        c.extend_from_slice(piece);
        out.push(c);
    }
    out
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

/// Wall time of each pass over all chunks (forward and output projection), seconds.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    pub base_and_runtime_s: f64,
    pub merged_s: f64,
}

/// One greedy continuation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Continuation {
    /// The generated ids, the end-of-generation token included when one ended it.
    pub tokens: Vec<u32>,
    /// Ended by an end-of-generation token before the requested length.
    pub stopped: bool,
    /// The tokens as text, piece after piece as llama.cpp prints a continuation (control tokens
    /// empty); filled by [`Generation::add_text`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Continuation {
    /// The pieces of `tokens[range]` joined (invalid UTF-8 shown as U+FFFD).
    pub fn text_of(
        &self,
        tok: &Tokenizer,
        range: std::ops::Range<usize>,
    ) -> std::result::Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in &self.tokens[range] {
            bytes.extend_from_slice(tok.token_to_piece(id, false)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Greedy continuations of the last chunk under the three models.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// Tokens asked for.
    pub requested: usize,
    /// Length of the prompt continued (the last chunk: the whole input when it fits one).
    pub prompt_tokens: usize,
    pub base: Continuation,
    pub runtime: Continuation,
    pub merged: Continuation,
    /// The first generated position where merged and runtime differ (`None`: they agree).
    pub first_divergence: Option<usize>,
    pub time_s: f64,
}

impl Generation {
    /// Fills each continuation's `text` with the model's tokenizer.
    pub fn add_text(&mut self, tok: &Tokenizer) -> std::result::Result<(), TokenizerError> {
        for c in [&mut self.base, &mut self.runtime, &mut self.merged] {
            c.text = Some(c.text_of(tok, 0..c.tokens.len())?);
        }
        Ok(())
    }
}

/// Everything `verify` found, as printed or serialized.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub architecture: String,
    /// The input ids.
    pub tokens: Vec<u32>,
    /// Positions per chunk asked for, after clamping to the model's context length.
    pub ctx: usize,
    /// Positions of each chunk (input tokens, plus the start token of each later chunk).
    pub chunks: Vec<usize>,
    /// Positions compared: the sum of `chunks`.
    pub n_positions: usize,
    pub n_vocab: usize,
    /// Base tensors the adapters adapt.
    pub adapted_tensors: usize,
    pub merged_types: MergedTypes,
    #[serde(flatten)]
    pub comparison: Comparison,
    pub timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
}

impl VerifyReport {
    pub fn passed(&self) -> bool {
        self.comparison.failures.is_empty()
    }
}

/// The three `--logits-out` files, created when the first block's width is known.
struct LogitsFiles {
    dir: PathBuf,
    n_positions: usize,
    files: Option<[NpyRows; 3]>,
}

impl LogitsFiles {
    fn write(&mut self, blocks: [&Logits; 3]) -> Result<()> {
        if self.files.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(|error| VerifyError::CreateDir {
                path: self.dir.clone(),
                error,
            })?;
            let n_vocab = blocks[0].n_vocab;
            let open = |name: &str| {
                NpyRows::create(
                    &self.dir.join(format!("{name}.npy")),
                    self.n_positions,
                    n_vocab,
                )
            };
            self.files = Some([open("base")?, open("runtime")?, open("merged")?]);
        }
        if let Some(files) = &mut self.files {
            for (f, l) in files.iter_mut().zip(blocks) {
                f.write_rows(&l.data)?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if let Some(files) = self.files {
            for f in files {
                f.finish()?;
            }
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

/// Runs base, base + `lora` and `merged` over `opts.tokens`, chunk by chunk, and compares them;
/// then continues the last chunk greedily when `opts.generate` asks for it.
pub fn run(
    base: &dyn WeightSource,
    lora: &RuntimeLora,
    merged: &dyn WeightSource,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
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
    if opts.tokens.is_empty() {
        return Err(VerifyError::NoTokens);
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

    let mut ctx = if opts.ctx == 0 { DEFAULT_CTX } else { opts.ctx };
    if base_model.hp.n_ctx_train > 0 {
        ctx = ctx.min(base_model.hp.n_ctx_train);
    }
    let chunks = chunks(&opts.tokens, ctx, opts.chunk_start);
    let n_positions: usize = chunks.iter().map(Vec::len).sum();
    let mut files = opts.logits_out.as_ref().map(|dir| LogitsFiles {
        dir: dir.clone(),
        n_positions,
        files: None,
    });
    let mut acc = Accumulator::default();
    let (mut t_base, mut t_merged) = (0f64, 0f64);
    let loras = [None, Some(lora)];
    // The last chunk's sessions and final logits, which a continuation starts from.
    let mut last = None;
    for (ci, chunk) in chunks.iter().enumerate() {
        let n = chunk.len();
        let is_last = ci + 1 == chunks.len();
        // Room for the continuation after the last chunk.
        let n_ctx = n + if is_last { opts.generate } else { 0 };
        let t0 = Instant::now();
        let mut br = base_model.session(&loras, n_ctx);
        let h_br = br.feed(&[chunk, chunk])?;
        let t1 = Instant::now();
        let mut m = merged_model.session(&[None], n_ctx);
        let h_m = m.feed(&[chunk])?;
        t_base += (t1 - t0).as_secs_f64();
        t_merged += t1.elapsed().as_secs_f64();
        let block = (BLOCK_VALUES / (3 * n_vocab).max(1)).clamp(1, n);
        let mut start = 0;
        let mut tail = None;
        while start < n {
            let rows = start..(start + block).min(n);
            let t0 = Instant::now();
            let [b, r]: [Logits; 2] = br
                .head(&h_br, rows.clone())?
                .try_into()
                .unwrap_or_else(|_| unreachable!("two streams give two sets of logits"));
            let t1 = Instant::now();
            let [ml]: [Logits; 1] = m
                .head(&h_m, rows.clone())?
                .try_into()
                .unwrap_or_else(|_| unreachable!("one stream gives one set of logits"));
            t_base += (t1 - t0).as_secs_f64();
            t_merged += t1.elapsed().as_secs_f64();
            // The tied or untied output heads may differ in rows even when the embeddings agree.
            if ml.n_vocab != b.n_vocab {
                return Err(VerifyError::LogitsDiffer {
                    merged: merged.describe(),
                    merged_vocab: ml.n_vocab,
                    base: base.describe(),
                    n_vocab: b.n_vocab,
                });
            }
            acc.add(&b, &r, &ml);
            if let Some(f) = &mut files {
                f.write([&b, &r, &ml])?;
            }
            start = rows.end;
            if start == n {
                let t = b.n_tokens - 1;
                tail = Some([b.row(t).to_vec(), r.row(t).to_vec(), ml.row(t).to_vec()]);
            }
        }
        if is_last {
            last = Some((br, m, tail, n));
        }
    }
    if let Some(f) = files {
        f.finish()?;
    }
    debug_assert_eq!(acc.n_positions(), n_positions);
    let generation = match last {
        Some((mut br, mut m, Some(tail), n)) if opts.generate > 0 => {
            Some(generate(&mut br, &mut m, tail, n, opts)?)
        }
        _ => None,
    };

    Ok(VerifyReport {
        architecture: base_model.hp.arch.name().to_string(),
        tokens: opts.tokens.clone(),
        ctx,
        chunks: chunks.iter().map(Vec::len).collect(),
        n_positions: acc.n_positions(),
        n_vocab,
        adapted_tensors: lora.tensors().count(),
        merged_types: types,
        comparison: acc.finish(thresholds),
        timings: Timings {
            base_and_runtime_s: t_base,
            merged_s: t_merged,
        },
        generation,
    })
}

/// Greedy continuations (llama.cpp's greedy sampler: the first largest logit) from the sessions
/// of the last chunk: `br` holds base and runtime, `m` the merged model; `first` are the three
/// models' logits at the chunk's last position. Each continuation stops at `opts.generate` tokens
/// or after an end-of-generation token; a stream that stopped is fed its last token again (its
/// output unused) while the other of its session goes on.
fn generate(
    br: &mut Session,
    m: &mut Session,
    first: [Vec<f32>; 3],
    prompt_tokens: usize,
    opts: &VerifyOptions,
) -> Result<Generation> {
    let t0 = Instant::now();
    let n = opts.generate;
    let mut out: [Vec<u32>; 3] = Default::default();
    let mut done = [false; 3];
    let mut stopped = [false; 3];
    let mut next = first.map(|row| argmax(&row) as u32);
    loop {
        for i in 0..3 {
            if done[i] {
                continue;
            }
            out[i].push(next[i]);
            if opts.stop.contains(&next[i]) {
                stopped[i] = out[i].len() < n;
                done[i] = true;
            }
            if out[i].len() == n {
                done[i] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        let last = |i: usize| *out[i].last().unwrap_or(&0);
        if !(done[0] && done[1]) {
            let rows = br.step(&[last(0), last(1)])?;
            for (i, row) in rows.iter().enumerate() {
                if !done[i] {
                    next[i] = argmax(row) as u32;
                }
            }
        }
        if !done[2] {
            let rows = m.step(&[last(2)])?;
            next[2] = argmax(&rows[0]) as u32;
        }
    }
    let [base, runtime, merged] = out;
    let first_divergence =
        (0..runtime.len().max(merged.len())).find(|&i| runtime.get(i) != merged.get(i));
    Ok(Generation {
        requested: n,
        prompt_tokens,
        base: Continuation {
            tokens: base,
            stopped: stopped[0],
            text: None,
        },
        runtime: Continuation {
            tokens: runtime,
            stopped: stopped[1],
            text: None,
        },
        merged: Continuation {
            tokens: merged,
            stopped: stopped[2],
            text: None,
        },
        first_divergence,
        time_s: t0.elapsed().as_secs_f64(),
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

/// The merged model `gguf-lora merge` makes with its defaults (each tensor keeps its type, the
/// adapter-keeping requantization calibrated on the built-in corpus), written to a temporary
/// directory that lives as long as the returned guard; used when the user gives no merged model, so
/// that verify says what a merge would keep.
pub fn merge_to_temp(
    base: &GgufModel,
    specs: &[(String, f32)],
) -> Result<(tempfile::TempDir, GgufModel)> {
    use crate::calibrate::{preserve_method, CalibrationText};
    use crate::engine::file::Output;
    use crate::merge::inputs::open_adapter;
    use crate::merge::{merge_model, MergeOptions};
    let (mut inputs, mut opened) = (Vec::new(), Vec::new());
    for (spec, scale) in specs {
        let (i, a) = open_adapter(Path::new(spec), base, spec.clone(), *scale)?;
        inputs.push(i);
        opened.push(a);
    }
    let dir = tempfile::tempdir().map_err(VerifyError::TempDir)?;
    let out = dir.path().join("merged.gguf");
    let output = Output {
        path: &out,
        no_split: true,
        other_inputs: &[],
    };
    let opts = MergeOptions::default();
    crate::merge::check(base, &inputs, opts.outtype, &opts.retype, &output)?;
    let adapters: Vec<&adapter::Adapter> = opened.iter().collect();
    let requant = preserve_method(
        base,
        &inputs,
        &adapters,
        opts.outtype,
        &opts.retype,
        &CalibrationText::default(),
    )
    .map_err(|e| VerifyError::Calibrate(Box::new(e)))?;
    let opts = MergeOptions { requant, ..opts };
    merge_model(base, &inputs, &opts, &output, &|_, _| {})?;
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
        .expect_err("refused");
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
    fn chunks_keep_every_token_once_and_restart_with_the_start_token() {
        let t: Vec<u32> = (10..21).collect();
        assert_eq!(chunks(&t, 100, Some(1)), vec![t.clone()]);
        assert_eq!(
            chunks(&t, 4, Some(1)),
            vec![
                vec![10, 11, 12, 13],
                vec![1, 14, 15, 16],
                vec![1, 17, 18, 19],
                vec![1, 20]
            ]
        );
        assert_eq!(
            chunks(&t, 4, None),
            vec![vec![10, 11, 12, 13], vec![14, 15, 16, 17], vec![18, 19, 20]]
        );
        // No room for a start token in chunks of one.
        assert_eq!(chunks(&t[..2], 1, Some(1)), vec![vec![10], vec![11]]);
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
