//! llama.cpp's SentencePiece-style tokenizer (`llm_tokenizer_spm_session`): start from UTF-8
//! characters, repeatedly merge the adjacent pair whose concatenation is the highest-scoring token
//! (ties to the leftmost), then emit each symbol as its token or, if it is none, as byte tokens.
//!
//! Why not a `tokenizers` model: its `Unigram` picks the segmentation with the best total score
//! (Viterbi) and its `BPE` merges by a ranked merge list; this greedy merge-by-token-score is neither,
//! and gives different ids on the same vocabulary.
//!
//! llama.cpp also keeps a `rev_merge` map to re-split symbols that are not tokens; it is never used,
//! since a merged symbol is a token by construction and an unmerged one (one character) can never
//! equal the text of a recorded pair, so we leave it out.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::error::{Result, TokenizerError};
use super::unicode::utf8_len;
use super::vocab::Vocab;

#[derive(Clone, Copy)]
struct Symbol {
    prev: i32,
    next: i32,
    start: usize,
    n: usize,
}

/// A candidate merge; the heap's top is the highest score, then the lowest left index
/// (`llm_bigram_spm::comparator`). Scores are never NaN (refused when loading).
struct Bigram {
    score: f32,
    left: i32,
    right: i32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Tokenizes `text` (already whitespace-escaped, non-empty) into `out`.
pub(super) fn tokenize(vocab: &Vocab, text: &[u8], out: &mut Vec<u32>) -> Result<()> {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    let mut offs = 0;
    while offs < text.len() {
        let n = utf8_len(text[offs]).min(text.len() - offs);
        let index = symbols.len() as i32;
        offs += n;
        symbols.push(Symbol {
            prev: index - 1,
            next: if offs == text.len() { -1 } else { index + 1 },
            start: offs - n,
            n,
        });
    }
    if symbols.is_empty() {
        return Ok(());
    }
    let mut queue = BinaryHeap::new();
    let try_add = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: i32, right: i32| {
        if left == -1 || right == -1 {
            return;
        }
        let l = symbols[left as usize];
        let r = symbols[right as usize];
        let piece = &text[l.start..l.start + l.n + r.n];
        if let Some(id) = vocab.id(piece) {
            queue.push(Bigram {
                score: vocab.scores[id as usize],
                left,
                right,
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() as i32 {
        try_add(&symbols, &mut queue, i - 1, i);
    }
    while let Some(b) = queue.pop() {
        let (l, r) = (b.left as usize, b.right as usize);
        if symbols[l].n == 0 || symbols[r].n == 0 || symbols[l].n + symbols[r].n != b.size {
            continue;
        }
        symbols[l].n += symbols[r].n;
        symbols[r].n = 0;
        symbols[l].next = symbols[r].next;
        let after = symbols[r].next;
        if after >= 0 {
            symbols[after as usize].prev = b.left;
        }
        let (prev, next) = (symbols[l].prev, symbols[l].next);
        try_add(&symbols, &mut queue, prev, b.left);
        try_add(&symbols, &mut queue, b.left, next);
    }
    let mut i = 0i32;
    while i != -1 {
        let s = symbols[i as usize];
        let piece = &text[s.start..s.start + s.n];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece {
                    out.push(byte_token(vocab, b)?);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}

/// `llama_vocab::byte_to_token` for SPM: `<0xXX>`, else the one-byte token; llama.cpp throws (and
/// aborts) when neither exists.
fn byte_token(vocab: &Vocab, b: u8) -> Result<u32> {
    let hex = format!("<0x{b:02X}>");
    vocab
        .id(hex.as_bytes())
        .or_else(|| vocab.id(&[b]))
        .ok_or(TokenizerError::Unencodable { byte: b })
}
