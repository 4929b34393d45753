//! `--lora` / `--lora-scaled`, as llama.cpp's own flags (`common/arg.cpp`): `--lora FNAME[,FNAME...]`
//! and `--lora-scaled FNAME:SCALE[,...]`, both repeatable. Shared by the subcommands that take adapters.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoraArgs {
    /// Adapter(s) at scale 1: GGUF LoRA file, PEFT directory or PEFT .safetensors, or
    /// BUNDLE.gguf#NAME. Comma-separated, repeatable.
    #[arg(long = "lora", value_name = "ADAPTER[,ADAPTER...]")]
    pub lora: Vec<String>,
    /// Adapter(s) with a user scale (multiplies alpha/rank). Comma-separated, repeatable.
    #[arg(long = "lora-scaled", value_name = "ADAPTER:SCALE[,...]")]
    pub lora_scaled: Vec<String>,
}

impl LoraArgs {
    /// Every adapter with its user scale, in the order given (`--lora` ones first).
    pub fn adapters(&self) -> Result<Vec<(String, f32)>> {
        let mut out = Vec::new();
        for list in &self.lora {
            for a in list.split(',').filter(|a| !a.is_empty()) {
                out.push((a.to_string(), 1.0));
            }
        }
        for list in &self.lora_scaled {
            for item in list.split(',').filter(|a| !a.is_empty()) {
                let Some((path, scale)) = item.rsplit_once(':') else {
                    bail!("--lora-scaled {item}: expected ADAPTER:SCALE");
                };
                let Ok(scale) = scale.parse::<f32>() else {
                    bail!("--lora-scaled {item}: scale {scale:?} is not a number");
                };
                if !scale.is_finite() {
                    bail!("--lora-scaled {item}: scale must be finite");
                }
                out.push((path.to_string(), scale));
            }
        }
        if out.is_empty() {
            bail!("no adapter given: use --lora ADAPTER or --lora-scaled ADAPTER:SCALE");
        }
        Ok(out)
    }
}
