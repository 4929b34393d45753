//! The one error type of the tokenizer: metadata that cannot describe a vocabulary (each variant names
//! the key), tokenizers we do not reproduce, and inputs llama.cpp itself cannot encode (where it
//! aborts the process; we return an error instead).

use thiserror::Error;

/// What went wrong building a tokenizer from GGUF metadata or using it.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// A key llama.cpp requires is absent.
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    /// A key has a type llama.cpp refuses (its typed getters accept exactly one type).
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    /// A per-token array is shorter than the token list.
    #[error("metadata key '{key}' has {len} entries, but the vocabulary has {n_tokens} tokens")]
    TooShort {
        key: String,
        len: usize,
        n_tokens: usize,
    },
    /// A tokenizer model or pre-tokenizer that we do not reproduce exactly.
    #[error("tokenizer {name} is not supported; pass --tokens")]
    Unsupported { name: String },
    /// The GGUF says it has no vocabulary (`tokenizer.ggml.model` = `none`/`no_vocab`).
    #[error("the model has no vocabulary (tokenizer.ggml.model = '{model}'); pass --tokens")]
    NoVocabulary { model: String },
    /// Two tokens with the same text (llama.cpp asserts and aborts on this).
    #[error("metadata key 'tokenizer.ggml.tokens' has the text {text:?} twice (tokens {first} and {second})")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    /// More tokens than a 32-bit signed token id can address.
    #[error("metadata key 'tokenizer.ggml.tokens' has {n} tokens, more than llama.cpp's token ids can address")]
    TooManyTokens { n: usize },
    /// A NaN score: llama.cpp's merge order would then depend on its heap's internals.
    #[error("metadata key 'tokenizer.ggml.scores' has NaN for token {id}")]
    NanScore { id: u32 },
    /// A byte-typed token whose text is too short to hold `<0xXX>` (llama.cpp throws while loading).
    #[error("token {id} {text:?} has type BYTE (tokenizer.ggml.token_type) but is not of the form <0xXX>")]
    BadByteToken { id: u32, text: String },
    /// A token that llama.cpp's per-model attribute rules look up by text is absent (it throws).
    #[error("the model's name selects llama.cpp's {rule} token rules, which need token {token:?}; the vocabulary has none")]
    MissingRuleToken {
        rule: &'static str,
        token: &'static str,
    },
    /// A byte the vocabulary cannot express: no merged token, no `<0xXX>` byte token and no one-byte
    /// token (llama.cpp aborts with `std::out_of_range`).
    #[error("cannot tokenize byte 0x{byte:02X}{}: the vocabulary has no token for it and no byte token <0x{byte:02X}> (llama.cpp aborts on this input)", shown(*byte))]
    Unencodable { byte: u8 },
    /// A UTF-8 lead byte announcing a code point above U+10FFFF (llama.cpp aborts on it).
    #[error("the text has a malformed UTF-8 sequence for a code point above U+10FFFF (llama.cpp aborts on this input)")]
    InvalidCodepoint,
    /// The regex engine gave up on a pre-tokenizer regex (its backtracking limit).
    #[error("pre-tokenizer regex failed: {detail}")]
    Regex { detail: String },
    /// The model asks for a BOS/EOS token it does not have (llama.cpp asserts).
    #[error(
        "the model adds a {which} token (tokenizer.ggml.add_{which_lower}_token) but has none"
    )]
    MissingSpecial {
        which: &'static str,
        which_lower: &'static str,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is out of range: the vocabulary has {n_tokens} tokens")]
    TokenOutOfRange { id: i64, n_tokens: usize },
}

/// ` ('H')` for a printable ASCII byte, nothing otherwise.
fn shown(b: u8) -> String {
    if b.is_ascii_graphic() || b == b' ' {
        format!(" ({:?})", b as char)
    } else {
        String::new()
    }
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
