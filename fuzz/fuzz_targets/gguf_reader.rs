//! Fuzzes the GGUF reader on arbitrary bytes: it must return an error or a file whose every tensor
//! slice has exactly the tensor's size, never panic, and never allocate beyond the input's size.
#![no_main]

use gguf_lora::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        for t in f.tensors() {
            assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes());
            assert!(f.data_offset() + t.offset + t.n_bytes() <= data.len() as u64);
        }
        assert!(f.alignment().is_power_of_two());
        let _ = format!("{:?}", f.metadata());
    }
});
