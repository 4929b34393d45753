//! Codec throughput, ours beside libggml's on the same data in the same run (a benchmark, not a test).
//!
//! `cargo bench --bench codecs [-- TYPE...]` prints two tables of millions of weights per second:
//! - one thread, per SIMD level this CPU runs (portable, AVX2, AVX-512; see `quant::simd`) and for
//!   libggml: quantize, quantize with an imatrix (where ggml has such a variant) and dequantize, with
//!   the ratio of our dispatched (widest) level to libggml;
//! - all threads, our dispatched level against libggml.
//!
//! libggml is timed by `testdata/codecs/ggml_bench.py` through ctypes (`ggml_quantize_chunk`, the
//! type's `to_float`) with the same rows, the same imatrix and the same thread count, in the same run.
//! Each figure is the best of a few runs. The machine is shared, so one-thread figures use the
//! thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, for ggml through Python's `time.thread_time`);
//! all-thread figures are wall time and only mean something on an idle machine. The load average
//! (`/proc/loadavg`) before and after is printed with the tables.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gguf_lora::quant::simd::{with_level, SimdLevel};
use gguf_lora::quant::{self, GgmlType};

const N_PER_ROW: usize = 4096;
const N_ROWS: usize = 512; // 2 Mi weights
const REPS: usize = 3;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv python and libggml directory from `scripts/setup-env.sh` (installs them if missing).
fn interop_env() -> Vec<(String, String)> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup-env.sh"))
        .arg("--print-env")
        .output()
        .expect("run scripts/setup-env.sh");
    assert!(out.status.success(), "scripts/setup-env.sh failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Best wall time of [`REPS`] runs of `f`, in seconds.
fn best(mut f: impl FnMut()) -> f64 {
    (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
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

/// CPU time of the calling thread in seconds (`CLOCK_THREAD_CPUTIME_ID`, exact at any moment, unlike
/// `/proc/thread-self/schedstat`, which is only brought up to date at scheduler ticks).
fn thread_cpu_seconds() -> f64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: libc's clock_gettime writes one `struct timespec` (two 64-bit fields on x86-64 and
    // AArch64 Linux) through the valid pointer it is given.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best thread CPU time of [`REPS`] runs of `f` on the one-thread pool, in seconds.
fn best_cpu(single: &rayon::ThreadPool, mut f: impl FnMut() + Send) -> f64 {
    single.install(|| {
        (0..REPS)
            .map(|_| {
                let t = thread_cpu_seconds();
                f();
                thread_cpu_seconds() - t
            })
            .fold(f64::INFINITY, f64::min)
    })
}

/// Deterministic normal-ish data (sum of uniforms), with a few outliers per row like real weights.
fn data() -> (Vec<f32>, Vec<f32>) {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut x: Vec<f32> = (0..N_ROWS * N_PER_ROW)
        .map(|_| (next() + next() + next() - 1.5) * 0.05)
        .collect();
    for i in (0..x.len()).step_by(997) {
        x[i] *= 20.0;
    }
    let imatrix = (0..N_PER_ROW).map(|_| next() * next() * 4.0).collect();
    (x, imatrix)
}

/// Our one-thread CPU seconds at one SIMD level.
struct LevelTimes {
    q1: f64,
    /// With an imatrix, where ggml has such a variant.
    qi1: Option<f64>,
    deq1: f64,
}

/// Our seconds for one type: one thread per level, and all threads at the dispatched level.
struct Ours {
    levels: Vec<LevelTimes>,
    q_n: f64,
    deq_n: f64,
}

fn time_ours(
    ty: GgmlType,
    x: &[f32],
    imatrix: &[f32],
    levels: &[SimdLevel],
    single: &rayon::ThreadPool,
) -> Ours {
    let row_bytes = ty.row_bytes(N_PER_ROW as u64).unwrap() as usize;
    let mut q = vec![0u8; row_bytes * N_ROWS];
    let mut y = vec![0f32; x.len()];
    let mut per_level = Vec::new();
    for &level in levels {
        // On the one-thread pool, `quantize_rows` runs on the pool's thread, where the level applies.
        let mut quantize = |im: Option<&[f32]>| {
            with_level(level, || {
                quant::quantize_rows(ty, x, N_PER_ROW, &mut q, im).unwrap();
            })
        };
        let q1 = best_cpu(single, || quantize(None));
        let qi1 =
            quant::has_imatrix_variant(ty).then(|| best_cpu(single, || quantize(Some(imatrix))));
        quant::quantize_rows(ty, x, N_PER_ROW, &mut q, None).unwrap();
        let deq1 = best_cpu(single, || {
            with_level(level, || {
                quant::dequantize_rows(ty, &q, N_PER_ROW, &mut y).unwrap();
            })
        });
        per_level.push(LevelTimes { q1, qi1, deq1 });
    }
    let q_n = best(|| quant::quantize_rows(ty, x, N_PER_ROW, &mut q, None).unwrap());
    quant::quantize_rows(ty, x, N_PER_ROW, &mut q, None).unwrap();
    let deq_n = best(|| quant::dequantize_rows(ty, &q, N_PER_ROW, &mut y).unwrap());
    Ours {
        levels: per_level,
        q_n,
        deq_n,
    }
}

/// `/proc/loadavg`'s three load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn main() {
    use GgmlType::*;
    // `cargo test --all-targets` runs this binary too, without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let all = [
        F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
    ];
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let types: Vec<GgmlType> = all
        .into_iter()
        .filter(|t| wanted.is_empty() || wanted.iter().any(|w| w.eq_ignore_ascii_case(t.name())))
        .collect();
    let threads = rayon::current_num_threads();
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect();
    let (x, imatrix) = data();

    let dir = tempfile::tempdir().unwrap();
    write_f32(&dir.path().join("data.f32"), &x);
    write_f32(&dir.path().join("imatrix.f32"), &imatrix);
    let spec = serde_json::json!({
        "n_per_row": N_PER_ROW, "reps": REPS, "threads": threads,
        "types": types.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "imatrix_types": types.iter().filter(|t| quant::has_imatrix_variant(**t)).map(|t| t.name()).collect::<Vec<_>>(),
    });
    std::fs::write(dir.path().join("spec.json"), spec.to_string()).unwrap();
    let env = interop_env();
    let python = env
        .iter()
        .find(|(k, _)| k == "GGUF_LORA_PYTHON")
        .map(|(_, v)| v.clone())
        .expect("GGUF_LORA_PYTHON");
    let load_before = load_average();
    let out = Command::new(python)
        .arg(repo_root().join("testdata/codecs/ggml_bench.py"))
        .arg(dir.path())
        .env("PYTHONPATH", repo_root().join("testdata/tools"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ggml_bench.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ggml: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<(GgmlType, Ours)> = types
        .iter()
        .map(|&ty| (ty, time_ours(ty, &x, &imatrix, &levels, &single)))
        .collect();
    let load_after = load_average();

    let mw = |secs: f64| x.len() as f64 / secs / 1e6;
    let g = |t: GgmlType, k: &str| ggml[t.name()][k].as_f64().map(mw);
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("x{:.2}", a / b),
        _ => "-".to_string(),
    };
    println!(
        "M weights per second, {N_ROWS} rows x {N_PER_ROW}, best of {REPS}; load average before {load_before}, after {load_after}"
    );
    let names: Vec<&str> = levels.iter().map(|l| l.name()).collect();
    let widest = levels.len() - 1;
    println!(
        "\nOne thread (its CPU time): ours at each SIMD level ({}), libggml, and our {} / libggml",
        names.join(", "),
        names[widest]
    );
    // Each group: one column per level, libggml, and the ratio.
    let width = 9 * (levels.len() + 1) + 8;
    let header: String = names
        .iter()
        .map(|n| format!(" {n:>8}"))
        .chain([format!(" {:>8}", "ggml"), format!(" {:>7}", "ratio")])
        .collect();
    println!(
        "{:<6} |{:^width$}|{:^width$}|{:^width$}|",
        "", "quantize", "quantize + imatrix", "dequantize"
    );
    println!("{:<6} |{header} |{header} |{header} |", "type");
    for (ty, o) in &ours {
        let group = |pick: &dyn Fn(&LevelTimes) -> Option<f64>, key: &str| {
            let mut r = String::new();
            for l in &o.levels {
                r += &format!(" {:>8}", cell(pick(l).map(mw)));
            }
            let best = pick(&o.levels[widest]).map(mw);
            r + &format!(
                " {:>8} {:>7} |",
                cell(g(*ty, key)),
                ratio(best, g(*ty, key))
            )
        };
        println!(
            "{:<6} |{}{}{}",
            ty.name(),
            group(&|l| Some(l.q1), "q1"),
            group(&|l| l.qi1, "qi1"),
            group(&|l| Some(l.deq1), "deq1"),
        );
    }
    println!(
        "\nAll {threads} threads (wall time), our {} against libggml",
        names[widest]
    );
    println!(
        "{:<6} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7}",
        "type", "quantize", "ggml", "ratio", "deq", "ggml", "ratio"
    );
    for (ty, o) in &ours {
        let (q, d) = (Some(mw(o.q_n)), Some(mw(o.deq_n)));
        println!(
            "{:<6} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7}",
            ty.name(),
            cell(q),
            cell(g(*ty, "qN")),
            ratio(q, g(*ty, "qN")),
            cell(d),
            cell(g(*ty, "deqN")),
            ratio(d, g(*ty, "deqN")),
        );
    }
}
