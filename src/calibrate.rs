//! The calibration pass of `merge`: what each touched tensor's input looks like in the model the
//! user trained for.
//!
//! The base runs with the adapters applied at runtime (the model whose behaviour the merge must
//! keep) through our forward pass ([`crate::verify::forward`]) over calibration tokens, in chunks
//! of `ctx` tokens; the input of every linear an adapter touches is recorded. Tensors that read the
//! same input (q/k/v, gate/up) share one record. The records become [`InputStats`], which the
//! adapter-keeping requantization ([`crate::engine::preserve`]) weights its errors with.
//!
//! Without a calibration file the merge calibrates on [`DEFAULT_CORPUS`], 19 KB of our own mixed
//! text committed with the source (about 5000 tokens: prose, dialogue, letters, instructions, code,
//! tables, numbers, a little French, German, Spanish and Chinese), of which it takes the first
//! [`default_tokens`] unless told more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use half::bf16;

use crate::adapter::Adapter;
use crate::engine::preserve::{self, InputStats, Weighting};
use crate::engine::{AdapterInput, InputStatsMap, MergeType, RequantMethod};
use crate::gguf::GgufModel;
use crate::quant::GgmlType;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::verify::forward::{LinearInputs, Model};
use crate::verify::lora::{LoraTerm, RuntimeLora, TOKEN_EMBD};
use crate::verify::VerifyError;

/// The text the merge calibrates on when the user gives none.
pub const DEFAULT_CORPUS: &str = include_str!("calibrate/corpus.txt");
/// Calibration tokens when the user does not say ([`default_tokens`]): the pass's cost is tokens
/// times the layers' weights, so a large base gets fewer. Measured through llama.cpp
/// (testdata/merge_quality/judge.py, `scripts/bench-merge-quality.sh`): gemma3-270m Q4_K_M + a
/// random rank-16 adapter, held-out KL to the runtime LoRA over seeds 0-3 of
/// testdata/tools/random_lora.py 0.059 at 512 tokens, 0.047 at 1024, 0.048 at 2048 (the corpus
/// extended), 12 s, 17 s and 26 s wall on 2 cores; the 7B-shaped base takes 9 minutes at 512.
pub const DEFAULT_TOKENS: usize = 1024;
pub const DEFAULT_TOKENS_LARGE: usize = 512;
/// Weights in the layers above which a base counts as large for [`default_tokens`].
pub const LARGE_BASE_WEIGHTS: u64 = 2_000_000_000;

/// The calibration tokens for `model` when the user does not say: [`DEFAULT_TOKENS`], or
/// [`DEFAULT_TOKENS_LARGE`] when its layers (`blk.*`) hold more than [`LARGE_BASE_WEIGHTS`].
pub fn default_tokens(model: &GgufModel) -> usize {
    tokens_for_layer_weights(
        model
            .tensors()
            .filter(|(_, t)| t.name.starts_with("blk."))
            .map(|(_, t)| t.n_elements())
            .fold(0, u64::saturating_add),
    )
}

fn tokens_for_layer_weights(weights: u64) -> usize {
    if weights > LARGE_BASE_WEIGHTS {
        DEFAULT_TOKENS_LARGE
    } else {
        DEFAULT_TOKENS
    }
}
/// Tokens per forward chunk when the user does not say.
pub const DEFAULT_CTX: usize = 512;

/// Why calibration could not run.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    // Not a `#[source]`: the message already carries the cause, and the binary prints sources.
    #[error("calibration: the base's tokenizer cannot read {source_name}: {error}; calibrate on another text with --calibrate FILE, or use --requant nearest")]
    Tokenizer {
        source_name: String,
        error: TokenizerError,
    },
    // Likewise (with `#[from]` the binary printed the cause twice).
    #[error("calibration: {0}")]
    Forward(VerifyError),
    #[error("calibration: the text gives no tokens")]
    NoTokens,
    #[error("calibration: --ctx must be at least 1")]
    ZeroCtx,
}

impl From<VerifyError> for CalibrateError {
    fn from(e: VerifyError) -> CalibrateError {
        CalibrateError::Forward(e)
    }
}

/// What to calibrate on.
pub struct CalibrationSpec<'t> {
    /// The text (the user's file or [`DEFAULT_CORPUS`]) and what to call it in reports.
    pub text: &'t [u8],
    pub source: String,
    /// Whether the text is our own corpus rather than the user's: when the base's tokenizer cannot
    /// read it (a model whose tokenizer we do not reproduce, or a test fixture's toy vocabulary),
    /// seeded random tokens stand in for it, and the report says so. The user's own text is never
    /// replaced.
    pub built_in: bool,
    /// At most this many tokens are used (the text is repeated if shorter).
    pub max_tokens: usize,
    pub ctx: usize,
    /// How errors are weighted (see [`InputStats::new`]).
    pub weighting: Weighting,
}

/// Statistics per touched tensor (per expert for stacked experts).
pub struct Calibration {
    pub stats: InputStatsMap,
    pub tokens: usize,
    pub source: String,
}

impl std::fmt::Debug for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Calibration {{ {} tensors, {} tokens of {} }}",
            self.stats.len(),
            self.tokens,
            self.source
        )
    }
}

/// What the statistics of expert `expert` of the stacked tensor `tensor` are recorded under
/// (the tensor's rows of that expert are requantized with them).
fn expert_key(tensor: &str, expert: usize) -> String {
    format!("{tensor}#{expert}")
}

/// The stacked tensor and expert of an [`expert_key`]; `None` for a plain tensor's name.
fn split_expert_key(key: &str) -> Option<(&str, usize)> {
    let (tensor, e) = key.rsplit_once('#')?;
    Some((tensor, e.parse().ok()?))
}

/// The input a tensor shares with its siblings: q/k/v read one normed hidden state, gate/up another
/// (an expert's gate/up likewise, per expert).
fn input_key(tensor: &str) -> String {
    let mut parts: Vec<&str> = tensor.split('.').collect();
    if parts.len() >= 3 {
        let shared = match parts[2] {
            "attn_q" | "attn_k" | "attn_v" => Some("attn_in"),
            "ffn_gate" | "ffn_up" => Some("ffn_in"),
            "ffn_gate_exps" | "ffn_up_exps" => Some("ffn_in_exps"),
            "ffn_gate_shexp" | "ffn_up_shexp" => Some("ffn_in_shexp"),
            _ => None,
        };
        if let Some(s) = shared {
            parts[2] = s;
        }
    }
    parts.join(".")
}

/// Per shared input: the tensor that records it, and every tensor seen reading it.
type Members = HashMap<String, (Option<String>, HashSet<String>)>;

/// Records the inputs of the wanted tensors, one record per shared input.
/// How a recorded input value is stored: f32 exactly, or bf16 (what the merge keeps: a 7B model's
/// inputs over 512 tokens are 1.5 GB in f32, and statistics need no more than bf16's three digits,
/// while its range, f32's, holds real activations' outliers; measured on the fact adapter: held-out
/// KL 0.0959 against 0.0958 with f32).
pub trait Recorded: Copy + Send + Sync + 'static {
    fn record(v: f32) -> Self;
}

impl Recorded for f32 {
    fn record(v: f32) -> f32 {
        v
    }
}

impl Recorded for bf16 {
    fn record(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

struct Recorder<'w, T> {
    wanted: &'w HashSet<String>,
    /// Tokens the pass runs: each record is allocated once at its final size (grown by doubling,
    /// a 7B model's records took up to twice their size).
    total_tokens: usize,
    /// Per shared input: values per token and the tokens' values.
    inputs: Mutex<BTreeMap<String, (usize, Vec<T>)>>,
    /// Per input key: the tensor that records it, and every tensor seen reading it.
    members: Mutex<Members>,
}

impl<T: Recorded> Recorder<'_, T> {
    /// Everything recorded so far, as records (their inputs are complete: the pass has left the
    /// layer they belong to), each with the directions `lora`'s adapters read it along.
    fn take(&self, lora: &RuntimeLora) -> Vec<RecordedInput<T>> {
        let inputs = std::mem::take(&mut *self.inputs.lock().unwrap_or_else(|e| e.into_inner()));
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        inputs
            .into_iter()
            .map(|(key, (n_in, rows))| {
                let mut tensors: Vec<String> = members
                    .remove(&key)
                    .map(|m| m.1.into_iter().collect())
                    .unwrap_or_default();
                tensors.sort();
                RecordedInput {
                    adapter_rows: adapter_rows(lora, &tensors, n_in),
                    tensors,
                    n_in,
                    rows,
                }
            })
            .collect()
    }
}

impl<T: Recorded> Recorder<'_, T> {
    /// Appends `x` to the record of `tensor`'s input (a plain tensor's name or an [`expert_key`]).
    /// An expert sees a share of the tokens that routing decides, so its record grows as needed
    /// rather than being sized for every token.
    fn record(&self, tensor: &str, x: &[f32], n_in: usize, expert: bool) {
        let key = input_key(tensor);
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let entry = members.entry(key.clone()).or_default();
        entry.1.insert(tensor.to_string());
        // The first member seen records the input for all; its siblings see the same rows.
        let recorder = entry.0.get_or_insert_with(|| tensor.to_string());
        if recorder != tensor {
            return;
        }
        drop(members);
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let total = if expert { 0 } else { self.total_tokens };
        let entry = inputs
            .entry(key)
            .or_insert_with(|| (n_in, Vec::with_capacity(n_in.saturating_mul(total))));
        entry.1.extend(x.iter().map(|&v| T::record(v)));
    }
}

impl<T: Recorded> LinearInputs for Recorder<'_, T> {
    fn observe(&self, tensor: &str, _stream: usize, x: &[f32], n_in: usize) {
        if self.wanted.contains(tensor) {
            self.record(tensor, x, n_in, false);
        }
    }

    fn observe_expert(&self, tensor: &str, expert: usize, _stream: usize, x: &[f32], n_in: usize) {
        if self.wanted.contains(tensor) {
            self.record(&expert_key(tensor, expert), x, n_in, true);
        }
    }

    fn wants_logits(&self) -> bool {
        false
    }
}

/// The tokens a calibration runs on, and what they are (for the report and provenance).
pub struct CalibrationTokens {
    pub ids: Vec<u32>,
    pub source: String,
}

/// Seed of the random tokens that stand in for the built-in corpus.
const SEED: u64 = 0x6767_7566;

/// Tokens of `spec.text` by the base's own tokenizer (BOS as the model says), at most
/// `spec.max_tokens`, the text repeated when it is shorter; for the built-in corpus on a base whose
/// tokenizer cannot read it, `spec.max_tokens` seeded random tokens of its vocabulary.
pub fn calibration_tokens(
    model: &GgufModel,
    spec: &CalibrationSpec<'_>,
) -> Result<CalibrationTokens, CalibrateError> {
    if spec.max_tokens == 0 {
        return Err(CalibrateError::NoTokens);
    }
    let once = Tokenizer::from_metadata(model.metadata())
        .and_then(|tok| tok.tokenize(spec.text, true, false));
    let once = match once {
        Ok(ids) => ids,
        Err(error) if spec.built_in => {
            let n_vocab = Model::new(model)?.n_vocab()?;
            return Ok(CalibrationTokens {
                ids: crate::verify::seeded_tokens(SEED, spec.max_tokens, n_vocab),
                source: format!(
                    "seeded random tokens (the base's tokenizer cannot read the built-in corpus: {error})"
                ),
            });
        }
        Err(error) => {
            return Err(CalibrateError::Tokenizer {
                source_name: spec.source.clone(),
                error,
            })
        }
    };
    if once.is_empty() {
        return Err(CalibrateError::NoTokens);
    }
    let mut ids = Vec::with_capacity(spec.max_tokens);
    while ids.len() < spec.max_tokens {
        let take = (spec.max_tokens - ids.len()).min(once.len());
        ids.extend_from_slice(&once[..take]);
    }
    Ok(CalibrationTokens {
        ids,
        source: spec.source.clone(),
    })
}

/// Runs the base with `adapters` (each with its user scale) applied at runtime over `tokens`, in
/// chunks of `spec.ctx`, and returns the input statistics of every tensor in `targets`. Layer by
/// layer: each layer's records become statistics (and are dropped) before the next layer runs, so
/// memory holds one layer's records, never the model's.
pub fn calibrate(
    model: &GgufModel,
    adapters: &[(&Adapter, f32)],
    tokens: &CalibrationTokens,
    targets: &HashSet<String>,
    spec: &CalibrationSpec<'_>,
) -> Result<Calibration, CalibrateError> {
    let mut stats = HashMap::new();
    record_inputs_by_layer::<bf16>(
        model,
        adapters,
        &tokens.ids,
        targets,
        spec.ctx,
        &mut |recorded| {
            use rayon::prelude::*;
            let built: Vec<(Vec<String>, Arc<InputStats>)> = recorded
                .into_par_iter()
                .map(|r| {
                    // A tied embedding's head statistics say nothing of its other use, the lookup.
                    let w = if r.tensors.iter().any(|t| t == TOKEN_EMBD) {
                        spec.weighting.for_tied_embedding()
                    } else {
                        spec.weighting
                    };
                    let s = InputStats::new(r.n_in, &r.rows, &r.adapter_rows, &w);
                    (r.tensors, Arc::new(s))
                })
                .collect();
            for (tensors, s) in built {
                for t in tensors {
                    match split_expert_key(&t) {
                        // A stacked tensor's statistics are one entry per expert, in expert
                        // order; an expert no token reached has none (its rows round to nearest).
                        Some((tensor, e)) => {
                            let n_expert = model
                                .tensor(tensor)
                                .and_then(|t| t.dims.get(2).copied())
                                .unwrap_or(0) as usize;
                            let per_expert = stats
                                .entry(tensor.to_string())
                                .or_insert_with(|| vec![None; n_expert]);
                            if let Some(slot) = per_expert.get_mut(e) {
                                *slot = Some(Arc::clone(&s));
                            }
                        }
                        None => {
                            stats.insert(t, vec![Some(Arc::clone(&s))]);
                        }
                    }
                }
            }
        },
    )?;
    Ok(Calibration {
        stats,
        tokens: tokens.ids.len(),
        source: tokens.source.clone(),
    })
}

/// What entered one linear input over the calibration tokens.
pub struct RecordedInput<T> {
    /// The tensors that read it (q/k/v share one input, gate/up another), sorted.
    pub tensors: Vec<String>,
    /// Values per token.
    pub n_in: usize,
    /// Token-major: token `i`'s input is `rows[i·n_in..(i+1)·n_in]`.
    pub rows: Vec<T>,
    /// The directions the adapters read this input along (see [`adapter_rows`]).
    pub adapter_rows: Vec<f32>,
}

/// Runs the base with `adapters` (each with its user scale) applied at runtime over `tokens`, in
/// chunks of `ctx` positions, and returns what entered every tensor of `targets`, one record per
/// shared input (sorted by input).
pub fn record_inputs<T: Recorded>(
    model: &GgufModel,
    adapters: &[(&Adapter, f32)],
    tokens: &[u32],
    targets: &HashSet<String>,
    ctx: usize,
) -> Result<Vec<RecordedInput<T>>, CalibrateError> {
    let mut all = Vec::new();
    record_inputs_by_layer(model, adapters, tokens, targets, ctx, &mut |mut layer| {
        all.append(&mut layer)
    })?;
    all.sort_by_key(|r| r.tensors.first().cloned().map(|t| input_key(&t)));
    Ok(all)
}

/// [`record_inputs`], handing each layer's records to `layer_done` as soon as every chunk has
/// been through that layer (sorted by input within the layer).
fn record_inputs_by_layer<T: Recorded>(
    model: &GgufModel,
    adapters: &[(&Adapter, f32)],
    tokens: &[u32],
    targets: &HashSet<String>,
    ctx: usize,
    layer_done: &mut dyn FnMut(Vec<RecordedInput<T>>),
) -> Result<(), CalibrateError> {
    if ctx == 0 {
        return Err(CalibrateError::ZeroCtx);
    }
    if tokens.is_empty() {
        return Err(CalibrateError::NoTokens);
    }
    let mut lora = RuntimeLora::new();
    for (a, scale) in adapters {
        lora.add_adapter(a, *scale)?;
    }
    let forward = Model::new(model)?.releasing_weights().batched_products();
    let recorder = Recorder {
        wanted: targets,
        total_tokens: tokens.len(),
        inputs: Mutex::new(BTreeMap::new()),
        members: Mutex::new(HashMap::new()),
    };
    let chunks: Vec<&[u32]> = tokens.chunks(ctx).collect();
    forward.run_layers(&chunks, &[Some(&lora)], &recorder, &mut |_layer| {
        layer_done(recorder.take(&lora))
    })?;
    // The head's input is shown after the last layer.
    let rest = recorder.take(&lora);
    if !rest.is_empty() {
        layer_done(rest);
    }
    Ok(())
}

/// The directions the adapters of `tensors` (which share one input of `n_in` values) read that
/// input along: every row `a_i` of every term's `A`, times `|scale|·‖B e_i‖`, so that the rows'
/// Gram is `Σ ΔWᵀΔW` over the terms when `B`'s columns are orthogonal, and a direction weighs by
/// how much it moves the output. An expert's record (an [`expert_key`]) gets its own blocks of a
/// stacked term.
fn adapter_rows(lora: &RuntimeLora, tensors: &[String], n_in: usize) -> Vec<f32> {
    let mut rows = Vec::new();
    for key in tensors {
        // An expert's directions are its own blocks of the stacked factors.
        let (tensor, expert) = match split_expert_key(key) {
            Some((t, e)) => (t, Some(e)),
            None => (key.as_str(), None),
        };
        for term in lora.get(tensor) {
            push_adapter_rows(term, expert, n_in, &mut rows);
        }
    }
    rows
}

/// [`adapter_rows`] of one term: of expert `expert`'s blocks for a stacked term.
fn push_adapter_rows(term: &LoraTerm, expert: Option<usize>, n_in: usize, rows: &mut Vec<f32>) {
    let lr = &term.lr;
    let factors = match expert {
        Some(e) if lr.n_expert > 1 => lr.expert_factors(e),
        None if lr.n_expert <= 1 => lr.expert_factors(0),
        _ => None,
    };
    let Some((a, b)) = factors.filter(|(a, _)| a.len() == lr.rank * n_in) else {
        return;
    };
    let scale = term.scale().abs() as f64;
    for (i, a) in a.chunks_exact(n_in).enumerate() {
        let b_norm = b
            .iter()
            .skip(i)
            .step_by(lr.rank)
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt();
        let weight = (scale * b_norm) as f32;
        rows.extend(a.iter().map(|&v| v * weight));
    }
}

/// What the merge calibrates on: the user's text (and what to call it), or our corpus.
pub struct CalibrationText {
    pub text: Option<(Vec<u8>, String)>,
    /// At most this many tokens; `None`: [`default_tokens`] of the base.
    pub max_tokens: Option<usize>,
    pub ctx: usize,
    /// Share of the fit's energy given to the adapters' own input directions (see
    /// [`Weighting::adapter`]).
    pub adapter_weight: f32,
}

impl Default for CalibrationText {
    fn default() -> Self {
        CalibrationText {
            text: None,
            max_tokens: None,
            ctx: DEFAULT_CTX,
            adapter_weight: preserve::DEFAULT_ADAPTER_WEIGHT,
        }
    }
}

/// The adapter-keeping requantization of a merge of `inputs` (their normalized adapters beside)
/// into `model`, with `retype`'s tensors written in their own types (`--token-embedding-type`,
/// `--output-tensor-type`): statistics from a calibration pass over `text`, or none when every
/// merged tensor is written as a float type (nothing to keep on a grid, and no tokenizer needed).
/// The one place the default merge's method is decided: `merge` and `verify`'s own merge both call
/// it.
///
/// A retyped output head (or an embedding the head is tied to) is calibrated too, on what the head
/// reads: its rounding then goes where the final hidden states are small, as the merged tensors'
/// does. A retyped embedding the head does not read is never observed, so it rounds to nearest.
pub fn preserve_method(
    model: &GgufModel,
    inputs: &[AdapterInput],
    adapters: &[&Adapter],
    outtype: MergeType,
    retype: &[(String, GgmlType)],
    text: &CalibrationText,
) -> Result<RequantMethod, CalibrateError> {
    let targets: HashSet<String> = inputs
        .iter()
        .flat_map(|a| a.updates.iter().map(|(name, _)| name.clone()))
        .chain(retype.iter().map(|(name, _)| name.clone()))
        .collect();
    let on_a_grid = |name: &String| {
        let retyped = retype.iter().find(|(n, _)| n == name).map(|&(_, t)| t);
        let ty = match (retyped, outtype) {
            (Some(t), _) | (None, MergeType::Type(t)) => Some(t),
            (None, MergeType::Keep) => model.tensor(name).map(|t| t.ty),
        };
        ty.is_some_and(preserve::supports)
    };
    if !targets.iter().any(on_a_grid) {
        return Ok(RequantMethod::Preserve {
            calibration: "nothing to calibrate: every merged tensor is a float type".into(),
            stats: Arc::default(),
        });
    }
    let (bytes, source) = match &text.text {
        Some((bytes, source)) => (&bytes[..], source.clone()),
        None => (DEFAULT_CORPUS.as_bytes(), "the built-in corpus".to_string()),
    };
    let spec = CalibrationSpec {
        text: bytes,
        source,
        built_in: text.text.is_none(),
        max_tokens: text.max_tokens.unwrap_or_else(|| default_tokens(model)),
        ctx: text.ctx,
        weighting: Weighting {
            adapter: text.adapter_weight,
            ..Weighting::default()
        },
    };
    let scaled: Vec<(&Adapter, f32)> = adapters
        .iter()
        .zip(inputs)
        .map(|(a, i)| (*a, i.scale))
        .collect();
    let cal = calibration_tokens(model, &spec)
        .and_then(|tokens| calibrate(model, &scaled, &tokens, &targets, &spec));
    let cal = match cal {
        Ok(cal) => cal,
        // A base the forward pass does not run (an MoE, an architecture verify lacks) still
        // merges: the merge itself needs no forward pass, and failing it would leave the user
        // no default at all. Round to nearest and say so, unless the user asked for calibration.
        Err(CalibrateError::Forward(e)) if text.text.is_none() && e.is_unrunnable_model() => {
            return Ok(RequantMethod::Nearest {
                fallback: Some(e.to_string()),
            })
        }
        Err(e) => return Err(e),
    };
    Ok(RequantMethod::Preserve {
        calibration: format!("calibrated on {} tokens of {}", cal.tokens, cal.source),
        stats: Arc::new(cal.stats.into_iter().collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bases_calibrate_on_fewer_tokens() {
        // gemma3-270m's layers hold 0.1B weights, a 7B's 6.5B.
        assert_eq!(tokens_for_layer_weights(100_000_000), DEFAULT_TOKENS);
        assert_eq!(tokens_for_layer_weights(LARGE_BASE_WEIGHTS), DEFAULT_TOKENS);
        assert_eq!(
            tokens_for_layer_weights(6_500_000_000),
            DEFAULT_TOKENS_LARGE
        );
    }

    #[test]
    fn siblings_share_an_input() {
        assert_eq!(input_key("blk.3.attn_k.weight"), "blk.3.attn_in.weight");
        assert_eq!(
            input_key("blk.3.attn_q.weight"),
            input_key("blk.3.attn_v.weight")
        );
        assert_eq!(
            input_key("blk.0.ffn_up.weight"),
            input_key("blk.0.ffn_gate.weight")
        );
        assert_eq!(input_key("blk.0.ffn_down.weight"), "blk.0.ffn_down.weight");
        assert_eq!(input_key("output.weight"), "output.weight");
    }
}
