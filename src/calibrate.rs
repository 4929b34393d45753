//! The calibration pass of `merge`: what each touched tensor's input looks like in the model the
//! user trained for.
//!
//! The base runs with the adapters applied at runtime (the model whose behaviour the merge must
//! keep) through our forward pass ([`crate::verify::forward`]) over calibration tokens, in chunks
//! of `ctx` tokens; the input of every linear an adapter touches is recorded. Tensors that read the
//! same input (q/k/v, gate/up) share one record. The records become [`InputStats`], which the
//! adapter-keeping requantization ([`crate::engine::preserve`]) weights its errors with.
//!
//! Without a calibration file the merge calibrates on [`DEFAULT_CORPUS`], a few KB of our own
//! mixed text (prose, dialogue, instructions, code, numbers) committed with the source.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::adapter::Adapter;
use crate::engine::preserve::InputStats;
use crate::gguf::GgufModel;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::verify::forward::{LinearInputs, Model};
use crate::verify::lora::RuntimeLora;
use crate::verify::VerifyError;

/// The text the merge calibrates on when the user gives none.
pub const DEFAULT_CORPUS: &str = include_str!("calibrate/corpus.txt");
/// Calibration tokens when the user does not say.
pub const DEFAULT_TOKENS: usize = 512;
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
    #[error("calibration: {0}")]
    Forward(#[from] VerifyError),
    #[error("calibration: the text gives no tokens")]
    NoTokens,
    #[error("calibration: --ctx must be at least 1")]
    ZeroCtx,
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
    /// Damping (see [`InputStats::new`]).
    pub damp: f32,
    pub damp_diag: f32,
    /// Directions of each input's Gram kept (0: all tokens).
    pub rank: usize,
}

/// Statistics per touched tensor.
pub struct Calibration {
    pub stats: HashMap<String, Arc<InputStats>>,
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

/// The input a tensor shares with its siblings: q/k/v read one normed hidden state, gate/up another.
fn input_key(tensor: &str) -> String {
    let mut parts: Vec<&str> = tensor.split('.').collect();
    if parts.len() >= 3 {
        let shared = match parts[2] {
            "attn_q" | "attn_k" | "attn_v" => Some("attn_in"),
            "ffn_gate" | "ffn_up" => Some("ffn_in"),
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
struct Recorder<'w> {
    wanted: &'w HashSet<String>,
    inputs: Mutex<BTreeMap<String, (usize, Vec<f32>)>>,
    /// Per input key: the tensor that records it, and every tensor seen reading it.
    members: Mutex<Members>,
}

impl LinearInputs for Recorder<'_> {
    fn observe(&self, tensor: &str, _stream: usize, x: &[f32], n_in: usize) {
        if !self.wanted.contains(tensor) {
            return;
        }
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
        let entry = inputs.entry(key).or_insert_with(|| (n_in, Vec::new()));
        entry.1.extend_from_slice(x);
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
/// chunks of `spec.ctx`, and returns the input statistics of every tensor in `targets`.
pub fn calibrate(
    model: &GgufModel,
    adapters: &[(&Adapter, f32)],
    tokens: &CalibrationTokens,
    targets: &HashSet<String>,
    spec: &CalibrationSpec<'_>,
) -> Result<Calibration, CalibrateError> {
    let (source, tokens) = (&tokens.source, &tokens.ids[..]);
    if spec.ctx == 0 {
        return Err(CalibrateError::ZeroCtx);
    }
    if tokens.is_empty() {
        return Err(CalibrateError::NoTokens);
    }
    let mut lora = RuntimeLora::new();
    for (a, scale) in adapters {
        lora.add_adapter(a, *scale)?;
    }
    let forward = Model::new(model)?;
    let recorder = Recorder {
        wanted: targets,
        inputs: Mutex::new(BTreeMap::new()),
        members: Mutex::new(HashMap::new()),
    };
    for chunk in tokens.chunks(spec.ctx) {
        forward.logits_with(chunk, &[Some(&lora)], Some(&recorder))?;
    }
    let inputs = recorder
        .inputs
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let members = recorder
        .members
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let built: Vec<(String, Arc<InputStats>)> = {
        use rayon::prelude::*;
        inputs
            .into_par_iter()
            .map(|(key, (n_in, rows))| {
                let s = InputStats::new(n_in, &rows, spec.damp, spec.damp_diag, spec.rank);
                (key, Arc::new(s))
            })
            .collect()
    };
    let mut stats = HashMap::new();
    for (key, s) in built {
        for t in members.get(&key).into_iter().flat_map(|m| &m.1) {
            stats.insert(t.clone(), Arc::clone(&s));
        }
    }
    Ok(Calibration {
        stats,
        tokens: tokens.len(),
        source: source.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
