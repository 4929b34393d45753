//! The vocabulary as llama.cpp builds it from GGUF metadata (`llama_vocab::impl::load`): token texts,
//! scores and attributes, the special token ids with their defaults, the flags that steer
//! tokenization, the end-of-generation set, and the text-based fix-ups llama.cpp applies to token
//! attributes. Keys are read with llama.cpp's strictness: a present key of the wrong type is an error,
//! because llama.cpp refuses to load such a file.

use std::collections::{BTreeSet, HashMap};

use super::error::{Result, TokenizerError};
use super::pretokenize::{pre_type_of, PreSettings, PreType};
use crate::gguf::{Array, Metadata, Value};

/// `llama_token_attr` bits.
pub const ATTR_UNKNOWN: u32 = 1 << 0;
pub const ATTR_UNUSED: u32 = 1 << 1;
pub const ATTR_NORMAL: u32 = 1 << 2;
pub const ATTR_CONTROL: u32 = 1 << 3;
pub const ATTR_USER_DEFINED: u32 = 1 << 4;
pub const ATTR_BYTE: u32 = 1 << 5;
pub const ATTR_LSTRIP: u32 = 1 << 7;
pub const ATTR_RSTRIP: u32 = 1 << 8;

/// The two tokenizer models we reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `llama`: SentencePiece-style, merging by token score, with byte fallback (`llm_tokenizer_spm`).
    Spm,
    /// `gpt2`: byte-level BPE with ranked merges and a pre-tokenizer (`llm_tokenizer_bpe`).
    Bpe,
}

/// Special token ids (`None` is llama.cpp's `LLAMA_TOKEN_NULL`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

pub(super) struct Vocab {
    pub model: String,
    pub pre: String,
    pub kind: Kind,
    pub pre_type: PreType,
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    pub token_to_id: HashMap<Vec<u8>, u32>,
    pub specials: Specials,
    pub add_space_prefix: bool,
    pub add_bos: bool,
    pub add_eos: bool,
    pub ignore_merges: bool,
    pub clean_spaces: bool,
    pub escape_whitespaces: bool,
    pub eog: BTreeSet<u32>,
    /// `(left, right)` of each merge, in rank order (BPE only).
    pub merges: Vec<(String, String)>,
}

pub(super) const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

fn wrong_type(key: &str, expected: &'static str, v: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key: key.to_string(),
        expected,
        found: v.type_name(),
    }
}

/// A string key, if present (llama.cpp's `get_key<std::string>`).
fn get_str<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(key, "string", v)),
    }
}

fn get_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(key, "bool", v)),
    }
}

fn get_u32(md: &Metadata, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::U32(x)) => Ok(Some(*x)),
        Some(v) => Err(wrong_type(key, "u32", v)),
    }
}

fn get_array<'a>(md: &'a Metadata, key: &str, expected: &'static str) -> Result<Option<&'a Array>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(wrong_type(key, expected, v)),
    }
}

fn array_of_strings<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a [String]>> {
    match get_array(md, key, "array[string]")? {
        None => Ok(None),
        Some(Array::String(v)) => Ok(Some(v)),
        Some(_) => Err(wrong_type(
            key,
            "array[string]",
            &md.get(key).cloned().unwrap_or(Value::U8(0)),
        )),
    }
}

/// The special-token keys in llama.cpp's order (the deprecated FIM names come last and win).
type SpecialSlot = fn(&mut Specials) -> &mut Option<u32>;

const SPECIAL_KEYS: [(&str, SpecialSlot); 17] = [
    ("tokenizer.ggml.bos_token_id", |s| &mut s.bos),
    ("tokenizer.ggml.eos_token_id", |s| &mut s.eos),
    ("tokenizer.ggml.eot_token_id", |s| &mut s.eot),
    ("tokenizer.ggml.eom_token_id", |s| &mut s.eom),
    ("tokenizer.ggml.unknown_token_id", |s| &mut s.unk),
    ("tokenizer.ggml.seperator_token_id", |s| &mut s.sep),
    ("tokenizer.ggml.padding_token_id", |s| &mut s.pad),
    ("tokenizer.ggml.mask_token_id", |s| &mut s.mask),
    ("tokenizer.ggml.fim_pre_token_id", |s| &mut s.fim_pre),
    ("tokenizer.ggml.fim_suf_token_id", |s| &mut s.fim_suf),
    ("tokenizer.ggml.fim_mid_token_id", |s| &mut s.fim_mid),
    ("tokenizer.ggml.fim_pad_token_id", |s| &mut s.fim_pad),
    ("tokenizer.ggml.fim_rep_token_id", |s| &mut s.fim_rep),
    ("tokenizer.ggml.fim_sep_token_id", |s| &mut s.fim_sep),
    ("tokenizer.ggml.prefix_token_id", |s| &mut s.fim_pre),
    ("tokenizer.ggml.suffix_token_id", |s| &mut s.fim_suf),
    ("tokenizer.ggml.middle_token_id", |s| &mut s.fim_mid),
];

impl Vocab {
    pub fn load(md: &Metadata) -> Result<Vocab> {
        let model = get_str(md, KEY_MODEL)?
            .ok_or_else(|| TokenizerError::MissingKey {
                key: KEY_MODEL.into(),
            })?
            .to_string();
        let pre = get_str(md, KEY_PRE)?.unwrap_or("").to_string();
        // Read for its type only (BERT-style token types): llama.cpp refuses a wrong type.
        get_u32(md, "tokenizer.ggml.token_type_count")?;

        let mut specials = Specials::default();
        let mut add_space_prefix = false;
        let mut add_bos;
        let mut add_eos = false;
        let mut ignore_merges = false;
        let mut clean_spaces = false;
        let escape_whitespaces;
        let mut merges = Vec::new();
        let (kind, pre_type) = match model.as_str() {
            "no_vocab" | "none" => return Err(TokenizerError::NoVocabulary { model }),
            "llama" => {
                specials.bos = Some(1);
                specials.eos = Some(2);
                specials.unk = Some(0);
                add_space_prefix = true;
                add_bos = true;
                escape_whitespaces = true;
                (Kind::Spm, PreType::Default)
            }
            "gpt2" => {
                let list = array_of_strings(md, KEY_MERGES)?.ok_or_else(|| {
                    TokenizerError::MissingKey {
                        key: KEY_MERGES.into(),
                    }
                })?;
                merges = list.iter().map(|m| split_merge(m)).collect();
                specials.bos = Some(11);
                specials.eos = Some(11);
                clean_spaces = true;
                let Some((pre_type, settings)) = pre_type_of(&pre) else {
                    // llama.cpp: "unknown pre-tokenizer type".
                    return Err(TokenizerError::Unsupported {
                        name: format!("gpt2 with pre-tokenizer '{pre}' (unknown to llama.cpp)"),
                    });
                };
                let PreSettings {
                    no_clean_spaces,
                    ignore_merges: im,
                    add_bos: ab,
                    escape_whitespaces: ew,
                    no_bos_token,
                } = settings;
                clean_spaces &= !no_clean_spaces;
                ignore_merges = im;
                add_bos = ab;
                escape_whitespaces = ew;
                if no_bos_token {
                    specials.bos = None;
                }
                (Kind::Bpe, pre_type)
            }
            other => {
                return Err(TokenizerError::Unsupported {
                    name: format!("'{other}'"),
                })
            }
        };
        if let Some(v) = get_bool(md, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }
        // Only the UGM tokenizer reads it, but llama.cpp type-checks it for every model.
        get_bool(md, "tokenizer.ggml.remove_extra_whitespaces")?;

        let texts_in =
            array_of_strings(md, KEY_TOKENS)?.ok_or_else(|| TokenizerError::MissingKey {
                key: KEY_TOKENS.into(),
            })?;
        let n = texts_in.len();
        if n > i32::MAX as usize {
            return Err(TokenizerError::TooManyTokens { n });
        }
        let scores = read_scores(md, n)?;
        let types = read_token_types(md, n)?;
        if kind == Kind::Spm {
            // The SPM merge queue orders by score; with NaN its order would depend on the heap.
            if let Some(id) = scores.iter().position(|s| s.is_nan()) {
                return Err(TokenizerError::NanScore { id: id as u32 });
            }
        }

        let mut texts = Vec::with_capacity(n);
        let mut token_to_id: HashMap<Vec<u8>, u32> = HashMap::with_capacity(n);
        for (i, t) in texts_in.iter().enumerate() {
            let text = if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.clone()
            };
            if let Some(first) = token_to_id.insert(text.as_bytes().to_vec(), i as u32) {
                return Err(TokenizerError::DuplicateToken {
                    text,
                    first,
                    second: i as u32,
                });
            }
            texts.push(text);
        }
        let mut attrs: Vec<u32> = match &types {
            None => vec![ATTR_NORMAL; n],
            Some(t) => t.iter().map(|&ty| attr_of_type(ty)).collect(),
        };

        // Special token ids: defaults out of range are disabled; a key in range replaces the default.
        for (key, field) in SPECIAL_KEYS {
            let slot = field(&mut specials);
            if slot.is_some_and(|id| id as usize >= n) {
                *slot = None;
            }
            if let Some(id) = get_u32(md, key)? {
                if (id as usize) < n {
                    *slot = Some(id);
                }
            }
        }
        if let Some(v) = get_bool(md, "tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = get_bool(md, "tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }
        get_bool(md, "tokenizer.ggml.add_sep_token")?;
        if pre_type == PreType::Gemma4 && !add_bos {
            add_bos = true;
        }
        get_bool(md, "tokenizer.ggml.normalizer.lowercase")?;
        get_bool(md, "tokenizer.ggml.normalizer.strip_accents")?;
        match get_array(md, "tokenizer.ggml.suppress_tokens", "array[i32]")? {
            None | Some(Array::I32(_)) => {}
            Some(_) => {
                let v = md.get("tokenizer.ggml.suppress_tokens").cloned();
                return Err(wrong_type(
                    "tokenizer.ggml.suppress_tokens",
                    "array[i32]",
                    &v.unwrap_or(Value::U8(0)),
                ));
            }
        }

        let eog = detect_specials(&texts, &token_to_id, &mut attrs, &mut specials);
        let mut vocab = Vocab {
            model,
            pre,
            kind,
            pre_type,
            texts,
            scores,
            attrs,
            token_to_id,
            specials,
            add_space_prefix,
            add_bos,
            add_eos,
            ignore_merges,
            clean_spaces,
            escape_whitespaces,
            eog,
            merges,
        };
        vocab.apply_name_rules(md)?;
        Ok(vocab)
    }

    pub fn id(&self, text: &[u8]) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The per-model attribute rules llama.cpp applies by name at the end of loading (after the
    /// special-token and piece caches are built, so they only change LSTRIP/RSTRIP).
    fn apply_name_rules(&mut self, md: &Metadata) -> Result<()> {
        let name = get_str(md, "general.name")?
            .unwrap_or("")
            .to_ascii_lowercase();
        let arch = get_str(md, "general.architecture")?.unwrap_or("");
        let contains_any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
        if contains_any(&self.pre, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
            || contains_any(arch, &["nomic-bert-moe", "jina-bert-v3"])
        {
            if let Some(id) = self.id(b"<mask>") {
                self.attrs[id as usize] |= ATTR_LSTRIP;
            }
        } else if contains_any(&name, &["phi-3", "phi3"]) {
            for id in 0..self.texts.len() {
                if self.attrs[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0 {
                    self.attrs[id] |= ATTR_RSTRIP;
                }
            }
            for (token, on) in [
                ("</s>", true),
                ("<unk>", false),
                ("<s>", false),
                ("<|endoftext|>", false),
            ] {
                let id = self
                    .id(token.as_bytes())
                    .ok_or(TokenizerError::MissingRuleToken {
                        rule: "Phi-3",
                        token,
                    })?;
                if on {
                    self.attrs[id as usize] |= ATTR_RSTRIP;
                } else {
                    self.attrs[id as usize] &= !ATTR_RSTRIP;
                }
            }
        } else if name.contains("modern-bert") {
            if let Some(id) = self.id(b"[MASK]") {
                self.attrs[id as usize] |= ATTR_LSTRIP;
            }
        }
        Ok(())
    }
}

/// A merge rule `"left right"`, split at the first space after the first byte as llama.cpp does; a
/// rule without one becomes the pair `("", "")`, which never matches.
fn split_merge(m: &str) -> (String, String) {
    // Byte positions, as `std::string::find(' ', 1)`; a space is always a character boundary.
    match m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) {
        Some(pos) => (m[..pos].to_string(), m[pos + 1..].to_string()),
        None => (String::new(), String::new()),
    }
}

fn read_scores(md: &Metadata, n: usize) -> Result<Vec<f32>> {
    let scores = match md.get(KEY_SCORES) {
        None => return Ok(vec![0.0; n]),
        Some(Value::Array(Array::F32(v))) => v.clone(),
        Some(Value::Array(Array::I32(v))) => v.iter().map(|&x| x as f32).collect(),
        Some(v) => return Err(wrong_type(KEY_SCORES, "array[f32] or array[i32]", v)),
    };
    if scores.len() < n {
        return Err(TokenizerError::TooShort {
            key: KEY_SCORES.into(),
            len: scores.len(),
            n_tokens: n,
        });
    }
    Ok(scores)
}

fn read_token_types(md: &Metadata, n: usize) -> Result<Option<Vec<i32>>> {
    match md.get(KEY_TOKEN_TYPE) {
        None => Ok(None),
        Some(Value::Array(Array::I32(v))) => {
            if v.len() < n {
                return Err(TokenizerError::TooShort {
                    key: KEY_TOKEN_TYPE.into(),
                    len: v.len(),
                    n_tokens: n,
                });
            }
            Ok(Some(v.clone()))
        }
        Some(v) => Err(wrong_type(KEY_TOKEN_TYPE, "array[i32]", v)),
    }
}

/// `llama_token_type` (GGUF) to `llama_token_attr`.
fn attr_of_type(t: i32) -> u32 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0,
    }
}

/// llama.cpp's detection of special tokens by their text: EOT, EOM and FIM ids when the metadata has
/// none, "unused" control tokens, the end-of-generation set, and a few model-specific overrides.
///
/// llama.cpp walks an `unordered_map`, so when a vocabulary has two candidate texts for one role it
/// takes whichever its hash table yields first; we take the lowest id. That changes the reported id
/// only: every candidate of the end-of-generation list is marked CONTROL and end-of-generation
/// either way, and FIM candidates are CONTROL in every converter's output.
fn detect_specials(
    texts: &[String],
    token_to_id: &HashMap<Vec<u8>, u32>,
    attrs: &mut [u32],
    sp: &mut Specials,
) -> BTreeSet<u32> {
    const EOT: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
        "<end_of_utterance>",
    ];
    const EOM: &[&str] = &["<|eom_id|>"];
    const FIM_PRE: &[&str] = &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<\u{FF5C}fim\u{2581}begin\u{FF5C}>",
        "<PRE>",
        "\u{2581}<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ];
    const FIM_SUF: &[&str] = &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<\u{FF5C}fim\u{2581}hole\u{FF5C}>",
        "<SUF>",
        "\u{2581}<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ];
    const FIM_MID: &[&str] = &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<\u{FF5C}fim\u{2581}end\u{FF5C}>",
        "<MID>",
        "\u{2581}<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ];
    const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
    const FIM_REP: &[&str] = &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ];
    const FIM_SEP: &[&str] = &["<|file_sep|>"];
    const EOG: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
        "[e~[",
    ];
    let lookup = |t: &str| token_to_id.get(t.as_bytes()).copied();
    for (slot, names) in [
        (&mut sp.eot, EOT),
        (&mut sp.eom, EOM),
        (&mut sp.fim_pre, FIM_PRE),
        (&mut sp.fim_suf, FIM_SUF),
        (&mut sp.fim_mid, FIM_MID),
        (&mut sp.fim_pad, FIM_PAD),
        (&mut sp.fim_rep, FIM_REP),
        (&mut sp.fim_sep, FIM_SEP),
    ] {
        if slot.is_none() {
            if let Some(id) = names.iter().filter_map(|t| lookup(t)).min() {
                *slot = Some(id);
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
    }
    for (id, text) in texts.iter().enumerate() {
        if attrs[id] & ATTR_CONTROL != 0 && text.contains("unused") {
            attrs[id] |= ATTR_UNUSED;
        }
    }
    let mut eog: BTreeSet<u32> = [sp.fim_pad, sp.fim_rep, sp.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for t in EOG {
        if let Some(id) = lookup(t) {
            eog.insert(id);
            attrs[id as usize] |= ATTR_CONTROL;
        }
    }
    // gpt-oss: these are always rendered.
    for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = lookup(t) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }
    eog.extend([sp.eos, sp.eot, sp.eom].into_iter().flatten());
    // o200k_harmony and solar-open: "<|end|>" is not end-of-generation there.
    let find =
        |eog: &BTreeSet<u32>, t: &str| eog.iter().copied().find(|&id| texts[id as usize] == t);
    if let Some(end) = find(&eog, "<|end|>") {
        let has = |t: &str| find(&eog, t).is_some();
        let call = has("<|call|>") || has("<|calls|>");
        if call && (has("<|return|>") || has("<|flush|>")) {
            eog.remove(&end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // gemma4 and plamo: "</s>" is a normal token.
    if find(&eog, "<|tool_response>").is_some() || find(&eog, "<|plamo:eos|>").is_some() {
        if let Some(s) = find(&eog, "</s>") {
            eog.remove(&s);
            attrs[s as usize] = ATTR_NORMAL;
        }
    }
    eog
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small SPM vocabulary's metadata: `<unk> <s> </s> ▁a a b`.
    fn spm() -> Metadata {
        let mut md = Metadata::new();
        md.set(KEY_MODEL, Value::String("llama".into()));
        let toks = ["<unk>", "<s>", "</s>", "\u{2581}a", "a", "b"];
        md.set(
            KEY_TOKENS,
            Value::Array(Array::String(toks.iter().map(|t| t.to_string()).collect())),
        );
        md.set(
            KEY_SCORES,
            Value::Array(Array::F32(vec![0.0, 0.0, 0.0, -1.0, -2.0, -3.0])),
        );
        md.set(
            KEY_TOKEN_TYPE,
            Value::Array(Array::I32(vec![2, 3, 3, 1, 1, 1])),
        );
        md
    }

    fn err(md: &Metadata) -> String {
        match Vocab::load(md) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_defaults_like_llama_cpp() {
        let v = Vocab::load(&spm()).unwrap();
        assert_eq!(v.kind, Kind::Spm);
        assert_eq!(
            (v.specials.bos, v.specials.eos, v.specials.unk),
            (Some(1), Some(2), Some(0))
        );
        assert!(v.add_bos && !v.add_eos && v.add_space_prefix);
        assert_eq!(v.attrs[0], ATTR_UNKNOWN);
        // </s> is end-of-generation by its text, and as EOS.
        assert!(v.eog.contains(&2));
    }

    #[test]
    fn special_ids_out_of_range_fall_back_like_llama_cpp() {
        let mut md = spm();
        md.set("tokenizer.ggml.bos_token_id", Value::U32(99));
        md.set("tokenizer.ggml.eos_token_id", Value::U32(4));
        let v = Vocab::load(&md).unwrap();
        assert_eq!(
            v.specials.bos,
            Some(1),
            "an out-of-range id keeps the default"
        );
        assert_eq!(v.specials.eos, Some(4));
    }

    #[test]
    fn odd_metadata_gets_errors_naming_the_key() {
        let mut md = spm();
        md.remove(KEY_MODEL);
        assert_eq!(err(&md), "metadata key 'tokenizer.ggml.model' is missing");

        let mut md = spm();
        md.remove(KEY_TOKENS);
        assert_eq!(err(&md), "metadata key 'tokenizer.ggml.tokens' is missing");

        let mut md = spm();
        md.set(KEY_TOKENS, Value::Array(Array::U32(vec![1, 2])));
        assert!(err(&md).starts_with("metadata key 'tokenizer.ggml.tokens' has type array[u32]"));

        let mut md = spm();
        md.set(KEY_SCORES, Value::Array(Array::F32(vec![0.0; 3])));
        assert_eq!(
            err(&md),
            "metadata key 'tokenizer.ggml.scores' has 3 entries, but the vocabulary has 6 tokens"
        );

        let mut md = spm();
        md.set(KEY_SCORES, Value::F32(1.0));
        assert!(
            err(&md).contains("'tokenizer.ggml.scores' has type f32"),
            "{}",
            err(&md)
        );

        let mut md = spm();
        md.set(KEY_TOKEN_TYPE, Value::Array(Array::U8(vec![1; 6])));
        assert!(err(&md)
            .contains("'tokenizer.ggml.token_type' has type array[u8], expected array[i32]"));

        let mut md = spm();
        md.set("tokenizer.ggml.bos_token_id", Value::I32(1));
        assert!(err(&md).contains("'tokenizer.ggml.bos_token_id' has type i32, expected u32"));

        let mut md = spm();
        md.set("tokenizer.ggml.add_bos_token", Value::U8(1));
        assert!(err(&md).contains("'tokenizer.ggml.add_bos_token' has type u8, expected bool"));

        let mut md = spm();
        md.set(
            KEY_SCORES,
            Value::Array(Array::F32(vec![0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0])),
        );
        assert_eq!(
            err(&md),
            "metadata key 'tokenizer.ggml.scores' has NaN for token 3"
        );

        let mut md = spm();
        let dup = ["<unk>", "a", "a"].iter().map(|t| t.to_string()).collect();
        md.set(KEY_TOKENS, Value::Array(Array::String(dup)));
        assert!(
            err(&md).contains("has the text \"a\" twice (tokens 1 and 2)"),
            "{}",
            err(&md)
        );

        let mut md = spm();
        md.set(KEY_MODEL, Value::String("bert".into()));
        assert_eq!(err(&md), "tokenizer 'bert' is not supported; pass --tokens");

        let mut md = spm();
        md.set(KEY_MODEL, Value::String("gpt2".into()));
        assert_eq!(err(&md), "metadata key 'tokenizer.ggml.merges' is missing");

        let mut md = spm();
        md.set(KEY_MODEL, Value::String("none".into()));
        assert!(err(&md).starts_with("the model has no vocabulary"));

        let mut md = spm();
        md.set("general.name", Value::String("Phi-3 mini".into()));
        assert!(
            err(&md).contains("need token \"<|endoftext|>\""),
            "{}",
            err(&md)
        );
    }

    #[test]
    fn merges_split_at_the_first_space_after_the_first_byte() {
        assert_eq!(split_merge("Ġ t"), ("Ġ".into(), "t".into()));
        assert_eq!(split_merge("  x"), (" ".into(), "x".into()));
        assert_eq!(split_merge("ab"), ("".into(), "".into()));
        assert_eq!(split_merge(""), ("".into(), "".into()));
    }
}
