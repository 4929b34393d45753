//! `bundle`: several LoRA adapters (GGUF or PEFT) in one file, and `--extract` to get one back.
//!
//! - **concat** (default): one standard GGUF LoRA that applies every input at its scale at once
//!   (PEFT's exact `cat` combination, [`Layout::Concat`]). Per adapted base tensor, `A` is the
//!   row-stack of the inputs' `A`, `B` the column-stack of their `B`, each block multiplied by
//!   `user scale × alpha / rank` of that input tensor. Each tensor's written alpha is its
//!   concatenated rank, so llama.cpp's runtime scale `alpha / rank` is 1 and `B·A = Σ sᵢ·Bᵢ·Aᵢ`
//!   exactly (to f32 rounding); the adapter writer then writes the alpha most tensors share and
//!   folds `rank / alpha_file` into `B` of the others. Ranks are never padded. Inputs may target
//!   different tensors and have different ranks; llama.cpp loads the result like any adapter.
//! - **named**: a container holding each input adapter bit for bit under its name (layout in
//!   [`crate::adapter::bundle`] and `docs/FORMAT.md`). PEFT inputs are stored as `convert` would
//!   write them. `BUNDLE.gguf#NAME` then works wherever an adapter is read, and [`extract`] writes
//!   one back as its own file.
//!
//! Every input is read and checked before the output is created: one architecture for all (and
//! the base's, with `--base`), one shape per adapted base tensor (and the base's), nothing a GGUF
//! LoRA cannot hold. Any problem is an error naming the input and tensor; nothing is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::adapter::bundle::{self as layout, key, stored_name};
use crate::adapter::gguf::{self as gguf_adapter, FactorType, LoraFile};
use crate::adapter::source::{split_spec, GgufSource};
use crate::adapter::{
    self, peft, Adapter, AdapterError, ConcatPart, Issue, Layout, LoraTensor, Opened, Provenance,
    ScaleSuffix, SourceFormat,
};
use crate::arch::{BaseError, BaseInfo};
use crate::gguf::{Array, GgufError, GgufWriter, Metadata, TensorDesc, Value};

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One standard GGUF LoRA applying all inputs at their scales.
    Concat,
    /// A container of the inputs, each selectable (`BUNDLE.gguf#NAME`) and extractable by name.
    Named,
}

impl Mode {
    /// The names `--mode` takes.
    pub const NAMES: [&'static str; 2] = ["concat", "named"];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Concat => "concat",
            Mode::Named => "named",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s.to_ascii_lowercase().as_str() {
            "concat" => Ok(Mode::Concat),
            "named" => Ok(Mode::Named),
            _ => Err(format!(
                "unknown bundle mode '{s}' (expected concat or named)"
            )),
        }
    }
}

/// One input: `[NAME=]PATH[:SCALE]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    /// Given name (`NAME=`), if any.
    pub name: Option<String>,
    /// A GGUF LoRA, PEFT directory or `.safetensors`, or `BUNDLE.gguf#NAME`.
    pub path: PathBuf,
    pub scale: f64,
}

/// Whether `name` can name a bundled adapter: non-empty, and none of the characters that
/// `NAME=PATH:SCALE` and `FILE#NAME` use as separators, nor path separators or control characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name
            .chars()
            .any(|c| matches!(c, '#' | ':' | '=' | '/' | '\\') || c.is_control())
}

impl InputSpec {
    /// Parses `[NAME=]PATH[:SCALE]`. A string that exists as a path is taken whole, so paths with
    /// `=` or `:` in them still work when given plainly.
    pub fn parse(s: &str) -> Result<InputSpec, SpecError> {
        let spec = || s.to_string();
        let (mut rest, scale) = match adapter::split_scale(s) {
            (p, ScaleSuffix::Scale(v, text)) => {
                if !v.is_finite() {
                    return Err(SpecError::ScaleNotFinite {
                        spec: spec(),
                        scale: text.to_string(),
                    });
                }
                (p, v)
            }
            // A tail that is no number is part of the path (which then must exist).
            (p, ScaleSuffix::None | ScaleSuffix::NotANumber(_)) => (p, 1.0),
        };
        let mut name = None;
        if !Path::new(rest).exists() {
            if let Some((n, p)) = rest.split_once('=') {
                if !valid_name(n) {
                    return Err(SpecError::BadName {
                        spec: spec(),
                        name: n.to_string(),
                    });
                }
                name = Some(n.to_string());
                rest = p;
            }
        }
        if rest.is_empty() {
            return Err(SpecError::NoPath { spec: spec() });
        }
        Ok(InputSpec {
            name,
            path: PathBuf::from(rest),
            scale,
        })
    }

    /// The given name, else the selected member of a bundle, else the file stem (directory name
    /// for a PEFT directory).
    pub fn default_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let (file, member) = split_spec(&self.path);
        if let Some(m) = member {
            return m;
        }
        let stem = if file.is_dir() {
            file.file_name()
        } else {
            file.file_stem()
        };
        stem.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// How to bundle.
#[derive(Clone, Debug)]
pub struct BundleOptions {
    pub mode: Mode,
    /// Base model GGUF: every input is checked against it (architecture, tensor names and shapes).
    pub base: Option<PathBuf>,
    /// Tensor type of a concat bundle's `lora_a`/`lora_b`.
    pub outtype: FactorType,
}

/// A `[NAME=]PATH[:SCALE]` argument that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("'{spec}': scale {scale} is not finite")]
    ScaleNotFinite { spec: String, scale: String },
    #[error("'{spec}': '{name}' is not a valid adapter name (no '#', ':', '=', '/', '\\')")]
    BadName { spec: String, name: String },
    #[error("'{spec}': no adapter path")]
    NoPath { spec: String },
}

/// Why nothing was bundled. Every variant means nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Refused(#[from] adapter::Refusal),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("no adapter to bundle")]
    NoInputs,
    #[error("{}: {} module(s) do not fit the base; nothing was written:\n{}", path.display(), lines.len(), lines.join("\n"))]
    Misfit { path: PathBuf, lines: Vec<String> },
    #[error("{}: a PEFT adapter needs the base model's architecture: pass --base BASE.gguf (or bundle it with a GGUF adapter, whose architecture is used)", path.display())]
    PeftNeedsArch { path: PathBuf },
    #[error("{}: the adapter does not say its architecture (general.architecture)", path.display())]
    NoArch { path: PathBuf },
    #[error("{} is for architecture '{arch}' but {} is for '{first_arch}': bundled adapters must share one base model; nothing was written", path.display(), first.display())]
    ArchDiffers {
        path: PathBuf,
        arch: String,
        first: PathBuf,
        first_arch: String,
    },
    #[error("the adapters are for architecture '{arch}' but the base is '{base}'")]
    BaseArch { arch: String, base: String },
    #[error("tensor {target}: {} adapts a {shape} but {} a {other_shape}: the adapters were trained on different base shapes; nothing was written", path.display(), other.display())]
    Shapes {
        target: String,
        path: PathBuf,
        shape: String,
        other: PathBuf,
        other_shape: String,
    },
    #[error("{}: {} tensor(s) cannot be expressed in a GGUF LoRA (concat writes one); nothing was written:\n{}", path.display(), lines.len(), lines.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n"))]
    Unrepresentable { path: PathBuf, lines: Vec<String> },
    #[error("{}: an aLoRA adapter activates on its own invocation tokens, which one concatenated adapter cannot keep; use --mode named", path.display())]
    ConcatAlora { path: PathBuf },
    #[error("{}: '{name}' cannot name an adapter (it must be non-empty, without '#', ':', '=', '/', '\\'); name it with NAME=PATH", path.display())]
    BadName { path: PathBuf, name: String },
    #[error("{} and {} would both be named '{name}'; name them with NAME=PATH", first.display(), path.display())]
    DuplicateName {
        first: PathBuf,
        path: PathBuf,
        name: String,
    },
}

/// One bundled adapter, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct BundledAdapter {
    pub name: String,
    pub source: PathBuf,
    pub format: SourceFormat,
    pub scale: f64,
    /// `adapter.lora.alpha` of its GGUF form (0 when absent).
    pub alpha: f32,
    pub n_targets: usize,
    pub min_rank: usize,
    pub max_rank: usize,
}

/// One input's share of a concatenated tensor.
#[derive(Clone, Debug, Serialize)]
pub struct ConcatShare {
    pub adapter: String,
    pub rank: usize,
    /// `user scale × alpha / rank`: what was folded into its block of `B`.
    pub scale: f64,
}

/// One tensor of a concat bundle.
#[derive(Clone, Debug, Serialize)]
pub struct ConcatTarget {
    pub target: String,
    pub kind: &'static str,
    pub rank: usize,
    pub parts: Vec<ConcatShare>,
}

/// What `bundle` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct BundleReport {
    pub mode: Mode,
    pub output: PathBuf,
    pub arch: String,
    pub base: Option<PathBuf>,
    pub adapters: Vec<BundledAdapter>,
    /// Concat: every written tensor pair.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<ConcatTarget>,
    /// Concat: `adapter.lora.alpha` written, and the targets whose `B` carries `rank / alpha`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folded: Vec<String>,
    pub n_tensors: usize,
    /// Tensor data bytes written.
    pub bytes: u64,
}

/// One input, read and checked.
struct Input {
    spec: InputSpec,
    name: String,
    format: SourceFormat,
    adapter: Adapter,
}

/// Reads and checks every input (see the module docs).
fn read_inputs(
    specs: &[InputSpec],
    opts: &BundleOptions,
) -> Result<(Vec<Input>, Option<BaseInfo>), BundleError> {
    if specs.is_empty() {
        return Err(BundleError::NoInputs);
    }
    let base = BaseInfo::resolve(opts.base.as_deref(), None)?;
    // GGUF inputs first: they name their architecture, which PEFT inputs need when no base is given.
    let is_peft = |s: &InputSpec| adapter::detect(&s.path) == SourceFormat::Peft;
    let mut slots: Vec<Option<Input>> = specs.iter().map(|_| None).collect();
    for (i, spec) in specs.iter().enumerate().filter(|(_, s)| !is_peft(s)) {
        let Opened {
            adapter, issues, ..
        } = adapter::open(&spec.path, base.as_ref())?.same_arch(&spec.path)?;
        refuse_issues(&spec.path, &issues)?;
        slots[i] = Some(input(spec, SourceFormat::Gguf, adapter));
    }
    let gguf_arch = slots.iter().flatten().find_map(|i| i.adapter.arch.clone());
    let peft_base = match (&base, &gguf_arch) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(arch)) => BaseInfo::from_arch(arch).ok(),
        (None, None) => None,
    };
    for (i, spec) in specs.iter().enumerate().filter(|(_, s)| is_peft(s)) {
        let Some(b) = &peft_base else {
            return Err(BundleError::PeftNeedsArch {
                path: spec.path.clone(),
            });
        };
        let Opened {
            adapter, issues, ..
        } = adapter::open(&spec.path, Some(b))?.same_arch(&spec.path)?;
        refuse_issues(&spec.path, &issues)?;
        slots[i] = Some(input(spec, SourceFormat::Peft, adapter));
    }
    let inputs: Vec<Input> = slots.into_iter().flatten().collect();
    check_together(&inputs, base.as_ref())?;
    Ok((inputs, base))
}

fn input(spec: &InputSpec, format: SourceFormat, adapter: Adapter) -> Input {
    Input {
        name: spec.default_name(),
        spec: spec.clone(),
        format,
        adapter,
    }
}

fn refuse_issues(path: &Path, issues: &[Issue]) -> Result<(), BundleError> {
    if issues.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = issues
        .iter()
        .map(|i| match &i.target {
            Some(t) => format!("  - {} → {t}: {}", i.source, i.message),
            None => format!("  - {}: {}", i.source, i.message),
        })
        .collect();
    Err(BundleError::Misfit {
        path: path.to_path_buf(),
        lines,
    })
}

/// One architecture, and one shape per adapted base tensor, across all inputs.
fn check_together(inputs: &[Input], base: Option<&BaseInfo>) -> Result<(), BundleError> {
    let first = &inputs[0];
    let arch_of = |i: &Input| {
        i.adapter.arch.clone().ok_or_else(|| BundleError::NoArch {
            path: i.spec.path.clone(),
        })
    };
    let arch = arch_of(first)?;
    for i in inputs {
        let a = arch_of(i)?;
        if a != arch {
            return Err(BundleError::ArchDiffers {
                path: i.spec.path.clone(),
                arch: a,
                first: first.spec.path.clone(),
                first_arch: arch,
            });
        }
    }
    if let Some(b) = base {
        if b.arch != arch {
            return Err(BundleError::BaseArch {
                arch,
                base: b.arch.clone(),
            });
        }
    }
    let mut seen: HashMap<&str, (&Input, &LoraTensor)> = HashMap::new();
    for i in inputs {
        for t in &i.adapter.tensors {
            let Some((j, u)) = seen.get(t.target.as_str()) else {
                seen.insert(&t.target, (i, t));
                continue;
            };
            let shape = |t: &LoraTensor| (t.kind, t.n_in(), t.n_out(), t.n_expert());
            if shape(t) != shape(u) {
                let show = |t: &LoraTensor| {
                    format!(
                        "{} {}×{}{}",
                        t.kind.name(),
                        t.n_out(),
                        t.n_in(),
                        if t.n_expert() > 1 {
                            format!(" ×{} experts", t.n_expert())
                        } else {
                            String::new()
                        }
                    )
                };
                return Err(BundleError::Shapes {
                    target: t.target.clone(),
                    path: i.spec.path.clone(),
                    shape: show(t),
                    other: j.spec.path.clone(),
                    other_shape: show(u),
                });
            }
        }
    }
    Ok(())
}

/// Files the output may not be: every input file, a PEFT input's config and weights, the base.
fn input_files(inputs: &[Input], base: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in inputs {
        let (file, _) = split_spec(&i.spec.path);
        if let Ok((config, weights)) = peft::locate(&file) {
            out.push(config);
            out.push(weights);
        }
        out.push(file);
    }
    out.extend(base.map(Path::to_path_buf));
    out
}

/// Bundles `specs` into `output` (see the module docs).
pub fn bundle(
    specs: &[InputSpec],
    output: &Path,
    opts: &BundleOptions,
) -> Result<BundleReport, BundleError> {
    let (inputs, _) = read_inputs(specs, opts)?;
    match opts.mode {
        Mode::Concat => concat(&inputs, output, opts),
        Mode::Named => named(inputs, output, opts),
    }
}

fn summary(i: &Input, alpha: f32) -> BundledAdapter {
    let ranks = i.adapter.tensors.iter().map(LoraTensor::rank);
    BundledAdapter {
        name: i.name.clone(),
        source: i.spec.path.clone(),
        format: i.format,
        scale: i.spec.scale,
        alpha,
        n_targets: i.adapter.tensors.len(),
        min_rank: ranks.clone().min().unwrap_or(0),
        max_rank: ranks.max().unwrap_or(0),
    }
}

fn concat(
    inputs: &[Input],
    output: &Path,
    opts: &BundleOptions,
) -> Result<BundleReport, BundleError> {
    for i in inputs {
        let bad = i.adapter.unrepresentable();
        if !bad.is_empty() {
            return Err(BundleError::Unrepresentable {
                path: i.spec.path.clone(),
                lines: bad,
            });
        }
        if i.adapter.alora_invocation_tokens.is_some() {
            return Err(BundleError::ConcatAlora {
                path: i.spec.path.clone(),
            });
        }
    }
    // Targets in order of first appearance; each gets every input's tensor for it, in input order.
    let mut order: Vec<String> = Vec::new();
    let mut parts: HashMap<String, Vec<(usize, ConcatPart)>> = HashMap::new();
    for (k, i) in inputs.iter().enumerate() {
        for t in &i.adapter.tensors {
            let entry = parts.entry(t.target.clone()).or_insert_with(|| {
                order.push(t.target.clone());
                Vec::new()
            });
            entry.push((
                k,
                ConcatPart {
                    tensor: t.clone(),
                    scale: i.spec.scale,
                },
            ));
        }
    }
    let mut tensors = Vec::with_capacity(order.len());
    let mut targets = Vec::with_capacity(order.len());
    for target in &order {
        let ps = parts.remove(target).unwrap_or_default();
        let Some((_, first)) = ps.first() else {
            continue;
        };
        let kind = first.tensor.kind;
        let layer = first.tensor.layer;
        targets.push(ConcatTarget {
            target: target.clone(),
            kind: kind.name(),
            rank: ps.iter().map(|(_, p)| p.tensor.rank()).sum(),
            parts: ps
                .iter()
                .map(|(k, p)| ConcatShare {
                    adapter: inputs[*k].name.clone(),
                    rank: p.tensor.rank(),
                    scale: p.scale * p.tensor.scale(),
                })
                .collect(),
        });
        tensors.push(LoraTensor {
            target: target.clone(),
            layer,
            kind,
            layout: Layout::Concat(ps.into_iter().map(|(_, p)| p).collect()),
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        });
    }
    let first = &inputs[0];
    let base_model = first.adapter.provenance.base_model.clone().filter(|b| {
        inputs
            .iter()
            .all(|i| i.adapter.provenance.base_model.as_ref() == Some(b))
    });
    let adapter = Adapter {
        arch: first.adapter.arch.clone(),
        tensors,
        provenance: Provenance {
            path: output.to_path_buf(),
            base_model,
            ..Provenance::default()
        },
        ..Adapter::default()
    };
    let files = input_files(inputs, opts.base.as_deref());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let written = gguf_adapter::write(&adapter, output, &refs, opts.outtype)?;
    Ok(BundleReport {
        mode: Mode::Concat,
        output: output.to_path_buf(),
        arch: adapter.arch.clone().unwrap_or_default(),
        base: opts.base.clone(),
        adapters: inputs
            .iter()
            .map(|i| summary(i, gguf_adapter::choose_file_alpha(&i.adapter) as f32))
            .collect(),
        targets,
        alpha: Some(written.alpha),
        folded: written.folded.iter().map(|(t, _)| t.clone()).collect(),
        n_tensors: written.n_tensors,
        bytes: written.bytes,
    })
}

/// One member of a named bundle as its own GGUF file has it: a GGUF input as it is, a PEFT input as
/// `convert` would write it (laid out now, its tensors encoded while the bundle is written).
enum Member<'a> {
    File(GgufSource),
    Converted {
        adapter: &'a Adapter,
        layout: LoraFile,
    },
}

impl Member<'_> {
    fn version(&self) -> u32 {
        match self {
            Member::File(src) => src.version,
            Member::Converted { layout, .. } => layout.version,
        }
    }

    fn metadata(&self) -> &Metadata {
        match self {
            Member::File(src) => &src.metadata,
            Member::Converted { layout, .. } => &layout.metadata,
        }
    }

    /// Its tensors' names, shapes and types, in its own order.
    fn descs(&self) -> Vec<TensorDesc> {
        match self {
            Member::File(src) => src.tensors.iter().map(|t| (&t.info).into()).collect(),
            Member::Converted { layout, .. } => layout.descs.clone(),
        }
    }

    /// Writes its tensors' bytes in order; returns how many.
    fn write(&self, w: &mut GgufWriter) -> Result<u64, BundleError> {
        match self {
            Member::File(src) => Ok(src.copy_tensors(w)?),
            Member::Converted { adapter, layout } => {
                let summary =
                    gguf_adapter::encode_tensors(adapter, layout, |b| Ok(w.write_tensor(b)?))?;
                Ok(summary.bytes)
            }
        }
    }
}

fn named(
    inputs: Vec<Input>,
    output: &Path,
    opts: &BundleOptions,
) -> Result<BundleReport, BundleError> {
    let mut names: HashMap<&str, &Path> = HashMap::new();
    for i in &inputs {
        if !valid_name(&i.name) {
            return Err(BundleError::BadName {
                path: i.spec.path.clone(),
                name: i.name.clone(),
            });
        }
        if let Some(other) = names.insert(&i.name, &i.spec.path) {
            return Err(BundleError::DuplicateName {
                first: other.to_path_buf(),
                path: i.spec.path.clone(),
                name: i.name.clone(),
            });
        }
    }
    let arch = inputs[0].adapter.arch.clone().unwrap_or_default();
    // Each adapter as its GGUF file has it; PEFT inputs laid out as `convert` writes them (F32), after
    // the same refusal `convert` makes of what a GGUF LoRA cannot hold.
    let mut members = Vec::with_capacity(inputs.len());
    for i in &inputs {
        members.push(match i.format {
            SourceFormat::Gguf => Member::File(GgufSource::open(&i.spec.path)?),
            SourceFormat::Peft => {
                if let Some(r) = adapter::Refusal::unrepresentable(&i.spec.path, &i.adapter) {
                    return Err(r.into());
                }
                Member::Converted {
                    adapter: &i.adapter,
                    layout: gguf_adapter::layout(&i.adapter, FactorType::F32)?,
                }
            }
        });
    }

    let mut md = Metadata::new();
    md.set(crate::gguf::KEY_ARCH, Value::String(arch.clone()));
    md.set(
        crate::gguf::KEY_TYPE,
        Value::String(layout::BUNDLE_TYPE.into()),
    );
    md.set(
        "gguf_lora.version",
        Value::String(env!("CARGO_PKG_VERSION").to_string()),
    );
    md.set(layout::KEY_VERSION, Value::U32(layout::VERSION));
    md.set(layout::KEY_COUNT, Value::U32(inputs.len() as u32));
    md.set(
        layout::KEY_NAMES,
        Value::Array(Array::String(
            inputs.iter().map(|i| i.name.clone()).collect(),
        )),
    );
    let mut descs = Vec::new();
    let mut adapters = Vec::with_capacity(inputs.len());
    for (k, (i, member)) in inputs.iter().zip(&members).enumerate() {
        let own = member.metadata();
        let alpha = own.get_f32(gguf_adapter::KEY_ALPHA).unwrap_or(0.0);
        let t = &i.adapter.tensors;
        let targets = t.iter().map(|t| t.target.clone()).collect();
        let ranks = t.iter().map(|t| t.rank() as u32).collect();
        let member_descs = member.descs();
        md.set(key(k, "name"), Value::String(i.name.clone()));
        md.set(key(k, "architecture"), Value::String(arch.clone()));
        md.set(key(k, "alpha"), Value::F32(alpha));
        md.set(key(k, "scale"), Value::F32(i.spec.scale as f32));
        md.set(
            key(k, "source"),
            Value::String(i.spec.path.display().to_string()),
        );
        md.set(key(k, "format"), Value::String(i.format.name().into()));
        md.set(key(k, "gguf_version"), Value::U32(member.version()));
        md.set(key(k, "targets"), Value::Array(Array::String(targets)));
        md.set(key(k, "ranks"), Value::Array(Array::U32(ranks)));
        md.set(
            key(k, "tensors"),
            Value::Array(Array::String(
                member_descs.iter().map(|d| d.name.clone()).collect(),
            )),
        );
        let prefix = layout::kv_prefix(k);
        for (kk, v) in own.iter() {
            md.set(format!("{prefix}{kk}"), v.clone());
        }
        for (j, d) in member_descs.into_iter().enumerate() {
            descs.push(TensorDesc {
                name: stored_name(k, j, &d.name),
                ..d
            });
        }
        adapters.push(summary(i, alpha));
    }
    let files = input_files(&inputs, opts.base.as_deref());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let mut w = GgufWriter::create(
        output,
        &refs,
        crate::gguf::VERSION,
        crate::gguf::DEFAULT_ALIGNMENT,
        &md,
        &descs,
    )?;
    let mut bytes = 0;
    for member in &members {
        bytes += member.write(&mut w)?;
    }
    w.finish()?;
    Ok(BundleReport {
        mode: Mode::Named,
        output: output.to_path_buf(),
        arch,
        base: opts.base.clone(),
        adapters,
        targets: Vec::new(),
        alpha: None,
        folded: Vec::new(),
        n_tensors: descs.len(),
        bytes,
    })
}

/// What `--extract` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExtractReport {
    pub bundle: PathBuf,
    pub name: String,
    pub output: PathBuf,
    pub n_tensors: usize,
    pub bytes: u64,
}

/// Writes adapter `name` of the named bundle `bundle` to `output`, as its own file had it.
pub fn extract(bundle: &Path, name: &str, output: &Path) -> Result<ExtractReport, BundleError> {
    let label = PathBuf::from(format!("{}#{name}", bundle.display()));
    let src = GgufSource::open_member(label, bundle.to_path_buf(), Some(name.to_string()))?;
    let bytes = src.write(output, &[bundle])?;
    Ok(ExtractReport {
        bundle: bundle.to_path_buf(),
        name: name.to_string(),
        output: output.to_path_buf(),
        n_tensors: src.tensors.len(),
        bytes,
    })
}

/// What [`inspect_bundle`] found: the listing with per-adapter coverage.
#[derive(Clone, Debug, Serialize)]
pub struct BundleListing {
    pub arch: Option<String>,
    pub adapters: Vec<ListedAdapter>,
}

/// One adapter of a named bundle, with its coverage.
#[derive(Clone, Debug, Serialize)]
pub struct ListedAdapter {
    #[serde(flatten)]
    pub entry: layout::BundleEntry,
    /// Layers with at least one adapted tensor, and the short names adapted (`attn_q`, ...).
    pub layers: Vec<u32>,
    pub modules: Vec<String>,
    pub n_tensors: usize,
}

/// The listing of a named bundle (`None` when the file is not one).
pub fn listing(
    path: &Path,
    metadata: &Metadata,
) -> Option<Result<BundleListing, adapter::BundleError>> {
    if metadata.get_str(crate::gguf::KEY_TYPE) != Some(layout::BUNDLE_TYPE) {
        return None;
    }
    Some(layout::Listing::read(path, metadata).map(|l| {
        BundleListing {
            arch: metadata.get_str(crate::gguf::KEY_ARCH).map(str::to_string),
            adapters: l
                .adapters
                .into_iter()
                .map(|entry| {
                    let mut layers: Vec<u32> = entry
                        .targets
                        .iter()
                        .filter_map(|t| crate::gguf::layer_of(t))
                        .collect();
                    layers.sort_unstable();
                    layers.dedup();
                    let mut modules: Vec<String> =
                        entry.targets.iter().map(|t| module_of(t)).collect();
                    modules.sort();
                    modules.dedup();
                    ListedAdapter {
                        n_tensors: entry.tensors.len(),
                        entry,
                        layers,
                        modules,
                    }
                })
                .collect(),
        }
    }))
}

/// `blk.3.attn_q.weight` → `attn_q`; `token_embd.weight` → `token_embd`.
fn module_of(target: &str) -> String {
    let t = target.strip_suffix(".weight").unwrap_or(target);
    match crate::gguf::layer_of(t) {
        Some(l) => t
            .split_once(&format!("blk.{l}."))
            .map_or(t, |(_, m)| m)
            .to_string(),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_name_path_and_scale() {
        let p = InputSpec::parse("style=/x/a.gguf:0.5").unwrap();
        assert_eq!(
            (p.name.as_deref(), p.path.as_path(), p.scale),
            (Some("style"), Path::new("/x/a.gguf"), 0.5)
        );
        let p = InputSpec::parse("/x/b.gguf#dom:-1.25").unwrap();
        assert_eq!(
            (p.path.as_path(), p.scale),
            (Path::new("/x/b.gguf#dom"), -1.25)
        );
        assert_eq!(p.default_name(), "dom");
        let p = InputSpec::parse("/x/c.gguf").unwrap();
        assert_eq!((p.scale, p.default_name()), (1.0, "c".to_string()));
        assert!(InputSpec::parse("a#b=/x.gguf").is_err());
        assert!(InputSpec::parse("/x.gguf:inf").is_err());
        assert_eq!(module_of("blk.12.attn_q.weight"), "attn_q");
        assert_eq!(module_of("token_embd.weight"), "token_embd");
    }
}
