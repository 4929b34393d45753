//! Reading PEFT LoRA adapters (as saved by PEFT, Unsloth and axolotl) into the normalized
//! [`Adapter`]: `adapter_config.json` semantics, tensor-name forms, per-module rank and alpha, and the
//! mapping of modules onto the base model's GGUF tensors.
//!
//! Tensor names (`peft/utils/save_and_load.py`): `base_model.model.<module>.lora_A.weight` `(r, in)`,
//! `.lora_B.weight` `(out, r)`, optionally with the adapter name before `.weight`
//! (`lora_A.default.weight`); embeddings `lora_embedding_A` `(r, vocab)` / `lora_embedding_B`
//! `(dim, r)`; DoRA `lora_magnitude_vector` `(out)`; `lora_B.bias` with `lora_bias`; any other
//! tensor (`modules_to_save`, resized embeddings, mergekit norms) is a full replacement tensor.
//!
//! Scales (`peft/tuners/lora/layer.py`, `update_layer`): `scaling = alpha / r`, or `alpha / √r` with
//! `use_rslora`, where `r` and `alpha` come from `rank_pattern` / `alpha_pattern` through
//! `get_pattern_key` (`peft/utils/other.py`): the first key, in the config's order, for which
//! `re.match(rf"(.*\.)?({key})$", module_name)` matches, else `r` / `lora_alpha`. The module name is
//! the path inside the base model (`model.layers.0.self_attn.q_proj`).
//!
//! `fan_in_fan_out` only matters for GPT-2-style `Conv1D` bases; PEFT resets it to false for
//! `nn.Linear`, which every architecture we map uses, and stores A/B as `(r, in)` / `(out, r)` either
//! way, so it needs no transposition here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{
    check_against_base, Adapter, AdapterError, Factor, FullTensor, FusedPart, Issue, IssueKind,
    Layout, LoraPair, LoraTensor, Matrix, Provenance, SourceFormat, TargetKind,
};
use crate::arch::{self, BaseInfo, Rope};
use crate::safetensors_file::SafetensorsFile;

/// The `adapter_config.json` fields that change what an adapter does.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub r: u32,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In the config's order: PEFT takes the first matching key.
    pub rank_pattern: Vec<(String, u32)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    pub modules_to_save: Vec<String>,
    /// List entries, or the single regex string.
    pub target_modules: Vec<String>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
    /// Older aLoRA configs give the invocation as text only; turning it into token ids needs the base
    /// tokenizer, so `convert` refuses such a config instead of writing an always-on adapter.
    pub invocation_string: Option<String>,
    pub base_model_name_or_path: Option<String>,
    compiled_rank: Vec<(regex::Regex, u32)>,
    compiled_alpha: Vec<(regex::Regex, f64)>,
}

/// PEFT's `LoraConfig` defaults.
const DEFAULT_R: u32 = 8;
const DEFAULT_ALPHA: f64 = 8.0;

impl PeftConfig {
    /// Parses `adapter_config.json` text. Errors say which field is wrong.
    pub fn parse(text: &str) -> Result<PeftConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let peft_type = get("peft_type").and_then(Value::as_str).map(str::to_string);
        if let Some(t) = &peft_type {
            if t != "LORA" {
                return Err(format!(
                    "peft_type is {t:?}; only LORA adapters can be read"
                ));
            }
        }
        let r = match get("r") {
            Some(v) => {
                as_u32(v).ok_or_else(|| format!("r: expected a positive integer, got {v}"))?
            }
            None => DEFAULT_R,
        };
        let lora_alpha = match get("lora_alpha") {
            Some(v) => {
                as_finite(v).ok_or_else(|| format!("lora_alpha: expected a number, got {v}"))?
            }
            None => DEFAULT_ALPHA,
        };
        let flag = |k: &str| -> Result<bool, String> {
            match get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(format!("{k}: expected true or false, got {v}")),
            }
        };
        let mut rank_pattern = Vec::new();
        if let Some(p) = get("rank_pattern") {
            let m = p.as_object().ok_or("rank_pattern: expected an object")?;
            for (k, v) in m {
                let r = as_u32(v).ok_or_else(|| {
                    format!("rank_pattern[{k:?}]: expected a positive integer, got {v}")
                })?;
                rank_pattern.push((k.clone(), r));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(p) = get("alpha_pattern") {
            let m = p.as_object().ok_or("alpha_pattern: expected an object")?;
            for (k, v) in m {
                let a = as_finite(v)
                    .ok_or_else(|| format!("alpha_pattern[{k:?}]: expected a number, got {v}"))?;
                alpha_pattern.push((k.clone(), a));
            }
        }
        let strings = |k: &str| -> Result<Vec<String>, String> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("{k}: expected strings, got {x}"))
                    })
                    .collect(),
                Some(v) => Err(format!(
                    "{k}: expected a string or a list of strings, got {v}"
                )),
            }
        };
        let alora_invocation_tokens = match get("alora_invocation_tokens") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| {
                                format!("alora_invocation_tokens: expected token ids, got {x}")
                            })
                    })
                    .collect::<Result<Vec<u32>, String>>()?,
            )
            .filter(|t| !t.is_empty()),
            Some(v) => return Err(format!("alora_invocation_tokens: expected a list, got {v}")),
        };
        let compiled_rank = rank_pattern
            .iter()
            .map(|(k, r)| Ok((pattern_regex(k)?, *r)))
            .collect::<Result<_, String>>()?;
        let compiled_alpha = alpha_pattern
            .iter()
            .map(|(k, a)| Ok((pattern_regex(k)?, *a)))
            .collect::<Result<_, String>>()?;
        Ok(PeftConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            rank_pattern,
            alpha_pattern,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            use_dora: flag("use_dora")?,
            lora_bias: flag("lora_bias")?,
            modules_to_save: strings("modules_to_save")?,
            target_modules: strings("target_modules")?,
            alora_invocation_tokens,
            invocation_string: get("invocation_string")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            compiled_rank,
            compiled_alpha,
        })
    }

    /// PEFT's `r` for a module (after `rank_pattern`), and the pattern key that decided it.
    pub fn rank_for(&self, module: &str) -> (u32, Option<&str>) {
        for (i, (re, r)) in self.compiled_rank.iter().enumerate() {
            if re.is_match(module) {
                return (*r, Some(self.rank_pattern[i].0.as_str()));
            }
        }
        (self.r, None)
    }

    /// PEFT's `lora_alpha` for a module (after `alpha_pattern`).
    pub fn alpha_for(&self, module: &str) -> (f64, Option<&str>) {
        for (i, (re, a)) in self.compiled_alpha.iter().enumerate() {
            if re.is_match(module) {
                return (*a, Some(self.alpha_pattern[i].0.as_str()));
            }
        }
        (self.lora_alpha, None)
    }

    /// The llama.cpp-convention alpha (scale = alpha / rank) that reproduces PEFT's `scaling` for a
    /// module of rank `rank`: `alpha`, or `alpha·√rank` with rsLoRA.
    pub fn llama_alpha(&self, module: &str, rank: u32) -> f64 {
        let (alpha, _) = self.alpha_for(module);
        if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        }
    }

    fn provenance(&self, path: &Path) -> Provenance {
        Provenance {
            path: path.to_path_buf(),
            format: Some(SourceFormat::Peft),
            r: Some(self.r),
            lora_alpha: Some(self.lora_alpha),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            target_modules: self.target_modules.clone(),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            base_model: self.base_model_name_or_path.clone(),
        }
    }
}

/// PEFT's `get_pattern_key` test, `re.match(rf"(.*\.)?({key})$", name)`, as an anchored regex.
fn pattern_regex(key: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        format!("pattern key {key:?} is not a regular expression we can evaluate: {e}")
    })
}

fn as_u32(v: &Value) -> Option<u32> {
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    })?;
    u32::try_from(n).ok().filter(|n| *n > 0)
}

fn as_finite(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// The role of one tensor in a PEFT state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorRole {
    LoraA,
    LoraB,
    EmbeddingA,
    EmbeddingB,
    Magnitude,
    LoraBias,
    /// Anything else: a full weight (`modules_to_save`, resized embeddings, norms).
    Full,
}

/// Splits a PEFT tensor name into the module path inside the base model and the tensor's role:
/// `base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight` →
/// (`model.layers.0.mlp.up_proj`, `LoraA`).
pub fn parse_tensor_name(name: &str) -> (String, TensorRole) {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let parts: Vec<&str> = name.split('.').collect();
    let role_at = parts.iter().rposition(|p| {
        matches!(
            *p,
            "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector"
        )
    });
    if let Some(i) = role_at {
        let rest = &parts[i + 1..];
        // Allowed tails: nothing, weight, bias, ADAPTER, ADAPTER.weight, ADAPTER.bias.
        let tail_ok = match rest {
            [] | [_] => true,
            [_, last] => matches!(*last, "weight" | "bias"),
            _ => false,
        };
        if tail_ok {
            let is_bias = rest.last() == Some(&"bias");
            let role = match (parts[i], is_bias) {
                ("lora_A", false) => Some(TensorRole::LoraA),
                ("lora_B", false) => Some(TensorRole::LoraB),
                ("lora_B", true) => Some(TensorRole::LoraBias),
                ("lora_embedding_A", false) => Some(TensorRole::EmbeddingA),
                ("lora_embedding_B", false) => Some(TensorRole::EmbeddingB),
                ("lora_magnitude_vector", false) => Some(TensorRole::Magnitude),
                _ => None,
            };
            if let Some(role) = role {
                return (parts[..i].join("."), role);
            }
        }
    }
    // A full tensor: `<module>.weight` or `<module>.modules_to_save.<adapter>.weight`.
    let mut module: Vec<&str> = parts[..parts.len().saturating_sub(1)].to_vec();
    if let Some(i) = module.iter().position(|p| *p == "modules_to_save") {
        module.truncate(i);
    }
    (module.join("."), TensorRole::Full)
}

/// Locates `adapter_config.json` and the safetensors file for a PEFT directory or a `.safetensors`
/// file with its config beside it.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf), AdapterError> {
    let invalid = |m: String| AdapterError::Invalid(m);
    if path.is_dir() {
        let config = path.join("adapter_config.json");
        let weights = path.join("adapter_model.safetensors");
        if !weights.is_file() {
            if path.join("adapter_model.bin").is_file() {
                return Err(invalid(format!(
                    "{}: only adapter_model.bin (a PyTorch pickle) is there; save the adapter with safetensors (PEFT's default, save_pretrained(safe_serialization=True))",
                    path.display()
                )));
            }
            return Err(invalid(format!(
                "{}: no adapter_model.safetensors in this directory",
                path.display()
            )));
        }
        if !config.is_file() {
            return Err(invalid(format!(
                "{}: no adapter_config.json in this directory",
                path.display()
            )));
        }
        Ok((config, weights))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = dir.join("adapter_config.json");
        if !config.is_file() {
            return Err(invalid(format!(
                "{}: expected adapter_config.json beside it (PEFT writes it next to the weights)",
                path.display()
            )));
        }
        Ok((config, path.to_path_buf()))
    } else {
        Err(invalid(format!(
            "{}: no such file or directory",
            path.display()
        )))
    }
}

/// Whether `path` looks like a PEFT adapter (a directory with adapter_config.json, or a
/// `.safetensors` file).
pub fn is_peft(path: &Path) -> bool {
    if path.is_dir() {
        path.join("adapter_config.json").is_file()
    } else {
        path.extension().is_some_and(|e| e == "safetensors")
    }
}

/// One PEFT module's tensors before mapping.
#[derive(Clone, Debug, Default)]
pub struct PeftModule {
    /// Module path inside the base model (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    pub embedding: bool,
    pub a: Option<Factor>,
    pub b: Option<Factor>,
    pub magnitude: Option<Factor>,
    pub bias: Option<Factor>,
}

/// A PEFT adapter as read, before it meets an architecture.
#[derive(Debug)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub config_path: PathBuf,
    pub weights: Arc<SafetensorsFile>,
    /// Modules in name order.
    pub modules: Vec<PeftModule>,
    /// Full tensors by source name.
    pub full: Vec<(String, String, Factor)>,
}

/// Reads the config and classifies every tensor; shape problems that make a tensor unusable are
/// errors listing every offender.
pub fn read_raw(path: &Path) -> Result<PeftAdapter, AdapterError> {
    let (config_path, weights_path) = locate(path)?;
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| AdapterError::Invalid(format!("{}: {e}", config_path.display())))?;
    let config = PeftConfig::parse(&text)
        .map_err(|e| AdapterError::Invalid(format!("{}: {e}", config_path.display())))?;
    let file = Arc::new(SafetensorsFile::open(&weights_path)?);
    let mut modules: BTreeMap<String, PeftModule> = BTreeMap::new();
    let mut full = Vec::new();
    let mut problems = Vec::new();
    for entry in file.tensors() {
        // PEFT saves the targeted embedding/lm_head base weights themselves (`save_embedding_layers`)
        // as `<module>.base_layer.weight`: unchanged base weights, not part of the update (the
        // reference converter skips them too). A resized vocabulary shows in the LoRA shapes.
        if entry.name.ends_with(".base_layer.weight") {
            continue;
        }
        let (module, role) = parse_tensor_name(&entry.name);
        let shape = &entry.shape;
        let factor = |rows: usize, cols: usize| Factor::Safetensors {
            file: file.clone(),
            entry: entry.clone(),
            rows,
            cols,
        };
        let want_2d = || -> Option<(usize, usize)> {
            match shape.as_slice() {
                [r, c] => Some((*r, *c)),
                _ => None,
            }
        };
        let want_1d = || -> Option<usize> {
            match shape.as_slice() {
                [n] => Some(*n),
                [1, n] | [n, 1] => Some(*n),
                _ => None,
            }
        };
        let m = || PeftModule {
            path: module.clone(),
            ..PeftModule::default()
        };
        match role {
            TensorRole::LoraA
            | TensorRole::LoraB
            | TensorRole::EmbeddingA
            | TensorRole::EmbeddingB => {
                let Some((r, c)) = want_2d() else {
                    problems.push(format!(
                        "tensor '{}' has shape {shape:?}; expected 2 dimensions (convolution LoRA is not supported)",
                        entry.name
                    ));
                    continue;
                };
                let md = modules.entry(module.clone()).or_insert_with(m);
                let embedding = matches!(role, TensorRole::EmbeddingA | TensorRole::EmbeddingB);
                md.embedding |= embedding;
                let slot = if matches!(role, TensorRole::LoraA | TensorRole::EmbeddingA) {
                    &mut md.a
                } else {
                    &mut md.b
                };
                if slot.is_some() {
                    problems.push(format!(
                        "module '{module}' has two {:?} tensors (several adapters in one file?); last: '{}'",
                        role, entry.name
                    ));
                }
                *slot = Some(factor(r, c));
            }
            TensorRole::Magnitude | TensorRole::LoraBias => {
                let Some(n) = want_1d() else {
                    problems.push(format!(
                        "tensor '{}' has shape {shape:?}; expected a vector",
                        entry.name
                    ));
                    continue;
                };
                let md = modules.entry(module.clone()).or_insert_with(m);
                let f = Some(factor(1, n));
                if role == TensorRole::Magnitude {
                    md.magnitude = f;
                } else {
                    md.bias = f;
                }
            }
            TensorRole::Full => {
                let (r, c) = match shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    _ => {
                        problems.push(format!(
                            "tensor '{}' has shape {shape:?}; expected a LoRA factor or a 1-D/2-D weight",
                            entry.name
                        ));
                        continue;
                    }
                };
                full.push((entry.name.clone(), module, factor(r, c)));
            }
        }
    }
    for md in modules.values() {
        match (&md.a, &md.b) {
            (Some(a), Some(b)) => {
                let (ra, _) = a.shape();
                let (_, rb) = b.shape();
                if ra != rb {
                    problems.push(format!(
                        "module '{}': lora_A has rank {ra} ({}), lora_B has rank {rb} ({})",
                        md.path,
                        describe_shape(a),
                        describe_shape(b)
                    ));
                } else if ra == 0 {
                    problems.push(format!("module '{}': rank 0", md.path));
                }
            }
            (None, Some(_)) => {
                problems.push(format!("module '{}': lora_B without lora_A", md.path))
            }
            (Some(_), None) => {
                problems.push(format!("module '{}': lora_A without lora_B", md.path))
            }
            (None, None) => {
                problems.push(format!(
                    "module '{}': {} without lora_A/lora_B",
                    md.path,
                    if md.magnitude.is_some() {
                        "lora_magnitude_vector"
                    } else {
                        "lora_B.bias"
                    }
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(AdapterError::Invalid(format!(
            "{}: {}",
            weights_path.display(),
            problems.join("; ")
        )));
    }
    Ok(PeftAdapter {
        config,
        config_path,
        weights: file,
        modules: modules.into_values().collect(),
        full,
    })
}

fn describe_shape(f: &Factor) -> String {
    let (r, c) = f.shape();
    match f {
        Factor::Safetensors { entry, .. } => format!("'{}' {r}×{c}", entry.name),
        Factor::Owned(_) => format!("{r}×{c}"),
        Factor::Gguf { tensor, .. } => format!("'{tensor}' {r}×{c}"),
    }
}

/// Reads a PEFT adapter and maps it onto `base`. Returns the adapter and the list of problems; a
/// caller that writes files must refuse when the list is not empty.
pub fn read(path: &Path, base: &BaseInfo) -> Result<(Adapter, Vec<Issue>), AdapterError> {
    let raw = read_raw(path)?;
    Ok(build(&raw, base, path))
}

/// Maps the modules of `raw` onto `base` (see [`read`]).
pub fn build(raw: &PeftAdapter, base: &BaseInfo, path: &Path) -> (Adapter, Vec<Issue>) {
    let cfg = &raw.config;
    let arch = base.arch.as_str();
    let mut issues = Vec::new();
    let mut singles: Vec<(arch::ModuleMap, LoraPair, &PeftModule)> = Vec::new();
    for md in &raw.modules {
        let (Some(a), Some(b)) = (&md.a, &md.b) else {
            continue; // read_raw refused these
        };
        let rank = a.shape().0;
        let (cfg_rank, key) = cfg.rank_for(&md.path);
        if cfg_rank as usize != rank {
            issues.push(Issue {
                source: md.path.clone(),
                target: None,
                status: IssueKind::RankMismatch,
                message: format!(
                    "tensors have rank {rank} but the config gives r = {cfg_rank}{}",
                    key.map(|k| format!(" (rank_pattern key {k:?})"))
                        .unwrap_or_default()
                ),
            });
            continue;
        }
        let Some(map) = arch::map_module(arch, &md.path) else {
            issues.push(Issue {
                source: md.path.clone(),
                target: None,
                status: IssueKind::UnknownModule,
                message: format!("no {arch} GGUF tensor corresponds to this module"),
            });
            continue;
        };
        if md.embedding != (map.kind == TargetKind::Embedding) {
            issues.push(Issue {
                source: md.path.clone(),
                target: Some(map.target.clone()),
                status: IssueKind::UnknownModule,
                message: if md.embedding {
                    "embedding LoRA (lora_embedding_A/B) on a module that is not the token embedding".into()
                } else {
                    "linear LoRA on the token embedding; expected lora_embedding_A/B".into()
                },
            });
            continue;
        }
        let pair = LoraPair {
            source: md.path.clone(),
            a: a.clone(),
            b: b.clone(),
            alpha: cfg.llama_alpha(&md.path, rank as u32),
            b_rows: None,
        };
        singles.push((map, pair, md));
    }

    // Group by target: experts stack, q/k/v may fuse or split against the base.
    let mut tensors: Vec<LoraTensor> = Vec::new();
    let mut experts: BTreeMap<String, Vec<(usize, LoraPair, arch::ModuleMap)>> = BTreeMap::new();
    let mut to_fuse: BTreeMap<u32, Vec<(usize, LoraPair)>> = BTreeMap::new();
    for (map, pair, md) in singles {
        if let Some(e) = map.expert {
            experts
                .entry(map.target.clone())
                .or_default()
                .push((e, pair, map));
            continue;
        }
        if base.has_tensors() && base.tensor(&map.target).is_none() {
            if let Some(layer) = map.layer {
                let parts = arch::qkv_parts(layer);
                if let Some(i) = parts.iter().position(|p| *p == map.target) {
                    if base.tensor(&arch::qkv_fused(layer)).is_some() {
                        to_fuse.entry(layer).or_default().push((i, pair));
                        continue;
                    }
                }
                if map.target == arch::qkv_fused(layer)
                    && parts.iter().all(|p| base.tensor(p).is_some())
                {
                    let mut start = 0usize;
                    for p in &parts {
                        let rows = base
                            .tensor(p)
                            .and_then(|t| t.dims.get(1))
                            .copied()
                            .unwrap_or(0) as usize;
                        let mut part = pair.clone();
                        part.b_rows = Some(start..start + rows);
                        start += rows;
                        tensors.push(plain_tensor(
                            p.clone(),
                            Some(layer),
                            TargetKind::Linear,
                            part,
                            md,
                        ));
                    }
                    if start != pair.b.shape().0 {
                        issues.push(Issue {
                            source: md.path.clone(),
                            target: Some(map.target.clone()),
                            status: IssueKind::ShapeMismatch,
                            message: format!(
                                "lora_B has {} rows but the base's attn_q/attn_k/attn_v have {start} together",
                                pair.b.shape().0
                            ),
                        });
                    }
                    continue;
                }
            }
        }
        let pair = match trim_embedding_vocab(arch, &map, pair, base) {
            Ok(p) => p,
            Err(message) => {
                issues.push(Issue {
                    source: md.path.clone(),
                    target: Some(map.target.clone()),
                    status: IssueKind::ShapeMismatch,
                    message,
                });
                continue;
            }
        };
        let mut t = plain_tensor(map.target.clone(), map.layer, map.kind, pair, md);
        if let Some(rope) = map.rope {
            match head_count(base, rope) {
                Some(n) => t.permute_heads = Some(n),
                None => {
                    issues.push(Issue {
                        source: md.path.clone(),
                        target: Some(map.target.clone()),
                        status: IssueKind::NeedsBase,
                        message: format!(
                            "{arch} stores {} RoPE-permuted by head; the head count comes from the base model: pass --base BASE.gguf",
                            map.target
                        ),
                    });
                    continue;
                }
            }
        }
        tensors.push(t);
    }

    for (target, mut list) in experts {
        list.sort_by_key(|(e, _, _)| *e);
        let map = list[0].2.clone();
        let n_expert = match base.tensor(&target).and_then(|t| t.dims.get(2)) {
            Some(n) => *n as usize,
            None => list.last().map_or(0, |(e, _, _)| e + 1),
        };
        let first = list[0].1.clone();
        let (rank, n_in, n_out) = (first.rank(), first.n_in(), first.n_out());
        let mut pairs = Vec::with_capacity(n_expert);
        let mut bad = None;
        let mut it = list.into_iter().peekable();
        for e in 0..n_expert {
            match it.peek() {
                Some((ei, _, _)) if *ei == e => {
                    let (_, p, _) = it.next().unwrap_or_else(|| unreachable!());
                    if p.rank() != rank || p.n_in() != n_in || p.n_out() != n_out {
                        bad = Some(format!(
                            "expert {e} ({}) is {}×{} rank {}, expert 0 is {n_out}×{n_in} rank {rank}; stacked experts need one shape and rank",
                            p.source,
                            p.n_out(),
                            p.n_in(),
                            p.rank()
                        ));
                    }
                    pairs.push(p);
                }
                _ => pairs.push(LoraPair {
                    // An expert the adapter does not touch: an exact zero update.
                    source: format!("(expert {e} not adapted)"),
                    a: Factor::owned(Matrix::zeros(rank, n_in)),
                    b: Factor::owned(Matrix::zeros(n_out, rank)),
                    alpha: first.alpha,
                    b_rows: None,
                }),
            }
        }
        if let Some((e, p, _)) = it.next() {
            bad = Some(format!(
                "expert {e} ({}) is beyond the base's {n_expert} experts",
                p.source
            ));
        }
        if let Some(message) = bad {
            issues.push(Issue {
                source: target.clone(),
                target: Some(target.clone()),
                status: IssueKind::ShapeMismatch,
                message,
            });
            continue;
        }
        tensors.push(LoraTensor {
            target,
            layer: map.layer,
            kind: TargetKind::Experts,
            layout: Layout::Experts(pairs),
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        });
    }

    for (layer, parts) in to_fuse {
        let fused = arch::qkv_fused(layer);
        let total = base
            .tensor(&fused)
            .and_then(|t| t.dims.get(1))
            .copied()
            .unwrap_or(0) as usize;
        let mut rows: [Option<usize>; 3] = [None; 3];
        for (i, p) in &parts {
            rows[*i] = Some(p.n_out());
        }
        // Row counts of untouched parts: from the head counts, else the one unknown is the rest.
        if let (Some(h), Some(hkv)) = (base.n_head, base.n_head_kv.or(base.n_head)) {
            let denom = (h + 2 * hkv) as usize;
            if denom > 0 && total.is_multiple_of(denom) {
                let hd = total / denom;
                let want = [h as usize * hd, hkv as usize * hd, hkv as usize * hd];
                for i in 0..3 {
                    rows[i].get_or_insert(want[i]);
                }
            }
        }
        if rows.iter().filter(|r| r.is_none()).count() == 1 {
            let known: usize = rows.iter().flatten().sum();
            if let Some(slot) = rows.iter_mut().find(|r| r.is_none()) {
                *slot = Some(total.saturating_sub(known));
            }
        }
        let sources: Vec<String> = parts.iter().map(|(_, p)| p.source.clone()).collect();
        let all_rows: Option<Vec<usize>> = rows.iter().copied().collect();
        match all_rows {
            Some(r) if r.iter().sum::<usize>() == total => {
                let mut slots: Vec<FusedPart> = r.iter().map(|&rows| FusedPart { rows, pair: None }).collect();
                for (i, p) in parts {
                    slots[i].pair = Some(p);
                }
                tensors.push(LoraTensor {
                    target: fused,
                    layer: Some(layer),
                    kind: TargetKind::Linear,
                    layout: Layout::Fused(slots),
                    permute_heads: None,
                    dora_magnitude: None,
                    lora_bias: None,
                });
            }
            _ => issues.push(Issue {
                source: sources.join("+"),
                target: Some(fused.clone()),
                status: IssueKind::ShapeMismatch,
                message: format!(
                    "the base fuses q/k/v into {fused} ({total} rows) and the adapted parts do not fill it ({rows:?})"
                ),
            }),
        }
    }

    issues.extend(check_against_base(&tensors, base));
    if cfg.alora_invocation_tokens.is_none() {
        if let Some(text) = &cfg.invocation_string {
            issues.push(Issue {
                source: raw.config_path.display().to_string(),
                target: None,
                status: IssueKind::NeedsTokens,
                message: format!(
                    "an aLoRA with invocation_string {text:?} but no alora_invocation_tokens: add the base tokenizer's ids for it (convert_lora_to_gguf.py drops the first token) as alora_invocation_tokens"
                ),
            });
        }
    }
    tensors.sort_by_key(tensor_order);
    let full_tensors = raw
        .full
        .iter()
        .map(|(name, module, data)| FullTensor {
            source: name.clone(),
            target: arch::map_module(arch, module).map(|m| {
                if name.ends_with(".bias") {
                    m.target.replace(".weight", ".bias")
                } else {
                    m.target
                }
            }),
            data: data.clone(),
        })
        .collect();
    let adapter = Adapter {
        arch: Some(base.arch.clone()),
        tensors,
        full_tensors,
        alora_invocation_tokens: cfg.alora_invocation_tokens.clone(),
        provenance: cfg.provenance(path),
    };
    (adapter, issues)
}

fn plain_tensor(
    target: String,
    layer: Option<u32>,
    kind: TargetKind,
    pair: LoraPair,
    md: &PeftModule,
) -> LoraTensor {
    LoraTensor {
        target,
        layer,
        kind,
        layout: Layout::Single(Box::new(pair)),
        permute_heads: None,
        dora_magnitude: md.magnitude.clone(),
        lora_bias: md.bias.clone(),
    }
}

/// gemma3's converter drops the embedding rows past the tokenizer's real vocabulary
/// (`data_torch[:n_vocab_real]`), so its GGUF `token_embd` can be shorter than the HF embedding. The
/// LoRA's `A` (one column per token) is cut the same way: the dropped columns belong to tokens the
/// GGUF model can never see. (llama.cpp's own LoRA converter slices `B` there instead, leaving an
/// adapter its loader rejects.)
fn trim_embedding_vocab(
    arch: &str,
    map: &arch::ModuleMap,
    pair: LoraPair,
    base: &BaseInfo,
) -> Result<LoraPair, String> {
    if map.kind != TargetKind::Embedding || !arch.starts_with("gemma3") {
        return Ok(pair);
    }
    let Some(n_vocab) = base
        .tensor(&map.target)
        .and_then(|t| t.dims.get(1))
        .map(|v| *v as usize)
    else {
        return Ok(pair);
    };
    let (rank, cols) = pair.a.shape();
    if cols <= n_vocab {
        return Ok(pair);
    }
    let a = pair.a.load().map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(rank * n_vocab);
    for r in 0..rank {
        data.extend_from_slice(&a.row(r)[..n_vocab]);
    }
    let a = Matrix::new(rank, n_vocab, data).ok_or("embedding LoRA shape")?;
    Ok(LoraPair {
        a: Factor::owned(a),
        ..pair
    })
}

fn head_count(base: &BaseInfo, rope: Rope) -> Option<usize> {
    let n = match rope {
        Rope::Q => base.n_head,
        Rope::K => base.n_head_kv.or(base.n_head),
    }?;
    Some(n as usize)
}

/// Output order: global tensors first, then by layer, then by name (stable and readable).
fn tensor_order(t: &LoraTensor) -> (u32, String) {
    (t.layer.map_or(0, |l| l + 1), t.target.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_name_forms() {
        let cases = [
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "model.layers.0.self_attn.q_proj",
                TensorRole::LoraA,
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                "model.layers.0.self_attn.q_proj",
                TensorRole::LoraB,
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "model.embed_tokens",
                TensorRole::EmbeddingA,
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_B.default",
                "model.embed_tokens",
                TensorRole::EmbeddingB,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector",
                "model.layers.1.mlp.up_proj",
                TensorRole::Magnitude,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.weight",
                "model.layers.1.mlp.up_proj",
                TensorRole::Magnitude,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias",
                "model.layers.1.mlp.up_proj",
                TensorRole::LoraBias,
            ),
            (
                "base_model.model.lm_head.weight",
                "lm_head",
                TensorRole::Full,
            ),
            (
                "base_model.model.lm_head.modules_to_save.default.weight",
                "lm_head",
                TensorRole::Full,
            ),
            (
                "model.layers.2.mlp.down_proj.lora_A.weight",
                "model.layers.2.mlp.down_proj",
                TensorRole::LoraA,
            ),
            (
                "base_model.model.model.norm.weight",
                "model.norm",
                TensorRole::Full,
            ),
        ];
        for (name, module, role) in cases {
            assert_eq!(
                parse_tensor_name(name),
                (module.to_string(), role),
                "{name}"
            );
        }
    }

    #[test]
    fn pattern_keys_follow_peft_get_pattern_key() {
        let cfg = PeftConfig::parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,
                "rank_pattern":{"q_proj":4,"model.layers.1.mlp.up_proj":2,"layers\\.[23]\\..*down_proj":6},
                "alpha_pattern":{"self_attn.v_proj":5,"proj":1}}"#,
        )
        .unwrap();
        // Suffix match on a dot boundary.
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.q_proj").0, 4);
        // Not a dot boundary: "xq_proj" does not end in ".q_proj".
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.xq_proj").0, 8);
        // A full path matches itself (the `(.*\.)?` is optional).
        assert_eq!(cfg.rank_for("model.layers.1.mlp.up_proj").0, 2);
        assert_eq!(cfg.rank_for("model.layers.11.mlp.up_proj").0, 8);
        // Keys are regular expressions.
        assert_eq!(cfg.rank_for("model.layers.3.mlp.down_proj").0, 6);
        assert_eq!(cfg.rank_for("model.layers.4.mlp.down_proj").0, 8);
        // First key in config order wins; "proj" needs a whole dotted component.
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.v_proj").0, 5.0);
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.o_proj").0, 16.0);
        assert_eq!(cfg.alpha_for("model.layers.0.proj").0, 1.0);
    }

    #[test]
    fn scales_plain_rslora_and_patterns() {
        let cfg = PeftConfig::parse(r#"{"r":16,"lora_alpha":32}"#).unwrap();
        assert_eq!(cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16), 32.0);
        let cfg = PeftConfig::parse(
            r#"{"r":16,"lora_alpha":32,"use_rslora":true,"alpha_pattern":{"v_proj":8}}"#,
        )
        .unwrap();
        // rsLoRA: scaling = alpha/sqrt(r) = 32/4 = 8, so llama.cpp alpha = 8 * 16 = 128.
        assert_eq!(
            cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16),
            128.0
        );
        assert_eq!(
            cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16) / 16.0,
            32.0 / 4.0
        );
        assert_eq!(cfg.llama_alpha("model.layers.0.self_attn.v_proj", 16), 32.0);
        // Defaults are PEFT's.
        let cfg = PeftConfig::parse("{}").unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (8, 8.0, false));
    }

    #[test]
    fn config_errors_name_the_field() {
        for (text, want) in [
            ("[]", "object"),
            ("{", "JSON"),
            (r#"{"r":"8"}"#, "r:"),
            (r#"{"r":0}"#, "r:"),
            (r#"{"lora_alpha":"x"}"#, "lora_alpha"),
            (r#"{"use_rslora":1}"#, "use_rslora"),
            (r#"{"peft_type":"IA3"}"#, "LORA"),
            (r#"{"rank_pattern":{"(?<=x)q":2}}"#, "pattern key"),
            (r#"{"alora_invocation_tokens":[1,-2]}"#, "alora"),
            (r#"{"target_modules":7}"#, "target_modules"),
        ] {
            let err = PeftConfig::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let cfg = PeftConfig::parse(
            r#"{"target_modules":"all-linear","modules_to_save":null,"alora_invocation_tokens":[5,6],"base_model_name_or_path":"m"}"#,
        )
        .unwrap();
        assert_eq!(cfg.target_modules, ["all-linear"]);
        assert_eq!(cfg.alora_invocation_tokens, Some(vec![5, 6]));
        assert_eq!(cfg.base_model_name_or_path.as_deref(), Some("m"));
    }

    use crate::arch::BaseTensor;
    use crate::quant::GgmlType;
    use std::collections::BTreeMap;

    /// Writes a PEFT directory: config and an F32 safetensors file built by hand.
    fn peft_dir(config: &str, tensors: &[(&str, Vec<usize>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (i, (name, shape)) in tensors.iter().enumerate() {
            let n: usize = shape.iter().product();
            let start = data.len();
            for j in 0..n {
                data.extend_from_slice(&(((i * 31 + j) % 13) as f32 * 0.1 - 0.6).to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::to_string(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&data);
        std::fs::write(dir.path().join("adapter_model.safetensors"), bytes).unwrap();
        dir
    }

    fn base(arch: &str, n_head: u32, n_head_kv: u32, tensors: &[(&str, Vec<u64>)]) -> BaseInfo {
        let tensors: BTreeMap<String, BaseTensor> = tensors
            .iter()
            .map(|(n, d)| {
                (
                    n.to_string(),
                    BaseTensor {
                        dims: d.clone(),
                        ty: GgmlType::F32,
                    },
                )
            })
            .collect();
        BaseInfo {
            arch: arch.into(),
            n_layer: Some(1),
            n_head: Some(n_head),
            n_head_kv: Some(n_head_kv),
            n_embd: Some(4),
            name: None,
            tensors: Some(tensors),
        }
    }

    const P: &str = "base_model.model.model.layers.0.";

    #[test]
    fn moe_experts_stack_with_untouched_experts_as_zero() {
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":4}"#,
            &[
                (
                    &format!("{P}mlp.experts.0.up_proj.lora_A.weight"),
                    vec![2, 4],
                ),
                (
                    &format!("{P}mlp.experts.0.up_proj.lora_B.weight"),
                    vec![6, 2],
                ),
                (
                    &format!("{P}mlp.experts.2.up_proj.lora_A.weight"),
                    vec![2, 4],
                ),
                (
                    &format!("{P}mlp.experts.2.up_proj.lora_B.weight"),
                    vec![6, 2],
                ),
            ],
        );
        let b = base(
            "qwen2moe",
            2,
            1,
            &[("blk.0.ffn_up_exps.weight", vec![4, 6, 3])],
        );
        let (a, issues) = read(dir.path(), &b).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let t = a.tensor("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(
            (t.kind, t.n_expert(), t.rank()),
            (TargetKind::Experts, 3, 2)
        );
        let l = t.load().unwrap();
        assert_eq!((l.a.rows, l.a.cols, l.b.rows, l.b.cols), (6, 4, 18, 2));
        assert!(l.b.data[12..24].iter().all(|v| *v == 0.0)); // expert 1's B
        assert!(l.b.data[..12].iter().any(|v| *v != 0.0));
        assert_eq!(l.scale(), 2.0);
    }

    #[test]
    fn separate_q_v_fuse_into_a_base_attn_qkv() {
        // n_head 2, n_head_kv 1, 16 fused rows: head dim 4, q 8 rows, k 4, v 4.
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":2,"rank_pattern":{"v_proj":1}}"#,
            &[
                (&format!("{P}self_attn.q_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.q_proj.lora_B.weight"), vec![8, 2]),
                (&format!("{P}self_attn.v_proj.lora_A.weight"), vec![1, 4]),
                (&format!("{P}self_attn.v_proj.lora_B.weight"), vec![4, 1]),
            ],
        );
        let b = base("phi3", 2, 1, &[("blk.0.attn_qkv.weight", vec![4, 16])]);
        let (a, issues) = read(dir.path(), &b).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let t = a.tensor("blk.0.attn_qkv.weight").unwrap();
        assert_eq!((t.rank(), t.n_out(), t.n_in()), (3, 16, 4));
        let l = t.load().unwrap();
        let fused = l.b.matmul(&l.a);
        // Each part's own update (scale q = 2/2 = 1, v = 2/1 = 2) sits in its rows; k rows are zero.
        let raw = read_raw(dir.path()).unwrap();
        let part = |i: usize| {
            let m = &raw.modules[i];
            m.b.as_ref()
                .unwrap()
                .load()
                .unwrap()
                .matmul(&m.a.as_ref().unwrap().load().unwrap())
        };
        let (dq, dv) = (part(0), part(1)); // name order: q_proj, v_proj
        let s = l.scale() as f32;
        for c in 0..4 {
            for r in 0..8 {
                assert!((fused.data[r * 4 + c] * s - dq.data[r * 4 + c]).abs() < 1e-6);
            }
            for r in 8..12 {
                assert_eq!(fused.data[r * 4 + c], 0.0);
            }
            for r in 0..4 {
                assert!((fused.data[(12 + r) * 4 + c] * s - 2.0 * dv.data[r * 4 + c]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn fused_qkv_splits_into_separate_base_tensors() {
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":2}"#,
            &[
                (&format!("{P}self_attn.qkv_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.qkv_proj.lora_B.weight"), vec![16, 2]),
            ],
        );
        let b = base(
            "phi3",
            2,
            1,
            &[
                ("blk.0.attn_q.weight", vec![4, 8]),
                ("blk.0.attn_k.weight", vec![4, 4]),
                ("blk.0.attn_v.weight", vec![4, 4]),
            ],
        );
        let (a, issues) = read(dir.path(), &b).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let whole = read_raw(dir.path()).unwrap().modules[0]
            .b
            .as_ref()
            .unwrap()
            .load()
            .unwrap();
        let mut row = 0;
        for (name, rows) in [("attn_q", 8), ("attn_k", 4), ("attn_v", 4)] {
            let t = a.tensor(&format!("blk.0.{name}.weight")).unwrap();
            let l = t.load().unwrap();
            assert_eq!(l.b, whole.rows_range(row..row + rows), "{name}");
            row += rows;
        }
    }

    #[test]
    fn llama_q_and_k_get_their_head_counts() {
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":2}"#,
            &[
                (&format!("{P}self_attn.q_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.q_proj.lora_B.weight"), vec![8, 2]),
                (&format!("{P}self_attn.k_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.k_proj.lora_B.weight"), vec![4, 2]),
            ],
        );
        let b = base(
            "llama",
            2,
            1,
            &[
                ("blk.0.attn_q.weight", vec![4, 8]),
                ("blk.0.attn_k.weight", vec![4, 4]),
            ],
        );
        let (a, issues) = read(dir.path(), &b).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            a.tensor("blk.0.attn_q.weight").unwrap().permute_heads,
            Some(2)
        );
        assert_eq!(
            a.tensor("blk.0.attn_k.weight").unwrap().permute_heads,
            Some(1)
        );
        // Without a base, llama q/k cannot be permuted: a NeedsBase issue, not a silent error.
        let (_, issues) = read(dir.path(), &BaseInfo::from_arch("llama").unwrap()).unwrap();
        assert_eq!(issues.len(), 2);
        assert!(issues.iter().all(|i| i.status == IssueKind::NeedsBase));
    }

    #[test]
    fn config_rank_disagreeing_with_tensors_and_unknown_modules_are_issues() {
        let dir = peft_dir(
            r#"{"r":4,"lora_alpha":2}"#,
            &[
                (&format!("{P}self_attn.q_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.q_proj.lora_B.weight"), vec![8, 2]),
            ],
        );
        let (_, issues) = read(dir.path(), &BaseInfo::from_arch("qwen2").unwrap()).unwrap();
        assert_eq!(issues[0].status, IssueKind::RankMismatch);
        let dir = peft_dir(
            r#"{"r":2}"#,
            &[
                (&format!("{P}self_attn.rotary.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.rotary.lora_B.weight"), vec![8, 2]),
            ],
        );
        let (_, issues) = read(dir.path(), &BaseInfo::from_arch("qwen2").unwrap()).unwrap();
        assert_eq!(issues[0].status, IssueKind::UnknownModule);
        // A/B rank mismatch is a read error naming both tensors.
        let dir = peft_dir(
            r#"{"r":2}"#,
            &[
                (&format!("{P}self_attn.q_proj.lora_A.weight"), vec![2, 4]),
                (&format!("{P}self_attn.q_proj.lora_B.weight"), vec![8, 3]),
            ],
        );
        let err = read_raw(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("rank 2") && err.contains("rank 3") && err.contains("lora_B"),
            "{err}"
        );
    }

    #[test]
    fn gemma3_embedding_lora_is_cut_to_the_gguf_vocabulary() {
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":2}"#,
            &[
                (
                    "base_model.model.model.embed_tokens.lora_embedding_A",
                    vec![2, 12],
                ),
                (
                    "base_model.model.model.embed_tokens.lora_embedding_B",
                    vec![4, 2],
                ),
            ],
        );
        let b = base("gemma3", 2, 1, &[("token_embd.weight", vec![4, 10])]);
        let (a, issues) = read(dir.path(), &b).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let t = a.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (t.kind, t.n_in(), t.n_out()),
            (TargetKind::Embedding, 10, 4)
        );
        let full = read_raw(dir.path()).unwrap().modules[0]
            .a
            .as_ref()
            .unwrap()
            .load()
            .unwrap();
        let cut = t.load().unwrap().a;
        for r in 0..2 {
            assert_eq!(cut.row(r), &full.row(r)[..10]);
        }
        // Other architectures keep the mismatch visible.
        let b = base("llama", 2, 1, &[("token_embd.weight", vec![4, 10])]);
        let (_, issues) = read(dir.path(), &b).unwrap();
        assert_eq!(issues[0].status, IssueKind::ShapeMismatch);
    }
}
