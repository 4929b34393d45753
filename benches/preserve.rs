//! Throughput of the adapter-keeping requantization (`engine::preserve::encode_rows`), per SIMD
//! level, one thread (a benchmark, not a test).
//!
//! `cargo bench --bench preserve [-- TYPE...]` prints rows per second and microseconds per row for
//! 4096-wide rows of a 7B-shaped attention tensor, with the base's own rows as the kept grid and
//! 448 calibration tokens reduced to the default rank, as the default merge runs it. Thread CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`), best of a few runs, so a busy machine slows it little; the
//! load average is printed with the table.

use std::time::Duration;

use gguf_lora::engine::preserve::{self, InputStats};
use gguf_lora::quant::simd::{with_level, SimdLevel};
use gguf_lora::quant::{self, GgmlType};

const N_COLS: usize = 4096;
const N_ROWS: usize = 256;
const N_TOKENS: usize = 512;
const REPS: usize = 3;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A reproducible stream of values in [-0.5, 0.5).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let types = [
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ];
    let mut rng = Lcg(7);
    // Activations with channel scales spread over two orders of magnitude, as real ones are.
    let scales: Vec<f32> = (0..N_COLS).map(|_| 10f32.powf(2.0 * rng.next())).collect();
    let tokens: Vec<f32> = (0..N_TOKENS * N_COLS)
        .map(|i| rng.next() * scales[i % N_COLS])
        .collect();
    let stats = InputStats::new(N_COLS, &tokens, &[], &preserve::Weighting::default());
    println!("load before: {}", load());
    println!(
        "{N_ROWS} rows × {N_COLS} columns, fit rank {}, one thread, thread CPU time (best of {REPS})",
        stats.t
    );
    println!(
        "{:<6} {:<9} {:>10} {:>10}",
        "type", "level", "rows/s", "µs/row"
    );
    for ty in types {
        if !wanted.is_empty() && !wanted.iter().any(|w| w.eq_ignore_ascii_case(ty.name())) {
            continue;
        }
        let row_bytes = N_COLS / ty.block_size() * ty.type_size();
        let weights: Vec<f32> = (0..N_ROWS * N_COLS).map(|_| 0.04 * rng.next()).collect();
        let mut base = vec![0u8; N_ROWS * row_bytes];
        for (w, b) in weights.chunks(N_COLS).zip(base.chunks_mut(row_bytes)) {
            quant::quantize_row(ty, w, b, None).expect("quantize the base");
        }
        // A trained adapter's size of change: about 2% of the weights' RMS.
        let exact: Vec<f32> = weights.iter().map(|w| w + 0.0005 * rng.next()).collect();
        let mut out = vec![0u8; N_ROWS * row_bytes];
        for level in [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512] {
            if level > quant::simd::detected() {
                continue;
            }
            let best = (0..REPS)
                .map(|_| {
                    let start = thread_cpu();
                    with_level(level, || {
                        preserve::encode_rows(ty, &stats, &exact, Some(&base), &mut out)
                            .expect("encode")
                    });
                    thread_cpu() - start
                })
                .min()
                .unwrap_or_default();
            let secs = best.as_secs_f64();
            println!(
                "{:<6} {:<9} {:>10.0} {:>10.1}",
                ty.name(),
                level.name(),
                N_ROWS as f64 / secs,
                secs * 1e6 / N_ROWS as f64
            );
        }
    }
    println!("load after: {}", load());
}
