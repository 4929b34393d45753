//! Fuzzes the safetensors header checks on arbitrary bytes: an error, or entries whose byte ranges
//! lie inside the input, run back to back without overlap, and match shape × dtype size.
#![no_main]

use gguf_lora::safetensors_file::check_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = check_bytes(data) {
        let mut prev_end = None;
        for (e, r) in &entries {
            assert!(r.start <= r.end && r.end <= data.len());
            if let Some(p) = prev_end {
                assert_eq!(p, r.start, "{}", e.name);
            }
            prev_end = Some(r.end);
            let size = match e.dtype {
                safetensors::Dtype::F32 | safetensors::Dtype::I32 | safetensors::Dtype::U32 => 4,
                safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::I16 | safetensors::Dtype::U16 => 2,
                safetensors::Dtype::F64 | safetensors::Dtype::I64 | safetensors::Dtype::U64 => 8,
                _ => 1,
            };
            assert_eq!(e.n_elements() * size, r.end - r.start);
        }
        if let Some(end) = prev_end {
            assert_eq!(end, data.len());
        }
    }
});
