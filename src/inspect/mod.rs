//! `inspect`: what is in a model or adapter file. [`inspect`] detects the file kind and builds a
//! [`Report`] once; the binary renders it as a table or serializes it as one JSON object.
//!
//! Each file kind is one [`Report`] variant with its own module (GGUF in [`gguf`]); safetensors
//! files and PEFT directories are added as further variants beside it.

pub mod adapter;
pub mod gguf;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::gguf::GgufError;

/// What `inspect` found, one variant per file kind; serialized with a `"kind"` tag.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// A GGUF model or adapter, single file or split set.
    Gguf(gguf::GgufReport),
    /// An adapter matched against a base model (`inspect ADAPTER --base BASE.gguf`).
    AdapterMatch(adapter::AdapterMatchReport),
}

/// Why a file could not be inspected.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The GGUF reader refused the file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A kind of file this build cannot inspect yet.
    #[error("{}: {what} cannot be inspected yet", path.display())]
    Unsupported { path: PathBuf, what: &'static str },
    /// `BUNDLE.gguf#NAME` could not be resolved.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    /// The path could not be read at all.
    #[error("{}: cannot read: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The kinds of file `inspect` tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Gguf,
    Safetensors,
    PeftDirectory,
}

/// Tells the file kind from the first bytes (GGUF magic), the extension or being a directory.
/// Anything unrecognized is treated as GGUF so that the reader names what is wrong with it.
pub fn detect(path: &Path) -> Result<FileKind, InspectError> {
    let io = |error| InspectError::Io {
        path: path.to_path_buf(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Ok(FileKind::PeftDirectory);
    }
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(io)?;
    if n == 4 && &magic == crate::gguf::MAGIC {
        return Ok(FileKind::Gguf);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(FileKind::Safetensors);
    }
    Ok(FileKind::Gguf)
}

/// Inspects the file at `path`, whatever its kind; `BUNDLE.gguf#NAME` shows that adapter of a named
/// bundle as its own file would be (it is extracted to a scratch file and read back).
pub fn inspect(path: &Path) -> Result<Report, InspectError> {
    if let (_, Some(_)) = crate::adapter::bundle::split_spec(path) {
        let src = crate::adapter::bundle::GgufSource::open(path)?;
        let scratch = tempfile::tempdir().map_err(|error| InspectError::Io {
            path: std::env::temp_dir(),
            error,
        })?;
        let file = scratch.path().join("member.gguf");
        src.write(&file, &[])?;
        let model = crate::gguf::GgufModel::open(&file)?;
        return Ok(Report::Gguf(gguf::report(path, &model)));
    }
    match detect(path)? {
        FileKind::Gguf => Ok(Report::Gguf(gguf::inspect_gguf(path)?)),
        FileKind::Safetensors => Err(InspectError::Unsupported {
            path: path.to_path_buf(),
            what: "safetensors files",
        }),
        FileKind::PeftDirectory => Err(InspectError::Unsupported {
            path: path.to_path_buf(),
            what: "PEFT adapter directories",
        }),
    }
}
