//! One row-quantization loop, for instruction counts and profiles of a single codec at one SIMD level:
//! `cargo run --release --example quantize_loop -- TYPE ROWS [REPS] [--imatrix] [--level LEVEL]`.
//!
//! Quantizes ROWS rows of 4096 values (the data of `benches/codecs.rs`: sums of uniforms with
//! outliers) REPS times, then prints the rate per CPU second of the thread (the machine may be
//! shared) and a hash of the bytes (equal hashes at every level
//! and before/after a change are a quick bit-identity check). The loop is the non-inlined function
//! `quantize_loop`, so `valgrind --tool=callgrind --toggle-collect='quantize_loop::quantize_loop'`
//! counts exactly its instructions. Valgrind does not emulate AVX-512: under it the widest level
//! that runs is AVX2.
use gguf_lora::quant::simd::{with_level, SimdLevel};
use gguf_lora::quant::{self, GgmlType};
use std::hint::black_box;

const N_PER_ROW: usize = 4096;

fn data(n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut x: Vec<f32> = (0..n)
        .map(|_| (next() + next() + next() - 1.5) * 0.05)
        .collect();
    for i in (0..x.len()).step_by(997) {
        x[i] *= 20.0;
    }
    let imatrix = (0..N_PER_ROW).map(|_| next() * next() * 4.0).collect();
    (x, imatrix)
}

/// `struct timespec` of 64-bit Linux.
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clock_id: i32, tp: *mut Timespec) -> i32;
}

/// CPU time of the calling thread in seconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_seconds() -> f64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: libc's clock_gettime writes one `struct timespec` through the valid pointer.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[inline(never)]
fn quantize_loop(ty: GgmlType, x: &[f32], q: &mut [u8], imatrix: Option<&[f32]>) {
    let rb = q.len() / (x.len() / N_PER_ROW);
    for (xr, qr) in x.chunks_exact(N_PER_ROW).zip(q.chunks_exact_mut(rb)) {
        quant::quantize_row(ty, xr, qr, imatrix).expect("whole rows");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: quantize_loop TYPE ROWS [REPS] [--imatrix] [--level portable|avx2|avx512]";
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--level"))
        .map(|(_, a)| a)
        .collect();
    let ty = positional
        .first()
        .and_then(|t| GgmlType::from_name(t))
        .expect(usage);
    let rows: usize = positional.get(1).and_then(|r| r.parse().ok()).expect(usage);
    let reps: usize = positional.get(2).and_then(|r| r.parse().ok()).unwrap_or(1);
    let imat = args.iter().any(|a| a == "--imatrix");
    let level = match args.iter().position(|a| a == "--level") {
        Some(i) => SimdLevel::ALL
            .into_iter()
            .find(|l| Some(l.name()) == args.get(i + 1).map(String::as_str))
            .expect(usage),
        None => quant::simd::detected(),
    };
    let (x, w) = data(rows * N_PER_ROW);
    let mut q = vec![0u8; ty.row_bytes(N_PER_ROW as u64).expect("whole blocks") as usize * rows];
    let t = thread_cpu_seconds();
    with_level(level, || {
        for _ in 0..reps {
            quantize_loop(ty, &x, &mut q, imat.then_some(&w[..]));
        }
    });
    let s = thread_cpu_seconds() - t;
    let h = q.iter().fold(0u64, |h, &b| {
        h.wrapping_mul(0x100000001b3).wrapping_add(b as u64)
    });
    println!(
        "{ty} {} imatrix={imat} {:.1} Mw/s hash {h:016x}",
        quant::simd::active().min(level),
        (rows * N_PER_ROW * reps) as f64 / s / 1e6
    );
    black_box(q);
}
