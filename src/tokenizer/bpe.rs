//! llama.cpp's BPE tokenizer (`llm_tokenizer_bpe_session`): pre-tokenize into words, split each word
//! into UTF-8 characters, repeatedly merge the adjacent pair with the lowest merge rank (ties to the
//! leftmost), and emit each final symbol as its token, or byte by byte, silently dropping bytes the
//! vocabulary cannot express.
//!
//! Why not the `tokenizers` crate's `BPE` model: it refuses merge rules whose result is not in the
//! vocabulary and maps unknown symbols to an unknown token, where llama.cpp merges anyway and falls
//! back to (or drops) single bytes; and its pre-tokenizers are not llama.cpp's (see
//! [`super::pretokenize`]). The merge loop itself is small, so we keep llama.cpp's exact rules.
//!
//! llama.cpp looks merges up by the strings of both symbols. We intern every string that occurs in a
//! merge rule once, so the loop works on ids: a symbol whose text is not interned can take part in
//! no merge, and a pair's validity check (its texts unchanged) is its two ids unchanged.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::PreType;
use super::unicode::utf8_len;
use super::vocab::Vocab;

/// The merge rules as ids.
pub(super) struct Merges {
    /// Every string that is the left or right side or the result of a rule.
    piece_ids: HashMap<Vec<u8>, u32>,
    /// `(left, right)` → `(rank, merged piece)`; the first rule for a pair wins, as in llama.cpp.
    pairs: HashMap<(u32, u32), (u32, u32)>,
    /// The token of each interned piece, if it is one.
    piece_token: Vec<Option<u32>>,
}

impl Merges {
    pub fn new(vocab: &Vocab) -> Merges {
        let mut piece_ids: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut intern = |s: Vec<u8>| -> u32 {
            let next = piece_ids.len() as u32;
            *piece_ids.entry(s).or_insert(next)
        };
        let mut pairs = HashMap::with_capacity(vocab.merges.len());
        for (rank, (l, r)) in vocab.merges.iter().enumerate() {
            if l.is_empty() && r.is_empty() {
                continue;
            }
            let a = intern(l.as_bytes().to_vec());
            let b = intern(r.as_bytes().to_vec());
            let ab = intern([l.as_bytes(), r.as_bytes()].concat());
            pairs.entry((a, b)).or_insert((rank as u32, ab));
        }
        let mut piece_token = vec![None; piece_ids.len()];
        for (text, &id) in &piece_ids {
            piece_token[id as usize] = vocab.id(text);
        }
        Merges {
            piece_ids,
            pairs,
            piece_token,
        }
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    prev: i32,
    next: i32,
    start: usize,
    n: usize,
    /// The interned id of this symbol's text, if it has one.
    piece: Option<u32>,
}

/// A queued merge: `(rank, left index, right index, left piece, right piece)`, lowest rank first,
/// then leftmost (`llm_bigram_bpe::comparator`).
type QueuedMerge = Reverse<(u32, i32, i32, u32, u32)>;

/// Reused buffers for one tokenization.
#[derive(Default)]
pub(super) struct Session {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<QueuedMerge>,
}

impl Session {
    /// Tokenizes one pre-tokenized word into `out`.
    pub fn word(
        &mut self,
        vocab: &Vocab,
        merges: &Merges,
        byte_encode: bool,
        word: &[u8],
        out: &mut Vec<u32>,
    ) {
        self.symbols.clear();
        self.queue.clear();
        let whole = |w: &[u8]| vocab.id(w);
        let mut offset = 0;
        let whole_word = (vocab.ignore_merges && whole(word).is_some())
            || (vocab.pre_type == PreType::Gemma4
                && word.iter().all(|&b| b == b'\n')
                && whole(word).is_some());
        if whole_word {
            self.symbols.push(Symbol {
                prev: -1,
                next: -1,
                start: 0,
                n: word.len(),
                piece: merges.piece_ids.get(word).copied(),
            });
            offset = word.len();
        }
        while offset < word.len() {
            let n = utf8_len(word[offset]).min(word.len() - offset);
            let index = self.symbols.len() as i32;
            self.symbols.push(Symbol {
                prev: index - 1,
                next: if offset + n == word.len() {
                    -1
                } else {
                    index + 1
                },
                start: offset,
                n,
                piece: merges.piece_ids.get(&word[offset..offset + n]).copied(),
            });
            offset += n;
        }
        for i in 1..self.symbols.len() as i32 {
            self.add_bigram(merges, i - 1, i);
        }
        while let Some(Reverse((_, left, right, lp, rp))) = self.queue.pop() {
            let (l, r) = (left as usize, right as usize);
            let (ls, rs) = (self.symbols[l], self.symbols[r]);
            if ls.n == 0 || rs.n == 0 || ls.piece != Some(lp) || rs.piece != Some(rp) {
                continue;
            }
            let merged = merges.pairs.get(&(lp, rp)).map(|&(_, ab)| ab);
            let s = &mut self.symbols;
            s[l].n += rs.n;
            s[l].piece = merged;
            s[r].n = 0;
            s[l].next = rs.next;
            if rs.next >= 0 {
                s[rs.next as usize].prev = left;
            }
            let (prev, next) = (s[l].prev, s[l].next);
            self.add_bigram(merges, prev, left);
            self.add_bigram(merges, left, next);
        }
        for s in self.symbols.iter().filter(|s| s.n > 0) {
            let text = &word[s.start..s.start + s.n];
            let token = match s.piece {
                Some(p) => merges.piece_token[p as usize],
                None => vocab.id(text),
            };
            match token {
                Some(t) => out.push(t),
                None => {
                    for &b in text {
                        let t = if byte_encode {
                            vocab.id(&[b])
                        } else {
                            vocab.id(format!("<0x{b:02X}>").as_bytes())
                        };
                        out.extend(t);
                    }
                }
            }
        }
    }

    fn add_bigram(&mut self, merges: &Merges, left: i32, right: i32) {
        if left == -1 || right == -1 {
            return;
        }
        let (Some(lp), Some(rp)) = (
            self.symbols[left as usize].piece,
            self.symbols[right as usize].piece,
        ) else {
            return;
        };
        if let Some(&(rank, _)) = merges.pairs.get(&(lp, rp)) {
            self.queue.push(Reverse((rank, left, right, lp, rp)));
        }
    }
}
