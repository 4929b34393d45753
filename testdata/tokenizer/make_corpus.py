"""Writes corpus.json, the committed tokenizer corpus (run once; the JSON is what tests read)."""
import json
import os
import random
E = []
def t(name, text): E.append({"name": name, "text": text})
def h(name, hexs): E.append({"name": name, "hex": hexs})
t("empty", "")
t("english", "The quick brown fox jumps over the lazy dog. It's 5 o'clock; don't panic! We'll see, they've said, I'M sure you're right.")
t("english-multiline", "Dear reader,\n\nThis is a short letter.\nIt has several lines.\n\nRegards,\nThe Author\n")
t("code-python", "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])  # [0, 1, 1, 2, ...]\n")
t("code-rust-tabs", "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tif v.len() >= 3 && v[2] != 4 {\n\t\tpanic!(\"bad: {:?}\", v);\n\t}\n}\n")
t("code-json", '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": true}, "s": "x\\ny"}')
t("numbers", "1234567890 3.14159 1,000,000 2024-01-15 0x1F 1e-5 -42 +7 12:30:45 99.9% 1/3 ½ 10^9")
t("whitespace-runs", "a  b   c    d     e\t\tf \t g\n\n\nh   \n   i\r\nj\r\n\r\nk  ")
t("whitespace-leading-trailing", "   leading and trailing   ")
t("whitespace-only", " \n \t \r\n  ")
t("single-space", " ")
t("newlines-only", "\n\n\n\n")
t("unicode-spaces", "nbsp\u00a0here ideographic\u3000space em\u2003space thin\u2009space line\u2028sep")
t("cjk-chinese", "中文分词测试：我们今天去公园散步，天气很好。")
t("cjk-japanese", "日本語のテキスト、カタカナとひらがな。東京は大きい都市です。")
t("cjk-korean", "한국어 텍스트입니다. 서울은 큰 도시입니다.")
t("emoji", "😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵 hearts ❤️💙 ok👌")
t("accents", "café naïve façade Ångström résumé Zürich São Paulo Kraków Dvořák")
t("combining-marks", "e\u0301 a\u0308 n\u0303 Tiếng Việt có dấu")
t("rtl-hebrew", "שלום עולם, מה שלומך היום?")
t("rtl-arabic", "مرحبا بالعالم! كيف حالك اليوم؟")
t("rtl-mixed", "abc שלום 123 مرحبا xyz")
t("scripts", "Ελληνικά κείμενο. Русский текст. नमस्ते दुनिया। สวัสดีชาวโลก ქართული")
t("symbols", "∑∫√≠≈ €£¥₹ ©®™ →←↑↓ ♠♣♥♦ «quotes» „low“ ‘single’ — – … •")
t("digits-non-ascii", "٠١٢٣٤ ४५६ ๑๒๓ ①②③ Ⅻ")
t("controls-zero-width", "a\u0001b\u007fc\u200bd\u200de\ufefff\u00adg")
t("bom-start", "\ufeffstart of file")
t("contractions", "'s 'S 'Re 'VE 'll 'D 'm x's y'T ' '' 'x '\n")
t("punctuation", "Hello , world ! How ' s it ? Fine . A 're B 've C 't D 'd E 'm F 's .")
t("urls-paths", "https://example.com/a/b?c=1&d=%20 /usr/local/bin C:\\Windows\\System32 user@example.org")
t("special-gemma", "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n")
t("special-chatml", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>")
t("special-basic", "<bos>x<eos> <s>y</s> <unk> <pad> <mask> <|endoftext|>")
t("special-partial", "<|im_st <start_of <|im_end <s </s")
t("special-adjacent", "<|im_start|><|im_start|>  <|im_end|>\n\n<start_of_turn><end_of_turn>")
t("special-spaces", "  <start_of_turn>  user  <end_of_turn>  ")
t("markdown", "# Title\n\n- item **bold** _italic_ `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n> quote\n")
t("mixed-case", "camelCase PascalCase snake_case SCREAMING_CASE kebab-case iPhone McDonald's XMLHttpRequest")
t("repeats", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!!! ............ ------------ ============")
random.seed(13)
words = "the of and to in is was for on that with as by at from his her it an are this be have or not which had but they you were their one all we can has there been if more when will would who so no".split()
line = []
n = 0
while n < 4096:
    w = random.choice(words)
    if random.random() < 0.1: w = w.capitalize()
    if random.random() < 0.08: w += random.choice([",", ".", ";", "!", "?", "'s", " 42", " 2024"])
    line.append(w); n += len(w) + 1
t("long-line", " ".join(line))
# Texts inside the 256-piece fixture vocabulary (lowercase a-z without j, space, ?!.,): the only
# texts llama.cpp can tokenize on those models without aborting.
fw = "on li do or ni fa al he an ri sh mu er ng ing qu ch xo ve we pa lo zi so ka ru the loni muri geru wesh nido chen quon riri nipa ruri tafa kari muan eral theli kave rich sofa sozi alor enan itmu".split()
t("fixture-words", "on the li loni muri geru wesh")
t("fixture-punct", "loni, muri! geru? wesh. the fafa")
t("fixture-spaces", "  on  the   li    ")
t("fixture-unknown-words", "zzz qqq yyy bbb kkk vvv xyz")
t("fixture-special", "<s>on the</s> li<unk>do </s>")
t("fixture-strip", "on</s>   li </s>  do<unk>  the </s>")
random.seed(7)
fl = []
n = 0
while n < 3000:
    w = random.choice(fw)
    if random.random() < 0.1: w += random.choice([",", ".", "!", "?"])
    fl.append(w); n += len(w) + 1
t("fixture-long-line", " ".join(fl))
# Malformed UTF-8 (llama.cpp reads bytes): a stray continuation byte, a truncated sequence, an overlong
# form, a surrogate, a lead byte announcing a code point above U+10FFFF, and a 5-byte lead.
h("bad-utf8-continuation", "61 80 62".replace(" ", ""))
h("bad-utf8-truncated", "78 e4 b8 79".replace(" ", ""))
h("bad-utf8-overlong", "c0 af 41".replace(" ", ""))
h("bad-utf8-surrogate", "ed a0 80 7a".replace(" ", ""))
h("bad-utf8-above-max", "41 f5 80 80 80 42".replace(" ", ""))
h("bad-utf8-five-byte", "f8 88 80 80 80 43".replace(" ", ""))
doc = {
    "about": "Tokenizer corpus for tests/tokenize.rs: llama.cpp's ids are computed live from these texts (testdata/tokenizer/llama_tokenize.py); 'hex' entries are raw bytes that are not valid UTF-8.",
    "entries": E,
}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.json"), "w", encoding="utf-8") as f:
    json.dump(doc, f, ensure_ascii=False, indent=1)
    f.write("\n")
