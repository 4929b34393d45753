//! `--lora` / `--lora-scaled`, as llama.cpp's own flags (`common/arg.cpp`): `--lora FNAME[,FNAME...]`
//! and `--lora-scaled FNAME:SCALE[,...]`, both repeatable. Shared by the subcommands that take adapters.
//! Scales are parsed by clap (a bad one is a usage error, exit 2); a zero or negative scale is legal,
//! as in llama.cpp.

use gguf_lora::adapter::{split_scale, ScaleSuffix};

use crate::UsageError;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoraArgs {
    /// Adapter(s) at scale 1: GGUF LoRA file, PEFT directory or PEFT .safetensors, or
    /// BUNDLE.gguf#NAME. Comma-separated, repeatable.
    #[arg(long = "lora", value_name = "ADAPTER[,ADAPTER...]")]
    pub lora: Vec<String>,
    /// Adapter(s) with a user scale (multiplies alpha/rank; zero and negative scales are allowed).
    /// Comma-separated, repeatable.
    #[arg(long = "lora-scaled", value_name = "ADAPTER:SCALE[,...]", value_parser = parse_scaled)]
    pub lora_scaled: Vec<Scaled>,
}

/// One `--lora-scaled` value: its adapters with their scales.
#[derive(Debug, Clone)]
pub struct Scaled(Vec<(String, f32)>);

/// `ADAPTER:SCALE[,ADAPTER:SCALE...]`.
fn parse_scaled(list: &str) -> Result<Scaled, String> {
    let mut out = Vec::new();
    for item in list.split(',').filter(|a| !a.is_empty()) {
        let scale = match split_scale(item) {
            (path, ScaleSuffix::Scale(v, _)) => {
                let v = v as f32;
                if !v.is_finite() {
                    return Err(format!("{item}: scale must be finite"));
                }
                (path.to_string(), v)
            }
            (_, ScaleSuffix::NotANumber(tail)) => {
                return Err(format!("{item}: scale {tail:?} is not a number"))
            }
            (_, ScaleSuffix::None) => return Err(format!("{item}: expected ADAPTER:SCALE")),
        };
        out.push(scale);
    }
    Ok(Scaled(out))
}

impl LoraArgs {
    /// Every adapter with its user scale, in the order given (`--lora` ones first).
    pub fn adapters(&self) -> Result<Vec<(String, f32)>, UsageError> {
        let mut out = Vec::new();
        for list in &self.lora {
            for a in list.split(',').filter(|a| !a.is_empty()) {
                out.push((a.to_string(), 1.0));
            }
        }
        for list in &self.lora_scaled {
            out.extend(list.0.iter().cloned());
        }
        if out.is_empty() {
            return Err(UsageError(
                "no adapter given: use --lora ADAPTER or --lora-scaled ADAPTER:SCALE".into(),
            ));
        }
        Ok(out)
    }
}
