//! Code points the way llama.cpp's `src/unicode.cpp` sees them: its UTF-8 decoder (which replaces bad
//! bytes with U+FFFD one byte at a time but lets through surrogates and values above U+10FFFF), its
//! category flags from its own tables ([`super::unicode_data`]), its lowercase map, and GPT-2's
//! byte-to-character map.

use std::sync::OnceLock;

use super::unicode_data::{FLAG_RANGES, LOWERCASE, WHITESPACE};

/// `unicode_cpt_flags` bits, exactly llama.cpp's values.
pub(super) const UNDEFINED: u16 = 0x0001;
pub(super) const NUMBER: u16 = 0x0002;
pub(super) const LETTER: u16 = 0x0004;
#[cfg(test)]
pub(super) const SEPARATOR: u16 = 0x0008;
pub(super) const ACCENT_MARK: u16 = 0x0010;
pub(super) const PUNCTUATION: u16 = 0x0020;
pub(super) const SYMBOL: u16 = 0x0040;
#[cfg(test)]
pub(super) const CONTROL: u16 = 0x0080;
pub(super) const MASK_CATEGORIES: u16 = 0x00FF;
pub(super) const WHITESPACE_FLAG: u16 = 0x0100;

/// One past the largest code point (`MAX_CODEPOINTS`).
pub(super) const MAX_CODEPOINTS: u32 = 0x110000;

/// The replacement character llama.cpp substitutes for each byte it cannot decode.
pub(super) const REPLACEMENT: u32 = 0xFFFD;

/// Flags of one code point (`unicode_cpt_flags`): a category bit, plus [`WHITESPACE_FLAG`]. The empty
/// value (0) is what llama.cpp's splitters see outside the current segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Flags(pub u16);

impl Flags {
    pub fn is_number(self) -> bool {
        self.0 & NUMBER != 0
    }
    pub fn is_letter(self) -> bool {
        self.0 & LETTER != 0
    }
    pub fn is_accent_mark(self) -> bool {
        self.0 & ACCENT_MARK != 0
    }
    pub fn is_whitespace(self) -> bool {
        self.0 & WHITESPACE_FLAG != 0
    }
    /// `as_uint() != 0`: false only for the empty value.
    pub fn is_set(self) -> bool {
        self.0 != 0
    }
    pub fn category(self) -> u16 {
        self.0 & MASK_CATEGORIES
    }
}

/// llama.cpp's per-code-point flag array (`unicode_cpt_flags_array`), built once: 0x110000 entries,
/// as llama.cpp does, because a lookup per code point is the pre-tokenizers' inner loop. The lowercase,
/// uppercase and NFD bits are left out: no tokenizer we reproduce reads them.
fn table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![UNDEFINED; MAX_CODEPOINTS as usize];
        for w in FLAG_RANGES.windows(2) {
            let (start, flags) = w[0];
            let end = w[1].0;
            t[start as usize..end as usize].fill(flags);
        }
        for &c in WHITESPACE.iter() {
            t[c as usize] |= WHITESPACE_FLAG;
        }
        t
    })
}

/// `unicode_cpt_flags_from_cpt`: code points past the table are UNDEFINED.
pub(super) fn flags(cpt: u32) -> Flags {
    Flags(table().get(cpt as usize).copied().unwrap_or(UNDEFINED))
}

/// `unicode_tolower`: the code point itself when the map has no entry.
pub(super) fn to_lower(cpt: u32) -> u32 {
    match LOWERCASE.binary_search_by_key(&cpt, |&(c, _)| c) {
        Ok(i) => LOWERCASE[i].1,
        Err(_) => cpt,
    }
}

/// `unicode_len_utf8`: the sequence length a lead byte announces (1 for continuation bytes).
pub(super) fn utf8_len(lead: u8) -> usize {
    const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(lead >> 4) as usize]
}

/// `unicode_cpts_from_utf8`: decodes like llama.cpp, which checks lead and continuation bits but not
/// overlong forms, surrogates or the U+10FFFF limit; a byte it cannot decode becomes U+FFFD and
/// decoding resumes at the next byte.
pub(super) fn decode(text: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let b0 = text[i];
        let cont = |k: usize| text.get(i + k).is_some_and(|&b| b & 0xC0 == 0x80);
        let (cpt, n) = if b0 & 0x80 == 0 {
            (b0 as u32, 1)
        } else if b0 & 0x40 == 0 {
            (REPLACEMENT, 1)
        } else if b0 & 0x20 == 0 {
            if cont(1) {
                (((b0 as u32 & 0x1F) << 6) | (text[i + 1] as u32 & 0x3F), 2)
            } else {
                (REPLACEMENT, 1)
            }
        } else if b0 & 0x10 == 0 {
            if cont(1) && cont(2) {
                let c = ((b0 as u32 & 0x0F) << 12)
                    | ((text[i + 1] as u32 & 0x3F) << 6)
                    | (text[i + 2] as u32 & 0x3F);
                (c, 3)
            } else {
                (REPLACEMENT, 1)
            }
        } else if b0 & 0x08 == 0 {
            if cont(1) && cont(2) && cont(3) {
                let c = ((b0 as u32 & 0x07) << 18)
                    | ((text[i + 1] as u32 & 0x3F) << 12)
                    | ((text[i + 2] as u32 & 0x3F) << 6)
                    | (text[i + 3] as u32 & 0x3F);
                (c, 4)
            } else {
                (REPLACEMENT, 1)
            }
        } else {
            (REPLACEMENT, 1)
        };
        out.push(cpt);
        i += n;
    }
    out
}

/// `unicode_cpt_to_utf8`, appending to `out`; `None` for code points above U+10FFFF, where llama.cpp
/// throws (and, inside `llama_tokenize`, aborts the process). Surrogates are encoded like any other
/// value, as llama.cpp does.
pub(super) fn encode_utf8(cpt: u32, out: &mut Vec<u8>) -> Option<()> {
    match cpt {
        0..=0x7F => out.push(cpt as u8),
        0x80..=0x7FF => {
            out.extend_from_slice(&[0xC0 | (cpt >> 6) as u8, 0x80 | (cpt & 0x3F) as u8])
        }
        0x800..=0xFFFF => out.extend_from_slice(&[
            0xE0 | (cpt >> 12) as u8,
            0x80 | ((cpt >> 6) & 0x3F) as u8,
            0x80 | (cpt & 0x3F) as u8,
        ]),
        0x10000..=0x10FFFF => out.extend_from_slice(&[
            0xF0 | (cpt >> 18) as u8,
            0x80 | ((cpt >> 12) & 0x3F) as u8,
            0x80 | ((cpt >> 6) & 0x3F) as u8,
            0x80 | (cpt & 0x3F) as u8,
        ]),
        _ => return None,
    }
    Some(())
}

/// GPT-2's byte-level alphabet (`unicode_byte_to_utf8_map`): printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100.. in byte order. Returns the byte → char table and the
/// inverse for U+0000..U+0143.
fn byte_alphabet() -> &'static ([char; 256], [Option<u8>; 0x144]) {
    static MAPS: OnceLock<([char; 256], [Option<u8>; 0x144])> = OnceLock::new();
    MAPS.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut to_byte = [None; 0x144];
        let mut n = 0u32;
        for b in 0..=255u8 {
            let keeps = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let c = if keeps {
                b as u32
            } else {
                n += 1;
                255 + n
            };
            to_char[b as usize] = char::from_u32(c).unwrap_or('\0');
            to_byte[c as usize] = Some(b);
        }
        (to_char, to_byte)
    })
}

/// The character standing for byte `b` in GPT-2's alphabet.
pub(super) fn byte_to_char(b: u8) -> char {
    byte_alphabet().0[b as usize]
}

/// The inverse of [`byte_to_char`] (`unicode_utf8_to_byte`); `None` for characters outside the
/// alphabet, where llama.cpp's lookup throws.
pub(super) fn char_to_byte(c: u32) -> Option<u8> {
    byte_alphabet().1.get(c as usize).copied().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_of_known_code_points() {
        assert!(flags('a' as u32).is_letter());
        assert!(flags('7' as u32).is_number());
        assert!(flags(' ' as u32).is_whitespace());
        assert!(flags(0x3000).is_whitespace());
        assert!(flags(0x4E2D).is_letter()); // 中
        assert!(flags(0x0301).is_accent_mark());
        assert_eq!(flags(0x0660).category(), NUMBER); // Arabic-Indic zero
        assert_eq!(flags(0x1F600).category(), SYMBOL); // emoji
        assert_eq!(flags(0x110000), Flags(UNDEFINED));
        assert_eq!(flags('!' as u32).category(), PUNCTUATION);
        assert_eq!(flags(0x0000).category(), CONTROL);
        assert_eq!(flags(0x00A0).category(), SEPARATOR);
    }

    #[test]
    fn decode_matches_llama_cpp_rules() {
        assert_eq!(
            decode("aé中😀".as_bytes()),
            vec![0x61, 0xE9, 0x4E2D, 0x1F600]
        );
        // A stray continuation byte and a truncated sequence each become one U+FFFD per byte.
        assert_eq!(
            decode(b"\x80a\xE4\xB8"),
            vec![REPLACEMENT, 0x61, REPLACEMENT, REPLACEMENT]
        );
        // Surrogates and values above U+10FFFF pass the decoder, as in llama.cpp.
        assert_eq!(decode(b"\xED\xA0\x80"), vec![0xD800]);
        assert_eq!(decode(b"\xF7\xBF\xBF\xBF"), vec![0x1FFFFF]);
        let mut v = Vec::new();
        assert!(encode_utf8(0x1FFFFF, &mut v).is_none());
    }

    #[test]
    fn byte_alphabet_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b) as u32), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(to_lower('S' as u32), 's' as u32);
        assert_eq!(to_lower('s' as u32), 's' as u32);
    }
}
