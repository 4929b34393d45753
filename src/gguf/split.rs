//! Split sets (`NAME-00001-of-00003.gguf`, as `llama-gguf-split` writes them) opened as one model.
//!
//! Every shard carries `split.no` (0-based), `split.count` and `split.tensors.count` (the total over
//! all shards); the other metadata lives in shard 0. A single file is a model with one shard.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{GgufError, GgufErrorKind, Result};
use super::reader::{GgufFile, TensorInfo};
use super::value::Metadata;

pub const KEY_SPLIT_NO: &str = "split.no";
pub const KEY_SPLIT_COUNT: &str = "split.count";
pub const KEY_SPLIT_TENSORS: &str = "split.tensors.count";

/// One model: a single GGUF file or all shards of a split set.
pub struct GgufModel {
    shards: Vec<GgufFile>,
    /// Tensor name → (shard, index in that shard's tensor list).
    index: HashMap<String, (usize, usize)>,
}

/// `(prefix, no, count)` of a shard file name `PREFIX-0000k-of-0000N.gguf` (k is 1-based).
fn parse_shard_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    if no.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((prefix.to_string(), no.parse().ok()?, count.parse().ok()?))
}

/// The path of shard `no` (1-based) of `count` beside `dir`, named like `llama_split_path`.
fn shard_path(dir: &Path, prefix: &str, no: u32, count: u32) -> PathBuf {
    dir.join(format!("{prefix}-{no:05}-of-{count:05}.gguf"))
}

impl GgufModel {
    /// Opens a single file, or, given any shard of a split set, every shard of the set.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let path = path.as_ref();
        let first = GgufFile::open(path)?;
        let split_err =
            |p: &Path, problem: String| GgufError::new(p, GgufErrorKind::Split { problem });
        let count = match first.metadata().get(KEY_SPLIT_COUNT) {
            None => return GgufModel::from_shards(vec![first]),
            Some(v) => v.as_uint().ok_or_else(|| {
                split_err(
                    path,
                    format!(
                        "{KEY_SPLIT_COUNT} is {}, expected a positive integer",
                        v.describe()
                    ),
                )
            })?,
        };
        if count == 0 || count > u64::from(u16::MAX) {
            return Err(split_err(path, format!("{KEY_SPLIT_COUNT} is {count}")));
        }
        let count = count as u32;
        if count == 1 {
            return GgufModel::from_shards(vec![first]);
        }
        let (prefix, _, name_count) = parse_shard_name(path).ok_or_else(|| {
            split_err(
                path,
                format!("{KEY_SPLIT_COUNT} is {count} but the file name is not NAME-0000k-of-{count:05}.gguf"),
            )
        })?;
        if name_count != count {
            return Err(split_err(
                path,
                format!("file name says {name_count} shards but {KEY_SPLIT_COUNT} is {count}"),
            ));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let given = parse_shard_name(path).map(|(_, no, _)| no);
        let mut first = Some(first);
        let mut shards = Vec::with_capacity(count as usize);
        for no in 1..=count {
            let shard = match (given == Some(no), first.take()) {
                (true, Some(f)) => f,
                (_, f) => {
                    first = f;
                    GgufFile::open(shard_path(dir, &prefix, no, count))?
                }
            };
            shards.push(shard);
        }
        GgufModel::from_shards(shards)
    }

    /// Builds the model from shards in order, checking their `split.*` keys agree with the set.
    fn from_shards(shards: Vec<GgufFile>) -> Result<GgufModel> {
        let count = shards.len();
        let mut index = HashMap::new();
        let mut total = 0usize;
        for (i, shard) in shards.iter().enumerate() {
            let err =
                |problem: String| GgufError::new(shard.path(), GgufErrorKind::Split { problem });
            let m = shard.metadata();
            if count > 1 || m.contains_key(KEY_SPLIT_NO) {
                let no = m.get_uint(KEY_SPLIT_NO);
                if no != Some(i as u64) {
                    return Err(err(format!(
                        "{KEY_SPLIT_NO} is {}, expected {i} for shard {} of {count}",
                        shown(no),
                        i + 1
                    )));
                }
                let c = m.get_uint(KEY_SPLIT_COUNT);
                if count > 1 && c != Some(count as u64) {
                    return Err(err(format!(
                        "{KEY_SPLIT_COUNT} is {}, expected {count}",
                        shown(c)
                    )));
                }
            }
            for (j, t) in shard.tensors().iter().enumerate() {
                if let Some((other, _)) = index.insert(t.name.clone(), (i, j)) {
                    return Err(err(format!(
                        "tensor '{}' is also in shard {}",
                        t.name,
                        other + 1
                    )));
                }
            }
            total += shard.tensors().len();
        }
        let m = shards[0].metadata();
        if let Some(v) = m.get(KEY_SPLIT_TENSORS) {
            let declared = v.as_uint();
            if declared != Some(total as u64) {
                return Err(GgufError::new(
                    shards[0].path(),
                    GgufErrorKind::Split {
                        problem: format!(
                            "{KEY_SPLIT_TENSORS} is {} but the shards hold {total} tensors",
                            v.describe()
                        ),
                    },
                ));
            }
        }
        Ok(GgufModel { shards, index })
    }

    /// Shard 0's metadata (the model's; `split.*` keys included for split sets).
    pub fn metadata(&self) -> &Metadata {
        self.shards[0].metadata()
    }

    /// All tensors in file order, with the index of the shard holding each.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.tensors().iter().map(move |t| (i, t)))
    }

    /// Number of tensors over all shards.
    pub fn tensor_count(&self) -> usize {
        self.index.len()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let &(s, i) = self.index.get(name)?;
        Some(&self.shards[s].tensors()[i])
    }

    /// The shard holding tensor `name`.
    pub fn shard_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).map(|&(s, _)| s)
    }

    /// The tensor's bytes, a zero-copy slice of its shard's memory map.
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        let &(s, i) = self.index.get(name)?;
        let shard = &self.shards[s];
        Some(shard.tensor_data(&shard.tensors()[i]))
    }

    pub fn shards(&self) -> &[GgufFile] {
        &self.shards
    }

    /// Whether this model spans more than one file.
    pub fn is_split(&self) -> bool {
        self.shards.len() > 1
    }
}

/// An optional integer key's value for messages: the number, or "missing".
fn shown(v: Option<u64>) -> String {
    v.map_or_else(
        || "missing (or not an integer)".to_string(),
        |n| n.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert_eq!(
            parse_shard_name(Path::new("/x/model-q4-00002-of-00003.gguf")),
            Some(("model-q4".into(), 2, 3))
        );
        assert_eq!(parse_shard_name(Path::new("model.gguf")), None);
        assert_eq!(parse_shard_name(Path::new("m-2-of-3.gguf")), None);
        assert_eq!(
            shard_path(Path::new("/x"), "m", 1, 3),
            PathBuf::from("/x/m-00001-of-00003.gguf")
        );
    }
}
