//! `gguf-lora tokenize MODEL.gguf "text" [--file F] [--no-bos] [--no-special] [--ids-only] [--json]`:
//! the model's own tokenizer ([`gguf_lora::tokenizer`]) on a prompt, printed like llama.cpp's
//! `llama-tokenize` (`    id -> 'piece'`, or `[1, 2, 3]` with `--ids-only`). llama-tokenize's own
//! spellings work too: `-m MODEL -p PROMPT`, `--ids`, `--no-parse-special`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use gguf_lora::gguf::GgufFile;
use gguf_lora::tokenizer::Tokenizer;
use serde::Serialize;

use crate::{print_stdout, Outcome, UsageError};

/// Show the token ids and pieces the model's own tokenizer (from its GGUF metadata) gives a text,
/// exactly as llama.cpp tokenizes it.
#[derive(clap::Args)]
pub struct Args {
    /// The model GGUF (only its metadata is read), then the text to tokenize (taken verbatim: no
    /// escape processing); with -m the only positional is the text.
    #[arg(value_name = "MODEL.gguf TEXT", num_args = 0..=2)]
    positional: Vec<String>,
    /// The model, as llama-tokenize takes it.
    #[arg(short = 'm', long = "model", value_name = "MODEL.gguf")]
    model: Option<PathBuf>,
    /// The text, as llama-tokenize takes it.
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "TEXT",
        conflicts_with = "file"
    )]
    prompt: Option<String>,
    /// Read the text from this file (`-` for standard input) instead.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Do not add the BOS/EOS tokens the model asks for (llama.cpp's `add_special = false`).
    #[arg(long)]
    no_bos: bool,
    /// Do not turn control-token texts such as `<|im_start|>` into their ids (llama.cpp's
    /// `parse_special = false`); user-defined tokens are still matched, as in llama.cpp.
    #[arg(long, visible_alias = "no-parse-special")]
    no_special: bool,
    /// Print only the ids, as a list like `[1, 2, 3]`.
    #[arg(long, visible_alias = "ids", conflicts_with = "json")]
    ids_only: bool,
    /// Print exactly one JSON object on stdout instead of the `id -> 'piece'` lines.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct TokenizeReport {
    model: PathBuf,
    tokenizer: String,
    pre_tokenizer: String,
    add_special: bool,
    parse_special: bool,
    n_tokens: usize,
    tokens: Vec<TokenEntry>,
}

#[derive(Serialize)]
struct TokenEntry {
    id: u32,
    /// The piece as text; invalid UTF-8 (a partial character) shows as U+FFFD.
    piece: String,
    /// The piece's bytes, only when they are not valid UTF-8 on their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<Vec<u8>>,
}

/// The model and the text (or `None` for `--file`) from the positionals and `-m`/`-p`, which
/// stand for the first and second positional.
fn model_and_text(args: &Args) -> Result<(PathBuf, Option<String>), UsageError> {
    let usage = |m: &str| UsageError(m.to_string());
    let mut pos = args.positional.iter();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => PathBuf::from(
            pos.next()
                .ok_or_else(|| usage("give a model (MODEL.gguf or -m MODEL.gguf)"))?,
        ),
    };
    let text = match &args.prompt {
        Some(p) => Some(p.clone()),
        None => pos.next().cloned(),
    };
    if pos.next().is_some() {
        return Err(usage("too many arguments: give one model and one text"));
    }
    match (&text, &args.file) {
        (None, None) => Err(usage("give a text (TEXT, -p TEXT or --file FILE)")),
        (Some(_), Some(_)) => Err(usage(
            "give the text once: as an argument or with --file, not both",
        )),
        _ => Ok((model, text)),
    }
}

pub fn run(args: Args) -> Result<Outcome> {
    let (model, text) = model_and_text(&args)?;
    let text: Vec<u8> = match (text, &args.file) {
        (Some(t), _) => t.into_bytes(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read standard input")?;
            buf
        }
        (None, Some(p)) => {
            std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?
        }
        (None, None) => unreachable!("model_and_text requires a text or --file"),
    };
    let file = GgufFile::open(&model)?;
    let tok = Tokenizer::from_metadata(file.metadata())
        .with_context(|| format!("{}", model.display()))?;
    let add_special = !args.no_bos;
    let parse_special = !args.no_special;
    let ids = tok
        .tokenize(&text, add_special, parse_special)
        .with_context(|| format!("{}: cannot tokenize the text", model.display()))?;

    let out = if args.ids_only {
        let list: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        format!("[{}]\n", list.join(", "))
    } else {
        let mut entries = Vec::with_capacity(ids.len());
        for &id in &ids {
            // Pieces as llama-tokenize shows them: control tokens included.
            let bytes = tok.token_to_piece(id, true)?;
            let valid = std::str::from_utf8(bytes).is_ok();
            entries.push(TokenEntry {
                id,
                piece: String::from_utf8_lossy(bytes).into_owned(),
                bytes: (!valid).then(|| bytes.to_vec()),
            });
        }
        if args.json {
            let (tok_model, pre) = tok.model_name();
            let report = TokenizeReport {
                model: model.clone(),
                tokenizer: tok_model.to_string(),
                pre_tokenizer: pre.to_string(),
                add_special,
                parse_special,
                n_tokens: entries.len(),
                tokens: entries,
            };
            let mut s = serde_json::to_string_pretty(&report)?;
            s.push('\n');
            s
        } else {
            let mut s = String::new();
            for e in &entries {
                s.push_str(&format!("{:6} -> '{}'\n", e.id, e.piece));
            }
            s
        }
    };
    print_stdout(&out)?;
    Ok(Outcome::Success)
}
