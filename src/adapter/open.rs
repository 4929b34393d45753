//! The one entry point for reading an adapter, whatever form the user gave it in:
//! [`open`] decides once what `ADAPTER` is (a GGUF LoRA file, `BUNDLE.gguf#NAME`, a PEFT directory,
//! or a PEFT `.safetensors` with its config beside it), reads it, maps a PEFT adapter onto the base,
//! checks a GGUF adapter against the base, and returns the adapter with its problems. Each operation
//! applies its own policy to them (convert and bundle refuse, inspect shows, merge leaves shapes to
//! its plan). `ADAPTER:SCALE` is split by [`split_scale`], also in one place.

use std::io::Read;
use std::path::Path;

use super::check::{check_against_base, Issue};
use super::source::split_spec;
use super::{gguf, peft, Adapter, AdapterError, SourceFormat};
use crate::arch::BaseInfo;

/// What `spec` is, decided without reading more than its first four bytes (`inspect`'s rule, the
/// strictest): `BUNDLE.gguf#NAME` and a file starting with the GGUF magic are GGUF; a directory and
/// a `.safetensors` file are PEFT; anything else is read as GGUF, so that the GGUF reader names what
/// is wrong with it.
pub fn detect(spec: &Path) -> SourceFormat {
    if split_spec(spec).1.is_some() {
        return SourceFormat::Gguf;
    }
    if spec.is_dir() {
        return SourceFormat::Peft;
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(spec)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == crate::gguf::MAGIC);
    if !is_gguf && spec.extension().is_some_and(|e| e == "safetensors") {
        SourceFormat::Peft
    } else {
        SourceFormat::Gguf
    }
}

/// A GGUF adapter made for another architecture than the base's.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchMismatch {
    /// `general.architecture` of the adapter, when it says one.
    pub adapter: Option<String>,
    pub base: String,
}

/// An adapter as [`open`] read it, with what is wrong with it against the base.
#[derive(Debug)]
pub struct Opened {
    pub adapter: Adapter,
    pub format: SourceFormat,
    /// Modules that do not fit the base (empty without a base, or when all fit).
    pub issues: Vec<Issue>,
    /// A GGUF adapter whose architecture is not the base's (PEFT adapters take the base's).
    pub arch_mismatch: Option<ArchMismatch>,
}

impl Opened {
    /// Refuses a GGUF adapter made for another architecture than the base's (the policy of the
    /// operations that write one: convert, bundle).
    pub fn same_arch(self, spec: &Path) -> Result<Opened, AdapterError> {
        match self.arch_mismatch {
            Some(m) => Err(AdapterError::ArchMismatch {
                path: spec.to_path_buf(),
                adapter: m.adapter,
                base: m.base,
            }),
            None => Ok(self),
        }
    }
}

/// Reads the adapter `spec` (see [`detect`]). A PEFT adapter is mapped onto `base` and needs one
/// (a base GGUF, or only `--arch`); a GGUF adapter is read as it is and, with a base, checked
/// against it (architecture, every target's presence and shape).
pub fn open(spec: &Path, base: Option<&BaseInfo>) -> Result<Opened, AdapterError> {
    let format = detect(spec);
    let (adapter, issues, arch_mismatch) = match format {
        SourceFormat::Peft => {
            let base = base.ok_or_else(|| AdapterError::PeftNeedsBase {
                path: spec.to_path_buf(),
            })?;
            let (adapter, issues) = peft::read(spec, base)?;
            (adapter, issues, None)
        }
        SourceFormat::Gguf => {
            let adapter = gguf::read(spec)?;
            match base {
                None => (adapter, Vec::new(), None),
                Some(base) => {
                    let mismatch =
                        (adapter.arch.as_deref() != Some(base.arch.as_str())).then(|| {
                            ArchMismatch {
                                adapter: adapter.arch.clone(),
                                base: base.arch.clone(),
                            }
                        });
                    let issues = check_against_base(&adapter.tensors, base);
                    (adapter, issues, mismatch)
                }
            }
        }
    };
    Ok(Opened {
        adapter,
        format,
        issues,
        arch_mismatch,
    })
}

/// What follows the last `:` of an `ADAPTER:SCALE` argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleSuffix<'a> {
    /// No suffix (or the whole string names an existing path).
    None,
    /// A number (not necessarily finite: callers decide), with its text.
    Scale(f64, &'a str),
    /// Text that is not a number: part of the path, or a mistake, as the caller decides.
    NotANumber(&'a str),
}

/// Splits `ADAPTER:SCALE` at the last `:`. A string that exists as a path is taken whole, so paths
/// with `:` in them work when given plainly.
pub fn split_scale(s: &str) -> (&str, ScaleSuffix<'_>) {
    if Path::new(s).exists() {
        return (s, ScaleSuffix::None);
    }
    match s.rsplit_once(':') {
        Some((path, tail)) => match tail.parse::<f64>() {
            Ok(v) => (path, ScaleSuffix::Scale(v, tail)),
            Err(_) => (s, ScaleSuffix::NotANumber(tail)),
        },
        None => (s, ScaleSuffix::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic_directory_and_extension() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let gguf_named_safetensors = d.join("x.safetensors");
        std::fs::write(&gguf_named_safetensors, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(detect(&gguf_named_safetensors), SourceFormat::Gguf);
        assert_eq!(detect(d), SourceFormat::Peft);
        assert_eq!(detect(&d.join("missing.safetensors")), SourceFormat::Peft);
        assert_eq!(detect(&d.join("missing.gguf")), SourceFormat::Gguf);
        assert_eq!(detect(&d.join("b.gguf#style")), SourceFormat::Gguf);
        let other = d.join("notes.txt");
        std::fs::write(&other, b"hello").unwrap();
        assert_eq!(detect(&other), SourceFormat::Gguf);
    }

    #[test]
    fn scales_split_at_the_last_colon_unless_the_path_exists() {
        assert_eq!(
            split_scale("/x/a.gguf:0.5"),
            ("/x/a.gguf", ScaleSuffix::Scale(0.5, "0.5"))
        );
        assert_eq!(
            split_scale("/x/a.gguf:abc"),
            ("/x/a.gguf:abc", ScaleSuffix::NotANumber("abc"))
        );
        assert_eq!(split_scale("/x/a.gguf"), ("/x/a.gguf", ScaleSuffix::None));
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a:1.gguf");
        std::fs::write(&odd, b"x").unwrap();
        let s = odd.to_str().unwrap();
        assert_eq!(split_scale(s), (s, ScaleSuffix::None));
    }
}
