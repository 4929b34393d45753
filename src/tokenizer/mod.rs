//! Text to token ids and back, from a GGUF's own metadata (`tokenizer.ggml.*`), giving exactly the ids
//! llama.cpp gives: `llama_tokenize(text, add_special, parse_special)`, `llama_token_to_piece` and
//! `llama_detokenize`, as in the llama.cpp that llama-cpp-python 0.3.36 vendors.
//!
//! ```no_run
//! use gguf_lora::gguf::GgufFile;
//! use gguf_lora::tokenizer::Tokenizer;
//!
//! let file = GgufFile::open("model.gguf")?;
//! let tok = Tokenizer::from_metadata(file.metadata())?;
//! let ids = tok.tokenize(b"Hello world", true, false)?;
//! let text = tok.detokenize(&ids, false, false)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Reproduced: tokenizer model `llama` (SentencePiece-style merging by score with byte fallback, as
//! in Llama 2, Mistral, Gemma 1-3, Phi-3) and `gpt2` (byte-level BPE) with every pre-tokenizer of
//! llama.cpp's table except `superbpe` and `whitespace`; special-token splitting with llama.cpp's
//! rules (longest special text first; control tokens only when parsing specials; LSTRIP/RSTRIP),
//! BOS/EOS as the metadata says, and decoding with llama.cpp's space and clean-up rules. Other models
//! (`bert`, `t5`, `rwkv`, `plamo2`, `gemma4`, ...) are refused with [`TokenizerError::Unsupported`].
//!
//! Why our own code rather than the `tokenizers` crate (which mistral.rs builds from GGUF metadata):
//! llama.cpp's SentencePiece path is not any `tokenizers` model ([`spm`]), its BPE fallbacks differ
//! from `tokenizers`' ([`bpe`]), and its pre-tokenizers are hand-written splitters and `std::regex`
//! over llama.cpp's own Unicode tables ([`pretokenize`], [`ecma`], [`unicode`]), which `tokenizers`'
//! regexes (Unicode-aware, other Unicode version) do not reproduce: e.g. in `std::regex` `\s` is ASCII
//! whitespace plus what llama.cpp maps to 0x0B, and the Llama 3 splitter's punctuation rule tests
//! the current character where the regex it stands for tests the next. The pieces that are general
//! machinery come from crates: `fancy-regex` runs the regexes, `aho-corasick` finds which special
//! tokens occur at all.
//!
//! Where llama.cpp aborts the process (a byte the vocabulary cannot express, a malformed 4-byte UTF-8
//! sequence in BPE input, asking for a BOS the model lacks, an out-of-range id), we return an error.

mod bpe;
mod ecma;
mod error;
mod pretokenize;
mod spm;
mod unicode;
mod unicode_data;
mod vocab;

use std::collections::BTreeSet;

use aho_corasick::AhoCorasick;

pub use error::{Result, TokenizerError};
pub use vocab::{Kind, Specials};

use pretokenize::{PreTokenizer, SplitError};
use vocab::{
    Vocab, ATTR_BYTE, ATTR_CONTROL, ATTR_LSTRIP, ATTR_NORMAL, ATTR_RSTRIP, ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
};

use crate::gguf::Metadata;

/// Every pre-tokenizer regex we copied from llama.cpp, for the test that checks them against
/// llama.cpp's source; not part of the API.
#[doc(hidden)]
pub fn pre_tokenizer_regexes() -> Vec<String> {
    pretokenize::all_regexes()
}

/// A tokenizer built from GGUF metadata.
pub struct Tokenizer {
    vocab: Vocab,
    /// BPE only: the pre-tokenizer and the merge rules.
    bpe: Option<(PreTokenizer, bpe::Merges)>,
    /// Control, user-defined and unknown tokens, longest text first (`cache_special_tokens`).
    special_cache: Vec<u32>,
    /// Finds which special tokens occur in a text (patterns in `special_cache` order); `None` if the
    /// automaton could not be built, and then every special token is searched for.
    special_finder: Option<AhoCorasick>,
    /// `token_to_piece(id, special = true)` for every token (`cache_token_to_piece`).
    pieces: Vec<Vec<u8>>,
}

/// A piece of input after special-token splitting.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    Text { start: usize, end: usize },
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer llama.cpp would build for a model with this metadata.
    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer> {
        let vocab = Vocab::load(md)?;
        let bpe = match vocab.kind {
            Kind::Spm => None,
            Kind::Bpe => {
                let pre = PreTokenizer::new(vocab.pre_type).map_err(|why| {
                    TokenizerError::Unsupported {
                        name: format!("gpt2 with pre-tokenizer '{}' ({why})", vocab.pre),
                    }
                })?;
                Some((pre, bpe::Merges::new(&vocab)))
            }
        };
        let n = vocab.texts.len();
        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                vocab.attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        // llama.cpp's std::sort is not stable; equal lengths keep id order here, which matters only
        // for two different special texts of the same length that overlap in the input.
        special_cache.sort_by_key(|&id| std::cmp::Reverse(vocab.texts[id as usize].len()));
        let special_finder = if special_cache.is_empty() {
            None
        } else {
            AhoCorasick::new(
                special_cache
                    .iter()
                    .map(|&id| vocab.texts[id as usize].as_bytes()),
            )
            .ok()
        };
        let mut tok = Tokenizer {
            vocab,
            bpe,
            special_cache,
            special_finder,
            pieces: Vec::new(),
        };
        let mut pieces = Vec::with_capacity(n);
        for id in 0..n as u32 {
            pieces.push(tok.piece_uncached(id)?);
        }
        tok.pieces = pieces;
        Ok(tok)
    }

    /// Number of tokens in the vocabulary.
    pub fn n_tokens(&self) -> usize {
        self.vocab.texts.len()
    }

    /// `llama` (SentencePiece-style) or `gpt2` (BPE).
    pub fn kind(&self) -> Kind {
        self.vocab.kind
    }

    /// `tokenizer.ggml.model` and `tokenizer.ggml.pre` as given.
    pub fn model_name(&self) -> (&str, &str) {
        (&self.vocab.model, &self.vocab.pre)
    }

    /// The special token ids after llama.cpp's defaults, metadata and text-based detection.
    pub fn specials(&self) -> &Specials {
        &self.vocab.specials
    }

    /// Whether `tokenize(.., add_special = true, ..)` adds BOS / EOS.
    pub fn adds_bos(&self) -> bool {
        self.vocab.add_bos
    }
    pub fn adds_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// Tokens that end generation (`llama_vocab_is_eog`).
    pub fn eog(&self) -> &BTreeSet<u32> {
        &self.vocab.eog
    }

    /// A token's text as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Result<&str> {
        self.check(id)?;
        Ok(&self.vocab.texts[id as usize])
    }

    /// A token's `llama_token_attr` bits.
    pub fn token_attr(&self, id: u32) -> Result<u32> {
        self.check(id)?;
        Ok(self.vocab.attrs[id as usize])
    }

    fn check(&self, id: u32) -> Result<()> {
        if (id as usize) < self.n_tokens() {
            Ok(())
        } else {
            Err(TokenizerError::TokenOutOfRange {
                id: id.into(),
                n_tokens: self.n_tokens(),
            })
        }
    }

    /// `llama_tokenize(text, add_special, parse_special)`: BOS/EOS as the model says when
    /// `add_special`; control tokens written in the text become their ids only when `parse_special`
    /// (user-defined ones always do).
    pub fn tokenize(
        &self,
        text: &[u8],
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let fragments = self.partition(text, parse_special);
        let v = &self.vocab;
        let mut out = Vec::new();
        let bos = || {
            v.specials.bos.ok_or(TokenizerError::MissingSpecial {
                which: "BOS",
                which_lower: "bos",
            })
        };
        let eos = || {
            v.specials.eos.ok_or(TokenizerError::MissingSpecial {
                which: "EOS",
                which_lower: "eos",
            })
        };
        if add_special && v.add_bos {
            out.push(bos()?);
        }
        match &self.bpe {
            None => {
                // A space before the text that starts the input or follows a special token.
                let mut prev_special = true;
                let mut buf = Vec::new();
                for f in fragments {
                    match f {
                        Fragment::Text { start, end } => {
                            buf.clear();
                            if v.add_space_prefix && prev_special {
                                buf.extend_from_slice("\u{2581}".as_bytes());
                            }
                            escape_spaces(&text[start..end], &mut buf);
                            spm::tokenize(v, &buf, &mut out)?;
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Some((pre, merges)) => {
                let mut session = bpe::Session::default();
                let mut buf = Vec::new();
                for f in fragments {
                    match f {
                        Fragment::Text { start, end } => {
                            let raw = &text[start..end];
                            let piece = if v.escape_whitespaces {
                                buf.clear();
                                escape_spaces(raw, &mut buf);
                                &buf[..]
                            } else {
                                raw
                            };
                            let words = pre.split(piece).map_err(|e| match e {
                                SplitError::InvalidCodepoint => TokenizerError::InvalidCodepoint,
                                SplitError::Regex(detail) => TokenizerError::Regex { detail },
                            })?;
                            for w in &words {
                                session.word(v, merges, pre.byte_encode, w, &mut out);
                            }
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && v.add_eos {
            out.push(eos()?);
        }
        Ok(out)
    }

    /// `tokenizer_st_partition`: for each special token, longest text first, splits every remaining
    /// text fragment at each occurrence, stripping whitespace beside tokens marked LSTRIP/RSTRIP.
    fn partition(&self, text: &[u8], parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text {
            start: 0,
            end: text.len(),
        }];
        let finder = &self.special_finder;
        // Only tokens that occur somewhere in the text can split a fragment (each fragment is a
        // substring of it); llama.cpp scans for every special token, which is the same result.
        let present = match finder {
            Some(f) => {
                let mut present = vec![false; self.special_cache.len()];
                for m in f.find_overlapping_iter(text) {
                    present[m.pattern().as_usize()] = true;
                }
                present
            }
            None => vec![true; self.special_cache.len()],
        };
        for (k, &id) in self.special_cache.iter().enumerate() {
            let attr = self.vocab.attrs[id as usize];
            if !present[k] || (!parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0) {
                continue;
            }
            let needle = self.vocab.texts[id as usize].as_bytes();
            let finder = memchr::memmem::Finder::new(needle);
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text { start, end } = f else {
                    next.push(f);
                    continue;
                };
                let mut pos = start;
                loop {
                    let Some(m) = finder.find(&text[pos..end]).map(|i| i + pos) else {
                        if pos < end {
                            next.push(Fragment::Text { start: pos, end });
                        }
                        break;
                    };
                    let mut left_end = m;
                    if attr & ATTR_LSTRIP != 0 {
                        while left_end > pos && is_c_space(text[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > pos {
                        next.push(Fragment::Text {
                            start: pos,
                            end: left_end,
                        });
                    }
                    next.push(Fragment::Token(id));
                    pos = m + needle.len();
                    if attr & ATTR_RSTRIP != 0 {
                        while pos < end && is_c_space(text[pos]) {
                            pos += 1;
                        }
                    }
                }
            }
            fragments = next;
        }
        fragments
    }

    /// `llama_token_to_piece(id, lstrip = 0, special)`: the bytes a token stands for (possibly part
    /// of a UTF-8 sequence); empty for control and unknown tokens unless `special`.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<&[u8]> {
        self.check(id)?;
        let attr = self.vocab.attrs[id as usize];
        if !special && attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
            return Ok(&[]);
        }
        Ok(&self.pieces[id as usize])
    }

    /// The piece as llama.cpp computes it for its cache (`special = true`).
    fn piece_uncached(&self, id: u32) -> Result<Vec<u8>> {
        let v = &self.vocab;
        let attr = v.attrs[id as usize];
        let text = &v.texts[id as usize];
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return Ok(text.as_bytes().to_vec());
        }
        if attr & ATTR_NORMAL != 0 {
            return Ok(if v.kind == Kind::Spm || v.escape_whitespaces {
                text.replace('\u{2581}', " ").into_bytes()
            } else {
                decode_byte_level(text)
            });
        }
        if attr & ATTR_BYTE != 0 {
            return Ok(vec![token_to_byte(id, text)?]);
        }
        Ok(Vec::new())
    }

    /// `llama_detokenize(tokens, remove_special, unparse_special)`: the pieces joined, minus the
    /// leading space the tokenizer adds (SPM), minus BOS/EOS when `remove_special`, and with
    /// llama.cpp's clean-up of spaces before punctuation and contractions for the BPE models that ask
    /// for it.
    pub fn detokenize(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>> {
        let v = &self.vocab;
        let mut ids = ids;
        let mut remove_space = v.add_space_prefix;
        if remove_special && v.add_bos && !ids.is_empty() && Some(ids[0]) == v.specials.bos {
            remove_space = false;
            ids = &ids[1..];
        }
        if remove_special && v.add_eos && ids.last().copied() == v.specials.eos && !ids.is_empty() {
            ids = &ids[..ids.len() - 1];
        }
        let mut text = Vec::new();
        for &id in ids {
            let mut piece = self.token_to_piece(id, unparse_special)?;
            if remove_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if v.clean_spaces {
            clean_up_spaces(&mut text);
        }
        Ok(text)
    }
}

/// `llama_escape_whitespace`: spaces become U+2581.
fn escape_spaces(text: &[u8], out: &mut Vec<u8>) {
    for &b in text {
        if b == b' ' {
            out.extend_from_slice("\u{2581}".as_bytes());
        } else {
            out.push(b);
        }
    }
}

/// C `isspace` in the C locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// `llama_decode_text`: GPT-2 alphabet back to bytes; a character outside it becomes
/// `[UNK_BYTE_0x..<token text>]`, as llama.cpp writes it.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match unicode::char_to_byte(c as u32) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// `token_to_byte`: `strtol(text.substr(3, 2), NULL, 16)` (the `XX` of `<0xXX>`), truncated to a byte.
fn token_to_byte(id: u32, text: &str) -> Result<u8> {
    let b = text.as_bytes();
    if b.len() < 3 {
        return Err(TokenizerError::BadByteToken {
            id,
            text: text.to_string(),
        });
    }
    let digits = &b[3..b.len().min(5)];
    // strtol: leading whitespace, a sign, then hex digits (a "0x" prefix needs a digit after it,
    // which two characters cannot hold beyond "0x" itself, read as 0).
    let mut i = 0;
    while i < digits.len() && is_c_space(digits[i]) {
        i += 1;
    }
    let neg = i < digits.len() && digits[i] == b'-';
    if i < digits.len() && (digits[i] == b'-' || digits[i] == b'+') {
        i += 1;
    }
    let mut value: i64 = 0;
    while i < digits.len() {
        match (digits[i] as char).to_digit(16) {
            Some(d) => value = value * 16 + d as i64,
            None => break,
        }
        i += 1;
    }
    Ok((if neg { -value } else { value }) as u8)
}

/// The three clean-up passes of `llama_detokenize` (`clean_spaces`), index for index: drop a space
/// before `?!.,`, around a lone apostrophe, and before `'s 'm 're 've`. Like llama.cpp, each pass reads
/// the previous input character, not the previous output character.
fn clean_up_spaces(text: &mut Vec<u8>) {
    let t = text;
    // Pass 1.
    let total1 = t.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    // Pass 2.
    let total2 = total;
    total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = t[i];
        if x == b'\'' && i + 1 < total2 && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    // Pass 3.
    let total3 = total;
    total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < total3 {
                let x2 = t[i + 2];
                if x2 == b'e' && (x1 == b'r' || x1 == b'v') {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Array, Value};

    fn strings(xs: &[&str]) -> Value {
        Value::Array(Array::String(xs.iter().map(|s| s.to_string()).collect()))
    }

    /// A byte-level BPE vocabulary `a b c ab abc Ġ` with merges `a b`, `ab c`.
    fn bpe(pre: &str) -> Metadata {
        let mut md = Metadata::new();
        md.set("tokenizer.ggml.model", Value::String("gpt2".into()));
        md.set("tokenizer.ggml.pre", Value::String(pre.into()));
        md.set(
            "tokenizer.ggml.tokens",
            strings(&["a", "b", "c", "ab", "abc", "Ġ", "<|x|>"]),
        );
        md.set("tokenizer.ggml.merges", strings(&["a b", "ab c"]));
        md.set(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vec![1, 1, 1, 1, 1, 1, 3])),
        );
        md
    }

    #[test]
    fn bpe_merges_and_drops_unknown_bytes() {
        let tok = Tokenizer::from_metadata(&bpe("gpt-2")).unwrap();
        assert_eq!(tok.tokenize(b"abc", false, false).unwrap(), [4]);
        // "x" has no token and no byte token: llama.cpp drops it; the space becomes Ġ.
        assert_eq!(tok.tokenize(b"ab x c", false, false).unwrap(), [3, 5, 5, 2]);
        assert_eq!(tok.tokenize(b"a<|x|>b", false, true).unwrap(), [0, 6, 1]);
        assert_eq!(
            tok.detokenize(&[4, 5, 6], false, true).unwrap(),
            b"abc <|x|>"
        );
        assert_eq!(tok.detokenize(&[4, 5, 6], false, false).unwrap(), b"abc ");
    }

    #[test]
    fn llama_cpp_aborts_become_errors() {
        let mut md = bpe("chatglm-bpe");
        md.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.specials().bos, None);
        let e = tok.tokenize(b"abc", true, false).unwrap_err().to_string();
        assert_eq!(
            e,
            "the model adds a BOS token (tokenizer.ggml.add_bos_token) but has none"
        );
        assert_eq!(tok.tokenize(b"abc", false, false).unwrap(), [4]);
        let e = tok
            .tokenize(b"a\xF5\x80\x80\x80", false, false)
            .unwrap_err();
        assert!(matches!(e, TokenizerError::InvalidCodepoint), "{e}");
        let e = tok.detokenize(&[7], false, false).unwrap_err().to_string();
        assert_eq!(e, "token id 7 is out of range: the vocabulary has 7 tokens");
        assert!(tok.token_to_piece(u32::MAX, true).is_err());
    }

    fn clean(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_up_follows_llama_cpp() {
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it 's a ' b"), "it's a'b");
        assert_eq!(clean("we 're they 'll I 'd"), "we're they 'll I 'd");
        assert_eq!(clean(""), "");
        assert_eq!(clean(" ."), ".");
    }

    #[test]
    fn byte_token_values_follow_strtol() {
        assert_eq!(token_to_byte(0, "<0x0A>").unwrap(), 0x0A);
        assert_eq!(token_to_byte(0, "<0xff>").unwrap(), 0xFF);
        assert_eq!(token_to_byte(0, "<0xZZ>").unwrap(), 0);
        assert_eq!(token_to_byte(0, "<0x").unwrap(), 0);
        assert!(token_to_byte(0, "<0").is_err());
    }
}
