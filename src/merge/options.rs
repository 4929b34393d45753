//! The merge's options as users write them: `--outtype keep|TYPE` ([`MergeType`]) and
//! `--promote TYPE|FROM=TO[,...]|auto[:BUDGET]` ([`Promote`]), parsed here so that the binary only
//! hands over strings, and written back the same way into the merged model's provenance.

use std::fmt;
use std::str::FromStr;

use crate::engine::types::{parse_writable, TypeError};
use crate::engine::{MergeType, Promote};
use crate::quant::GgmlType;

/// An option value that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionError {
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error("--promote {spec}: budget '{budget}' is not a number")]
    BudgetNotANumber { spec: String, budget: String },
    #[error("--promote {spec}: budget must be a size growth >= 0")]
    BadBudget { spec: String },
    #[error("--promote '{spec}': expected auto or auto:BUDGET")]
    Auto { spec: String },
    #[error("--promote '{spec}': expected FROM=TO[,FROM=TO...]")]
    Map { spec: String },
    #[error("--promote '{spec}': unknown type '{from}'")]
    UnknownFrom { spec: String, from: String },
}

impl FromStr for MergeType {
    type Err = OptionError;

    /// `keep`, or a type we write (any case).
    fn from_str(s: &str) -> Result<MergeType, OptionError> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(MergeType::Keep),
            t => Ok(MergeType::Type(parse_writable(t)?)),
        }
    }
}

impl fmt::Display for MergeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeType::Keep => f.write_str("keep"),
            MergeType::Type(t) => f.write_str(t.name()),
        }
    }
}

impl FromStr for Promote {
    type Err = OptionError;

    /// `TYPE`, `FROM=TO[,FROM=TO...]` or `auto[:BUDGET]` (any case); a budget of `5`, `5%` or
    /// `0.05` means five percent.
    fn from_str(spec: &str) -> Result<Promote, OptionError> {
        let s = spec.to_ascii_lowercase();
        let s = s.as_str();
        if let Some(rest) = s.strip_prefix("auto") {
            let budget = match rest.strip_prefix(':') {
                None if rest.is_empty() => 0.05,
                Some(b) => {
                    let (num, pct) = match b.strip_suffix('%') {
                        Some(n) => (n, true),
                        None => (b, false),
                    };
                    let v: f64 = num.parse().map_err(|_| OptionError::BudgetNotANumber {
                        spec: s.to_string(),
                        budget: b.to_string(),
                    })?;
                    // "5%" and "5" both mean five percent; "0.05" means five percent too.
                    let frac = if pct || v >= 1.0 { v / 100.0 } else { v };
                    if !(frac.is_finite() && frac >= 0.0) {
                        return Err(OptionError::BadBudget {
                            spec: s.to_string(),
                        });
                    }
                    frac
                }
                None => {
                    return Err(OptionError::Auto {
                        spec: s.to_string(),
                    })
                }
            };
            return Ok(Promote::Auto { budget });
        }
        if s.contains('=') {
            let mut pairs = Vec::new();
            for pair in s.split(',') {
                let (from, to) = pair.split_once('=').ok_or_else(|| OptionError::Map {
                    spec: s.to_string(),
                })?;
                let from = GgmlType::from_name(from).ok_or_else(|| OptionError::UnknownFrom {
                    spec: s.to_string(),
                    from: from.to_string(),
                })?;
                pairs.push((from, parse_writable(to)?));
            }
            return Ok(Promote::Map(pairs));
        }
        Ok(Promote::Type(parse_writable(s)?))
    }
}

/// `gguf_lora.merge.promote` for the provenance: the option as it was understood, or `None`.
pub fn promote_key(p: &Promote) -> Option<String> {
    match p {
        Promote::None => None,
        Promote::Type(t) => Some(t.name().to_string()),
        Promote::Map(pairs) => Some(
            pairs
                .iter()
                .map(|(a, b)| format!("{a}={b}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Promote::Auto { budget } => Some(format!("auto:{}", budget)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_users_write_them() {
        assert_eq!("KEEP".parse::<MergeType>(), Ok(MergeType::Keep));
        assert_eq!(
            "q4_k".parse::<MergeType>(),
            Ok(MergeType::Type(GgmlType::Q4_K))
        );
        assert!("q4_k_m".parse::<MergeType>().is_err());
        assert_eq!(
            "auto".parse::<Promote>(),
            Ok(Promote::Auto { budget: 0.05 })
        );
        assert_eq!(
            "auto:10%".parse::<Promote>(),
            Ok(Promote::Auto { budget: 0.1 })
        );
        assert_eq!(
            "auto:0.02".parse::<Promote>(),
            Ok(Promote::Auto { budget: 0.02 })
        );
        assert_eq!(
            "Q4_K=q6_k,q5_0=q8_0".parse::<Promote>(),
            Ok(Promote::Map(vec![
                (GgmlType::Q4_K, GgmlType::Q6_K),
                (GgmlType::Q5_0, GgmlType::Q8_0)
            ]))
        );
        let err = "banana".parse::<Promote>().unwrap_err().to_string();
        assert!(
            err.contains("unknown or unsupported output type 'banana'"),
            "{err}"
        );
        assert!("auto:x".parse::<Promote>().is_err());
        assert!("autox".parse::<Promote>().is_err());
        assert_eq!(
            promote_key(&"q4_k=q6_k".parse().unwrap()).as_deref(),
            Some("q4_K=q6_K")
        );
    }
}
