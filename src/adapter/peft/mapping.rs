//! Mapping a PEFT adapter's modules onto a base model's GGUF tensors, in passes:
//! 0. [`super::params::split`]: LoRAs on fused expert parameters (`target_parameters`) split
//!    into per-expert pairs, as if trained on per-expert modules;
//! 1. [`Mapping::map_modules`]: each module → its GGUF target (rank against the config, the
//!    architecture's name map, embedding vs linear);
//! 2. [`Mapping::place`]: plain targets become tensors (a fused `qkv_proj` split into the base's
//!    separate q/k/v, gemma3's embedding cut to the GGUF vocabulary, llama q/k marked for the RoPE
//!    permutation); experts and q/k/v parts the base fuses are set aside;
//! 3. [`Mapping::stack_experts`]: per-expert LoRAs stacked in expert order, untouched experts zero;
//! 4. [`Mapping::fuse_qkv`]: separate q/k/v LoRAs combined into the base's `attn_qkv`;
//! 5. [`Mapping::finish`]: every target checked against the base, the aLoRA invocation, full tensors.
//!
//! Problems are collected as [`Issue`]s, never raised: each caller decides what it refuses.

use std::collections::BTreeMap;
use std::path::Path;

use super::params;
use super::tensors::{PeftAdapter, PeftError, PeftModule};
use crate::adapter::check::{check_against_base, Issue, IssueKind};
use crate::adapter::model::{Factor, FusedPart, Layout, LoraPair, LoraTensor};
use crate::adapter::{Adapter, FullTensor};
use crate::adapter::{AdapterError, Matrix};
use crate::arch::{self, Arch, BaseInfo, ModuleMap, Rope, TargetKind};

/// One module with its target, before grouping.
struct Single<'r> {
    map: ModuleMap,
    pair: LoraPair,
    module: &'r PeftModule,
}

/// What [`Mapping::place`] sets aside for the later passes.
#[derive(Default)]
struct Deferred {
    /// Stacked expert target → (expert index, pair, map).
    experts: BTreeMap<String, Vec<(usize, LoraPair, ModuleMap)>>,
    /// Layer → (part index in q, k, v order, pair), for a base that fuses q/k/v.
    to_fuse: BTreeMap<u32, Vec<(usize, LoraPair)>>,
}

struct Mapping<'r> {
    raw: &'r PeftAdapter,
    base: &'r BaseInfo,
    arch: Option<Arch>,
    issues: Vec<Issue>,
    tensors: Vec<LoraTensor>,
}

/// Maps the modules of `raw` onto `base` (see the module docs). Returns the adapter and the list of
/// problems; a caller that writes files must refuse when the list is not empty. A LoRA on fused
/// expert parameters that does not fit is an error ([`super::ParamError`]).
pub fn build(
    raw: &PeftAdapter,
    base: &BaseInfo,
    path: &Path,
) -> Result<(Adapter, Vec<Issue>), AdapterError> {
    let params = params::split(raw, base).map_err(PeftError::from)?;
    let mut m = Mapping {
        raw,
        base,
        arch: base.known_arch(),
        issues: Vec::new(),
        tensors: Vec::new(),
    };
    let mut singles = m.map_modules(&params.consumed);
    singles.extend(params.pairs.into_iter().map(|p| Single {
        map: p.map,
        pair: p.pair,
        module: p.module,
    }));
    let deferred = m.place(singles);
    m.stack_experts(deferred.experts);
    m.fuse_qkv(deferred.to_fuse);
    Ok(m.finish(path))
}

impl<'r> Mapping<'r> {
    fn issue(&mut self, source: &str, target: Option<&str>, status: IssueKind, message: String) {
        self.issues.push(Issue {
            source: source.to_string(),
            target: target.map(str::to_string),
            status,
            message,
        });
    }

    /// Pass 1: each module's target, rank checked against the config; `skip` are the fused
    /// expert-parameter modules [`params::split`] has already split into experts.
    fn map_modules(&mut self, skip: &[String]) -> Vec<Single<'r>> {
        let cfg = &self.raw.config;
        let mut singles = Vec::new();
        for md in &self.raw.modules {
            if skip.contains(&md.path) {
                continue;
            }
            let (Some(a), Some(b)) = (&md.a, &md.b) else {
                continue; // read_raw refused these
            };
            let rank = a.shape().0;
            let (cfg_rank, key) = cfg.rank_for(&md.path);
            if cfg_rank as usize != rank {
                self.issue(
                    &md.path,
                    None,
                    IssueKind::RankMismatch,
                    format!(
                        "tensors have rank {rank} but the config gives r = {cfg_rank}{}",
                        key.map(|k| format!(" (rank_pattern key {k:?})"))
                            .unwrap_or_default()
                    ),
                );
                continue;
            }
            let Some(map) = self.arch.and_then(|a| arch::map_module(a, &md.path)) else {
                let message = format!(
                    "no {} GGUF tensor corresponds to this module",
                    self.base.arch
                );
                self.issue(&md.path, None, IssueKind::UnknownModule, message);
                continue;
            };
            if md.embedding != (map.kind == TargetKind::Embedding) {
                let message = if md.embedding {
                    "embedding LoRA (lora_embedding_A/B) on a module that is not the token embedding".into()
                } else {
                    "linear LoRA on the token embedding; expected lora_embedding_A/B".into()
                };
                self.issue(
                    &md.path,
                    Some(&map.target),
                    IssueKind::UnknownModule,
                    message,
                );
                continue;
            }
            let pair = LoraPair {
                source: md.path.clone(),
                a: a.clone(),
                b: b.clone(),
                alpha: cfg.llama_alpha(&md.path, rank as u32),
                b_rows: None,
            };
            singles.push(Single {
                map,
                pair,
                module: md,
            });
        }
        singles
    }

    /// Pass 2: plain targets become tensors; experts and parts of a fused base tensor wait.
    fn place(&mut self, singles: Vec<Single<'r>>) -> Deferred {
        let base = self.base;
        let mut deferred = Deferred::default();
        for Single { map, pair, module } in singles {
            if let Some(e) = map.expert {
                deferred
                    .experts
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
                            deferred.to_fuse.entry(layer).or_default().push((i, pair));
                            continue;
                        }
                    }
                    if map.target == arch::qkv_fused(layer)
                        && parts.iter().all(|p| base.tensor(p).is_some())
                    {
                        self.split_fused(&map, layer, &parts, pair, module);
                        continue;
                    }
                }
            }
            let pair = match self.trim_embedding_vocab(&map, pair) {
                Ok(p) => p,
                Err(message) => {
                    self.issue(
                        &module.path,
                        Some(&map.target),
                        IssueKind::ShapeMismatch,
                        message,
                    );
                    continue;
                }
            };
            let mut t = plain_tensor(map.target.clone(), map.layer, map.kind, pair, module);
            if let Some(rope) = map.rope {
                match head_count(base, rope) {
                    Some(n) => t.permute_heads = Some(n),
                    None => {
                        let message = format!(
                            "{} stores {} RoPE-permuted by head; the head count comes from the base model: pass --base BASE.gguf",
                            base.arch, map.target
                        );
                        self.issue(
                            &module.path,
                            Some(&map.target),
                            IssueKind::NeedsBase,
                            message,
                        );
                        continue;
                    }
                }
            }
            self.tensors.push(t);
        }
        deferred
    }

    /// A fused `qkv_proj` LoRA on a base with separate q/k/v: one tensor per part, each taking its
    /// rows of `B`.
    fn split_fused(
        &mut self,
        map: &ModuleMap,
        layer: u32,
        parts: &[String; 3],
        pair: LoraPair,
        module: &PeftModule,
    ) {
        let mut start = 0usize;
        for p in parts {
            let rows = self
                .base
                .tensor(p)
                .and_then(|t| t.dims.get(1))
                .copied()
                .unwrap_or(0) as usize;
            let mut part = pair.clone();
            part.b_rows = Some(start..start + rows);
            start += rows;
            self.tensors.push(plain_tensor(
                p.clone(),
                Some(layer),
                TargetKind::Linear,
                part,
                module,
            ));
        }
        if start != pair.b.shape().0 {
            let message = format!(
                "lora_B has {} rows but the base's attn_q/attn_k/attn_v have {start} together",
                pair.b.shape().0
            );
            self.issue(
                &module.path,
                Some(&map.target),
                IssueKind::ShapeMismatch,
                message,
            );
        }
    }

    /// gemma3's converter drops the embedding rows past the tokenizer's real vocabulary
    /// (`data_torch[:n_vocab_real]`), so its GGUF `token_embd` can be shorter than the HF embedding.
    /// The LoRA's `A` (one column per token) is cut the same way: the dropped columns belong to
    /// tokens the GGUF model can never see. (llama.cpp's own LoRA converter slices `B` there
    /// instead, leaving an adapter its loader rejects.)
    fn trim_embedding_vocab(&self, map: &ModuleMap, pair: LoraPair) -> Result<LoraPair, String> {
        if map.kind != TargetKind::Embedding || !self.arch.is_some_and(Arch::trims_embedding_vocab)
        {
            return Ok(pair);
        }
        let Some(n_vocab) = self
            .base
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

    /// Pass 3: per-expert LoRAs stacked in expert order; experts the adapter leaves alone get an
    /// exact zero update.
    fn stack_experts(&mut self, experts: BTreeMap<String, Vec<(usize, LoraPair, ModuleMap)>>) {
        for (target, mut list) in experts {
            list.sort_by_key(|(e, _, _)| *e);
            let layer = list[0].2.layer;
            let n_expert = match self.base.tensor(&target).and_then(|t| t.dims.get(2)) {
                Some(n) => *n as usize,
                None => list.last().map_or(0, |(e, _, _)| e + 1),
            };
            let first = list[0].1.clone();
            let (rank, n_in, n_out) = (first.rank(), first.n_in(), first.n_out());
            let mut pairs = Vec::with_capacity(n_expert);
            let mut bad = None;
            let mut it = list.into_iter().peekable();
            for e in 0..n_expert {
                match it.next_if(|(ei, _, _)| *ei == e) {
                    Some((_, p, _)) => {
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
                    None => pairs.push(LoraPair {
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
                self.issue(&target, Some(&target), IssueKind::ShapeMismatch, message);
                continue;
            }
            self.tensors.push(LoraTensor {
                target,
                layer,
                kind: TargetKind::Experts,
                layout: Layout::Experts(pairs),
                permute_heads: None,
                dora_magnitude: None,
                lora_bias: None,
            });
        }
    }

    /// Pass 4: separate q/k/v LoRAs into the base's fused `attn_qkv`, rows of untouched parts from
    /// the head counts (or, when one part is unknown, what the others leave).
    fn fuse_qkv(&mut self, to_fuse: BTreeMap<u32, Vec<(usize, LoraPair)>>) {
        let base = self.base;
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
                    let mut slots: Vec<FusedPart> = r
                        .iter()
                        .map(|&rows| FusedPart { rows, pair: None })
                        .collect();
                    for (i, p) in parts {
                        slots[i].pair = Some(p);
                    }
                    self.tensors.push(LoraTensor {
                        target: fused,
                        layer: Some(layer),
                        kind: TargetKind::Linear,
                        layout: Layout::Fused(slots),
                        permute_heads: None,
                        dora_magnitude: None,
                        lora_bias: None,
                    });
                }
                _ => {
                    let shown: Vec<String> = rows
                        .iter()
                        .map(|r| r.map_or_else(|| "?".into(), |n| n.to_string()))
                        .collect();
                    let message = format!(
                        "the base fuses q/k/v into {fused} ({total} rows) and the adapted parts do not fill it (q, k, v rows: {})",
                        shown.join(", ")
                    );
                    self.issue(
                        &sources.join("+"),
                        Some(&fused),
                        IssueKind::ShapeMismatch,
                        message,
                    );
                }
            }
        }
    }

    /// Pass 5: checks against the base, the aLoRA invocation, output order and full tensors.
    fn finish(mut self, path: &Path) -> (Adapter, Vec<Issue>) {
        let cfg = &self.raw.config;
        let found = check_against_base(&self.tensors, self.base);
        self.issues.extend(found);
        if cfg.alora_invocation_tokens.is_none() {
            if let Some(text) = &cfg.invocation_string {
                let message = format!(
                    "an aLoRA with invocation_string {text:?} but no alora_invocation_tokens: add the base tokenizer's ids for it (convert_lora_to_gguf.py drops the first token) as alora_invocation_tokens"
                );
                let source = self.raw.config_path.display().to_string();
                self.issue(&source, None, IssueKind::NeedsTokens, message);
            }
        }
        self.tensors.sort_by_key(tensor_order);
        let arch = self.arch;
        let full_tensors = self
            .raw
            .full
            .iter()
            .map(|(name, module, data)| FullTensor {
                source: name.clone(),
                target: arch.and_then(|a| arch::map_module(a, module)).map(|m| {
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
            arch: Some(self.base.arch.clone()),
            tensors: self.tensors,
            full_tensors,
            alora_invocation_tokens: cfg.alora_invocation_tokens.clone(),
            provenance: cfg.provenance(path),
        };
        (adapter, self.issues)
    }
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
