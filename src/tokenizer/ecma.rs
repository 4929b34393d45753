//! llama.cpp's general-purpose pre-tokenizer regexes: C++ `std::regex` (ECMAScript grammar, classic
//! "C" locale) run over llama.cpp's "collapsed" text, emulated with `fancy-regex`.
//!
//! For a regex that names Unicode categories (`\p{L}` ...), llama.cpp (`unicode_regex_split`) does not
//! use Unicode-aware matching: it rewrites every code point above U+007F to one byte standing for its
//! category (0xD1 number, 0xD2 letter, 0xD3 punctuation, 0xD4 mark, 0xD5 symbol, 0xD0 anything else,
//! 0x0B for whitespace) and each `\p{X}` in the regex to `[<that byte><the ASCII members of X>]`. Regexes
//! without categories run as `std::wregex` over the code points, with non-ASCII whitespace turned into
//! 0x0B. Either way `\s` is ASCII-only (classic locale). We do the same rewriting with private-use
//! characters U+E0D0..U+E0D5 in place of the bytes, parse the ECMAScript pattern and re-emit it for
//! `fancy-regex` with every class spelled out as explicit code-point ranges, so no escape or class means
//! something different in the two dialects. `fancy-regex` is a backtracking engine for the lookarounds
//! (`(?!\S)`, `(?=[\p{L}])`) with the same leftmost, ordered-alternation semantics as ECMAScript.

use super::unicode::{flags, ACCENT_MARK, LETTER, NUMBER, PUNCTUATION, REPLACEMENT, SYMBOL};

/// The code point standing for a collapsed category (llama.cpp's byte 0xD0 + k).
const PLACEHOLDER_BASE: u32 = 0xE0D0;

/// `k_ucat_enum`: the category names llama.cpp collapses, with their flag.
const CATEGORY_NAMES: [(&str, u16); 10] = [
    ("\\p{N}", NUMBER),
    ("\\p{L}", LETTER),
    ("\\p{P}", PUNCTUATION),
    ("\\p{M}", ACCENT_MARK),
    ("\\p{S}", SYMBOL),
    ("\\p{Lu}", LETTER),
    ("\\p{Ll}", LETTER),
    ("\\p{Lt}", LETTER),
    ("\\p{Lm}", LETTER),
    ("\\p{Lo}", LETTER),
];

/// `k_ucat_cpt` (as an offset from 0xD0) and `k_ucat_map` (the ASCII members, in regex class syntax).
fn category_class(flag: u16) -> (u32, &'static str) {
    match flag {
        NUMBER => (1, "0-9"),
        LETTER => (2, "A-Za-z"),
        PUNCTUATION => (3, "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"),
        ACCENT_MARK => (4, ""),
        _ => (5, "\\$\\+<->^`\\|\\~"),
    }
}

/// Whether llama.cpp runs `regex` on the collapsed text (it names a category).
fn uses_categories(regex: &str) -> bool {
    CATEGORY_NAMES.iter().any(|(name, _)| regex.contains(name))
}

/// llama.cpp's rewriting of a category regex (the loop in `unicode_regex_split`), character for
/// character, including its simple bracket tracking.
fn collapse_pattern(regex: &str) -> Result<String, String> {
    if !regex.is_ascii() {
        // llama.cpp throws here ("Regex includes both unicode categories and non-ASCII characters").
        return Err("the regex mixes Unicode categories and non-ASCII characters".into());
    }
    let b = regex.as_bytes();
    let mut out = String::new();
    let mut inside = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'[' && (i == 0 || b[i - 1] != b'\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && b[i] == b']' && b[i - 1] != b'\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'p' && b[i + 2] == b'{' {
            if let Some(close) = regex[i + 3..].find('}').map(|k| k + i + 3) {
                if close <= i + 10 {
                    let name = &regex[i..=close];
                    if let Some(&(_, flag)) = CATEGORY_NAMES.iter().find(|(n, _)| *n == name) {
                        let (k, ascii) = category_class(flag);
                        if !inside {
                            out.push('[');
                        }
                        out.push(char::from_u32(PLACEHOLDER_BASE + k).unwrap_or('\u{E0D0}'));
                        out.push_str(ascii);
                        if !inside {
                            out.push(']');
                        }
                        i = close + 1;
                        continue;
                    }
                }
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    Ok(out)
}

/// The character llama.cpp's collapsed text holds for code point `cpt`.
pub(super) fn collapsed_char(cpt: u32) -> char {
    if cpt < 128 {
        return char::from(cpt as u8);
    }
    let f = flags(cpt);
    if f.is_whitespace() {
        return '\u{0B}';
    }
    let k = match f.category() {
        NUMBER => 1,
        LETTER => 2,
        PUNCTUATION => 3,
        ACCENT_MARK => 4,
        SYMBOL => 5,
        _ => 0,
    };
    char::from_u32(PLACEHOLDER_BASE + k).unwrap_or('\u{E0D0}')
}

/// The character llama.cpp's wide text holds for code point `cpt`. Surrogates (possible only from
/// malformed UTF-8) cannot be in a Rust string; U+FFFD stands in, which every class llama.cpp uses
/// treats the same way (all exclude both, or the negated ones include both).
pub(super) fn wide_char(cpt: u32) -> char {
    if cpt > 0x7F && flags(cpt).is_whitespace() {
        return '\u{0B}';
    }
    char::from_u32(cpt).unwrap_or(char::from_u32(REPLACEMENT).unwrap_or('?'))
}

/// One compiled llama.cpp regex.
pub(super) struct EcmaRegex {
    re: fancy_regex::Regex,
    /// Run over the collapsed text ([`collapsed_char`]) rather than the wide text ([`wide_char`]).
    pub collapsed: bool,
}

impl EcmaRegex {
    /// Compiles `regex` (as written in llama.cpp's source) the way `unicode_regex_split` would use it.
    pub fn new(regex: &str) -> Result<EcmaRegex, String> {
        let collapsed = uses_categories(regex);
        let pattern = if collapsed {
            collapse_pattern(regex)?
        } else {
            regex.to_string()
        };
        let ast = Parser::new(&pattern).parse()?;
        let mut translated = String::new();
        emit(&ast, &mut translated);
        let re = fancy_regex::RegexBuilder::new(&translated)
            .backtrack_limit(100_000_000)
            .build()
            .map_err(|e| format!("cannot compile {translated:?}: {e}"))?;
        Ok(EcmaRegex { re, collapsed })
    }

    /// `unicode_regex_split_stl` over one segment: appends the lengths (in code points) of the
    /// unmatched gaps and the matches, in order.
    pub fn split_segment(&self, segment: &str, out: &mut Vec<usize>) -> Result<(), String> {
        // Byte offsets to code-point offsets, walking forward only.
        let (mut last_byte, mut last_cpt) = (0, 0);
        let mut cpt_at = |byte: usize| {
            last_cpt += segment[last_byte..byte].chars().count();
            last_byte = byte;
            last_cpt
        };
        let mut start_idx = 0;
        for m in self.re.find_iter(segment) {
            let m = m.map_err(|e| e.to_string())?;
            let pos = cpt_at(m.start());
            let end = cpt_at(m.end());
            if pos > start_idx {
                out.push(pos - start_idx);
            }
            // No regex llama.cpp pairs with a supported pre-tokenizer can match the empty string, where
            // std::regex_iterator and fancy-regex would step differently.
            if end == pos {
                return Err("the regex matched the empty string".into());
            }
            out.push(end - pos);
            start_idx = end;
        }
        let total = cpt_at(segment.len());
        if start_idx < total {
            out.push(total - start_idx);
        }
        Ok(())
    }
}

/// A parsed ECMAScript regex (the subset llama.cpp's pre-tokenizers use).
#[derive(Debug)]
enum Node {
    Empty,
    Char(u32),
    /// Sorted, disjoint, inclusive code-point ranges.
    Class(Vec<(u32, u32)>),
    End,
    Start,
    Group(Box<Node>),
    Look {
        node: Box<Node>,
        negate: bool,
    },
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
        greedy: bool,
    },
}

const MAX_CPT: u32 = 0x10FFFF;
/// ECMAScript `\s` in the classic locale: ASCII whitespace only.
const SPACE: [(u32, u32); 2] = [(0x09, 0x0D), (0x20, 0x20)];
const DIGIT: [(u32, u32); 1] = [(0x30, 0x39)];
const WORD: [(u32, u32); 4] = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)];
/// `.`: anything but the ECMAScript line terminators.
const LINE_TERMINATORS: [(u32, u32); 3] = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)];

fn normalize(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn complement(ranges: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(a, b) in ranges {
        if a > next {
            out.push((next, a - 1));
        }
        next = b.saturating_add(1);
    }
    if next <= MAX_CPT {
        out.push((next, MAX_CPT));
    }
    out
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn new(pattern: &str) -> Parser {
        Parser {
            chars: pattern.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at position {}", self.pos))
    }

    fn parse(mut self) -> Result<Node, String> {
        let node = self.alternation()?;
        if self.pos != self.chars.len() {
            return self.err("unexpected ')'");
        }
        Ok(node)
    }

    fn alternation(&mut self) -> Result<Node, String> {
        let mut alts = vec![self.concatenation()?];
        while self.eat('|') {
            alts.push(self.concatenation()?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alt(alts)
        })
    }

    fn concatenation(&mut self) -> Result<Node, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(match items.len() {
            0 => Node::Empty,
            1 => items.pop().unwrap_or(Node::Empty),
            _ => Node::Concat(items),
        })
    }

    fn number(&mut self) -> Option<u32> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .parse()
            .ok()
    }

    fn quantified(&mut self, atom: Node) -> Result<Node, String> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let save = self.pos;
                self.pos += 1;
                let Some(min) = self.number() else {
                    self.pos = save;
                    return self.err("'{' without a repetition count");
                };
                let max = if self.eat(',') {
                    if self.peek() == Some('}') {
                        None
                    } else {
                        match self.number() {
                            Some(m) => Some(m),
                            None => return self.err("bad repetition bound"),
                        }
                    }
                } else {
                    Some(min)
                };
                if self.peek() != Some('}') {
                    return self.err("unclosed repetition");
                }
                (min, max)
            }
            _ => return Ok(atom),
        };
        self.pos += 1;
        let greedy = !self.eat('?');
        if matches!(atom, Node::Start | Node::End | Node::Look { .. }) {
            return self.err("quantified assertion");
        }
        Ok(Node::Repeat {
            node: Box::new(atom),
            min,
            max,
            greedy,
        })
    }

    fn atom(&mut self) -> Result<Node, String> {
        let Some(c) = self.peek() else {
            return self.err("unexpected end");
        };
        self.pos += 1;
        match c {
            '(' => {
                let node = if self.eat('?') {
                    match self.peek() {
                        Some(':') => {
                            self.pos += 1;
                            Node::Group(Box::new(self.alternation()?))
                        }
                        Some(k @ ('=' | '!')) => {
                            self.pos += 1;
                            Node::Look {
                                node: Box::new(self.alternation()?),
                                negate: k == '!',
                            }
                        }
                        _ => return self.err("unsupported group"),
                    }
                } else {
                    Node::Group(Box::new(self.alternation()?))
                };
                if !self.eat(')') {
                    return self.err("unclosed group");
                }
                Ok(node)
            }
            '[' => self.class(),
            '.' => Ok(Node::Class(complement(&LINE_TERMINATORS))),
            '^' => Ok(Node::Start),
            '$' => Ok(Node::End),
            '\\' => match self.escape(false)? {
                Escaped::Char(c) => Ok(Node::Char(c)),
                Escaped::Set(s) => Ok(Node::Class(s)),
            },
            '*' | '+' | '?' | '{' | ')' | ']' | '}' => self.err("unexpected metacharacter"),
            c => Ok(Node::Char(c as u32)),
        }
    }

    /// After a backslash.
    fn escape(&mut self, in_class: bool) -> Result<Escaped, String> {
        let Some(c) = self.peek() else {
            return self.err("trailing backslash");
        };
        self.pos += 1;
        Ok(match c {
            's' => Escaped::Set(SPACE.to_vec()),
            'S' => Escaped::Set(complement(&SPACE)),
            'd' => Escaped::Set(DIGIT.to_vec()),
            'D' => Escaped::Set(complement(&DIGIT)),
            'w' => Escaped::Set(WORD.to_vec()),
            'W' => Escaped::Set(complement(&WORD)),
            't' => Escaped::Char(0x09),
            'n' => Escaped::Char(0x0A),
            'v' => Escaped::Char(0x0B),
            'f' => Escaped::Char(0x0C),
            'r' => Escaped::Char(0x0D),
            '0' => Escaped::Char(0),
            'b' if in_class => Escaped::Char(0x08),
            'x' | 'u' => {
                let n = if c == 'x' { 2 } else { 4 };
                let hex: String = self.chars.iter().skip(self.pos).take(n).collect();
                match u32::from_str_radix(&hex, 16) {
                    Ok(v) if hex.len() == n => {
                        self.pos += n;
                        Escaped::Char(v)
                    }
                    _ => return self.err("bad hex escape"),
                }
            }
            c if c.is_ascii_alphanumeric() => return self.err("unsupported escape"),
            c => Escaped::Char(c as u32),
        })
    }

    /// After `[`.
    fn class(&mut self) -> Result<Node, String> {
        let negate = self.eat('^');
        let mut ranges = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unclosed class");
            };
            if c == ']' {
                self.pos += 1;
                break;
            }
            let first = self.class_atom()?;
            let is_range = self.peek() == Some('-') && self.chars.get(self.pos + 1) != Some(&']');
            match first {
                Escaped::Char(a) if is_range => {
                    self.pos += 1;
                    match self.class_atom()? {
                        Escaped::Char(b) if b >= a => ranges.push((a, b)),
                        _ => return self.err("bad class range"),
                    }
                }
                Escaped::Char(a) => ranges.push((a, a)),
                Escaped::Set(s) if !is_range => ranges.extend(s),
                Escaped::Set(_) => return self.err("class escape in a range"),
            }
        }
        let ranges = normalize(ranges);
        Ok(Node::Class(if negate {
            complement(&ranges)
        } else {
            ranges
        }))
    }

    fn class_atom(&mut self) -> Result<Escaped, String> {
        let Some(c) = self.peek() else {
            return self.err("unclosed class");
        };
        self.pos += 1;
        if c == '\\' {
            self.escape(true)
        } else {
            Ok(Escaped::Char(c as u32))
        }
    }
}

enum Escaped {
    Char(u32),
    Set(Vec<(u32, u32)>),
}

fn push_cpt(c: u32, out: &mut String) {
    out.push_str(&format!("\\x{{{c:X}}}"));
}

/// Re-emits `node` in `fancy-regex` syntax; every literal is a `\x{..}` escape and every class a list
/// of ranges, so nothing depends on how the two dialects read metacharacters or shorthand classes.
fn emit(node: &Node, out: &mut String) {
    match node {
        Node::Empty => out.push_str("(?:)"),
        Node::Char(c) => push_cpt(*c, out),
        Node::Class(ranges) => {
            // Surrogates cannot be in a Rust string (nor in a class); leave them out.
            let mut parts = Vec::new();
            for &(a, b) in ranges {
                if b < 0xD800 || a > 0xDFFF {
                    parts.push((a, b));
                } else {
                    if a < 0xD800 {
                        parts.push((a, 0xD7FF));
                    }
                    if b > 0xDFFF {
                        parts.push((0xE000, b));
                    }
                }
            }
            if parts.is_empty() {
                // Matches nothing (an empty ECMAScript class).
                out.push_str("(?!)");
                return;
            }
            out.push('[');
            for (a, b) in parts {
                push_cpt(a, out);
                if b != a {
                    out.push('-');
                    push_cpt(b, out);
                }
            }
            out.push(']');
        }
        Node::Start => out.push('^'),
        Node::End => out.push('$'),
        Node::Group(inner) => {
            out.push_str("(?:");
            emit(inner, out);
            out.push(')');
        }
        Node::Look { node, negate } => {
            out.push_str(if *negate { "(?!" } else { "(?=" });
            emit(node, out);
            out.push(')');
        }
        Node::Concat(items) => items.iter().for_each(|n| emit(n, out)),
        Node::Alt(alts) => {
            out.push_str("(?:");
            for (i, a) in alts.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                emit(a, out);
            }
            out.push(')');
        }
        Node::Repeat {
            node,
            min,
            max,
            greedy,
        } => {
            out.push_str("(?:");
            emit(node, out);
            out.push(')');
            match (min, max) {
                (0, None) => out.push('*'),
                (1, None) => out.push('+'),
                (0, Some(1)) => out.push('?'),
                (m, None) => out.push_str(&format!("{{{m},}}")),
                (m, Some(n)) if m == n => out.push_str(&format!("{{{m}}}")),
                (m, Some(n)) => out.push_str(&format!("{{{m},{n}}}")),
            }
            if !greedy {
                out.push('?');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(regex: &str, text: &str) -> Vec<String> {
        let re = EcmaRegex::new(regex).unwrap();
        let cpts: Vec<u32> = text.chars().map(|c| c as u32).collect();
        let hay: String = cpts
            .iter()
            .map(|&c| {
                if re.collapsed {
                    collapsed_char(c)
                } else {
                    wide_char(c)
                }
            })
            .collect();
        let mut lens = Vec::new();
        re.split_segment(&hay, &mut lens).unwrap();
        let mut words = Vec::new();
        let mut at = 0;
        for n in lens {
            words.push(text.chars().skip(at).take(n).collect());
            at += n;
        }
        words
    }

    #[test]
    fn collapses_categories_like_llama_cpp() {
        assert_eq!(collapse_pattern("\\p{N}").unwrap(), "[\u{E0D1}0-9]");
        assert_eq!(
            collapse_pattern("[^\\s\\p{L}\\p{N}]+").unwrap(),
            "[^\\s\u{E0D2}A-Za-z\u{E0D1}0-9]+"
        );
        assert!(collapse_pattern("\\p{L}é").is_err());
    }

    #[test]
    fn splits_digits_letters_and_whitespace() {
        assert_eq!(split("\\p{N}", "ab12c٣"), ["ab", "1", "2", "c", "٣"]);
        assert_eq!(split("\\s+$", "a b  "), ["a b", "  "]);
        assert_eq!(
            split("[\\p{P}\\$\\+<=>\\^~\\|]+", "a+b!!c"),
            ["a", "+", "b", "!!", "c"]
        );
        // Non-ASCII whitespace is \s (as 0x0B) in both modes; other non-ASCII never is.
        assert_eq!(split("\\s+", "a\u{3000}b"), ["a", "\u{3000}", "b"]);
        assert_eq!(
            split(" ?[^(\\s|.,!?…。，、।۔،)]+", "hi, yo…"),
            ["hi", ",", " yo", "…"]
        );
        // \S+ lookahead at the end of a segment.
        assert_eq!(split("\\s+(?!\\S)", "a   b  "), ["a", "  ", " b", "  "]);
    }
}
