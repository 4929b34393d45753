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
//! LoRA on transformers 5's fused expert parameters (`target_parameters`, PEFT's `ParamWrapper`:
//! `<experts>.lora_A` `(E·r, in)`, `<experts>.lora_B` `(out, E·r)`, nested under `base_layer` when
//! both `gate_up_proj` and `down_proj` are targeted) is split per expert by the `params` module
//! into the same stacked `ffn_*_exps` tensors as the per-expert modules of older transformers.
//!
//! `fan_in_fan_out` only matters for GPT-2-style `Conv1D` bases; PEFT resets it to false for
//! `nn.Linear`, which every architecture we map uses, and stores A/B as `(r, in)` / `(out, r)` either
//! way, so it needs no transposition here.

mod config;
mod mapping;
mod names;
mod params;
mod tensors;

use std::path::Path;

pub use config::{ConfigError, PeftConfig};
pub use mapping::build;
pub use names::{parse_tensor_name, TensorRole};
pub use params::{wrappers, ParamError, Wrapper};
pub use tensors::{locate, read_raw, PeftAdapter, PeftError, PeftModule};

use super::check::Issue;
use super::Adapter;
use super::AdapterError;
use crate::arch::BaseInfo;

/// Reads a PEFT adapter and maps it onto `base`. Returns the adapter and the list of problems; a
/// caller that writes files must refuse when the list is not empty.
pub fn read(path: &Path, base: &BaseInfo) -> Result<(Adapter, Vec<Issue>), AdapterError> {
    let raw = read_raw(path)?;
    build(&raw, base, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::IssueKind;
    use crate::adapter::Matrix;
    use crate::arch::BaseTensor;
    use crate::arch::TargetKind;
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

    /// A `target_parameters` adapter on fused experts: 3 experts, rank 2, hidden 6, expert width
    /// 2 (gate_up_proj `[3, 4, 6]`, down_proj `[3, 6, 2]`), both parameters, so the wrappers nest.
    fn target_parameters_dir(down_a: Vec<usize>) -> tempfile::TempDir {
        peft_dir(
            r#"{"r":2,"lora_alpha":4,"target_parameters":["mlp.experts.down_proj","mlp.experts.gate_up_proj"]}"#,
            &[
                (
                    &format!("{P}mlp.experts.base_layer.lora_A.weight"),
                    vec![6, 6],
                ),
                (
                    &format!("{P}mlp.experts.base_layer.lora_B.weight"),
                    vec![4, 6],
                ),
                (&format!("{P}mlp.experts.lora_A.weight"), down_a),
                (&format!("{P}mlp.experts.lora_B.weight"), vec![6, 6]),
            ],
        )
    }

    fn moe_base() -> BaseInfo {
        base(
            "qwen3moe",
            2,
            1,
            &[
                ("blk.0.ffn_gate_exps.weight", vec![6, 2, 3]),
                ("blk.0.ffn_up_exps.weight", vec![6, 2, 3]),
                ("blk.0.ffn_down_exps.weight", vec![2, 6, 3]),
            ],
        )
    }

    #[test]
    fn target_parameters_experts_take_a_row_blocks_and_b_strided_columns_gate_first() {
        let dir = target_parameters_dir(vec![6, 2]);
        let raw = read_raw(dir.path()).unwrap();
        let whole = |path: &str, b: bool| {
            let m = raw.modules.iter().find(|m| m.path == path).unwrap();
            let f = if b { &m.b } else { &m.a };
            f.as_ref().unwrap().load().unwrap()
        };
        let experts = "model.layers.0.mlp.experts";
        let inner = format!("{experts}.base_layer"); // gate_up_proj: wrapped first
        let (n, r) = (3, 2);
        let cols = |m: &Matrix, pick: &dyn Fn(usize) -> usize, rows: std::ops::Range<usize>| {
            let data = rows
                .clone()
                .flat_map(|i| (0..r).map(move |j| (i, j)))
                .map(|(i, j)| m.data[i * m.cols + pick(j)])
                .collect();
            Matrix::new(rows.len(), r, data).unwrap()
        };
        for b in [moe_base(), BaseInfo::from_arch("qwen3moe").unwrap()] {
            let (a, issues) = read(dir.path(), &b).unwrap();
            assert!(issues.is_empty(), "{issues:?}");
            for (target, module, rows) in [
                ("ffn_gate_exps", inner.as_str(), 0..2),
                ("ffn_up_exps", inner.as_str(), 2..4),
                ("ffn_down_exps", experts, 0..6),
            ] {
                let t = a.tensor(&format!("blk.0.{target}.weight")).unwrap();
                assert_eq!(
                    (t.kind, t.n_expert(), t.rank()),
                    (TargetKind::Experts, 3, 2)
                );
                let l = t.load().unwrap();
                assert_eq!(l.scale(), 2.0);
                let (wa, wb) = (whole(module, false), whole(module, true));
                let n_out = rows.len();
                let mut strided_differs_from_blocked = false;
                for e in 0..n {
                    let want_a = wa.rows_range(e * r..(e + 1) * r);
                    let want_b = cols(&wb, &|j| j * n + e, rows.clone());
                    assert_eq!(l.a.rows_range(e * r..(e + 1) * r), want_a, "{target} A_{e}");
                    assert_eq!(
                        l.b.rows_range(e * n_out..(e + 1) * n_out),
                        want_b,
                        "{target} B_{e}"
                    );
                    let blocked = cols(&wb, &|j| e * r + j, rows.clone());
                    strided_differs_from_blocked |=
                        blocked.matmul(&want_a) != want_b.matmul(&want_a);
                }
                assert!(
                    strided_differs_from_blocked,
                    "{target}: the test cannot tell"
                );
            }
            // Gate first: ffn_gate_exps holds B's first I rows, which differ from the up rows.
            let gate = a
                .tensor("blk.0.ffn_gate_exps.weight")
                .unwrap()
                .load()
                .unwrap();
            let up = a
                .tensor("blk.0.ffn_up_exps.weight")
                .unwrap()
                .load()
                .unwrap();
            assert_ne!(gate.b, up.b);
            assert_eq!(gate.a, up.a);
        }
    }

    #[test]
    fn one_target_parameter_has_no_base_layer_and_patterns_see_the_parameter_path() {
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":4,"target_parameters":["down_proj"],
                "rank_pattern":{"experts.down_proj":1},"alpha_pattern":{"mlp.experts.down_proj":3}}"#,
            &[
                (&format!("{P}mlp.experts.lora_A.weight"), vec![3, 2]),
                (&format!("{P}mlp.experts.lora_B.weight"), vec![6, 3]),
            ],
        );
        let (a, issues) = read(dir.path(), &moe_base()).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(a.tensors.len(), 1);
        let t = a.tensor("blk.0.ffn_down_exps.weight").unwrap();
        assert_eq!((t.n_expert(), t.rank(), t.n_in(), t.n_out()), (3, 1, 2, 6));
        assert_eq!(t.scale(), 3.0);
    }

    #[test]
    fn mixtral_router_weight_in_target_parameters_is_a_linear_lora_on_ffn_gate_inp() {
        // What PEFT saves for transformers 5 Mixtral trained with target_modules ["gate", "w2"]: its
        // config conversion writes `gate.weight` and `down_proj` into target_parameters. The router
        // (`mlp.gate`, weight [E = 3, hidden 6]) is a 2-D ParamWrapper: B·A, like a Linear's LoRA.
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":4,"target_parameters":["down_proj","gate.weight"]}"#,
            &[
                (&format!("{P}mlp.gate.lora_A.weight"), vec![2, 6]),
                (&format!("{P}mlp.gate.lora_B.weight"), vec![3, 2]),
                (&format!("{P}mlp.experts.lora_A.weight"), vec![6, 2]),
                (&format!("{P}mlp.experts.lora_B.weight"), vec![6, 6]),
            ],
        );
        let raw = read_raw(dir.path()).unwrap();
        let saved = |f: &str| {
            let m = raw
                .modules
                .iter()
                .find(|m| m.path == "model.layers.0.mlp.gate")
                .unwrap();
            let f = if f == "A" { &m.a } else { &m.b };
            f.as_ref().unwrap().load().unwrap()
        };
        let mixtral = base(
            "llama",
            2,
            1,
            &[
                ("blk.0.ffn_gate_inp.weight", vec![6, 3]),
                ("blk.0.ffn_down_exps.weight", vec![2, 6, 3]),
            ],
        );
        for b in [mixtral, BaseInfo::from_arch("mixtral").unwrap()] {
            let (a, issues) = read(dir.path(), &b).unwrap();
            assert!(issues.is_empty(), "{issues:?}");
            let t = a.tensor("blk.0.ffn_gate_inp.weight").unwrap();
            assert_eq!(
                (t.kind, t.rank(), t.n_in(), t.n_out()),
                (TargetKind::Linear, 2, 6, 3)
            );
            let l = t.load().unwrap();
            assert_eq!(
                (l.a.clone(), l.b.clone(), l.scale()),
                (saved("A"), saved("B"), 2.0)
            );
            let d = a.tensor("blk.0.ffn_down_exps.weight").unwrap();
            assert_eq!((d.kind, d.n_expert()), (TargetKind::Experts, 3));
        }
    }

    #[test]
    fn target_parameters_shapes_that_disagree_are_one_error_naming_the_tensor() {
        // down_proj's lora_A reads 5 columns: neither the expert width 2 nor the hidden size 6.
        let dir = target_parameters_dir(vec![6, 5]);
        for b in [moe_base(), BaseInfo::from_arch("qwen3moe").unwrap()] {
            let err = read(dir.path(), &b).err().unwrap().to_string();
            assert!(
                err.contains("adapter_model.safetensors")
                    && err.contains("mlp.experts.")
                    && !err.contains('\n'),
                "{err}"
            );
        }
        let err = read(dir.path(), &moe_base()).err().unwrap().to_string();
        assert!(
            err.contains(
                "'base_model.model.model.layers.0.mlp.experts.lora_A.weight' has 5 columns"
            ) && err.contains("down_proj needs 2"),
            "{err}"
        );
        // 7 rows of lora_A: not 3 experts × r = 2.
        let dir = target_parameters_dir(vec![7, 2]);
        let raw = read_raw(dir.path());
        assert!(raw.is_err()); // and lora_B's 6 columns disagree: a rank error already
        let dir = peft_dir(
            r#"{"r":2,"lora_alpha":4,"target_parameters":["mlp.experts.down_proj"]}"#,
            &[
                (&format!("{P}mlp.experts.lora_A.weight"), vec![7, 2]),
                (&format!("{P}mlp.experts.lora_B.weight"), vec![6, 7]),
            ],
        );
        for b in [moe_base(), BaseInfo::from_arch("qwen3moe").unwrap()] {
            let err = read(dir.path(), &b).err().unwrap().to_string();
            assert!(
                err.contains("has 7 rows; expected") && err.contains("r = 2"),
                "{err}"
            );
        }
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
