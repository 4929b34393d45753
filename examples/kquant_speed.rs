//! Single-thread throughput of the K-quant codecs beside libggml's, same data, same run:
//! `eval "$(bash scripts/setup-env.sh --print-env)"; cargo run --release --example kquant_speed [TYPE]`.
//! Single thread: million values per CPU second (the machine may be shared); "xN": all N threads,
//! rows in parallel, million values per wall-clock second. Measures ours, then runs `testdata/codecs/ggml_kquant_speed.py`
//! (libggml through ctypes, with `$GGUF_LORA_PYTHON`) and prints both side by side.
use gguf_lora::quant::kquants::*;
use rayon::prelude::*;

/// CPU time of this thread in seconds (from /proc/thread-self/schedstat, in ns): the machine is
/// shared, so wall time would measure the neighbours.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("linux schedstat");
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .expect("schedstat run time") as f64
        / 1e9
}

type Quantize = fn(&[f32], &mut [u8], Option<&[f32]>);
type Dequantize = fn(&[u8], &mut [f32]);

/// Runs `f` (which handles `mvals` million values) until it has used a CPU second; returns Mval/s.
fn repeat_for_a_second(mvals: f64, mut f: impl FnMut()) -> f64 {
    let start = cpu_seconds();
    let mut reps = 0;
    while cpu_seconds() - start < 1.0 {
        f();
        reps += 1;
    }
    reps as f64 * mvals / (cpu_seconds() - start)
}

/// Runs `f` (which handles `mvals` million values) for a wall-clock second; returns Mval/s.
fn repeat_for_a_wall_second(mvals: f64, mut f: impl FnMut()) -> f64 {
    let start = std::time::Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 1.0 {
        f();
        reps += 1;
    }
    reps as f64 * mvals / start.elapsed().as_secs_f64()
}

fn main() {
    let n_per_row = 4096;
    let nrows = 64;
    // Same data as the Python script: a fixed LCG, uniform in [-1, 1).
    let mut state = 12345u64;
    let x: Vec<f32> = (0..n_per_row * nrows)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let imatrix: Vec<f32> = (0..n_per_row).map(|i| 0.5 + (i % 7) as f32).collect();
    let codecs: [(&str, usize, Quantize, Dequantize); 6] = [
        ("q2_K", Q2_K_BYTES, quantize_row_q2_k, dequantize_row_q2_k),
        ("q3_K", Q3_K_BYTES, quantize_row_q3_k, dequantize_row_q3_k),
        ("q4_K", Q4_K_BYTES, quantize_row_q4_k, dequantize_row_q4_k),
        ("q5_K", Q5_K_BYTES, quantize_row_q5_k, dequantize_row_q5_k),
        ("q6_K", Q6_K_BYTES, quantize_row_q6_k, dequantize_row_q6_k),
        ("q8_K", Q8_K_BYTES, quantize_row_q8_k, dequantize_row_q8_k),
    ];
    let filter = std::env::args().nth(1);
    let mut ours = Vec::new();
    for (name, bytes, quantize, dequantize) in codecs {
        if filter.as_deref().is_some_and(|f| f != name) {
            continue;
        }
        let mut q = vec![0u8; x.len() / 256 * bytes];
        let mut y = vec![0f32; x.len()];
        let mvals = x.len() as f64 / 1e6;
        for (label, imat) in [("ref", None), ("imatrix", Some(&imatrix[..]))] {
            let rate = repeat_for_a_second(mvals, || {
                for row in 0..nrows {
                    let xr = &x[row * n_per_row..(row + 1) * n_per_row];
                    let qr =
                        &mut q[row * n_per_row / 256 * bytes..(row + 1) * n_per_row / 256 * bytes];
                    quantize(xr, qr, imat);
                }
            });
            ours.push((format!("{name} quantize {label}"), rate));
        }
        let rate = repeat_for_a_second(mvals, || dequantize(&q, &mut y));
        ours.push((format!("{name} dequantize"), rate));

        // All threads: rows in parallel with rayon, wall-clock time.
        let threads = rayon::current_num_threads();
        let row_bytes = n_per_row / 256 * bytes;
        for (label, imat) in [("ref", None), ("imatrix", Some(&imatrix[..]))] {
            let rate = repeat_for_a_wall_second(mvals, || {
                x.par_chunks(n_per_row)
                    .zip(q.par_chunks_mut(row_bytes))
                    .for_each(|(xr, qr)| quantize(xr, qr, imat));
            });
            ours.push((format!("{name} quantize {label} x{threads}"), rate));
        }
        let rate = repeat_for_a_wall_second(mvals, || {
            q.par_chunks(row_bytes)
                .zip(y.par_chunks_mut(n_per_row))
                .for_each(|(qr, yr)| dequantize(qr, yr));
        });
        ours.push((format!("{name} dequantize x{threads}"), rate));
    }
    let ggml = ggml_rates(filter.as_deref());
    println!(
        "{:28} {:>12} {:>12} {:>7}",
        "Mval/s", "gguf-lora", "libggml", "ratio"
    );
    for (what, rate) in ours {
        match ggml.iter().find(|(w, _)| *w == what) {
            Some((_, g)) => println!("{what:28} {rate:12.2} {g:12.2} {:7.2}", rate / g),
            None => println!("{what:28} {rate:12.2} {:>12} {:>7}", "-", "-"),
        }
    }
}

/// libggml's rates from `ggml_kquant_speed.py` (empty, with a note, when Python is not set up).
fn ggml_rates(filter: Option<&str>) -> Vec<(String, f64)> {
    let Ok(python) = std::env::var("GGUF_LORA_PYTHON") else {
        eprintln!("GGUF_LORA_PYTHON not set: no libggml column (see scripts/setup-env.sh)");
        return Vec::new();
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(python)
        .arg(format!("{root}/testdata/codecs/ggml_kquant_speed.py"))
        .args(filter)
        .env("PYTHONPATH", format!("{root}/testdata/tools"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (what, rate) = fields.split_at(fields.len().checked_sub(2)?);
            Some((what.join(" "), rate[0].parse().ok()?))
        })
        .collect()
}
