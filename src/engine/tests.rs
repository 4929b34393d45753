//! Unit tests of the engine on synthetic F32/F16 bases.

use super::*;
use crate::adapter::LowRank;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn low_rank(seed: &mut u64, rows: usize, cols: usize, rank: usize, scale: f32) -> LowRank {
    LowRank {
        a: (0..rank * cols).map(|_| lcg(seed)).collect(),
        b: (0..rows * rank).map(|_| lcg(seed)).collect(),
        rank,
        n_expert: 1,
        scale,
        magnitude: None,
    }
}

/// W + s·B·A in f64 (the independent reference).
fn reference(w: &[f32], lr: &LowRank, s: f64, cols: usize) -> Vec<f64> {
    let rows = w.len() / cols;
    let mut out: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    for i in 0..rows {
        for j in 0..cols {
            let d: f64 = (0..lr.rank)
                .map(|k| lr.b[i * lr.rank + k] as f64 * lr.a[k * cols + j] as f64)
                .sum();
            out[i * cols + j] += s * d;
        }
    }
    out
}

struct Fixture {
    data: Vec<Vec<u8>>,
    dims: Vec<Vec<u64>>,
    names: Vec<String>,
}

impl Fixture {
    fn new(seed: &mut u64) -> Fixture {
        let shapes = [
            ("tok", vec![64u64, 10]),
            ("blk.0.attn_q.weight", vec![96, 40]),
            ("blk.0.norm", vec![96]),
            ("blk.0.ffn_up.weight", vec![96, 700]),
        ];
        let mut f = Fixture {
            data: vec![],
            dims: vec![],
            names: vec![],
        };
        for (name, dims) in shapes {
            let n: u64 = dims.iter().product();
            f.data
                .push(f32_bytes(&(0..n).map(|_| lcg(seed)).collect::<Vec<_>>()));
            f.dims.push(dims);
            f.names.push(name.to_string());
        }
        f
    }

    fn base(&self) -> Vec<InputTensor<'_>> {
        (0..self.data.len())
            .map(|i| InputTensor {
                name: self.names[i].clone(),
                dims: self.dims[i].clone(),
                ty: GgmlType::F32,
                data: &self.data[i],
                map: None,
            })
            .collect()
    }
}

fn run(
    base: &[InputTensor<'_>],
    adapters: &[AdapterInput],
    opts: MergeOptions,
) -> (Vec<(usize, Vec<u8>)>, MergeReport) {
    let prepared = prepare(Some("llama"), base, adapters, &opts).unwrap();
    let mut written = Vec::new();
    let report = prepared
        .run(
            |i, b| {
                written.push((i, b.to_vec()));
                Ok(())
            },
            &|_, _| {},
        )
        .unwrap();
    (written, report)
}

#[test]
fn f32_merge_equals_reference_and_untouched_tensors_are_copied() {
    let mut seed = 1;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let lr1 = low_rank(&mut seed, 40, 96, 4, 0.5);
    let lr2 = low_rank(&mut seed, 700, 96, 8, 2.0);
    let want_q = reference(&floats(&fx.data[1]), &lr1, 0.5 * 1.5, 96);
    let want_up = reference(&floats(&fx.data[3]), &lr2, 2.0 * 1.5, 96);
    let adapters = vec![AdapterInput {
        name: "a".into(),
        architecture: Some("llama".into()),
        scale: 1.5,
        updates: vec![
            ("blk.0.attn_q.weight".into(), Update::low_rank(lr1)),
            ("blk.0.ffn_up.weight".into(), Update::low_rank(lr2)),
        ],
    }];
    let (written, report) = run(&base, &adapters, MergeOptions::default());
    assert_eq!(
        written.iter().map(|w| w.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(written[0].1, fx.data[0]);
    assert_eq!(written[2].1, fx.data[2]);
    for (got, want) in [
        (floats(&written[1].1), want_q),
        (floats(&written[3].1), want_up),
    ] {
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }
    assert_eq!(report.summary.tensors_merged, 2);
    assert_eq!(report.summary.tensors_copied, 2);
    assert_eq!(report.tensors[0].ranks, vec![4]);
    // F32 → F32: nothing lost.
    assert_eq!(report.tensors[0].relative_error, Some(0.0));
    assert!(report.tensors[0].rms_delta > 0.0);
}

#[test]
fn two_adapters_with_different_tensor_sets_sum() {
    let mut seed = 2;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let a1 = low_rank(&mut seed, 40, 96, 2, 1.0);
    let a2 = low_rank(&mut seed, 40, 96, 3, 1.0);
    let a3 = low_rank(&mut seed, 700, 96, 3, 1.0);
    let step1 = reference(&floats(&fx.data[1]), &a1, 0.7, 96);
    let step1_f32: Vec<f32> = step1.iter().map(|&x| x as f32).collect();
    let want_q = reference(&step1_f32, &a2, -0.3, 96);
    let want_up = reference(&floats(&fx.data[3]), &a3, -0.3, 96);
    let adapters = vec![
        AdapterInput {
            name: "one".into(),
            architecture: None,
            scale: 0.7,
            updates: vec![("blk.0.attn_q.weight".into(), Update::low_rank(a1))],
        },
        AdapterInput {
            name: "two".into(),
            architecture: Some("llama".into()),
            scale: -0.3,
            updates: vec![
                ("blk.0.attn_q.weight".into(), Update::low_rank(a2)),
                ("blk.0.ffn_up.weight".into(), Update::low_rank(a3)),
            ],
        },
    ];
    let (written, report) = run(&base, &adapters, MergeOptions::default());
    for (got, want) in [
        (floats(&written[1].1), want_q),
        (floats(&written[3].1), want_up),
    ] {
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()));
        }
    }
    assert_eq!(report.tensors[0].adapters, vec!["one", "two"]);
    assert_eq!(report.tensors[1].adapters, vec!["two"]);
}

#[test]
fn dora_rescales_each_row_to_its_magnitude() {
    let mut seed = 3;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let mut lr = low_rank(&mut seed, 40, 96, 4, 1.0);
    let mag: Vec<f32> = (0..40).map(|i| 0.5 + i as f32 * 0.1).collect();
    lr.magnitude = Some(mag.clone());
    let plain = reference(&floats(&fx.data[1]), &lr, 1.0, 96);
    let adapters = vec![AdapterInput {
        name: "d".into(),
        architecture: None,
        scale: 1.0,
        updates: vec![("blk.0.attn_q.weight".into(), Update::low_rank(lr))],
    }];
    let (written, report) = run(&base, &adapters, MergeOptions::default());
    let got = floats(&written[1].1);
    for i in 0..40 {
        let row = &plain[i * 96..(i + 1) * 96];
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        for j in 0..96 {
            let want = mag[i] as f64 / norm * row[j];
            assert!((got[i * 96 + j] as f64 - want).abs() < 1e-5, "row {i}");
        }
    }
    assert!(report.tensors[0].dora);
}

#[test]
fn replace_and_add_updates() {
    let mut seed = 4;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let replacement: Vec<f32> = (0..640).map(|i| i as f32).collect();
    let bias: Vec<f32> = (0..96).map(|i| i as f32 * 0.01).collect();
    let adapters = vec![AdapterInput {
        name: "m".into(),
        architecture: None,
        scale: 2.0,
        updates: vec![
            ("tok".into(), Update::replace(replacement.clone())),
            ("blk.0.norm".into(), Update::add(bias.clone())),
        ],
    }];
    let (written, _) = run(&base, &adapters, MergeOptions::default());
    assert_eq!(floats(&written[0].1), replacement);
    let norm0 = floats(&fx.data[2]);
    let got = floats(&written[2].1);
    for j in 0..96 {
        assert_eq!(got[j], norm0[j] + 2.0 * bias[j]);
    }
}

#[test]
fn every_problem_is_listed_and_nothing_is_written() {
    let mut seed = 5;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let adapters = vec![
        AdapterInput {
            name: "bad1".into(),
            architecture: Some("qwen2".into()),
            scale: 1.0,
            updates: vec![
                (
                    "blk.9.attn_q.weight".into(),
                    Update::low_rank(low_rank(&mut seed, 40, 96, 2, 1.0)),
                ),
                (
                    "blk.0.attn_q.weight".into(),
                    Update::low_rank(low_rank(&mut seed, 41, 96, 2, 1.0)),
                ),
            ],
        },
        AdapterInput {
            name: "bad2".into(),
            architecture: None,
            scale: 1.0,
            updates: vec![(
                "blk.0.ffn_up.weight".into(),
                Update::low_rank(low_rank(&mut seed, 700, 95, 2, 1.0)),
            )],
        },
    ];
    let err = prepare(Some("llama"), &base, &adapters, &MergeOptions::default())
        .err()
        .expect("refused");
    let EngineError::Plan(lines) = &err else {
        panic!("{err}")
    };
    assert_eq!(lines.len(), 4, "{lines:?}");
    let text = err.to_string();
    for needle in [
        "qwen2",
        "blk.9.attn_q.weight",
        "expected 40 × rank 2",
        "expected rank 2 × 96",
    ] {
        assert!(text.contains(needle), "{needle} missing in {text}");
    }
}

#[test]
fn outtype_f16_and_fallback_reporting() {
    let mut seed = 6;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let adapters = vec![AdapterInput {
        name: "a".into(),
        architecture: None,
        scale: 1.0,
        updates: vec![(
            "blk.0.attn_q.weight".into(),
            Update::low_rank(low_rank(&mut seed, 40, 96, 4, 1.0)),
        )],
    }];
    let opts = MergeOptions {
        outtype: MergeType::Type(GgmlType::F16),
        ..Default::default()
    };
    let prepared = prepare(None, &base, &adapters, &opts).unwrap();
    let types = prepared.output_types();
    assert_eq!(
        types,
        vec![GgmlType::F32, GgmlType::F16, GgmlType::F32, GgmlType::F32]
    );
    let mut sizes = Vec::new();
    let report = prepared
        .run(
            |_, b| {
                sizes.push(b.len());
                Ok(())
            },
            &|_, _| {},
        )
        .unwrap();
    assert_eq!(sizes[1], 40 * 96 * 2);
    let t = &report.tensors[0];
    assert_eq!(
        (t.type_in.as_str(), t.type_out.as_str(), t.fallback),
        ("f32", "f16", false)
    );
    assert!(t.relative_error.unwrap() > 0.0 && t.relative_error.unwrap() < 0.01);
}

#[test]
fn a_failing_sink_stops_the_merge_with_its_error() {
    let mut seed = 7;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let adapters = vec![AdapterInput {
        name: "a".into(),
        architecture: None,
        scale: 1.0,
        updates: vec![(
            "blk.0.ffn_up.weight".into(),
            Update::low_rank(low_rank(&mut seed, 700, 96, 4, 1.0)),
        )],
    }];
    let opts = MergeOptions::default();
    let prepared = prepare(None, &base, &adapters, &opts).unwrap();
    let err = prepared
        .run(
            |i, _| {
                if i == 1 {
                    Err(EngineError::from("disk full"))
                } else {
                    Ok(())
                }
            },
            &|_, _| {},
        )
        .expect_err("error");
    assert_eq!(err.to_string(), "disk full");
}

/// The stream tries the candidate types on the sampled rows as it merges them, a run split
/// between two row blocks included, and measures what the pass before the stream (the one
/// `--promote auto` uses) measures on the same rows; the written type's candidate is its
/// every-row measurement. Through `prepare`/`run`, the report's candidates are the same.
#[test]
fn candidates_tried_in_the_stream_measure_what_the_pass_before_it_does() {
    let mut seed = 7;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let lr = low_rank(&mut seed, 700, 96, 8, 0.05);
    let adapters = vec![AdapterInput {
        name: "a".into(),
        architecture: Some("llama".into()),
        scale: 1.0,
        updates: vec![("blk.0.ffn_up.weight".into(), Update::low_rank(lr))],
    }];
    let opts = MergeOptions {
        outtype: MergeType::Type(GgmlType::Q4_0),
        ..Default::default()
    };
    let plans = plan::plan(Some("llama"), &base, &adapters, opts.outtype).unwrap();
    let p = plans.iter().find(|p| p.is_touched()).unwrap();
    let types = promote::candidate_types(p, &opts.promote, promote::floor_bits(&plans));
    assert!(types.len() >= 3 && types[0] == GgmlType::Q4_0, "{types:?}");
    let close = |a: &stream::ErrorSums, b: &stream::ErrorSums| {
        let near = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-30);
        a.n == b.n
            && near(a.weights.sq_delta, b.weights.sq_delta)
            && near(a.weights.sq_noise, b.weights.sq_noise)
            && near(a.weights.dot_kept, b.weights.dot_kept)
    };
    let t = &base[p.index];
    let block = stream::BLOCK_ELEMS / p.n_cols;
    let runs = vec![(0, 3), (block - 10, 20), (p.n_rows - 10, 10)];
    let phases = Phases::default();
    let before = stream::sample_errors(p, &t.name, t.data, &runs, &types, &phases).unwrap();
    let sampling = stream::Sampling {
        types: types.clone(),
        runs,
    };
    let (_, sums) =
        stream::merge_tensor(p, &t.name, t.data, Vec::new(), &phases, Some(&sampling)).unwrap();
    assert_eq!(sums.candidates.len(), types.len());
    assert!(close(&sums.candidates[0], &sums.written));
    assert_eq!(sums.written.n, (p.n_rows * p.n_cols) as u64);
    for i in 1..types.len() {
        assert!(
            close(&before[i], &sums.candidates[i]),
            "{:?}: {:?} before the stream, {:?} in it",
            types[i],
            before[i],
            sums.candidates[i]
        );
    }
    let separate = promote::measure_candidates(
        &base,
        &plans,
        &plans
            .iter()
            .map(|p| promote::candidate_types(p, &opts.promote, promote::floor_bits(&plans)))
            .collect::<Vec<_>>(),
        &opts,
        &phases,
    )
    .unwrap();
    let (_, report) = run(&base, &adapters, opts);
    let merged = report
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_up.weight")
        .unwrap();
    let want = &separate[p.index];
    assert_eq!(merged.candidates.len(), want.len());
    for (got, want) in merged.candidates.iter().zip(want).skip(1) {
        assert_eq!(got.ty, want.ty);
        let (g, w) = (got.relative_error.unwrap(), want.relative_error.unwrap());
        assert!((g - w).abs() <= 1e-9 * w, "{}: {g} against {w}", got.ty);
    }
    assert_eq!(merged.candidates[0].relative_error, merged.relative_error);
}

/// `--token-embedding-type`: a tensor no adapter touches, given a type of its own, is written as
/// ggml's round-to-nearest of its values; it is reported apart (retyped, not merged) and its
/// rounding does not pool with the adapter's share kept.
#[test]
fn a_retyped_untouched_tensor_is_rounded_to_nearest_and_kept_apart_from_the_adapter() {
    let mut seed = 8;
    let fx = Fixture::new(&mut seed);
    let base = fx.base();
    let adapters = vec![AdapterInput {
        name: "a".into(),
        architecture: None,
        scale: 1.0,
        updates: vec![(
            "blk.0.attn_q.weight".into(),
            Update::low_rank(low_rank(&mut seed, 40, 96, 4, 1.0)),
        )],
    }];
    let opts = |retype: Vec<(String, GgmlType)>| MergeOptions {
        outtype: MergeType::Type(GgmlType::Q8_0),
        retype,
        ..Default::default()
    };
    let (plain_written, plain) = run(&base, &adapters, opts(Vec::new()));
    let (written, report) = run(
        &base,
        &adapters,
        opts(vec![("tok".to_string(), GgmlType::Q4_0)]),
    );
    let mut want = vec![0u8; GgmlType::Q4_0.row_bytes(64).unwrap() as usize * 10];
    crate::quant::quantize_rows(GgmlType::Q4_0, &floats(&fx.data[0]), 64, &mut want, None).unwrap();
    assert_eq!(written[0].1, want);
    assert_eq!(plain_written[0].1, fx.data[0]);
    // The merged tensor is the same bytes either way.
    assert_eq!(written[1].1, plain_written[1].1);
    let s = &report.summary;
    assert_eq!(
        (s.tensors_merged, s.tensors_retyped, s.tensors_copied),
        (1, 1, 2)
    );
    assert_eq!(plain.summary.tensors_retyped, 0);
    assert_eq!(s.kept.share_kept, plain.summary.kept.share_kept);
    assert_eq!(s.relative_error, plain.summary.relative_error);
    assert_eq!(s.per_type.len(), 1);
    let tok = report.tensors.iter().find(|t| t.name == "tok").unwrap();
    assert!(tok.adapters.is_empty() && tok.type_out == "q4_0" && tok.rms_error > 0.0);
    assert_eq!(tok.bytes_out, want.len() as u64);
    assert_eq!(
        s.bytes_out,
        plain.summary.bytes_out - 64 * 10 * 4 + want.len() as u64
    );

    // A tensor the base does not have is an error naming it, before anything is written.
    let bad = opts(vec![("output.weight".to_string(), GgmlType::Q8_0)]);
    let err = prepare(None, &base, &adapters, &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cannot give 'output.weight' its own type: the base has no such tensor"),
        "{err}"
    );
}

/// The bytes a retyped tensor gives back are budget `--promote auto:0` spends on the merged
/// tensors, so the output stays within the base's size; without them nothing can be promoted.
#[test]
fn bytes_a_retyped_tensor_frees_fund_promote_auto() {
    let mut seed = 9;
    let embd: Vec<f32> = (0..96 * 1000).map(|_| lcg(&mut seed)).collect();
    let up: Vec<f32> = (0..96 * 700).map(|_| lcg(&mut seed)).collect();
    let mut up_q4 = vec![0u8; GgmlType::Q4_0.row_bytes(96).unwrap() as usize * 700];
    crate::quant::quantize_rows(GgmlType::Q4_0, &up, 96, &mut up_q4, None).unwrap();
    let embd_bytes = f32_bytes(&embd);
    let base = vec![
        InputTensor {
            name: "token_embd.weight".into(),
            dims: vec![96, 1000],
            ty: GgmlType::F32,
            data: &embd_bytes,
            map: None,
        },
        InputTensor {
            name: "blk.0.ffn_up.weight".into(),
            dims: vec![96, 700],
            ty: GgmlType::Q4_0,
            data: &up_q4,
            map: None,
        },
    ];
    let up_update = low_rank(&mut seed, 700, 96, 8, 0.05);
    let embd_update: Vec<f32> = (0..96 * 1000).map(|_| 0.01 * lcg(&mut seed)).collect();
    let opts = |retype: Vec<(String, GgmlType)>| MergeOptions {
        promote: Promote::Auto { budget: 0.0 },
        retype,
        ..Default::default()
    };
    let base_bytes = (embd_bytes.len() + up_q4.len()) as u64;
    // The embedding untouched, then trained too (a retyped tensor an adapter touches frees bytes
    // the same way).
    for embd_touched in [false, true] {
        let mut updates = vec![(
            "blk.0.ffn_up.weight".to_string(),
            Update::low_rank(up_update.clone()),
        )];
        if embd_touched {
            updates.push((
                "token_embd.weight".to_string(),
                Update::add(embd_update.clone()),
            ));
        }
        let adapters = vec![AdapterInput {
            name: "a".into(),
            architecture: None,
            scale: 1.0,
            updates,
        }];
        let (_, alone) = run(&base, &adapters, opts(Vec::new()));
        assert_eq!(alone.summary.tensors_promoted, 0);
        assert_eq!(alone.summary.bytes_out, base_bytes);
        let retype = vec![("token_embd.weight".to_string(), GgmlType::Q4_0)];
        let (_, funded) = run(&base, &adapters, opts(retype));
        let up = funded
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.ffn_up.weight")
            .unwrap();
        let was = alone.tensors.iter().find(|t| t.name == up.name).unwrap();
        assert!(
            up.promoted,
            "embedding touched {embd_touched}: {} stayed {}",
            up.name, up.type_out
        );
        assert_eq!(funded.tensors[0].type_out, "q4_0");
        assert!(!funded.tensors[0].promoted);
        assert!(funded.summary.bytes_out <= base_bytes);
        assert!(up.kept.share_kept > was.kept.share_kept);
    }
}
