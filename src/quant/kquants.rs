//! The K-quant block codecs (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K), bit-exact with ggml's `ggml-quants.c`.
