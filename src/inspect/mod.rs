//! `inspect`: what is in a model or adapter file. [`inspect`] detects the file kind and builds a
//! [`Report`] once; the binary renders it as a table or serializes it as one JSON object.
//!
//! Each file kind is one [`Report`] variant with its own module: GGUF in [`gguf`], GGUF LoRA
//! adapters in [`gguf_adapter`], safetensors files in [`safetensors`], PEFT adapters in [`peft`], and
//! an adapter matched against a base in [`adapter`].

pub mod adapter;
pub mod gguf;
pub mod gguf_adapter;
pub mod peft;
pub mod safetensors;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use crate::adapter::source::{split_spec, GgufSource};
use crate::adapter::AdapterError;
use crate::gguf::{GgufError, GgufModel};
use crate::safetensors_file::{SafetensorsError, SafetensorsFile};

/// What `inspect` found, one variant per file kind; serialized with a `"kind"` tag.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// A GGUF model or adapter, single file or split set.
    Gguf(gguf::GgufReport),
    /// A GGUF LoRA adapter (`general.type = adapter`): the GGUF view plus the adapter view.
    GgufAdapter(gguf_adapter::GgufAdapterReport),
    /// A `.safetensors` file that is not a PEFT adapter.
    Safetensors(safetensors::SafetensorsReport),
    /// A PEFT LoRA adapter: directory, or `.safetensors` with `adapter_config.json` beside it.
    Peft(peft::PeftReport),
    /// An adapter matched against a base model (`inspect ADAPTER --base BASE.gguf`).
    AdapterMatch(adapter::AdapterMatchReport),
}

/// Why a file could not be inspected.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The GGUF reader refused the file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The safetensors reader refused the file.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The adapter (PEFT config and tensors, or GGUF LoRA pairs) is not a usable LoRA.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
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
/// bundle as its own file would be (the file `bundle --extract` writes, laid out without writing it).
pub fn inspect(path: &Path) -> Result<Report, InspectError> {
    if let (_, Some(_)) = split_spec(path) {
        let src = Arc::new(GgufSource::open(path)?);
        let adapter = crate::adapter::gguf::read_source(&src)?;
        let view = gguf::GgufView::of_source(&src)?;
        return Ok(Report::GgufAdapter(gguf_adapter::report(
            path, &view, &adapter,
        )));
    }
    match detect(path)? {
        FileKind::Gguf => {
            let model = GgufModel::open(path)?;
            let view = gguf::GgufView::of_model(&model);
            if model.metadata().get_str(crate::gguf::KEY_TYPE) == Some("adapter") {
                let adapter = crate::adapter::gguf::read(path)?;
                Ok(Report::GgufAdapter(gguf_adapter::report(
                    path, &view, &adapter,
                )))
            } else {
                Ok(Report::Gguf(gguf::report(path, &view)))
            }
        }
        FileKind::Safetensors => {
            let file = SafetensorsFile::open(path)?;
            if is_peft_weights(path, &file) {
                Ok(Report::Peft(peft::inspect_peft(path)?))
            } else {
                Ok(Report::Safetensors(safetensors::report(path, &file)))
            }
        }
        FileKind::PeftDirectory => Ok(Report::Peft(peft::inspect_peft(path)?)),
    }
}

/// A `.safetensors` file is read as PEFT weights when `adapter_config.json` lies beside it and it
/// holds at least one LoRA tensor: a merged model saved next to the adapter it came from stays a
/// plain safetensors file.
fn is_peft_weights(path: &Path, file: &SafetensorsFile) -> bool {
    // A bare file name has the empty parent, which joins to a path relative to the working directory.
    let dir = path.parent().unwrap_or(Path::new(""));
    dir.join("adapter_config.json").is_file()
        && file.tensors().iter().any(|t| {
            crate::adapter::peft::parse_tensor_name(&t.name).1
                != crate::adapter::peft::TensorRole::Full
        })
}
