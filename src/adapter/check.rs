//! What makes an adapted module unusable against a base: the [`Issue`]s that readers collect
//! instead of failing, so that each operation applies its own policy (convert and bundle refuse
//! them, inspect shows them in its table, merge leaves shape problems to its plan).

use super::model::LoraTensor;
use crate::arch::{BaseInfo, TargetKind};

/// Why an adapted module cannot become a correct GGUF LoRA tensor against this base.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Issue {
    /// Source module path or tensor name.
    pub source: String,
    /// GGUF target, when the module maps.
    pub target: Option<String>,
    pub status: IssueKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// No GGUF tensor for this module in this architecture.
    UnknownModule,
    /// The base has no such tensor.
    MissingInBase,
    /// Shapes disagree with the base tensor.
    ShapeMismatch,
    /// Rank in the tensors disagrees with the config (`r` / `rank_pattern`).
    RankMismatch,
    /// Needs facts only a base GGUF gives (head counts for the llama q/k permutation, ...).
    NeedsBase,
    /// An aLoRA whose invocation is given as text only.
    NeedsTokens,
}

/// Checks every target against the base GGUF: present, and shaped as llama.cpp's loader will check.
pub fn check_against_base(tensors: &[LoraTensor], base: &BaseInfo) -> Vec<Issue> {
    let mut issues = Vec::new();
    if !base.has_tensors() {
        return issues;
    }
    for t in tensors {
        let issue = |status, message: String| Issue {
            source: t.source(),
            target: Some(t.target.clone()),
            status,
            message,
        };
        let Some(bt) = base.tensor(&t.target) else {
            let message = if t.target == "output.weight"
                && base.tensor("token_embd.weight").is_some()
            {
                "the base ties its output to token_embd (no output.weight): a lm_head LoRA has nothing to apply to in llama.cpp; use `gguf-lora merge` on an untied base or train without lm_head".to_string()
            } else {
                format!("the base has no tensor {}", t.target)
            };
            issues.push(issue(IssueKind::MissingInBase, message));
            continue;
        };
        let want: Vec<u64> = match t.kind {
            TargetKind::Linear => vec![t.n_in() as u64, t.n_out() as u64],
            TargetKind::Embedding => vec![t.n_out() as u64, t.n_in() as u64],
            TargetKind::Experts => vec![t.n_in() as u64, t.n_out() as u64, t.n_expert() as u64],
        };
        if bt.dims != want {
            issues.push(issue(
                IssueKind::ShapeMismatch,
                format!(
                    "the adapter needs a base tensor with ne = {want:?}, the base's {} has ne = {:?}",
                    t.target, bt.dims
                ),
            ));
        }
    }
    issues
}
