//! Fuzzes `adapter_config.json` parsing and PEFT pattern matching: any text gives a config or an
//! error, and a parsed config answers rank/alpha queries without panicking (pattern keys are
//! compiled as regular expressions, so hostile keys must be refused cleanly).
#![no_main]

use gguf_lora::adapter::peft::{parse_tensor_name, PeftConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = PeftConfig::parse(text) {
        for module in ["model.layers.0.self_attn.q_proj", "lm_head", "", "a.b.c"] {
            let (r, _) = cfg.rank_for(module);
            assert!(r > 0);
            let _ = cfg.alpha_for(module);
            let _ = cfg.llama_alpha(module, r);
        }
    }
    // Tensor names are arbitrary strings in a safetensors header.
    let _ = parse_tensor_name(text);
});
