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

use crate::adapter::bundle::{self as layout, key, stored_name, GgufSource};
use crate::adapter::gguf::{self as gguf_adapter, OutType};
use crate::adapter::{
    peft, Adapter, AdapterError, ConcatPart, Layout, LoraTensor, Provenance, SourceFormat,
};
use crate::arch::BaseInfo;
use crate::convert::{self, kind_name, ConvertError, ConvertOptions};
use crate::gguf::{Array, GgufWriter, Metadata, TensorDesc, Value};

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One standard GGUF LoRA applying all inputs at their scales.
    Concat,
    /// A container of the inputs, each selectable (`BUNDLE.gguf#NAME`) and extractable by name.
    Named,
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
    pub fn parse(s: &str) -> Result<InputSpec, String> {
        let mut rest = s;
        let mut scale = 1.0;
        if !Path::new(rest).exists() {
            if let Some((p, sc)) = rest.rsplit_once(':') {
                if let Ok(v) = sc.parse::<f64>() {
                    if !v.is_finite() {
                        return Err(format!("'{s}': scale {sc} is not finite"));
                    }
                    scale = v;
                    rest = p;
                }
            }
        }
        let mut name = None;
        if !Path::new(rest).exists() {
            if let Some((n, p)) = rest.split_once('=') {
                if !valid_name(n) {
                    return Err(format!(
                        "'{s}': '{n}' is not a valid adapter name (no '#', ':', '=', '/', '\\')"
                    ));
                }
                name = Some(n.to_string());
                rest = p;
            }
        }
        if rest.is_empty() {
            return Err(format!("'{s}': no adapter path"));
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
        let (file, member) = layout::split_spec(&self.path);
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
    pub outtype: OutType,
}

/// Why nothing was bundled.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The inputs do not go together, or cannot be bundled; nothing was written.
    #[error("{0}")]
    Invalid(String),
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
        return Err(BundleError::Invalid("no adapter to bundle".into()));
    }
    let base = convert::load_base(&ConvertOptions {
        base: opts.base.clone(),
        arch: None,
        outtype: opts.outtype,
    })?;
    // GGUF inputs first: they name their architecture, which PEFT inputs need when no base is given.
    let is_peft = |s: &InputSpec| peft::is_peft(&s.path);
    let mut slots: Vec<Option<Input>> = specs.iter().map(|_| None).collect();
    for (i, spec) in specs.iter().enumerate().filter(|(_, s)| !is_peft(s)) {
        let (adapter, issues) = convert::read_adapter(&spec.path, base.as_ref())?;
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
            return Err(BundleError::Invalid(format!(
                "{}: a PEFT adapter needs the base model's architecture: pass --base BASE.gguf (or bundle it with a GGUF adapter, whose architecture is used)",
                spec.path.display()
            )));
        };
        let (adapter, issues) = convert::read_adapter(&spec.path, Some(b))?;
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

fn refuse_issues(path: &Path, issues: &[crate::adapter::Issue]) -> Result<(), BundleError> {
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
    Err(BundleError::Invalid(format!(
        "{}: {} module(s) do not fit the base; nothing was written:\n{}",
        path.display(),
        lines.len(),
        lines.join("\n")
    )))
}

/// One architecture, and one shape per adapted base tensor, across all inputs.
fn check_together(inputs: &[Input], base: Option<&BaseInfo>) -> Result<(), BundleError> {
    let first = &inputs[0];
    let arch_of = |i: &Input| {
        i.adapter.arch.clone().ok_or_else(|| {
            BundleError::Invalid(format!(
                "{}: the adapter does not say its architecture (general.architecture)",
                i.spec.path.display()
            ))
        })
    };
    let arch = arch_of(first)?;
    for i in inputs {
        let a = arch_of(i)?;
        if a != arch {
            return Err(BundleError::Invalid(format!(
                "{} is for architecture '{a}' but {} is for '{arch}': bundled adapters must share one base model; nothing was written",
                i.spec.path.display(),
                first.spec.path.display()
            )));
        }
    }
    if let Some(b) = base {
        if b.arch != arch {
            return Err(BundleError::Invalid(format!(
                "the adapters are for architecture '{arch}' but the base is '{}'",
                b.arch
            )));
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
                        kind_name(t.kind),
                        t.n_out(),
                        t.n_in(),
                        if t.n_expert() > 1 {
                            format!(" ×{} experts", t.n_expert())
                        } else {
                            String::new()
                        }
                    )
                };
                return Err(BundleError::Invalid(format!(
                    "tensor {}: {} adapts a {} but {} a {}: the adapters were trained on different base shapes; nothing was written",
                    t.target,
                    i.spec.path.display(),
                    show(t),
                    j.spec.path.display(),
                    show(u)
                )));
            }
        }
    }
    Ok(())
}

/// Files the output may not be: every input file, a PEFT input's config and weights, the base.
fn input_files(inputs: &[Input], base: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in inputs {
        let (file, _) = layout::split_spec(&i.spec.path);
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
            return Err(BundleError::Invalid(format!(
                "{}: {} tensor(s) cannot be expressed in a GGUF LoRA (concat writes one); nothing was written:\n{}",
                i.spec.path.display(),
                bad.len(),
                bad.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n")
            )));
        }
        if i.adapter.alora_invocation_tokens.is_some() {
            return Err(BundleError::Invalid(format!(
                "{}: an aLoRA adapter activates on its own invocation tokens, which one concatenated adapter cannot keep; use --mode named",
                i.spec.path.display()
            )));
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
            kind: kind_name(kind),
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

fn named(
    mut inputs: Vec<Input>,
    output: &Path,
    opts: &BundleOptions,
) -> Result<BundleReport, BundleError> {
    let mut names: HashMap<&str, &Path> = HashMap::new();
    for i in &inputs {
        if !valid_name(&i.name) {
            return Err(BundleError::Invalid(format!(
                "{}: '{}' cannot name an adapter (it must be non-empty, without '#', ':', '=', '/', '\\'); name it with NAME=PATH",
                i.spec.path.display(),
                i.name
            )));
        }
        if let Some(other) = names.insert(&i.name, &i.spec.path) {
            return Err(BundleError::Invalid(format!(
                "{} and {} would both be named '{}'; name them with NAME=PATH",
                other.display(),
                i.spec.path.display(),
                i.name
            )));
        }
    }
    let arch = inputs[0].adapter.arch.clone().unwrap_or_default();
    // What the listing needs from the checked adapters; their values (read to check them) are
    // dropped before the tensors are copied, so peak memory stays near one adapter.
    let coverage: Vec<(Vec<String>, Vec<u32>)> = inputs
        .iter()
        .map(|i| {
            let t = &i.adapter.tensors;
            (
                t.iter().map(|t| t.target.clone()).collect(),
                t.iter().map(|t| t.rank() as u32).collect(),
            )
        })
        .collect();
    let summaries: Vec<BundledAdapter> = inputs.iter().map(|i| summary(i, 0.0)).collect();
    for i in &mut inputs {
        i.adapter.tensors = Vec::new();
        i.adapter.full_tensors = Vec::new();
    }
    // Each adapter as its GGUF file has it; PEFT inputs through `convert`, into a scratch directory.
    let scratch = tempfile::tempdir()
        .map_err(|e| BundleError::Invalid(format!("cannot create a scratch directory: {e}")))?;
    let mut sources = Vec::with_capacity(inputs.len());
    for (k, i) in inputs.iter().enumerate() {
        let src = match i.format {
            SourceFormat::Gguf => GgufSource::open(&i.spec.path)?,
            SourceFormat::Peft => {
                let tmp = scratch.path().join(format!("{k}.gguf"));
                let copts = ConvertOptions {
                    base: opts.base.clone(),
                    arch: opts.base.is_none().then(|| arch.clone()),
                    outtype: OutType::F32,
                };
                convert::convert(&i.spec.path, &tmp, &copts)?;
                GgufSource::open_member(i.spec.path.clone(), tmp, None)?
            }
        };
        sources.push(src);
    }

    let mut md = Metadata::new();
    md.set(gguf_adapter::KEY_ARCH, Value::String(arch.clone()));
    md.set(
        gguf_adapter::KEY_TYPE,
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
    for (k, ((i, src), (targets, ranks))) in inputs.iter().zip(&sources).zip(coverage).enumerate() {
        let alpha = src.metadata.get_f32(gguf_adapter::KEY_ALPHA).unwrap_or(0.0);
        let format = match i.format {
            SourceFormat::Gguf => "gguf",
            SourceFormat::Peft => "peft",
        };
        md.set(key(k, "name"), Value::String(i.name.clone()));
        md.set(key(k, "architecture"), Value::String(arch.clone()));
        md.set(key(k, "alpha"), Value::F32(alpha));
        md.set(key(k, "scale"), Value::F32(i.spec.scale as f32));
        md.set(
            key(k, "source"),
            Value::String(i.spec.path.display().to_string()),
        );
        md.set(key(k, "format"), Value::String(format.into()));
        md.set(key(k, "gguf_version"), Value::U32(src.version));
        md.set(key(k, "targets"), Value::Array(Array::String(targets)));
        md.set(key(k, "ranks"), Value::Array(Array::U32(ranks)));
        md.set(
            key(k, "tensors"),
            Value::Array(Array::String(
                src.tensors.iter().map(|t| t.info.name.clone()).collect(),
            )),
        );
        let prefix = layout::kv_prefix(k);
        for (kk, v) in src.metadata.iter() {
            md.set(format!("{prefix}{kk}"), v.clone());
        }
        for (j, t) in src.tensors.iter().enumerate() {
            descs.push(TensorDesc {
                name: stored_name(k, j, &t.info.name),
                dims: t.info.dims.clone(),
                ty: t.info.ty,
            });
        }
        adapters.push(BundledAdapter {
            alpha,
            ..summaries[k].clone()
        });
    }
    let files = input_files(&inputs, opts.base.as_deref());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let gerr = |e: crate::gguf::GgufError| BundleError::Invalid(e.to_string());
    let mut w = GgufWriter::create(
        output,
        &refs,
        crate::gguf::VERSION,
        crate::gguf::DEFAULT_ALIGNMENT,
        &md,
        &descs,
    )
    .map_err(gerr)?;
    let mut bytes = 0;
    for src in &sources {
        for t in &src.tensors {
            let data = src.data(t);
            bytes += data.len() as u64;
            w.write_tensor(data).map_err(gerr)?;
            src.release(t);
        }
    }
    w.finish().map_err(gerr)?;
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
pub fn listing(path: &Path, metadata: &Metadata) -> Option<Result<BundleListing, AdapterError>> {
    if metadata.get_str(gguf_adapter::KEY_TYPE) != Some(layout::BUNDLE_TYPE) {
        return None;
    }
    Some(layout::Listing::read(path, metadata).map(|l| {
        BundleListing {
            arch: metadata.get_str(gguf_adapter::KEY_ARCH).map(str::to_string),
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
