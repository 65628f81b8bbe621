//! Loss + gradient throughput (bytes of logits per second) beside a device copy of the same
//! logits on the same adapter, for CE, DiceCE, CE + L1 region (T = 10) and all terms.
//! `cargo bench`; the 16×21×512×512 shape runs only on a real (non-CPU) adapter.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use segloss::bench::Problem;
use segloss::input::{Layout, Shape};
use segloss::{GpuContext, LossSpec};
use std::time::Duration;

const SPECS: &[(&str, &str)] = &[
    ("ce", r#"{"terms":[{"kind":"cross_entropy"}]}"#),
    (
        "dicece",
        r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#,
    ),
    (
        "ce_l1_t10",
        r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","penalty":"l1","temperature":10}]}"#,
    ),
    (
        "all_terms",
        r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal"},{"kind":"dice"},{"kind":"tversky"},{"kind":"generalized_dice"},{"kind":"region","penalty":"kl","temperature":10}]}"#,
    ),
];

fn losses(c: &mut Criterion) {
    let ctx = match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => panic!("benchmarks need a GPU adapter: {e}"),
    };
    let software = ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let mut shapes = vec![
        Shape::new(1, 2, &[64, 64]),
        Shape::new(8, 4, &[256, 256]),
        Shape::new(2, 4, &[96, 96, 96]),
    ];
    if !software {
        shapes.push(Shape::new(16, 21, &[512, 512]));
    }
    let mut group = c.benchmark_group("loss_and_gradient");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(if software { 3 } else { 5 }));
    for shape in &shapes {
        let name = format!(
            "{}x{}x{}",
            shape.batch,
            shape.classes,
            shape
                .spatial
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x")
        );
        group.throughput(Throughput::Bytes(4 * shape.len() as u64));
        let copy_problem = Problem::new(
            &ctx,
            &LossSpec::from_json(SPECS[0].1).unwrap(),
            shape,
            Layout::Nchw,
            None,
        )
        .unwrap();
        group.bench_with_input(BenchmarkId::new("device_copy", &name), shape, |b, _| {
            b.iter(|| copy_problem.copy_once(&ctx).unwrap())
        });
        for (label, json) in SPECS {
            let spec = LossSpec::from_json(json).unwrap();
            let problem = Problem::new(&ctx, &spec, shape, Layout::Nchw, None).unwrap();
            group.bench_with_input(BenchmarkId::new(*label, &name), shape, |b, _| {
                b.iter(|| problem.run_once(&ctx, false).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, losses);
criterion_main!(benches);
