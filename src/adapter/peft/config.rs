//! `adapter_config.json`: the fields that change what a PEFT adapter does, PEFT's defaults, and
//! PEFT's per-module rank and alpha (`rank_pattern` / `alpha_pattern` through `get_pattern_key`).

use std::path::Path;

use serde_json::Value;

use crate::adapter::{Provenance, SourceFormat};

/// An `adapter_config.json` field that is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object")]
    NotAnObject,
    #[error("{field}: expected an object")]
    FieldNotAnObject { field: &'static str },
    #[error("peft_type is {0:?}; only LORA adapters can be read")]
    NotLora(String),
    /// A field of the wrong type or range: what was expected and what was found.
    #[error("{field}: expected {expected}, got {found}")]
    Field {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("pattern key {key:?} is not a regular expression we can evaluate: {error}")]
    Pattern { key: String, error: String },
}

/// The `adapter_config.json` fields that change what an adapter does.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub r: u32,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In the config's order: PEFT takes the first matching key.
    pub rank_pattern: Vec<(String, u32)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    pub modules_to_save: Vec<String>,
    /// List entries, or the single regex string.
    pub target_modules: Vec<String>,
    /// `nn.Parameter`s adapted directly (PEFT 0.17+ `ParamWrapper`), e.g.
    /// `mlp.experts.gate_up_proj`: the fused expert weights of transformers 5 MoE models.
    pub target_parameters: Vec<String>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
    /// Older aLoRA configs give the invocation as text only; turning it into token ids needs the base
    /// tokenizer, so `convert` refuses such a config instead of writing an always-on adapter.
    pub invocation_string: Option<String>,
    pub base_model_name_or_path: Option<String>,
    compiled_rank: Vec<(regex::Regex, u32)>,
    compiled_alpha: Vec<(regex::Regex, f64)>,
}

/// PEFT's `LoraConfig` defaults.
const DEFAULT_R: u32 = 8;
const DEFAULT_ALPHA: f64 = 8.0;

impl PeftConfig {
    /// Parses `adapter_config.json` text. Errors say which field is wrong.
    pub fn parse(text: &str) -> Result<PeftConfig, ConfigError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let obj = v.as_object().ok_or(ConfigError::NotAnObject)?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let peft_type = get("peft_type").and_then(Value::as_str).map(str::to_string);
        if let Some(t) = &peft_type {
            if t != "LORA" {
                return Err(ConfigError::NotLora(t.clone()));
            }
        }
        let r = match get("r") {
            Some(v) => as_u32(v).ok_or_else(|| field("r", POSITIVE, v))?,
            None => DEFAULT_R,
        };
        let lora_alpha = match get("lora_alpha") {
            Some(v) => as_finite(v).ok_or_else(|| field("lora_alpha", NUMBER, v))?,
            None => DEFAULT_ALPHA,
        };
        let flag = |k: &str| -> Result<bool, ConfigError> {
            match get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(field(k, "true or false", v)),
            }
        };
        let mut rank_pattern = Vec::new();
        if let Some(p) = get("rank_pattern") {
            let m = p.as_object().ok_or(ConfigError::FieldNotAnObject {
                field: "rank_pattern",
            })?;
            for (k, v) in m {
                let r =
                    as_u32(v).ok_or_else(|| field(&format!("rank_pattern[{k:?}]"), POSITIVE, v))?;
                rank_pattern.push((k.clone(), r));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(p) = get("alpha_pattern") {
            let m = p.as_object().ok_or(ConfigError::FieldNotAnObject {
                field: "alpha_pattern",
            })?;
            for (k, v) in m {
                let a = as_finite(v)
                    .ok_or_else(|| field(&format!("alpha_pattern[{k:?}]"), NUMBER, v))?;
                alpha_pattern.push((k.clone(), a));
            }
        }
        let strings = |k: &str| -> Result<Vec<String>, ConfigError> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| field(k, "strings", x))
                    })
                    .collect(),
                Some(v) => Err(field(k, "a string or a list of strings", v)),
            }
        };
        let alora_invocation_tokens = match get("alora_invocation_tokens") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| field("alora_invocation_tokens", "token ids", x))
                    })
                    .collect::<Result<Vec<u32>, ConfigError>>()?,
            )
            .filter(|t| !t.is_empty()),
            Some(v) => return Err(field("alora_invocation_tokens", "a list", v)),
        };
        let compiled_rank = rank_pattern
            .iter()
            .map(|(k, r)| Ok((pattern_regex(k)?, *r)))
            .collect::<Result<_, ConfigError>>()?;
        let compiled_alpha = alpha_pattern
            .iter()
            .map(|(k, a)| Ok((pattern_regex(k)?, *a)))
            .collect::<Result<_, ConfigError>>()?;
        Ok(PeftConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            rank_pattern,
            alpha_pattern,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            use_dora: flag("use_dora")?,
            lora_bias: flag("lora_bias")?,
            modules_to_save: strings("modules_to_save")?,
            target_modules: strings("target_modules")?,
            target_parameters: strings("target_parameters")?,
            alora_invocation_tokens,
            invocation_string: get("invocation_string")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            compiled_rank,
            compiled_alpha,
        })
    }

    /// PEFT's `r` for a module (after `rank_pattern`), and the pattern key that decided it.
    pub fn rank_for(&self, module: &str) -> (u32, Option<&str>) {
        for (i, (re, r)) in self.compiled_rank.iter().enumerate() {
            if re.is_match(module) {
                return (*r, Some(self.rank_pattern[i].0.as_str()));
            }
        }
        (self.r, None)
    }

    /// PEFT's `lora_alpha` for a module (after `alpha_pattern`).
    pub fn alpha_for(&self, module: &str) -> (f64, Option<&str>) {
        for (i, (re, a)) in self.compiled_alpha.iter().enumerate() {
            if re.is_match(module) {
                return (*a, Some(self.alpha_pattern[i].0.as_str()));
            }
        }
        (self.lora_alpha, None)
    }

    /// The llama.cpp-convention alpha (scale = alpha / rank) that reproduces PEFT's `scaling` for a
    /// module of rank `rank`: `alpha`, or `alpha·√rank` with rsLoRA.
    pub fn llama_alpha(&self, module: &str, rank: u32) -> f64 {
        let (alpha, _) = self.alpha_for(module);
        if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        }
    }

    pub(super) fn provenance(&self, path: &Path) -> Provenance {
        Provenance {
            path: path.to_path_buf(),
            format: Some(SourceFormat::Peft),
            r: Some(self.r),
            lora_alpha: Some(self.lora_alpha),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            target_modules: self.target_modules.clone(),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            base_model: self.base_model_name_or_path.clone(),
        }
    }
}

/// PEFT's `get_pattern_key` test, `re.match(rf"(.*\.)?({key})$", name)`, as an anchored regex.
fn pattern_regex(key: &str) -> Result<regex::Regex, ConfigError> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| ConfigError::Pattern {
        key: key.to_string(),
        error: e.to_string(),
    })
}

const POSITIVE: &str = "a positive integer";
const NUMBER: &str = "a number";

/// A field of the wrong type: `FIELD: expected WHAT, got VALUE`.
fn field(name: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::Field {
        field: name.to_string(),
        expected,
        found: found.to_string(),
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    })?;
    u32::try_from(n).ok().filter(|n| *n > 0)
}

fn as_finite(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_keys_follow_peft_get_pattern_key() {
        let cfg = PeftConfig::parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,
                "rank_pattern":{"q_proj":4,"model.layers.1.mlp.up_proj":2,"layers\\.[23]\\..*down_proj":6},
                "alpha_pattern":{"self_attn.v_proj":5,"proj":1}}"#,
        )
        .unwrap();
        // Suffix match on a dot boundary.
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.q_proj").0, 4);
        // Not a dot boundary: "xq_proj" does not end in ".q_proj".
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.xq_proj").0, 8);
        // A full path matches itself (the `(.*\.)?` is optional).
        assert_eq!(cfg.rank_for("model.layers.1.mlp.up_proj").0, 2);
        assert_eq!(cfg.rank_for("model.layers.11.mlp.up_proj").0, 8);
        // Keys are regular expressions.
        assert_eq!(cfg.rank_for("model.layers.3.mlp.down_proj").0, 6);
        assert_eq!(cfg.rank_for("model.layers.4.mlp.down_proj").0, 8);
        // First key in config order wins; "proj" needs a whole dotted component.
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.v_proj").0, 5.0);
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.o_proj").0, 16.0);
        assert_eq!(cfg.alpha_for("model.layers.0.proj").0, 1.0);
    }

    #[test]
    fn scales_plain_rslora_and_patterns() {
        let cfg = PeftConfig::parse(r#"{"r":16,"lora_alpha":32}"#).unwrap();
        assert_eq!(cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16), 32.0);
        let cfg = PeftConfig::parse(
            r#"{"r":16,"lora_alpha":32,"use_rslora":true,"alpha_pattern":{"v_proj":8}}"#,
        )
        .unwrap();
        // rsLoRA: scaling = alpha/sqrt(r) = 32/4 = 8, so llama.cpp alpha = 8 * 16 = 128.
        assert_eq!(
            cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16),
            128.0
        );
        assert_eq!(
            cfg.llama_alpha("model.layers.0.self_attn.q_proj", 16) / 16.0,
            32.0 / 4.0
        );
        assert_eq!(cfg.llama_alpha("model.layers.0.self_attn.v_proj", 16), 32.0);
        // Defaults are PEFT's.
        let cfg = PeftConfig::parse("{}").unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (8, 8.0, false));
    }

    #[test]
    fn config_errors_name_the_field() {
        for (text, want) in [
            ("[]", "object"),
            ("{", "JSON"),
            (r#"{"r":"8"}"#, "r:"),
            (r#"{"r":0}"#, "r:"),
            (r#"{"lora_alpha":"x"}"#, "lora_alpha"),
            (r#"{"use_rslora":1}"#, "use_rslora"),
            (r#"{"peft_type":"IA3"}"#, "LORA"),
            (r#"{"rank_pattern":{"(?<=x)q":2}}"#, "pattern key"),
            (r#"{"alora_invocation_tokens":[1,-2]}"#, "alora"),
            (r#"{"target_modules":7}"#, "target_modules"),
        ] {
            let err = PeftConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let cfg = PeftConfig::parse(
            r#"{"target_modules":"all-linear","modules_to_save":null,"alora_invocation_tokens":[5,6],"base_model_name_or_path":"m"}"#,
        )
        .unwrap();
        assert_eq!(cfg.target_modules, ["all-linear"]);
        assert_eq!(cfg.alora_invocation_tokens, Some(vec![5, 6]));
        assert_eq!(cfg.base_model_name_or_path.as_deref(), Some("m"));
    }
}
