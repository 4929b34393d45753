//! `verify`: does a merged model behave like its base with the adapters applied at runtime?
//!
//! [`forward`] runs a transformer over GGUF weights (decoded block by block, never whole) with
//! optional runtime LoRA ([`lora`]) exactly as llama.cpp applies it; [`compare`] turns the logits of
//! base, base + runtime LoRA and merged model into the metrics and pass/fail checks of the command.

pub mod compare;
pub mod forward;
pub mod hparams;
pub mod lora;
pub mod matmul;
pub mod npy;
pub mod source;
