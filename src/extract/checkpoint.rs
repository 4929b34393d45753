//! The two models `extract` compares, read one way whatever their format: a GGUF model (one file or
//! a split set, any tensor type the codecs read) or an HF safetensors checkpoint (one file, or shards
//! listed by `model.safetensors.index.json`, with `config.json` beside them).
//!
//! Every tensor gets its GGUF name where our architecture tables map it (HF `q_proj.weight` →
//! `blk.N.attn_q.weight`), its shape in ggml order, and is read as f32 in its file's row order.
//! HF llama-family `q_proj`/`k_proj` rows are in HF order; [`Tensor::hf_rope_heads`] says which head
//! count turns them into the GGUF's RoPE-permuted order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::arch::{map_module, Arch, Rope, TargetKind};
use crate::gguf::{GgufError, GgufModel, KEY_ARCH, KEY_TYPE};
use crate::quant::{self, GgmlType};
use crate::safetensors_file::{SafetensorsError, SafetensorsFile, TensorEntry};

/// Why a model could not be read for extraction; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Gguf(#[from] Box<GgufError>),
    #[error(transparent)]
    Safetensors(#[from] Box<SafetensorsError>),
    #[error("{}: cannot read: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: neither a GGUF file nor an HF safetensors checkpoint (a directory with config.json and model.safetensors or model.safetensors.index.json, a .safetensors file, or the index)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{}: {problem}", path.display())]
    Config { path: PathBuf, problem: String },
    #[error("{}: general.type is \"{found}\"; extract needs two models, not an adapter", path.display())]
    NotAModel { path: PathBuf, found: String },
    #[error("{}: no general.architecture", path.display())]
    NoArchitecture { path: PathBuf },
    #[error("{}: tensor '{tensor}' cannot be read as f32: {problem}", path.display())]
    Read {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
}

impl From<GgufError> for CheckpointError {
    fn from(e: GgufError) -> Self {
        CheckpointError::Gguf(Box::new(e))
    }
}

impl From<SafetensorsError> for CheckpointError {
    fn from(e: SafetensorsError) -> Self {
        CheckpointError::Safetensors(Box::new(e))
    }
}

/// Which kind of file a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Safetensors,
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The GGUF name (mapped for HF tensors our tables know), else the file's own name.
    pub name: String,
    /// The name in the file.
    pub source: String,
    /// ggml order (`ne[0]`, a row's length, first).
    pub dims: Vec<u64>,
    /// The stored type's name (`Q4_K`, `BF16`).
    pub ty: String,
    /// Whether the stored type is a block quantization (not F32/F16/BF16).
    pub quantized: bool,
    /// For an HF name our tables map: the kind of LoRA target it is (`Experts` for one expert).
    pub mapped: Option<TargetKind>,
    /// HF llama-family `q_proj`/`k_proj`: rows are in HF order; the head count of GGUF's permutation.
    pub hf_rope_heads: Option<usize>,
    loc: Loc,
}

impl Tensor {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Rows (every dimension past the first).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// What kind of LoRA target it is, if any: from our tables for HF names, from the GGUF name
    /// otherwise ([`crate::arch::lora_target_kind`]).
    pub fn target_kind(&self) -> Option<TargetKind> {
        self.mapped
            .or_else(|| crate::arch::lora_target_kind(&self.name))
    }
}

#[derive(Clone, Debug)]
enum Loc {
    Gguf { ty: GgmlType },
    St { file: usize, entry: TensorEntry },
}

enum Files {
    Gguf(GgufModel),
    St(Vec<SafetensorsFile>),
}

/// A model opened for extraction.
pub struct Checkpoint {
    /// What the user gave.
    pub path: PathBuf,
    pub format: Format,
    /// GGUF architecture name (mapped from `config.json` for HF checkpoints).
    pub arch: String,
    /// Attention head counts, where the model says them.
    pub n_head: Option<usize>,
    pub n_head_kv: Option<usize>,
    /// `general.name` of a GGUF.
    pub name: Option<String>,
    pub tensors: Vec<Tensor>,
    index: BTreeMap<String, usize>,
    /// Every file read (shards, index, config), for the output-is-not-an-input check.
    pub files: Vec<PathBuf>,
    /// Bytes of the tensor files.
    pub bytes: u64,
    files_: Files,
}

/// Elements converted per step when streaming a tensor (4 MiB of f32).
const CHUNK_ELEMENTS: usize = 1 << 20;

impl Checkpoint {
    /// Opens a GGUF model (any shard of a split set) or an HF safetensors checkpoint.
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let io = |error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            return Checkpoint::open_hf(path, path);
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(io)?;
            let n = f.read(&mut magic).map_err(io)?;
            if n == 4 && &magic == crate::gguf::MAGIC {
                return Checkpoint::open_gguf(path);
            }
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors") || name.ends_with(".index.json") {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            return Checkpoint::open_hf(path, dir.unwrap_or(Path::new(".")));
        }
        Err(CheckpointError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }

    fn open_gguf(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let model = GgufModel::open(path)?;
        let md = model.metadata();
        if let Some(t) = md.get_str(KEY_TYPE) {
            if t != "model" {
                return Err(CheckpointError::NotAModel {
                    path: path.to_path_buf(),
                    found: t.to_string(),
                });
            }
        }
        let arch = md
            .get_str(KEY_ARCH)
            .ok_or_else(|| CheckpointError::NoArchitecture {
                path: path.to_path_buf(),
            })?
            .to_string();
        let head = |k: &str| {
            md.get_uint(&format!("{arch}.attention.{k}"))
                .map(|v| v as usize)
        };
        let (n_head, n_head_kv) = (head("head_count"), head("head_count_kv"));
        let tensors: Vec<Tensor> = model
            .tensors()
            .map(|(_, t)| Tensor {
                name: t.name.clone(),
                source: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty.name().to_string(),
                quantized: !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16),
                mapped: None,
                hf_rope_heads: None,
                loc: Loc::Gguf { ty: t.ty },
            })
            .collect();
        let files: Vec<PathBuf> = model
            .shards()
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect();
        let bytes = model.shards().iter().map(|s| s.file_size()).sum();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format: Format::Gguf,
            name: md.get_str("general.name").map(str::to_string),
            arch,
            n_head,
            n_head_kv: n_head_kv.or(n_head),
            index: index_of(&tensors),
            tensors,
            files,
            bytes,
            files_: Files::Gguf(model),
        })
    }

    /// `path` is the directory, a `.safetensors` file or the index; `dir` holds `config.json`.
    fn open_hf(path: &Path, dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let config_path = dir.join("config.json");
        let cfg_err = |problem: String| CheckpointError::Config {
            path: config_path.clone(),
            problem,
        };
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && path.is_dir() {
                CheckpointError::UnknownFormat {
                    path: path.to_path_buf(),
                }
            } else {
                CheckpointError::Io {
                    path: config_path.clone(),
                    error: e,
                }
            }
        })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| cfg_err(format!("not valid JSON: {e}")))?;
        let arch = hf_arch(&config).map_err(cfg_err)?;
        // Multimodal configs (gemma3) keep the text model's numbers in `text_config`.
        let get = |k: &str| {
            config
                .get(k)
                .or_else(|| config.get("text_config").and_then(|t| t.get(k)))
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
        };
        let n_head = get("num_attention_heads");
        let n_head_kv = get("num_key_value_heads").or(n_head);

        let mut files = vec![config_path.clone()];
        let shards: Vec<PathBuf> = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.exists() {
                files.push(index.clone());
                index_shards(&index)?
            } else if path.join("model.safetensors").exists() {
                vec![path.join("model.safetensors")]
            } else {
                return Err(CheckpointError::UnknownFormat {
                    path: path.to_path_buf(),
                });
            }
        } else if path.to_string_lossy().ends_with(".index.json") {
            files.push(path.to_path_buf());
            index_shards(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut opened = Vec::with_capacity(shards.len());
        let mut tensors = Vec::new();
        let mut bytes = 0;
        for (i, shard) in shards.iter().enumerate() {
            let f = SafetensorsFile::open(shard)?;
            bytes += std::fs::metadata(shard).map(|m| m.len()).unwrap_or(0);
            for e in f.tensors() {
                tensors.push(hf_tensor(arch, e, i, n_head, n_head_kv));
            }
            files.push(shard.clone());
            opened.push(f);
        }
        let tensors = dedup_names(tensors);
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format: Format::Safetensors,
            arch: arch.name().to_string(),
            n_head,
            n_head_kv,
            name: None,
            index: index_of(&tensors),
            tensors,
            files,
            bytes,
            files_: Files::St(opened),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's stored bytes and type name, to find untouched tensors without decoding them.
    pub fn raw<'a>(&'a self, t: &'a Tensor) -> Option<(&'a [u8], &'a str)> {
        match (&self.files_, &t.loc) {
            (Files::Gguf(m), Loc::Gguf { .. }) => {
                m.tensor_data(&t.source).map(|d| (d, t.ty.as_str()))
            }
            (Files::St(files), Loc::St { file, entry }) => {
                Some((files[*file].bytes(entry), t.ty.as_str()))
            }
            _ => None,
        }
    }

    /// Hands the tensor's mapped pages back to the kernel (after a comparison or a read), so that a
    /// pass over two multi-GB models keeps the resident set at about one tensor.
    pub fn release(&self, t: &Tensor) {
        match (&self.files_, &t.loc) {
            (Files::Gguf(m), Loc::Gguf { .. }) => {
                if let (Some(shard), Some(info)) = (m.shard_of(&t.source), m.tensor(&t.source)) {
                    m.shards()[shard].release_pages(info);
                }
            }
            (Files::St(files), Loc::St { file, entry }) => files[*file].release(entry),
            _ => {}
        }
    }

    /// Calls `f(first_element, values)` over the tensor's values as f32, in file order, a few
    /// MiB at a time.
    fn stream(&self, t: &Tensor, mut f: impl FnMut(usize, &[f32])) -> Result<(), CheckpointError> {
        let read_err = |problem: String| CheckpointError::Read {
            path: self.path.clone(),
            tensor: t.source.clone(),
            problem,
        };
        let row = t.row_len().max(1);
        let rows_per = (CHUNK_ELEMENTS / row).max(1);
        let mut buf = vec![0f32; rows_per.min(t.rows()) * row];
        match (&self.files_, &t.loc) {
            (Files::Gguf(m), Loc::Gguf { ty }) => {
                let data = m
                    .tensor_data(&t.source)
                    .ok_or_else(|| read_err("not in the file".into()))?;
                let row_bytes = ty.row_bytes(row as u64).unwrap_or(0) as usize;
                for (k, chunk) in data.chunks(rows_per * row_bytes.max(1)).enumerate() {
                    let n = chunk.len() / row_bytes.max(1) * row;
                    quant::dequantize_rows(*ty, chunk, row, &mut buf[..n])
                        .map_err(|e| read_err(e.to_string()))?;
                    f(k * rows_per * row, &buf[..n]);
                }
            }
            (Files::St(files), Loc::St { file, entry }) => {
                let bytes = files[*file].bytes(entry);
                let width = match entry.dtype {
                    Dtype::F32 => 4,
                    Dtype::F16 | Dtype::BF16 => 2,
                    d => return Err(read_err(format!("dtype {d:?}; expected F32, F16 or BF16"))),
                };
                for (k, chunk) in bytes.chunks(rows_per * row * width).enumerate() {
                    let n = chunk.len() / width;
                    let out = &mut buf[..n];
                    match entry.dtype {
                        Dtype::F32 => out
                            .par_iter_mut()
                            .zip(chunk.par_chunks_exact(4))
                            .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                        Dtype::F16 => {
                            out.par_iter_mut()
                                .zip(chunk.par_chunks_exact(2))
                                .for_each(|(o, c)| {
                                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32()
                                })
                        }
                        _ => {
                            out.par_iter_mut()
                                .zip(chunk.par_chunks_exact(2))
                                .for_each(|(o, c)| {
                                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32()
                                })
                        }
                    }
                    f(k * rows_per * row, out);
                }
            }
            _ => return Err(read_err("internal: tensor of another checkpoint".into())),
        }
        self.release(t);
        Ok(())
    }

    /// The tensor's values as f32, rows in file order.
    pub fn values(&self, t: &Tensor) -> Result<Vec<f32>, CheckpointError> {
        let mut out = vec![0f32; t.n_elements()];
        self.stream(t, |at, v| out[at..at + v.len()].copy_from_slice(v))?;
        Ok(out)
    }

    /// `delta -= values` in file row order, streaming; returns `Σ values²` (f64).
    pub fn subtract_from(&self, t: &Tensor, delta: &mut [f32]) -> Result<f64, CheckpointError> {
        let mut norm2 = 0f64;
        self.stream(t, |at, v| {
            norm2 += delta[at..at + v.len()]
                .par_iter_mut()
                .zip(v.par_iter())
                .map(|(d, &w)| {
                    *d -= w;
                    f64::from(w) * f64::from(w)
                })
                .sum::<f64>();
        })?;
        Ok(norm2)
    }
}

fn index_of(tensors: &[Tensor]) -> BTreeMap<String, usize> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect()
}

/// Two HF tensors mapping to one GGUF name (experts of a stacked tensor) keep their HF names: they
/// are compared one by one, and never merged into one target here.
fn dedup_names(mut tensors: Vec<Tensor>) -> Vec<Tensor> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tensors {
        *count.entry(t.name.clone()).or_default() += 1;
    }
    for t in &mut tensors {
        if count[&t.name] > 1 {
            t.name = t.source.clone();
        }
    }
    tensors
}

/// The shard files an index's `weight_map` names, in first-seen order, beside the index.
fn index_shards(index: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let err = |problem: String| CheckpointError::Config {
        path: index.to_path_buf(),
        problem,
    };
    let text = std::fs::read_to_string(index).map_err(|error| CheckpointError::Io {
        path: index.to_path_buf(),
        error,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| err("no \"weight_map\" object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(format!("weight_map[\"{tensor}\"] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(err(format!(
                "weight_map[\"{tensor}\"] = \"{file}\" is not a file beside the index"
            )));
        }
        let p = dir.join(file);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(err("\"weight_map\" is empty".into()));
    }
    Ok(out)
}

/// The GGUF architecture of an HF `config.json` (`model_type`, else `architectures[0]`).
fn hf_arch(config: &serde_json::Value) -> Result<Arch, String> {
    let model_type = config.get("model_type").and_then(serde_json::Value::as_str);
    let class = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(serde_json::Value::as_str);
    let from_type = |t: &str| match t {
        "gemma3_text" => Some(Arch::Gemma3),
        t => Arch::from_user(&t.replace('_', "")),
    };
    let from_class = |c: &str| {
        let stem = c
            .strip_suffix("ForCausalLM")
            .or_else(|| c.strip_suffix("ForConditionalGeneration"))?;
        Arch::from_user(stem)
    };
    model_type
        .and_then(from_type)
        .or_else(|| class.and_then(from_class))
        .ok_or_else(|| {
            format!(
                "model_type {} / architectures {} is not one we map to GGUF; supported: {}",
                model_type.map_or("missing".into(), |t| format!("\"{t}\"")),
                class.map_or("missing".into(), |c| format!("[\"{c}\"]")),
                Arch::list()
            )
        })
}

fn hf_tensor(
    arch: Arch,
    e: &TensorEntry,
    file: usize,
    n_head: Option<usize>,
    n_head_kv: Option<usize>,
) -> Tensor {
    let dims: Vec<u64> = e.shape.iter().rev().map(|&d| d as u64).collect();
    let map = e
        .name
        .strip_suffix(".weight")
        .filter(|_| e.shape.len() == 2)
        .and_then(|m| map_module(arch, m));
    let (name, mapped, rope) = match map {
        // One expert of a stacked GGUF tensor keeps its HF name (no GGUF tensor of its own).
        Some(m) if m.expert.is_some() => (e.name.clone(), Some(TargetKind::Experts), None),
        Some(m) => (m.target, Some(m.kind), m.rope),
        None => (e.name.clone(), None, None),
    };
    Tensor {
        name,
        source: e.name.clone(),
        dims,
        ty: format!("{:?}", e.dtype),
        quantized: false,
        mapped,
        hf_rope_heads: match rope {
            Some(Rope::Q) => n_head,
            Some(Rope::K) => n_head_kv,
            None => None,
        },
        loc: Loc::St {
            file,
            entry: e.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_configs_map_to_gguf_architectures() {
        let arch = |v: serde_json::Value| hf_arch(&v);
        assert_eq!(
            arch(serde_json::json!({"model_type": "mistral"})),
            Ok(Arch::Llama)
        );
        assert_eq!(
            arch(serde_json::json!({"model_type": "qwen2_moe"})),
            Ok(Arch::Qwen2Moe)
        );
        assert_eq!(
            arch(serde_json::json!({"model_type": "gemma3_text"})),
            Ok(Arch::Gemma3)
        );
        assert_eq!(
            arch(serde_json::json!({"architectures": ["Qwen3ForCausalLM"]})),
            Ok(Arch::Qwen3)
        );
        let e = arch(serde_json::json!({"model_type": "gpt2"})).unwrap_err();
        assert!(e.contains("\"gpt2\"") && e.contains("supported"), "{e}");
    }

    #[test]
    fn hf_names_map_to_gguf_targets_and_experts_stay_hf() {
        let entry = |name: &str, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let bytes = serde_json::to_vec(&serde_json::json!({
                name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * n]}
            }))
            .unwrap();
            let mut file = (bytes.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&bytes);
            file.extend(std::iter::repeat_n(0u8, 4 * n));
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.safetensors");
            std::fs::write(&p, file).unwrap();
            SafetensorsFile::open(&p).unwrap().tensors()[0].clone()
        };
        let q = hf_tensor(
            Arch::Llama,
            &entry("model.layers.1.self_attn.k_proj.weight", vec![32, 64]),
            0,
            Some(4),
            Some(2),
        );
        assert_eq!(q.name, "blk.1.attn_k.weight");
        assert_eq!((q.dims.clone(), q.hf_rope_heads), (vec![64, 32], Some(2)));
        assert_eq!(q.target_kind(), Some(TargetKind::Linear));
        let e = hf_tensor(
            Arch::Qwen2Moe,
            &entry("model.layers.0.mlp.experts.3.up_proj.weight", vec![16, 8]),
            0,
            None,
            None,
        );
        assert_eq!(e.name, "model.layers.0.mlp.experts.3.up_proj.weight");
        assert_eq!(e.target_kind(), Some(TargetKind::Experts));
        let n = hf_tensor(
            Arch::Llama,
            &entry("model.norm.weight", vec![64]),
            0,
            None,
            None,
        );
        assert_eq!(
            (n.name.as_str(), n.target_kind()),
            ("model.norm.weight", None)
        );
    }
}
