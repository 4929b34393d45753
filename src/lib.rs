//! gguf-lora: convert, merge, inspect, bundle and verify LoRA adapters for GGUF models.
//!
//! Data flows one way: files → readers ([`gguf`], [`adapter`]) → a normalized model → an operation
//! ([`convert`], [`merge`], [`quantize`], [`bundle`], [`inspect`], [`verify`]; merge and quantize
//! stream through the shared [`engine`]) → the streaming, atomic GGUF writer. The binary in `src/bin` only
//! parses flags and prints; everything it does is reachable from this library.

pub mod adapter;
pub mod arch;
pub mod bundle;
pub mod calibrate;
pub mod convert;
pub mod engine;
pub mod extract;
pub mod gguf;
pub mod inspect;
pub mod merge;
pub mod numbers;
pub mod output;
pub mod quant;
pub mod quantize;
pub mod safetensors_file;
pub mod tokenizer;
pub mod verify;
