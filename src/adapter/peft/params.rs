//! PEFT LoRA on fused expert parameters (`LoraConfig(target_parameters=[...])`, PEFT 0.17+
//! `ParamWrapper`) turned into the per-expert pairs the rest of the reader stacks, exactly as if
//! the adapter had been trained on the per-expert `mlp.experts.{e}.gate_proj` / `up_proj` /
//! `down_proj` modules of older transformers.
//!
//! transformers 5 stores a MoE layer's experts (Qwen2-MoE, Qwen3-MoE, Mixtral) as two 3-D
//! parameters of one module: `gate_up_proj` `[E, 2I, H]` (each expert `out × in`, gate rows
//! `0..I`, up rows `I..2I`) and `down_proj` `[E, H, I]`. PEFT's `ParamWrapper` (in
//! `peft/tuners/lora/layer.py`) gives each targeted parameter one `lora_A` `[E·r, in]` and one
//! `lora_B` `[out, E·r]`; expert `e`'s update is `scaling · B[:, e::E] · A[e·r:(e+1)·r, :]`: `A`'s
//! rows in blocks, `B`'s columns *strided* (`get_delta_weight` reshapes `A` to `[E, r, in]` and `B`
//! to `[out, r, E]`). Both halves of `gate_up_proj` share the expert's `A`.
//!
//! Saved tensor names never name the parameter: with two targeted parameters the wrappers nest,
//! and the one wrapped first (the module's first registered parameter, `gate_up_proj`) is the
//! inner one, saved as `<module>.base_layer.lora_A.weight`; the outer one as
//! `<module>.lora_A.weight`. We decide which is which here, and only here, from the config's
//! `target_parameters` and the nesting depth, and then check the decision against the shapes (the
//! base's hidden and expert widths, or each other's without a base): a disagreement is an error.
//! `rank_pattern` / `alpha_pattern` see the parameter's path (`model.layers.0.mlp.experts.down_proj`).
//!
//! An entry naming a module's own `weight` (`gate.weight`) is no fused expert weight: PEFT wraps
//! that 2-D parameter with one expert (`num_experts = 1`), whose delta is `lora.Linear`'s
//! `scaling · B · A`, saved as `<module>.lora_A.weight` / `lora_B.weight` exactly like a
//! `target_modules` LoRA; so those modules are left to the ordinary module mapping. PEFT writes
//! such entries itself for a transformers 5 MoE router: its v4 → v5 config conversion
//! (`peft/utils/transformers_weight_conversion.py`) turns the `target_modules` entry `gate` of a
//! Mixtral or Qwen-MoE model into `target_parameters` `gate.weight` (and `w1`/`w3`/`w2`, or
//! `gate_proj`/`up_proj`/`down_proj`, into `gate_up_proj`/`down_proj`, with `gate_up_proj`'s rank
//! and alpha doubled by a `rank_pattern` / `alpha_pattern` key `.*\.gate_up_proj`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::tensors::{PeftAdapter, PeftModule};
use crate::adapter::model::{Factor, LoraPair, Window};
use crate::arch::{self, BaseInfo, ModuleMap};

/// Parameters a `ParamWrapper` may adapt, in the order the experts module registers them (which
/// is the nesting order, innermost first).
const PARAMETERS: [&str; 2] = ["gate_up_proj", "down_proj"];

/// A `target_parameters` entry's parameter that is a module's own 2-D weight, adapted as a
/// `target_modules` LoRA on that module would be (see the module docs).
const MODULE_WEIGHT: &str = "weight";

/// A LoRA on fused expert parameters that cannot be read as stacked expert adapters.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("{}: target_parameters entry {name:?} is not a fused expert weight we can convert (only mlp.experts.gate_up_proj and mlp.experts.down_proj of transformers 5 MoE models, and a module's 2-D weight such as gate.weight)", config.display())]
    UnknownParameter { config: PathBuf, name: String },
    #[error("{}: module '{module}' has LoRA tensors nested {found} deep, but target_parameters names {expected} parameter(s) of it ({names})", file.display())]
    Nesting {
        file: PathBuf,
        module: String,
        found: usize,
        expected: usize,
        names: String,
    },
    #[error("{}: module '{module}' ({parameter}): {what} cannot be expressed for fused expert parameters (PEFT refuses it too)", file.display())]
    Unsupported {
        file: PathBuf,
        module: String,
        parameter: &'static str,
        what: &'static str,
    },
    #[error("{}: '{module}.{parameter}': the {arch} architecture has no stacked expert tensor for it", file.display())]
    NoTarget {
        file: PathBuf,
        module: String,
        parameter: &'static str,
        arch: String,
    },
    #[error("{}: tensor '{tensor}' has {rows} rows; expected {n_expert} experts × r = {rank} ({parameter}{})", file.display(), rank_key.as_ref().map(|k| format!(", rank_pattern key {k:?}")).unwrap_or_default())]
    ExpertRows {
        file: PathBuf,
        tensor: String,
        parameter: &'static str,
        rows: usize,
        n_expert: String,
        rank: u32,
        rank_key: Option<String>,
    },
    /// A factor's width disagrees with what the nesting says the parameter is.
    #[error("{}: tensor '{tensor}' has {found} {side}; {parameter} needs {expected} ({why})", file.display())]
    Width {
        file: PathBuf,
        tensor: String,
        parameter: &'static str,
        side: &'static str,
        found: usize,
        expected: usize,
        why: String,
    },
}

/// One expert's slice of a fused-parameter LoRA, mapped like a per-expert module.
pub(super) struct ExpertPair<'r> {
    /// The wrapper module the tensors were saved under.
    pub module: &'r PeftModule,
    pub map: ModuleMap,
    pub pair: LoraPair,
}

/// What [`split`] found: the wrapper modules it consumed and their per-expert pairs.
#[derive(Default)]
pub(super) struct Split<'r> {
    pub consumed: Vec<String>,
    pub pairs: Vec<ExpertPair<'r>>,
}

/// The wrapper modules of one experts module: its path and, by nesting depth, the saved module.
type Group<'r> = BTreeMap<usize, &'r PeftModule>;

/// One saved `ParamWrapper` module and the parameter it adapts.
pub struct Wrapper<'r> {
    /// The experts module (`model.layers.0.mlp.experts`), without `.base_layer`.
    pub module: String,
    /// `gate_up_proj` or `down_proj`.
    pub parameter: &'static str,
    /// The saved module (`model.layers.0.mlp.experts.base_layer` for the inner wrapper).
    pub saved: &'r PeftModule,
}

impl Wrapper<'_> {
    /// The per-expert modules of older transformers this parameter stands for, in its row order
    /// (`gate_proj`, `up_proj` for `gate_up_proj`; `down_proj`).
    pub fn expert_modules(&self) -> &'static [&'static str] {
        shorts(self.parameter)
    }

    /// The parameter's path, as `rank_pattern` / `alpha_pattern` see it.
    pub fn parameter_path(&self) -> String {
        format!("{}.{}", self.module, self.parameter)
    }
}

/// The decision: which saved module holds which parameter's LoRA, from the config's
/// `target_parameters` and the nesting (see the module docs). Empty without `target_parameters`.
/// In module order, the inner wrapper (first registered parameter) first. Entries naming a
/// module's `weight` give no wrapper: their modules are read as `target_modules` LoRAs.
pub fn wrappers(raw: &PeftAdapter) -> Result<Vec<Wrapper<'_>>, ParamError> {
    let cfg = &raw.config;
    // target_parameters entries as (module suffix, parameter).
    let mut targets: Vec<(String, &'static str)> = Vec::new();
    for name in &cfg.target_parameters {
        let (module, param) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        if param == MODULE_WEIGHT {
            continue;
        }
        let Some(param) = PARAMETERS.iter().find(|p| **p == param) else {
            return Err(ParamError::UnknownParameter {
                config: raw.config_path.clone(),
                name: name.clone(),
            });
        };
        targets.push((module.to_string(), param));
    }
    // PEFT matches `<module>.<parameter>` equal to an entry or ending in `.<entry>`; a bare
    // parameter name can only mean the experts modules' (the only ones we read).
    let names = |path: &str, m: &str| {
        if m.is_empty() {
            path == "experts" || path.ends_with(".experts")
        } else {
            path == m || path.ends_with(&format!(".{m}"))
        }
    };
    let mut groups: BTreeMap<String, Group<'_>> = BTreeMap::new();
    for md in &raw.modules {
        let (mut path, mut depth) = (md.path.as_str(), 0);
        while let Some(inner) = path.strip_suffix(".base_layer") {
            path = inner;
            depth += 1;
        }
        if targets.iter().any(|(m, _)| names(path, m)) {
            groups
                .entry(path.to_string())
                .or_default()
                .insert(depth, md);
        }
    }
    let mut out = Vec::new();
    for (module, group) in groups {
        let params: Vec<&'static str> = PARAMETERS
            .into_iter()
            .filter(|p| targets.iter().any(|(m, tp)| tp == p && names(&module, m)))
            .collect();
        let n = params.len();
        if group.len() != n || group.keys().any(|d| *d >= n) {
            return Err(ParamError::Nesting {
                file: raw.weights.path().to_path_buf(),
                found: group.keys().max().map_or(0, |d| d + 1),
                module,
                expected: n,
                names: params.join(", "),
            });
        }
        // Innermost (deepest) is the first registered parameter.
        for (depth, md) in group.into_iter().rev() {
            out.push(Wrapper {
                module: module.clone(),
                parameter: params[n - 1 - depth],
                saved: md,
            });
        }
    }
    Ok(out)
}

/// Splits each `ParamWrapper` module of `raw` ([`wrappers`]) into per-expert pairs, checked
/// against `base` (see the module docs).
pub(super) fn split<'r>(raw: &'r PeftAdapter, base: &BaseInfo) -> Result<Split<'r>, ParamError> {
    let file = raw.weights.path().to_path_buf();
    let mut out = Split::default();
    let all = wrappers(raw)?;
    for group in all.chunk_by(|x, y| x.module == y.module) {
        let module = &group[0].module;
        let mut resolved: Vec<Resolved> = Vec::new();
        for w in group {
            resolved.push(resolve(raw, base, &file, module, w.parameter, w.saved)?);
        }
        check_together(&file, &resolved)?;
        for r in &resolved {
            out.pairs.extend(r.expert_pairs(raw, module)?);
        }
        out.consumed
            .extend(group.iter().map(|w| w.saved.path.clone()));
    }
    Ok(out)
}

/// One wrapper module read as one parameter's LoRA.
struct Resolved<'r> {
    md: &'r PeftModule,
    param: &'static str,
    a: &'r Factor,
    b: &'r Factor,
    rank: usize,
    n_expert: usize,
    alpha: f64,
    /// Expert 0's targets: gate and up for `gate_up_proj`, down for `down_proj`.
    maps: Vec<ModuleMap>,
}

/// The experts-module path that `map_module` maps to expert `e`'s tensor of `short`.
fn expert_path(module: &str, e: usize, short: &str) -> String {
    format!("{module}.{e}.{short}")
}

fn shorts(param: &str) -> &'static [&'static str] {
    if param == "gate_up_proj" {
        &["gate_proj", "up_proj"]
    } else {
        &["down_proj"]
    }
}

fn tensor_name(f: &Factor) -> String {
    match f {
        Factor::Safetensors { entry, .. } => entry.name.clone(),
        other => other.describe(),
    }
}

fn resolve<'r>(
    raw: &'r PeftAdapter,
    base: &BaseInfo,
    file: &std::path::Path,
    module: &str,
    param: &'static str,
    md: &'r PeftModule,
) -> Result<Resolved<'r>, ParamError> {
    let cfg = &raw.config;
    let unsupported = |what| ParamError::Unsupported {
        file: file.to_path_buf(),
        module: module.to_string(),
        parameter: param,
        what,
    };
    if md.magnitude.is_some() || cfg.use_dora {
        return Err(unsupported("DoRA"));
    }
    if md.bias.is_some() {
        return Err(unsupported("lora_bias"));
    }
    if md.embedding {
        return Err(unsupported("an embedding LoRA"));
    }
    let (Some(a), Some(b)) = (&md.a, &md.b) else {
        return Err(unsupported("a LoRA without both lora_A and lora_B"));
    };
    let key = format!("{module}.{param}");
    let (rank, rank_key) = cfg.rank_for(&key);
    let maps: Option<Vec<ModuleMap>> = shorts(param)
        .iter()
        .map(|s| {
            base.known_arch()
                .and_then(|a| arch::map_module(a, &expert_path(module, 0, s)))
        })
        .collect();
    let Some(maps) = maps else {
        return Err(ParamError::NoTarget {
            file: file.to_path_buf(),
            module: module.to_string(),
            parameter: param,
            arch: base.arch.clone(),
        });
    };
    // The base's stacked tensor, ne = [n_in, n_out, n_expert].
    let base_dims = base.tensor(&maps[0].target).map(|t| t.dims.clone());
    let (a_rows, a_cols) = a.shape();
    let (b_rows, _) = b.shape();
    let r = rank as usize;
    let n_expert = match base_dims.as_deref() {
        Some([_, _, n]) => Some(*n as usize),
        _ => a_rows.checked_div(r).filter(|_| a_rows.is_multiple_of(r)),
    };
    let rows_err = |n_expert: String| ParamError::ExpertRows {
        file: file.to_path_buf(),
        tensor: tensor_name(a),
        parameter: param,
        rows: a_rows,
        n_expert,
        rank,
        rank_key: rank_key.map(str::to_string),
    };
    let n_expert = match n_expert {
        Some(n) if n > 0 && n.checked_mul(r) == Some(a_rows) => n,
        Some(n) if n > 0 => return Err(rows_err(n.to_string())),
        _ => return Err(rows_err("a whole number of".into())),
    };
    // A base tensor of another rank is check_against_base's to report.
    if let Some([n_in, n_out, _]) = base_dims.as_deref() {
        let (n_in, n_out) = (*n_in as usize, *n_out as usize);
        let parts = shorts(param).len();
        let width = |tensor: &Factor, side, found, expected, why: &str| ParamError::Width {
            file: file.to_path_buf(),
            tensor: tensor_name(tensor),
            parameter: param,
            side,
            found,
            expected,
            why: format!("{why} of the base's {}", maps[0].target),
        };
        if a_cols != n_in {
            let why = if param == "gate_up_proj" {
                "the hidden size, the input width"
            } else {
                "the expert width, the input width"
            };
            return Err(width(a, "columns", a_cols, n_in, why));
        }
        if b_rows != parts * n_out {
            let why = if param == "gate_up_proj" {
                "gate and up rows, twice the output width"
            } else {
                "the hidden size, the output width"
            };
            return Err(width(b, "rows", b_rows, parts * n_out, why));
        }
    } else if param == "gate_up_proj" && !b_rows.is_multiple_of(2) {
        return Err(ParamError::Width {
            file: file.to_path_buf(),
            tensor: tensor_name(b),
            parameter: param,
            side: "rows",
            found: b_rows,
            expected: b_rows + 1,
            why: "gate and up rows: an even number".into(),
        });
    }
    Ok(Resolved {
        md,
        param,
        a,
        b,
        rank: r,
        n_expert,
        alpha: cfg.llama_alpha(&key, rank),
        maps,
    })
}

/// Without a base to check against, `gate_up_proj` and `down_proj` of one module check each
/// other: gate/up read the hidden size down writes, down reads the expert width gate/up write.
fn check_together(file: &std::path::Path, resolved: &[Resolved]) -> Result<(), ParamError> {
    let find = |p| resolved.iter().find(|r| r.param == p);
    let (Some(gu), Some(dn)) = (find("gate_up_proj"), find("down_proj")) else {
        return Ok(());
    };
    let hidden = dn.b.shape().0;
    let width = dn.a.shape().1;
    let err = |tensor: &Factor, side, found, expected, why: &str| ParamError::Width {
        file: file.to_path_buf(),
        tensor: tensor_name(tensor),
        parameter: "gate_up_proj",
        side,
        found,
        expected,
        why: why.into(),
    };
    if gu.a.shape().1 != hidden {
        return Err(err(
            gu.a,
            "columns",
            gu.a.shape().1,
            hidden,
            "the hidden size, the rows of down_proj's lora_B",
        ));
    }
    if gu.b.shape().0 != 2 * width {
        return Err(err(
            gu.b,
            "rows",
            gu.b.shape().0,
            2 * width,
            "twice the expert width, the columns of down_proj's lora_A",
        ));
    }
    if gu.n_expert != dn.n_expert {
        return Err(ParamError::ExpertRows {
            file: file.to_path_buf(),
            tensor: tensor_name(gu.a),
            parameter: "gate_up_proj",
            rows: gu.a.shape().0,
            n_expert: dn.n_expert.to_string(),
            rank: gu.rank as u32,
            rank_key: None,
        });
    }
    Ok(())
}

/// `f` (a whole safetensors tensor) seen through `window` as `rows × cols`.
fn windowed(f: &Factor, rows: usize, cols: usize, window: Window) -> Option<Factor> {
    match f {
        Factor::Safetensors { file, entry, .. } => Some(Factor::Safetensors {
            file: file.clone(),
            entry: entry.clone(),
            rows,
            cols,
            window: Some(window),
        }),
        _ => None,
    }
}

impl<'r> Resolved<'r> {
    /// Per expert: `A` its block of rows, `B` its strided columns (and for `gate_up_proj` the gate
    /// rows for `ffn_gate_exps`, the up rows for `ffn_up_exps`).
    fn expert_pairs(
        &self,
        raw: &PeftAdapter,
        module: &str,
    ) -> Result<Vec<ExpertPair<'r>>, ParamError> {
        let (r, n) = (self.rank, self.n_expert);
        let (_, n_in) = self.a.shape();
        let (b_rows, b_cols) = self.b.shape();
        let parts = shorts(self.param);
        let n_out = b_rows / parts.len();
        let not_mapped = || ParamError::Unsupported {
            file: raw.weights.path().to_path_buf(),
            module: module.to_string(),
            parameter: self.param,
            what: "a factor that is not a safetensors tensor",
        };
        let mut out = Vec::with_capacity(n * parts.len());
        for (k, short) in parts.iter().enumerate() {
            for e in 0..n {
                let a = windowed(
                    self.a,
                    r,
                    n_in,
                    Window {
                        row0: e * r,
                        col0: 0,
                        col_step: 1,
                        full_cols: n_in,
                    },
                )
                .ok_or_else(not_mapped)?;
                let b = windowed(
                    self.b,
                    n_out,
                    r,
                    Window {
                        row0: k * n_out,
                        col0: e,
                        col_step: n,
                        full_cols: b_cols,
                    },
                )
                .ok_or_else(not_mapped)?;
                let mut map = self.maps[k].clone();
                map.expert = Some(e);
                let half = if parts.len() > 1 {
                    format!("[{}]", short.trim_end_matches("_proj"))
                } else {
                    String::new()
                };
                out.push(ExpertPair {
                    module: self.md,
                    map,
                    pair: LoraPair {
                        source: format!("{module}.{e}.{}{half}", self.param),
                        a,
                        b,
                        alpha: self.alpha,
                        b_rows: None,
                    },
                });
            }
        }
        Ok(out)
    }
}
