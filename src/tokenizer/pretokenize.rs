//! BPE pre-tokenization: which regexes `tokenizer.ggml.pre` selects (llama.cpp's `llama_vocab::impl::load`
//! and `llm_tokenizer_bpe`), and splitting text with them the way `unicode_regex_split` does: each regex
//! splits every segment the previous one left, with llama.cpp's hand-written splitters for the regexes
//! it special-cases (GPT-2, Llama 3, Qwen2, Qwen3.5, Kimi-K2, AFMoE digits, newline runs) and
//! [`super::ecma`] for the rest. The hand-written splitters are ported statement for statement: they
//! are not exactly the regexes they are named after (e.g. the Llama 3 one tests the current code
//! point's flags where the regex would test the next one), and llama.cpp's ids follow the code.

use super::ecma::{collapsed_char, wide_char, EcmaRegex};
use super::unicode::{self, decode, encode_utf8, flags, to_lower, Flags};

/// llama.cpp's `llama_vocab_pre_type`, as far as it changes tokenization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreType {
    Default,
    Llama3,
    Jais2,
    Dbrx,
    DeepseekLlm,
    Deepseek3,
    Spark25,
    Youtu,
    DeepseekCoder,
    Falcon,
    Starcoder,
    Gpt2,
    Qwen2,
    Qwen35,
    Poro,
    Chatglm4,
    Viking,
    Tekken,
    Chameleon,
    Gpt4o,
    GraniteEmbMulti,
    TinyAya,
    KimiK2,
    Superbpe,
    Bailingmoe,
    SeedCoder,
    Ufakzeka,
    Grok2,
    Afmoe,
    Laguna,
    ExaoneMoe,
    Gemma4,
    SarvamMoe,
    Minicpm5,
    Whitespace,
}

/// What a `tokenizer.ggml.pre` value changes besides the regexes (BPE models start from
/// `clean_spaces = true`, everything else false).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PreSettings {
    pub no_clean_spaces: bool,
    pub ignore_merges: bool,
    pub add_bos: bool,
    pub escape_whitespaces: bool,
    pub no_bos_token: bool,
}

/// llama.cpp's table from `tokenizer.ggml.pre` to pre-tokenizer type and settings; `None` for a name
/// it does not know (it refuses to load such a model).
pub(super) fn pre_type_of(pre: &str) -> Option<(PreType, PreSettings)> {
    use PreType::*;
    let s = PreSettings::default();
    let nc = PreSettings {
        no_clean_spaces: true,
        ..s
    };
    Some(match pre {
        "" | "default" => (Default, s),
        "minicpm5" => (
            Minicpm5,
            PreSettings {
                ignore_merges: true,
                ..s
            },
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (
            Llama3,
            PreSettings {
                ignore_merges: true,
                add_bos: true,
                ..s
            },
        ),
        "deepseek-llm" => (DeepseekLlm, nc),
        "deepseek-coder" => (DeepseekCoder, nc),
        "deepseek-v3" => (Deepseek3, nc),
        "spark2_5" => (Spark25, nc),
        "youtu" => (
            Youtu,
            PreSettings {
                ignore_merges: true,
                ..nc
            },
        ),
        "falcon" => (Falcon, s),
        "mpt" => (Gpt2, s),
        "starcoder" => (Starcoder, s),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" => (Gpt2, s),
        "jais-2" => (Jais2, s),
        "gemma4" | "granite-embed-multi-311m" => (
            Gemma4,
            PreSettings {
                escape_whitespaces: true,
                ..s
            },
        ),
        "sarvam-moe" => (
            SarvamMoe,
            PreSettings {
                escape_whitespaces: true,
                ..nc
            },
        ),
        "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => (Gpt2, s),
        "whitespace" => (Whitespace, s),
        "refact" => (Starcoder, s),
        "command-r" => (Starcoder, nc),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => (Qwen2, nc),
        "qwen35" => (Qwen35, nc),
        "stablelm2" => (Qwen2, s),
        "olmo" => (Gpt2, s),
        "dbrx" | "smaug-bpe" => (Dbrx, s),
        "poro-chat" => (Poro, nc),
        "chatglm-bpe" => (
            Chatglm4,
            PreSettings {
                no_bos_token: true,
                ..s
            },
        ),
        "glm4" | "glm5" => (
            Chatglm4,
            PreSettings {
                no_bos_token: true,
                ignore_merges: true,
                ..s
            },
        ),
        "viking" => (Viking, nc),
        "jais" => (Gpt2, s),
        "tekken" => (
            Tekken,
            PreSettings {
                ignore_merges: true,
                add_bos: true,
                ..nc
            },
        ),
        "smollm" => (Starcoder, nc),
        "codeshell" => (Starcoder, s),
        "bloom" | "gpt3-finnish" => (Poro, s),
        "exaone" => (Starcoder, s),
        "exaone4" => (Gpt2, s),
        "exaone-moe" => (ExaoneMoe, s),
        "chameleon" => (
            Chameleon,
            PreSettings {
                add_bos: true,
                ..nc
            },
        ),
        "minerva-7b" => (Starcoder, s),
        "megrez" => (Qwen2, s),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => (Gpt4o, nc),
        "granite-embed-multi-97m" => (
            GraniteEmbMulti,
            PreSettings {
                ignore_merges: true,
                ..nc
            },
        ),
        "tiny_aya" | "cohere2moe" => (TinyAya, nc),
        "superbpe" => (Superbpe, nc),
        "trillion" | "granite-docling" => (Gpt2, nc),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => (Bailingmoe, nc),
        "seed-coder" => (SeedCoder, nc),
        "hunyuan" => (Qwen2, nc),
        "hunyuan-dense" | "hy_v4" | "joyai-llm" => (Deepseek3, nc),
        "kimi-k2" => (KimiK2, nc),
        "ufakzeka" => (Ufakzeka, nc),
        "grok-2" => (Grok2, nc),
        "afmoe" => (Afmoe, nc),
        "laguna" => (Laguna, nc),
        "minimax-m2" => (Gpt4o, nc),
        "solar-open" => (Qwen2, nc),
        "mellum2" => (Starcoder, s),
        _ => return None,
    })
}

const GPT2_RE: &str =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
const LLAMA3_RE: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const LLAMA3_RE_ORIGINAL: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_RE: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN35_RE: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const NEWLINES_RE: &str = "[^\\n]+|[\\n]+";
const DEEPSEEK3_MAIN_RE: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
const YOUTU_TINY_AYA_RE: &str = "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|";

/// `llm_tokenizer_bpe`'s regexes per pre-tokenizer type, copied from llama.cpp's source, and whether
/// words are GPT-2 byte-encoded afterwards.
fn regex_exprs(t: PreType) -> (Vec<String>, bool) {
    use PreType::*;
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let tiny_aya_main = format!("{YOUTU_TINY_AYA_RE}\\p{{N}}{{1,3}}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
    let youtu_main = format!("{YOUTU_TINY_AYA_RE}\\p{{N}}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
    let exprs = match t {
        Llama3 | Dbrx | Chatglm4 => v(&[LLAMA3_RE]),
        Jais2 => v(&["(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}"]),
        DeepseekLlm => v(&[
            "[\r\n]",
            "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
            "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
            "\\s+$",
            "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
            "\\p{N}+",
        ]),
        Deepseek3 => v(&["\\p{N}{1,3}", "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+", DEEPSEEK3_MAIN_RE]),
        Spark25 => v(&[
            "\\p{N}{1,3}",
            "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
            "\\p{N}",
        ]),
        Youtu => vec![
            "[\u{AC00}-\u{D7A3}\u{3131}-\u{318E}]+|[\u{FF01}\u{2026}\u{201C}\u{201D}\u{2018}\u{2019}\u{2014}\u{FF1A}\u{FF1B}\u{FF0C}\u{3001}-\u{303F}\u{FE30}-\u{FE4F}]+|[\u{3105}-\u{312F}]+|[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+".to_string(),
            youtu_main,
        ],
        DeepseekCoder => v(&["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+", "\\p{N}"]),
        Falcon => v(&["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2_RE, "[0-9][0-9][0-9]"]),
        Starcoder => v(&["\\p{N}", GPT2_RE]),
        Gpt2 => v(&[GPT2_RE]),
        Qwen2 | Grok2 => v(&[QWEN2_RE]),
        Qwen35 => v(&[QWEN35_RE]),
        Poro => v(&[" ?[^(\\s|.,!?\u{2026}\u{3002}\u{FF0C}\u{3001}\u{964}\u{6D4}\u{60C})]+"]),
        Viking => v(&[" ?[^(\\s|.,!?\u{2026}\u{3002}\u{FF0C}\u{3001}\u{964}\u{6D4}\u{60C})]+", "\\p{N}"]),
        Tekken => v(&["[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        Chameleon => v(&[
            "<sentinel:[0-9]+>",
            "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            "([\\t\\n]|    |  )",
            "\\p{N}",
            "[\\p{P}!-/:-@\\[-`{-~]",
            GPT2_RE,
        ]),
        Gpt4o => v(&["[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        GraniteEmbMulti => v(&["[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        TinyAya => vec!["\\d{1,3}(?=(?:\\d{3})*\\b)".to_string(), tiny_aya_main],
        KimiK2 => v(&["\\p{Han}+"]),
        Superbpe => v(&["\\p{N}+", "(?=(\\d{3})+(?!\\d))"]),
        Bailingmoe => v(&["'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"]),
        SeedCoder => v(&["(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        Ufakzeka => v(&["[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        Afmoe => v(&[
            "\\p{AFMoE_digits}",
            "[\u{4E00}-\u{9FFF}\u{3400}-\u{4DBF}\u{8C48}-\u{FAFF}\u{3040}-\u{309F}\u{30A0}-\u{30FF}\u{FF65}-\u{FF9F}\u{2F00}-\u{2FDF}\u{E40}-\u{E7F}\u{E80}-\u{EFF}\u{1780}-\u{17FF}\u{1000}-\u{109F}\u{AA60}-\u{AA7F}\u{A9E0}-\u{A9FF}\u{AC00}-\u{D7AF}\u{1100}-\u{11FF}]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ]),
        Laguna => v(&[NEWLINES_RE, QWEN2_RE]),
        ExaoneMoe => v(&["(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"]),
        Gemma4 | SarvamMoe => v(&[NEWLINES_RE]),
        Minicpm5 => v(&["\\p{N}{1,3}", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]),
        Whitespace => v(&["\\S+"]),
        Default => v(&["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2_RE, "\\p{N}+", "[0-9][0-9][0-9]"]),
    };
    let byte_encode = !matches!(t, Gemma4 | SarvamMoe | Whitespace);
    (exprs, byte_encode)
}

/// Every regex of [`regex_exprs`] over all pre-tokenizer types, as llama.cpp's source writes them
/// (for the test that compares the table with that source).
pub(super) fn all_regexes() -> Vec<String> {
    use PreType::*;
    let all = [
        Default,
        Llama3,
        Jais2,
        Dbrx,
        DeepseekLlm,
        Deepseek3,
        Spark25,
        Youtu,
        DeepseekCoder,
        Falcon,
        Starcoder,
        Gpt2,
        Qwen2,
        Qwen35,
        Poro,
        Chatglm4,
        Viking,
        Tekken,
        Chameleon,
        Gpt4o,
        GraniteEmbMulti,
        TinyAya,
        KimiK2,
        Superbpe,
        Bailingmoe,
        SeedCoder,
        Ufakzeka,
        Grok2,
        Afmoe,
        Laguna,
        ExaoneMoe,
        Gemma4,
        SarvamMoe,
        Minicpm5,
        Whitespace,
    ];
    all.iter().flat_map(|&t| regex_exprs(t).0).collect()
}

/// One splitting step.
enum Step {
    Gpt2,
    Llama3,
    Qwen2,
    Qwen35,
    KimiK2,
    AfmoeDigits,
    Newlines,
    Regex(EcmaRegex),
}

/// The pre-tokenizer of one BPE vocabulary.
pub(super) struct PreTokenizer {
    steps: Vec<Step>,
    pub byte_encode: bool,
}

impl PreTokenizer {
    /// The pre-tokenizer for `t`, or why we do not reproduce it.
    pub fn new(t: PreType) -> Result<PreTokenizer, String> {
        match t {
            // An empty match makes std::regex_iterator and fancy-regex step differently.
            PreType::Superbpe => {
                return Err("its digit-grouping regex matches empty strings".into())
            }
            // The whitespace pre-tokenizer belongs to its own tokenizer model; under gpt2 llama.cpp
            // asserts on the first word with two spaces.
            PreType::Whitespace => return Err("it is only defined for the whitespace model".into()),
            _ => {}
        }
        let (exprs, byte_encode) = regex_exprs(t);
        let mut steps = Vec::new();
        for e in &exprs {
            // `unicode_regex_split_custom`'s exact-string dispatch.
            let step = match e.as_str() {
                GPT2_RE => Step::Gpt2,
                LLAMA3_RE | LLAMA3_RE_ORIGINAL => Step::Llama3,
                QWEN2_RE => Step::Qwen2,
                QWEN35_RE => Step::Qwen35,
                "\\p{Han}+" => Step::KimiK2,
                "\\p{AFMoE_digits}" | "\\d{1,3}(?=(?:\\d{3})*\\b)" => Step::AfmoeDigits,
                NEWLINES_RE => Step::Newlines,
                _ => Step::Regex(EcmaRegex::new(e).map_err(|m| format!("regex {e:?}: {m}"))?),
            };
            steps.push(step);
        }
        Ok(PreTokenizer { steps, byte_encode })
    }

    /// Splits `text` into words (`unicode_regex_split`), byte-encoded when the vocabulary is
    /// byte-level. `Err(offset)` for a code point above U+10FFFF (llama.cpp aborts there).
    pub fn split(&self, text: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let cpts = decode(text);
        let need_collapse = self
            .steps
            .iter()
            .any(|s| matches!(s, Step::Regex(r) if r.collapsed));
        let collapsed: Vec<char> = if need_collapse {
            cpts.iter().map(|&c| collapsed_char(c)).collect()
        } else {
            Vec::new()
        };
        let mut wide: Option<Vec<char>> = None;
        let mut offsets = vec![cpts.len()];
        for step in &self.steps {
            offsets = match step {
                Step::Gpt2 => split_custom(&cpts, &offsets, gpt2),
                Step::Llama3 => split_custom(&cpts, &offsets, llama3),
                Step::Qwen2 => split_custom(&cpts, &offsets, |s, o| qwen(s, o, false)),
                Step::Qwen35 => split_custom(&cpts, &offsets, |s, o| qwen(s, o, true)),
                Step::KimiK2 => split_custom(&cpts, &offsets, kimi_k2),
                Step::AfmoeDigits => split_custom(&cpts, &offsets, afmoe_digits),
                Step::Newlines => split_custom(&cpts, &offsets, newlines),
                Step::Regex(re) => {
                    let hay: &[char] = if re.collapsed {
                        &collapsed
                    } else {
                        wide.get_or_insert_with(|| cpts.iter().map(|&c| wide_char(c)).collect())
                    };
                    let mut out = Vec::with_capacity(offsets.len());
                    let mut start = 0;
                    let mut segment = String::new();
                    for &len in &offsets {
                        segment.clear();
                        segment.extend(&hay[start..start + len]);
                        re.split_segment(&segment, &mut out)
                            .map_err(SplitError::Regex)?;
                        start += len;
                    }
                    out
                }
            };
        }
        let mut words = Vec::with_capacity(offsets.len());
        let mut start = 0;
        let mut utf8 = Vec::new();
        for len in offsets {
            utf8.clear();
            for &c in &cpts[start..start + len] {
                encode_utf8(c, &mut utf8).ok_or(SplitError::InvalidCodepoint)?;
            }
            start += len;
            words.push(if self.byte_encode {
                let mut w = Vec::with_capacity(utf8.len() * 2);
                let mut buf = [0u8; 4];
                for &b in &utf8 {
                    w.extend_from_slice(unicode::byte_to_char(b).encode_utf8(&mut buf).as_bytes());
                }
                w
            } else {
                utf8.clone()
            });
        }
        Ok(words)
    }
}

/// Why [`PreTokenizer::split`] failed.
#[derive(Debug)]
pub(super) enum SplitError {
    /// A code point above U+10FFFF (from a malformed 4-byte UTF-8 sequence).
    InvalidCodepoint,
    /// The regex engine gave up (backtracking limit).
    Regex(String),
}

/// One segment for a hand-written splitter: code points `cpts[ini..end]`, with llama.cpp's accessors
/// that see nothing outside the segment, and the output lengths.
struct Seg<'a> {
    cpts: &'a [u32],
    ini: usize,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<usize>,
}

const OUT_OF_RANGE: u32 = 0xFFFF_FFFF;

impl Seg<'_> {
    fn cpt(&self, pos: usize) -> u32 {
        if self.ini <= pos && pos < self.end {
            self.cpts[pos]
        } else {
            OUT_OF_RANGE
        }
    }
    fn flags(&self, pos: usize) -> Flags {
        if self.ini <= pos && pos < self.end {
            flags(self.cpts[pos])
        } else {
            Flags::default()
        }
    }
    /// `_add_token`: emits the text since the last token; returns its length.
    fn add(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

fn split_custom(cpts: &[u32], offsets: &[usize], f: impl Fn(&mut Seg, usize)) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for &len in offsets {
        let mut seg = Seg {
            cpts,
            ini: start,
            end: start + len,
            prev_end: start,
            out: &mut out,
        };
        f(&mut seg, start);
        start += len;
    }
    out
}

fn is_cr_lf(c: u32) -> bool {
    c == '\r' as u32 || c == '\n' as u32
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, case-folded or not; returns the match end.
fn contraction(s: &Seg, pos: usize, fold: bool) -> Option<usize> {
    if s.cpt(pos) != '\'' as u32 || pos + 1 >= s.end {
        return None;
    }
    let low = |c: u32| if fold { to_lower(c) } else { c };
    let next = low(s.cpt(pos + 1));
    if [b's', b't', b'm', b'd'].iter().any(|&c| next == c as u32) {
        return Some(pos + 2);
    }
    if pos + 2 < s.end {
        let nn = low(s.cpt(pos + 2));
        let is = |a: u8, b: u8| next == a as u32 && nn == b as u32;
        if is(b'r', b'e') || is(b'v', b'e') || is(b'l', b'l') {
            return Some(pos + 3);
        }
    }
    None
}

/// Whitespace run at `pos`: its length and the end of its last CR/LF (0 if none).
fn whitespace_run(s: &Seg, pos: usize) -> (usize, usize) {
    let mut n = 0;
    let mut last_crlf = 0;
    while s.flags(pos + n).is_whitespace() {
        if is_cr_lf(s.cpt(pos + n)) {
            last_crlf = pos + n + 1;
        }
        n += 1;
    }
    (n, last_crlf)
}

/// The shared tail of the hand-written splitters: `\s*[\r\n]+` (when `crlf`), `\s+(?!\S)`, `\s+`, or
/// one code point. Returns the new position.
fn whitespace_tail(s: &mut Seg, mut pos: usize, crlf: bool) -> usize {
    let (n, last_crlf) = whitespace_run(s, pos);
    if crlf && last_crlf > 0 {
        pos = last_crlf;
        s.add(pos);
        return pos;
    }
    if n > 1 && s.cpt(pos + n) != OUT_OF_RANGE {
        pos += n - 1;
        s.add(pos);
        return pos;
    }
    if n > 0 {
        pos += n;
        s.add(pos);
        return pos;
    }
    pos += 1;
    s.add(pos);
    pos
}

/// `unicode_regex_split_custom_gpt2`.
fn gpt2(s: &mut Seg, mut pos: usize) {
    while pos < s.end {
        let cpt = s.cpt(pos);
        let f = s.flags(pos);
        if let Some(e) = contraction(s, pos, false) {
            pos += s.add(e);
            continue;
        }
        let space = cpt == ' ' as u32;
        let mut f2 = if space { s.flags(pos + 1) } else { f };
        if f2.is_letter() {
            pos += space as usize;
            while f2.is_letter() {
                pos += 1;
                f2 = s.flags(pos);
            }
            s.add(pos);
            continue;
        }
        if f2.is_number() {
            pos += space as usize;
            while f2.is_number() {
                pos += 1;
                f2 = s.flags(pos);
            }
            s.add(pos);
            continue;
        }
        let other = |f: Flags| !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.is_set();
        if other(f2) {
            pos += space as usize;
            while other(f2) {
                pos += 1;
                f2 = s.flags(pos);
            }
            s.add(pos);
            continue;
        }
        pos = whitespace_tail(s, pos, false);
    }
}

/// `unicode_regex_split_custom_llama3`.
fn llama3(s: &mut Seg, mut pos: usize) {
    while pos < s.end {
        let cpt = s.cpt(pos);
        let f = s.flags(pos);
        if let Some(e) = contraction(s, pos, true) {
            pos += s.add(e);
            continue;
        }
        if !(is_cr_lf(cpt) || f.is_number()) && (f.is_letter() || s.flags(pos + 1).is_letter()) {
            pos += 1;
            while s.flags(pos).is_letter() {
                pos += 1;
            }
            s.add(pos);
            continue;
        }
        if f.is_number() {
            let mut ini = pos;
            while s.flags(pos).is_number() {
                pos += 1;
                if pos - ini >= 3 {
                    s.add(pos);
                    ini = pos;
                }
            }
            s.add(pos);
            continue;
        }
        if punctuation_run(s, &mut pos, cpt, f, false) {
            continue;
        }
        pos = whitespace_tail(s, pos, true);
    }
}

/// ` ?[^\s\p{L}\p{N}]+[\r\n]*` as the Llama 3 / Qwen2 splitters write it: the first test checks the
/// *current* code point's flags for emptiness (`flags.as_uint()`), the loop the next ones'. With
/// `marks`, combining marks count as letters (Qwen3.5).
fn punctuation_run(s: &mut Seg, pos: &mut usize, cpt: u32, f: Flags, marks: bool) -> bool {
    let space = cpt == ' ' as u32;
    let mut f2 = if space { s.flags(*pos + 1) } else { f };
    let other = |f: Flags| {
        !(f.is_whitespace() || f.is_letter() || f.is_number() || (marks && f.is_accent_mark()))
    };
    if !(other(f2) && f.is_set()) {
        return false;
    }
    *pos += space as usize;
    while other(f2) && f2.is_set() {
        *pos += 1;
        f2 = s.flags(*pos);
    }
    while is_cr_lf(s.cpt(*pos)) {
        *pos += 1;
    }
    s.add(*pos);
    true
}

/// `unicode_regex_split_custom_qwen2` and, with `marks`, `unicode_regex_split_custom_qwen35`.
fn qwen(s: &mut Seg, mut pos: usize, marks: bool) {
    while pos < s.end {
        let cpt = s.cpt(pos);
        let f = s.flags(pos);
        if let Some(e) = contraction(s, pos, true) {
            pos += s.add(e);
            continue;
        }
        let wordish = |f: Flags| f.is_letter() || (marks && f.is_accent_mark());
        let next = s.flags(pos + 1);
        let starts = if marks {
            f.is_letter() || f.is_accent_mark() || next.is_accent_mark() || next.is_letter()
        } else {
            f.is_letter() || next.is_letter()
        };
        if !(is_cr_lf(cpt) || f.is_number()) && starts {
            pos += 1;
            while wordish(s.flags(pos)) {
                pos += 1;
            }
            s.add(pos);
            continue;
        }
        if f.is_number() {
            pos += 1;
            s.add(pos);
            continue;
        }
        if punctuation_run(s, &mut pos, cpt, f, marks) {
            continue;
        }
        pos = whitespace_tail(s, pos, true);
    }
}

/// `unicode_cpt_is_han`.
fn is_han(c: u32) -> bool {
    matches!(c,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0x2CEB0..=0x2EBEF | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// `unicode_regex_split_custom_kimi_k2`.
fn kimi_k2(s: &mut Seg, mut pos: usize) {
    while pos < s.end {
        let cpt = s.cpt(pos);
        let f = s.flags(pos);
        if is_han(cpt) {
            while is_han(s.cpt(pos)) {
                pos += 1;
            }
            s.add(pos);
            continue;
        }
        let lead_ok = !(is_cr_lf(cpt) || f.is_letter() || f.is_number());
        let letter_at = |s: &Seg, p: usize| s.flags(p).is_letter() && !is_han(s.cpt(p));
        let is_letter_pattern =
            (f.is_letter() && !is_han(cpt)) || (lead_ok && letter_at(s, pos + 1));
        if is_letter_pattern {
            let mut has_leading = false;
            if lead_ok {
                has_leading = true;
                pos += 1;
            }
            let mut has_letters = false;
            while letter_at(s, pos) {
                has_letters = true;
                pos += 1;
            }
            if has_letters || (!has_leading && letter_at(s, pos)) {
                if !has_letters {
                    pos += 1;
                }
                while letter_at(s, pos) {
                    pos += 1;
                }
                if s.cpt(pos) == '\'' as u32 && pos + 1 < s.end {
                    let next = to_lower(s.cpt(pos + 1));
                    if [b's', b't', b'm', b'd'].iter().any(|&c| next == c as u32) {
                        pos += 2;
                    } else if pos + 2 < s.end {
                        let nn = to_lower(s.cpt(pos + 2));
                        let is = |a: u8, b: u8| next == a as u32 && nn == b as u32;
                        if is(b'r', b'e') || is(b'v', b'e') || is(b'l', b'l') {
                            pos += 3;
                        }
                    }
                }
                s.add(pos);
                continue;
            } else if has_leading {
                pos -= 1;
            }
        }
        if f.is_number() {
            let mut ini = pos;
            while s.flags(pos).is_number() {
                pos += 1;
                if pos - ini >= 3 {
                    s.add(pos);
                    ini = pos;
                }
            }
            s.add(pos);
            continue;
        }
        // Unlike Llama 3, this test reads the flags it loops on.
        let space = cpt == ' ' as u32;
        let mut f2 = if space { s.flags(pos + 1) } else { f };
        let other = |f: Flags| !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.is_set();
        if other(f2) {
            pos += space as usize;
            while other(f2) {
                pos += 1;
                f2 = s.flags(pos);
            }
            while is_cr_lf(s.cpt(pos)) {
                pos += 1;
            }
            s.add(pos);
            continue;
        }
        pos = whitespace_tail(s, pos, true);
    }
}

/// `unicode_regex_split_custom_afmoe`: digit runs split into a leading group of `len % 3` and then
/// threes; text before a digit run is emitted together with its first group, as llama.cpp does.
fn afmoe_digits(s: &mut Seg, mut pos: usize) {
    while pos < s.end {
        if s.flags(pos).is_number() {
            let digit_start = pos;
            let mut count = 0;
            while s.flags(pos).is_number() && pos < s.end {
                count += 1;
                pos += 1;
            }
            let rem = count % 3;
            let mut current = digit_start;
            if rem > 0 {
                s.add(current + rem);
                current += rem;
            }
            while current < digit_start + count {
                s.add(current + 3);
                current += 3;
            }
            continue;
        }
        pos += 1;
    }
    if s.prev_end < s.end {
        let end = s.end;
        s.add(end);
    }
}

/// `unicode_regex_split_custom_newlines`: runs of newlines and runs of everything else.
fn newlines(s: &mut Seg, mut pos: usize) {
    while pos < s.end {
        let nl = s.cpts[pos] == '\n' as u32;
        let run = pos;
        while pos < s.end && (s.cpts[pos] == '\n' as u32) == nl {
            pos += 1;
        }
        s.out.push(pos - run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(t: PreType, text: &str) -> Vec<String> {
        let p = PreTokenizer {
            byte_encode: false,
            ..PreTokenizer::new(t).unwrap()
        };
        p.split(text.as_bytes())
            .unwrap()
            .into_iter()
            .map(|w| String::from_utf8(w).unwrap())
            .collect()
    }

    #[test]
    fn gpt2_style_splits() {
        assert_eq!(
            words(PreType::Gpt2, "Hello world's 123  x!?\n"),
            ["Hello", " world", "'s", " 123", " ", " x", "!?", "\n"]
        );
        // smollm/starcoder split every digit first.
        assert_eq!(
            words(PreType::Starcoder, "ab 123"),
            ["ab", " ", "1", "2", "3"]
        );
    }

    #[test]
    fn llama3_and_qwen2_splits() {
        assert_eq!(
            words(PreType::Llama3, "I'M 12345 ok\n\n  x"),
            ["I", "'M", " ", "123", "45", " ok", "\n\n", " ", " x"]
        );
        assert_eq!(words(PreType::Qwen2, "ab 12"), ["ab", " ", "1", "2"]);
    }

    #[test]
    fn unsupported_pre_tokenizers_say_why() {
        assert!(PreTokenizer::new(PreType::Superbpe).is_err());
        assert!(PreTokenizer::new(PreType::Whitespace).is_err());
        assert!(pre_type_of("no-such-pre").is_none());
    }
}
