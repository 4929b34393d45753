//! GGUF LoRA adapters: reading one into the normalized [`Adapter`], and writing one exactly as
//! llama.cpp's loader (`src/llama-adapter.cpp`) and `convert_lora_to_gguf.py` lay it out.
//!
//! Layout: `general.architecture` (the base's), `general.type = "adapter"`, `adapter.type = "lora"`,
//! `adapter.lora.alpha` (F32), `adapter.alora.invocation_tokens` (ARRAY[U32]) when present; per
//! adapted base tensor `NAME.lora_a` with `ne = [n_in, rank]` and `NAME.lora_b` with
//! `ne = [rank, n_out]` (stacked experts add `n_expert` as `ne[2]`), except `token_embd.weight.lora_a`,
//! stored transposed (`ne = [rank, n_vocab]`) so the runtime can `get_rows` it.
//!
//! # Alpha
//! A GGUF adapter has one alpha per file and the runtime divides by each tensor's own rank
//! (`scale = user · alpha / lora_b.ne[0]`, or `user` when alpha is 0). We write the alpha most tensors
//! share (so a plain, rsLoRA or rank_pattern adapter is written exactly as trained, and alpha stays
//! meaningful to tools that show it) and fold `alpha_i / alpha_file` into `B` of every tensor whose
//! PEFT alpha differs (`alpha_pattern`, rsLoRA with several ranks). Every tensor then gets exactly
//! PEFT's scale at user scale 1, in llama.cpp, `llama-export-lora` and our `merge` alike. We never
//! write alpha 0: its "no scaling" meaning is a llama.cpp convention other readers may not share.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::model::{Factor, Layout, LoraPair, LoraTensor};
use super::source::GgufSource;
use super::{Adapter, AdapterError, FullTensor, Provenance, SourceFormat};
use crate::arch::TargetKind;
use crate::gguf::{Array, GgufWriter, Metadata, TensorDesc, Value};
use crate::quant::{self, GgmlType};
use std::path::PathBuf;

pub use crate::gguf::{KEY_ARCH, KEY_TYPE};
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_ALPHA: &str = "adapter.lora.alpha";
pub const KEY_ALORA: &str = "adapter.alora.invocation_tokens";
pub const SUFFIX_A: &str = ".lora_a";
pub const SUFFIX_B: &str = ".lora_b";

/// A GGUF file that is not a LoRA adapter llama.cpp would load.
#[derive(Debug, thiserror::Error)]
pub enum LoraFileError {
    #[error("{}: this is a named bundle of adapters ({names}); select one as {}#NAME", path.display(), path.display())]
    IsBundle { path: PathBuf, names: String },
    #[error("{}: general.type is {found:?}; expected \"adapter\" (is this a base model?)", path.display())]
    NotAnAdapter {
        path: PathBuf,
        found: Option<String>,
    },
    #[error("{}: adapter.type is {found:?}; expected \"lora\"", path.display())]
    NotLora {
        path: PathBuf,
        found: Option<String>,
    },
    #[error("{}: {key} is {found}, llama.cpp requires {expected}", path.display())]
    KeyType {
        path: PathBuf,
        key: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{}: tensor '{name}' has an unexpected suffix (llama.cpp accepts .lora_a, .lora_b and *_norm.weight)", path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{}: LoRA tensor pair for '{base}' is missing one component", path.display())]
    HalfPair { path: PathBuf, base: String },
    #[error("{}: '{a}' (ne {a_dims:?}) and '{b}' (ne {b_dims:?}){problem}", path.display())]
    Pair {
        path: PathBuf,
        a: String,
        a_dims: Vec<u64>,
        b: String,
        b_dims: Vec<u64>,
        problem: PairProblem,
    },
    #[error("{}: '{a}' has zero experts", path.display())]
    ZeroExperts { path: PathBuf, a: String },
    /// Writing: the architecture is not known.
    #[error("{}: the architecture is unknown; pass --base BASE.gguf or --arch ARCH", path.display())]
    UnknownArch { path: PathBuf },
    /// Writing: nothing to write.
    #[error("{}: the adapter has no LoRA tensors", path.display())]
    NoTensors { path: PathBuf },
    /// Writing: a tensor could not be encoded.
    #[error("{tensor}: {error}")]
    Encode {
        tensor: String,
        error: crate::quant::QuantError,
    },
}

/// Why two tensors named as one LoRA pair are not one (the text follows the pair's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PairProblem {
    #[error(": expected two 2-D tensors, or two 3-D expert tensors with the same expert count")]
    Dims,
    #[error(" do not form a LoRA pair (rank mismatch)")]
    Rank,
}

/// Tensor type of a written adapter's `lora_a`/`lora_b` (`--outtype` of `convert` and `bundle`), as
/// `convert_lora_to_gguf.py` offers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorType {
    F32,
    F16,
    Bf16,
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl FactorType {
    /// The names `--outtype` takes, in the order help lists them.
    pub const NAMES: [&'static str; 4] = ["f32", "f16", "bf16", "q8_0"];

    /// The ggml type for a tensor whose rows are `row_len` long: Q8_0 needs whole 32-element blocks
    /// and falls back to F16 otherwise (the reference converter's `QuantError` fallback).
    pub fn ggml_type(self, row_len: u64) -> GgmlType {
        match self {
            FactorType::F32 => GgmlType::F32,
            FactorType::F16 => GgmlType::F16,
            FactorType::Bf16 => GgmlType::BF16,
            FactorType::Q8_0 if row_len.is_multiple_of(32) => GgmlType::Q8_0,
            FactorType::Q8_0 => GgmlType::F16,
        }
    }
}

impl std::str::FromStr for FactorType {
    type Err = String;

    fn from_str(s: &str) -> Result<FactorType, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => FactorType::F32,
            "f16" => FactorType::F16,
            "bf16" => FactorType::Bf16,
            "q8_0" => FactorType::Q8_0,
            _ => {
                return Err(format!(
                    "unknown adapter tensor type '{s}' (expected {})",
                    FactorType::NAMES.join(", ")
                ))
            }
        })
    }
}

/// The two tensors a target becomes, with shapes, before any data is read.
fn descs_of(t: &LoraTensor, outtype: FactorType) -> [TensorDesc; 2] {
    let (rank, n_in, n_out, n_exp) = (
        t.rank() as u64,
        t.n_in() as u64,
        t.n_out() as u64,
        t.n_expert() as u64,
    );
    let (a_dims, b_dims) = match t.kind {
        TargetKind::Linear => (vec![n_in, rank], vec![rank, n_out]),
        TargetKind::Embedding => (vec![rank, n_in], vec![rank, n_out]),
        TargetKind::Experts => (vec![n_in, rank, n_exp], vec![rank, n_out, n_exp]),
    };
    let desc = |suffix: &str, dims: Vec<u64>| TensorDesc {
        name: format!("{}{suffix}", t.target),
        ty: outtype.ggml_type(dims[0]),
        dims,
    };
    [desc(SUFFIX_A, a_dims), desc(SUFFIX_B, b_dims)]
}

/// The file alpha: the llama.cpp-convention alpha most tensors share (ties: the source config's
/// `lora_alpha` if among them, else the first), never 0.
pub fn choose_file_alpha(adapter: &Adapter) -> f64 {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for t in &adapter.tensors {
        let a = t.alpha();
        if a == 0.0 || !a.is_finite() {
            continue;
        }
        match counts.iter_mut().find(|(v, _)| *v == a) {
            Some((_, n)) => *n += 1,
            None => counts.push((a, 1)),
        }
    }
    let Some(best) = counts.iter().map(|(_, n)| *n).max() else {
        return 1.0;
    };
    let preferred = adapter.provenance.lora_alpha;
    counts
        .iter()
        .filter(|(_, n)| *n == best)
        .map(|(v, _)| *v)
        .find(|v| Some(*v) == preferred)
        .or_else(|| counts.iter().find(|(_, n)| *n == best).map(|(v, _)| *v))
        .unwrap_or(1.0)
}

/// What `write` did, for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WriteSummary {
    /// `adapter.lora.alpha` written.
    pub alpha: f32,
    pub n_tensors: usize,
    /// Targets whose `B` carries a folded factor `alpha_i / alpha_file` (and that factor).
    pub folded: Vec<(String, f64)>,
    /// Tensors written as F16 because their rows are not whole Q8_0 blocks.
    pub f16_fallback: Vec<String>,
    pub bytes: u64,
}

/// How an adapter is laid out as a GGUF LoRA file, before any tensor data is read: the metadata,
/// the tensor descriptions in order, and the file alpha every `B` is folded relative to.
pub struct LoraFile {
    pub version: u32,
    pub metadata: Metadata,
    pub descs: Vec<TensorDesc>,
    file_alpha: f64,
    f16_fallback: Vec<String>,
}

/// Lays out `adapter` as a GGUF LoRA with factors of type `outtype` (see [`LoraFile`]).
pub fn layout(adapter: &Adapter, outtype: FactorType) -> Result<LoraFile, AdapterError> {
    let path = || adapter.provenance.path.clone();
    let arch = adapter
        .arch
        .as_deref()
        .ok_or_else(|| LoraFileError::UnknownArch { path: path() })?;
    if adapter.tensors.is_empty() {
        return Err(LoraFileError::NoTensors { path: path() }.into());
    }
    let file_alpha = choose_file_alpha(adapter);
    let metadata = metadata(adapter, arch, file_alpha as f32);
    let mut descs = Vec::with_capacity(adapter.tensors.len() * 2);
    let mut f16_fallback = Vec::new();
    for t in &adapter.tensors {
        for d in descs_of(t, outtype) {
            if outtype == FactorType::Q8_0 && d.ty != GgmlType::Q8_0 {
                f16_fallback.push(d.name.clone());
            }
            descs.push(d);
        }
    }
    Ok(LoraFile {
        version: crate::gguf::VERSION,
        metadata,
        descs,
        file_alpha,
        f16_fallback,
    })
}

/// Loads each target of `adapter` in turn (one at a time), folds its alpha relative to the file's
/// into `B`, encodes `lora_a` and `lora_b` as `layout` says and hands each tensor's bytes to `sink`,
/// in the layout's order. Returns what was written.
pub fn encode_tensors(
    adapter: &Adapter,
    layout: &LoraFile,
    mut sink: impl FnMut(&[u8]) -> Result<(), AdapterError>,
) -> Result<WriteSummary, AdapterError> {
    let file_alpha = layout.file_alpha;
    let mut summary = WriteSummary {
        alpha: file_alpha as f32,
        n_tensors: layout.descs.len(),
        folded: Vec::new(),
        f16_fallback: layout.f16_fallback.clone(),
        bytes: 0,
    };
    for (t, d) in adapter.tensors.iter().zip(layout.descs.chunks(2)) {
        let mut l = t.load()?;
        if l.alpha != file_alpha {
            let factor = if file_alpha == 0.0 {
                0.0
            } else {
                l.alpha / file_alpha
            };
            l.b.scale_in_place(factor as f32);
            summary.folded.push((t.target.clone(), factor));
        }
        let a = if t.kind == TargetKind::Embedding {
            l.a.transposed()
        } else {
            l.a
        };
        for (m, desc) in [(&a, &d[0]), (&l.b, &d[1])] {
            if desc.ty == GgmlType::F32 && cfg!(target_endian = "little") {
                // F32 on a little-endian host: the values are already the file's bytes.
                let bytes: &[u8] = bytemuck::cast_slice(&m.data);
                summary.bytes += bytes.len() as u64;
                sink(bytes)?;
                continue;
            }
            let bytes = encode(&m.data, desc)?;
            summary.bytes += bytes.len() as u64;
            sink(&bytes)?;
        }
    }
    Ok(summary)
}

/// Writes `adapter` as a GGUF LoRA to `target` through the atomic streaming writer, loading one
/// target at a time. `inputs` are refused as `target`. On any error (a non-finite value found while
/// loading, I/O) nothing is left at `target`.
pub fn write(
    adapter: &Adapter,
    target: &Path,
    inputs: &[&Path],
    outtype: FactorType,
) -> Result<WriteSummary, AdapterError> {
    let layout = layout(adapter, outtype)?;
    let mut w = GgufWriter::create(
        target,
        inputs,
        layout.version,
        crate::gguf::DEFAULT_ALIGNMENT,
        &layout.metadata,
        &layout.descs,
    )?;
    let summary = encode_tensors(adapter, &layout, |bytes| Ok(w.write_tensor(bytes)?))?;
    w.finish()?;
    Ok(summary)
}

/// Encodes f32 values into `desc.ty`, row by row (`desc.dims[0]` per row).
fn encode(values: &[f32], desc: &TensorDesc) -> Result<Vec<u8>, AdapterError> {
    let row = desc.dims[0] as usize;
    let row_bytes = desc.ty.row_bytes(row as u64).unwrap_or(0) as usize;
    let rows = values.len().checked_div(row).unwrap_or(0);
    let mut out = vec![0u8; rows * row_bytes];
    quant::quantize_rows(desc.ty, values, row, &mut out, None).map_err(|error| {
        LoraFileError::Encode {
            tensor: desc.name.clone(),
            error,
        }
    })?;
    Ok(out)
}

fn metadata(adapter: &Adapter, arch: &str, alpha: f32) -> Metadata {
    let mut m = Metadata::new();
    m.set(KEY_ARCH, Value::String(arch.to_string()));
    m.set(KEY_TYPE, Value::String("adapter".into()));
    m.set(KEY_ADAPTER_TYPE, Value::String("lora".into()));
    let p = &adapter.provenance;
    if let Some(base) = &p.base_model {
        m.set("general.base_model.count", Value::U32(1));
        m.set("general.base_model.0.name", Value::String(base.clone()));
    }
    m.set(KEY_ALPHA, Value::F32(alpha));
    if let Some(tokens) = &adapter.alora_invocation_tokens {
        m.set(KEY_ALORA, Value::Array(Array::U32(tokens.clone())));
    }
    m.set(crate::gguf::KEY_QUANT_VERSION, Value::U32(2));
    // Provenance: what the source said, so a reader can tell how scales were derived.
    m.set(
        "gguf_lora.version",
        Value::String(env!("CARGO_PKG_VERSION").to_string()),
    );
    if let Some(f) = p.format {
        let name = match f {
            SourceFormat::Peft => "peft",
            SourceFormat::Gguf => "gguf",
        };
        m.set("gguf_lora.source.format", Value::String(name.into()));
    }
    if let Some(r) = p.r {
        m.set("gguf_lora.source.r", Value::U32(r));
    }
    if let Some(a) = p.lora_alpha {
        m.set("gguf_lora.source.lora_alpha", Value::F32(a as f32));
    }
    if p.format == Some(SourceFormat::Peft) {
        m.set("gguf_lora.source.use_rslora", Value::Bool(p.use_rslora));
        if !p.rank_pattern.is_empty() {
            m.set(
                "gguf_lora.source.rank_pattern",
                Value::Array(Array::String(
                    p.rank_pattern
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect(),
                )),
            );
        }
        if !p.alpha_pattern.is_empty() {
            m.set(
                "gguf_lora.source.alpha_pattern",
                Value::Array(Array::String(
                    p.alpha_pattern
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect(),
                )),
            );
        }
    }
    if !p.target_modules.is_empty() {
        m.set(
            "gguf_lora.source.target_modules",
            Value::Array(Array::String(p.target_modules.clone())),
        );
    }
    m
}

/// Reads a GGUF LoRA adapter (any tensor type we can dequantize) into the normalized model: a GGUF
/// file, or `BUNDLE.gguf#NAME` for one adapter of a named bundle (see [`super::bundle`]). Tensors
/// stay in the mapped file until a [`Factor`] is loaded (dequantized, checked to be finite).
pub fn read(path: &Path) -> Result<Adapter, AdapterError> {
    read_source(&Arc::new(GgufSource::open(path)?))
}

/// [`read`] on an opened [`GgufSource`].
pub fn read_source(src: &Arc<GgufSource>) -> Result<Adapter, AdapterError> {
    let path = src.label.as_path();
    let p = || path.to_path_buf();
    let md = &src.metadata;
    if src.is_bundle() {
        let names = super::bundle::Listing::read(path, md)
            .map(|l| l.names().join(", "))
            .unwrap_or_default();
        return Err(LoraFileError::IsBundle { path: p(), names }.into());
    }
    match md.get_str(KEY_TYPE) {
        Some("adapter") => {}
        other => {
            return Err(LoraFileError::NotAnAdapter {
                path: p(),
                found: other.map(str::to_string),
            }
            .into())
        }
    }
    match md.get_str(KEY_ADAPTER_TYPE) {
        Some("lora") => {}
        other => {
            return Err(LoraFileError::NotLora {
                path: p(),
                found: other.map(str::to_string),
            }
            .into())
        }
    }
    let key_type = |key, v: &Value, expected| LoraFileError::KeyType {
        path: p(),
        key,
        found: v.type_name(),
        expected,
    };
    let file_alpha = match md.get(KEY_ALPHA) {
        None => 0.0,
        Some(Value::F32(a)) => *a as f64,
        Some(v) => return Err(key_type(KEY_ALPHA, v, "F32").into()),
    };
    let alora = match md.get(KEY_ALORA) {
        None => None,
        Some(Value::Array(Array::U32(t))) => Some(t.clone()),
        Some(v) => return Err(key_type(KEY_ALORA, v, "ARRAY[UINT32]").into()),
    };
    let mut pairs: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut full = Vec::new();
    let mut order = Vec::new();
    for t in src.tensors.iter().map(|t| &t.info) {
        if let Some(base) = t.name.strip_suffix(SUFFIX_A) {
            if !pairs.contains_key(base) {
                order.push(base.to_string());
            }
            pairs.entry(base.to_string()).or_default().0 = Some(t.name.clone());
        } else if let Some(base) = t.name.strip_suffix(SUFFIX_B) {
            if !pairs.contains_key(base) {
                order.push(base.to_string());
            }
            pairs.entry(base.to_string()).or_default().1 = Some(t.name.clone());
        } else if t.name.ends_with("_norm.weight") {
            full.push(FullTensor {
                source: t.name.clone(),
                target: Some(t.name.clone()),
                data: factor(src, &t.name, 0..t.rows() as usize, false),
            });
        } else {
            return Err(LoraFileError::UnexpectedTensor {
                path: p(),
                name: t.name.clone(),
            }
            .into());
        }
    }
    let mut tensors = Vec::new();
    for base in order {
        let (Some(a_name), Some(b_name)) = pairs[&base].clone() else {
            return Err(LoraFileError::HalfPair { path: p(), base }.into());
        };
        let a_info = src.tensor(&a_name).map(|t| t.info.clone());
        let b_info = src.tensor(&b_name).map(|t| t.info.clone());
        let (Some(ai), Some(bi)) = (a_info, b_info) else {
            continue;
        };
        let is_embd = base.ends_with("token_embd.weight");
        let dims_ok = matches!(ai.dims.len(), 2 | 3)
            && ai.dims.len() == bi.dims.len()
            && (ai.dims.len() == 2 || (ai.dims[2] == bi.dims[2] && !is_embd));
        if !dims_ok {
            return Err(pair_error(
                p(),
                a_name,
                ai.dims,
                b_name,
                bi.dims,
                PairProblem::Dims,
            ));
        }
        let n_exp = if ai.dims.len() == 3 {
            ai.dims[2] as usize
        } else {
            1
        };
        if n_exp == 0 {
            return Err(LoraFileError::ZeroExperts {
                path: p(),
                a: a_name,
            }
            .into());
        }
        // Ranks: ne[1] of A (ne[0] of the transposed token_embd A) must equal ne[0] of B.
        let rank = bi.dims[0] as usize;
        let a_rank = if is_embd {
            ai.dims[0]
        } else {
            ai.dims.get(1).copied().unwrap_or(0)
        } as usize;
        if a_rank != rank || rank == 0 {
            return Err(pair_error(
                p(),
                a_name,
                ai.dims,
                b_name,
                bi.dims,
                PairProblem::Rank,
            ));
        }
        let alpha = if file_alpha == 0.0 {
            rank as f64
        } else {
            file_alpha
        };
        let pair = |source: String, a: Factor, b: Factor| LoraPair {
            source,
            a,
            b,
            alpha,
            b_rows: None,
        };
        let n_out = bi.dims[1] as usize;
        let b_factor = |e: usize| factor(src, &b_name, e * n_out..(e + 1) * n_out, false);
        let (kind, layout) = if is_embd {
            // Stored (vocab rows × rank); the model keeps A as rank × vocab.
            let a = factor(src, &a_name, 0..ai.rows() as usize, true);
            (
                TargetKind::Embedding,
                Layout::Single(Box::new(pair(base.clone(), a, b_factor(0)))),
            )
        } else if n_exp > 1 || ai.dims.len() == 3 {
            let mut ps = Vec::with_capacity(n_exp);
            for e in 0..n_exp {
                let a = factor(src, &a_name, e * rank..(e + 1) * rank, false);
                ps.push(pair(format!("{base}[{e}]"), a, b_factor(e)));
            }
            (TargetKind::Experts, Layout::Experts(ps))
        } else {
            let a = factor(src, &a_name, 0..rank, false);
            (
                TargetKind::Linear,
                Layout::Single(Box::new(pair(base.clone(), a, b_factor(0)))),
            )
        };
        tensors.push(LoraTensor {
            layer: crate::gguf::layer_of(&base),
            target: base,
            kind,
            layout,
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        });
    }
    Ok(Adapter {
        arch: md.get_str(KEY_ARCH).map(str::to_string),
        tensors,
        full_tensors: full,
        alora_invocation_tokens: alora,
        provenance: Provenance {
            path: path.to_path_buf(),
            format: Some(SourceFormat::Gguf),
            lora_alpha: md.get(KEY_ALPHA).and_then(Value::as_f64),
            base_model: md.get_str("general.base_model.0.name").map(str::to_string),
            ..Provenance::default()
        },
    })
}

fn pair_error(
    path: PathBuf,
    a: String,
    a_dims: Vec<u64>,
    b: String,
    b_dims: Vec<u64>,
    problem: PairProblem,
) -> AdapterError {
    LoraFileError::Pair {
        path,
        a,
        a_dims,
        b,
        b_dims,
        problem,
    }
    .into()
}

/// Rows `rows` of tensor `name` of `src` as a lazily loaded factor (see [`Factor::Gguf`]).
fn factor(
    src: &Arc<GgufSource>,
    name: &str,
    rows: std::ops::Range<usize>,
    transpose: bool,
) -> Factor {
    let cols = src.tensor(name).map_or(0, |t| t.info.row_len() as usize);
    Factor::Gguf {
        src: Arc::clone(src),
        tensor: name.to_string(),
        rows,
        cols,
        transpose,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Matrix;

    fn m(rows: usize, cols: usize, seed: f32) -> Matrix {
        let data = (0..rows * cols)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect();
        Matrix::new(rows, cols, data).unwrap()
    }

    fn pair(a: Matrix, b: Matrix, alpha: f64) -> LoraPair {
        LoraPair {
            source: "s".into(),
            a: Factor::owned(a),
            b: Factor::owned(b),
            alpha,
            b_rows: None,
        }
    }

    fn tensor(target: &str, kind: TargetKind, layout: Layout) -> LoraTensor {
        LoraTensor {
            target: target.into(),
            layer: crate::gguf::layer_of(target),
            kind,
            layout,
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        }
    }

    /// Written and read back, every target keeps its A, B·scale and kind; shapes follow llama.cpp.
    #[test]
    fn write_read_round_trip_keeps_effective_updates() {
        let adapter = Adapter {
            arch: Some("qwen2moe".into()),
            tensors: vec![
                tensor(
                    "token_embd.weight",
                    TargetKind::Embedding,
                    Layout::Single(Box::new(pair(m(4, 40, 1.0), m(8, 4, 2.0), 8.0))),
                ),
                tensor(
                    "blk.0.attn_q.weight",
                    TargetKind::Linear,
                    // alpha 16 on rank 4 while the file alpha will be 8: folded ×2 into B.
                    Layout::Single(Box::new(pair(m(4, 8, 3.0), m(8, 4, 4.0), 16.0))),
                ),
                tensor(
                    "blk.0.ffn_up_exps.weight",
                    TargetKind::Experts,
                    Layout::Experts(vec![
                        pair(m(4, 8, 5.0), m(6, 4, 6.0), 8.0),
                        pair(m(4, 8, 7.0), m(6, 4, 8.0), 8.0),
                    ]),
                ),
            ],
            alora_invocation_tokens: Some(vec![7, 9]),
            ..Adapter::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let summary = write(&adapter, &path, &[], FactorType::F32).unwrap();
        assert_eq!(summary.alpha, 8.0);
        assert_eq!(summary.folded, [("blk.0.attn_q.weight".to_string(), 2.0)]);

        let file = crate::gguf::GgufFile::open(&path).unwrap();
        let dims = |n: &str| file.tensor(n).unwrap().dims.clone();
        assert_eq!(dims("token_embd.weight.lora_a"), [4, 40]);
        assert_eq!(dims("token_embd.weight.lora_b"), [4, 8]);
        assert_eq!(dims("blk.0.attn_q.weight.lora_a"), [8, 4]);
        assert_eq!(dims("blk.0.attn_q.weight.lora_b"), [4, 8]);
        assert_eq!(dims("blk.0.ffn_up_exps.weight.lora_a"), [8, 4, 2]);
        assert_eq!(dims("blk.0.ffn_up_exps.weight.lora_b"), [4, 6, 2]);
        assert_eq!(
            file.metadata().get(KEY_ALORA),
            Some(&Value::Array(Array::U32(vec![7, 9])))
        );

        let back = read(&path).unwrap();
        assert_eq!(back.arch.as_deref(), Some("qwen2moe"));
        for t in &adapter.tensors {
            let r = back.tensor(&t.target).unwrap();
            assert_eq!(r.kind, t.kind, "{}", t.target);
            let (x, y) = (t.load().unwrap(), r.load().unwrap());
            assert_eq!(x.a, y.a, "{}", t.target);
            let (n, rank, n_out) = (x.n_expert, x.rank, x.n_out());
            for e in 0..n {
                let delta = |l: &crate::adapter::LoadedLora| {
                    let b = l.b.rows_range(e * n_out..(e + 1) * n_out);
                    let a = l.a.rows_range(e * rank..(e + 1) * rank);
                    b.matmul(&a)
                };
                let (dx, dy) = (delta(&x), delta(&y));
                for (p, q) in dx.data.iter().zip(&dy.data) {
                    let (p, q) = (p * x.scale() as f32, q * y.scale() as f32);
                    assert!(
                        (p - q).abs() <= 1e-6 * p.abs().max(1.0),
                        "{}: {p} vs {q}",
                        t.target
                    );
                }
            }
        }
    }

    #[test]
    fn file_alpha_is_the_most_common_and_never_zero() {
        let t = |alpha| {
            tensor(
                "blk.0.attn_q.weight",
                TargetKind::Linear,
                Layout::Single(Box::new(pair(m(2, 2, 0.0), m(2, 2, 0.0), alpha))),
            )
        };
        let mut a = Adapter {
            tensors: vec![t(4.0), t(8.0), t(8.0), t(0.0), t(0.0), t(0.0)],
            ..Adapter::default()
        };
        assert_eq!(choose_file_alpha(&a), 8.0);
        a.tensors = vec![t(4.0), t(8.0)];
        a.provenance.lora_alpha = Some(8.0);
        assert_eq!(choose_file_alpha(&a), 8.0);
        a.tensors = vec![t(0.0)];
        assert_eq!(choose_file_alpha(&a), 1.0);
    }

    #[test]
    fn q8_0_falls_back_to_f16_for_short_rows() {
        assert_eq!(FactorType::Q8_0.ggml_type(64), GgmlType::Q8_0);
        assert_eq!(FactorType::Q8_0.ggml_type(16), GgmlType::F16);
        assert_eq!(FactorType::Bf16.ggml_type(16), GgmlType::BF16);
    }

    #[test]
    fn malformed_adapter_pairs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u64], &[u64], &str); 4] = [
            (&[4, 2], &[2], "expected two 2-D tensors"),
            (&[4, 2, 3], &[2, 5, 2], "same expert count"),
            (&[4, 2], &[3, 5], "rank mismatch"),
            (&[4, 2, 0], &[2, 5, 0], "zero experts"),
        ];
        for (i, (a, b, want)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.gguf"));
            let mut md = Metadata::new();
            md.set(KEY_ARCH, Value::String("llama".into()));
            md.set(KEY_TYPE, Value::String("adapter".into()));
            md.set(KEY_ADAPTER_TYPE, Value::String("lora".into()));
            let descs = [
                TensorDesc {
                    name: "blk.0.attn_q.weight.lora_a".into(),
                    dims: a.to_vec(),
                    ty: GgmlType::F32,
                },
                TensorDesc {
                    name: "blk.0.attn_q.weight.lora_b".into(),
                    dims: b.to_vec(),
                    ty: GgmlType::F32,
                },
            ];
            let mut w = GgufWriter::create(&path, &[], 3, 32, &md, &descs).unwrap();
            for d in &descs {
                let n: u64 = d.dims.iter().product();
                w.write_tensor(&vec![0u8; n as usize * 4]).unwrap();
            }
            w.finish().unwrap();
            let err = read(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
