//! Device time of each stage alone, for performance work: the statistics pass, the whole
//! forward (statistics + finalize) and forward + gradient, against a copy of the logits.
//!
//! cargo run --release --example stage_times -- 8,4,256,256 [ROUNDS] [SPEC]
//!
//! SPEC is a loss spec in JSON (default DiceCE: cross_entropy + dice). With a spec of pixel
//! terms only, "+grad" takes the one-pass path where it applies (ARCHITECTURE.md, "One pass
//! for pixel terms").

use segloss::gpu::{DeviceBatch, GpuContext, GradTarget};
use segloss::input::{LabelFormat, Labels, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::LossSpec;
use std::time::Instant;
use wgpu::util::DeviceExt;

fn main() -> segloss::Result<()> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "8,4,256,256".into());
    let d: Vec<usize> = arg.split(',').filter_map(|v| v.parse().ok()).collect();
    let shape = Shape::new(d[0], d[1], &d[2..]);
    let spec = LossSpec::from_json(
        &std::env::args()
            .nth(3)
            .unwrap_or_else(|| r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#.into()),
    )?;
    let ctx = GpuContext::new()?;
    let dev = ctx.device();
    let mut rng = Rng::new(1);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.0);
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let logits = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&z),
        usage,
    });
    let words = LabelFormat::U8.encode(&Labels::index(&y), -100, shape.classes)?;
    let labels = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&words),
        usage,
    });
    let grad = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: logits.size(),
        usage,
        mapped_at_creation: false,
    });
    let batch = DeviceBatch::new(&shape, &logits, &labels, LabelFormat::U8);
    // Each round times every variant once, in turn, so all see the same machine state
    // (lavapipe's times drift by tens of percent within a minute); medians of the rounds.
    // Finalize alone: the two-phase API given the statistics, without the gradient.
    let mut enc = dev.create_command_encoder(&Default::default());
    let st = ctx.record_statistics(&mut enc, &spec, &batch)?;
    ctx.queue().submit([enc.finish()]);
    let st = st.statistics(&ctx)?;
    type Variant<'a> = &'a dyn Fn(&mut wgpu::CommandEncoder) -> segloss::Result<()>;
    let variants: [Variant; 5] = [
        &|enc| {
            enc.copy_buffer_to_buffer(&logits, 0, &grad, 0, logits.size());
            Ok(())
        },
        &|enc| ctx.record_statistics(enc, &spec, &batch).map(|_| ()),
        &|enc| ctx.record(enc, &spec, &batch, None).map(|_| ()),
        &|enc| {
            ctx.record(enc, &spec, &batch, Some(GradTarget::f32(&grad)))
                .map(|_| ())
        },
        &|enc| {
            ctx.record_with_statistics(enc, &spec, &batch, &st, None)
                .map(|_| ())
        },
    ];
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(15);
    let mut times = vec![vec![]; variants.len()];
    for round in 0..rounds + 2 {
        for (k, f) in variants.iter().enumerate() {
            let t = Instant::now();
            let mut enc = dev.create_command_encoder(&Default::default());
            f(&mut enc)?;
            ctx.queue().submit([enc.finish()]);
            dev.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| segloss::Error::Gpu(e.to_string()))?;
            // The first two rounds compile the pipelines and warm the pools.
            if round >= 2 {
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [copy, stats, forward, full, finalize] = [0, 1, 2, 3, 4].map(|k| median(&mut times[k]));
    println!(
        "{arg} on {}: copy {copy:.3} ms | stats {stats:.3} | stats+finalize {forward:.3} | +grad {full:.3} ms | finalize alone {finalize:.3} ms",
        ctx.adapter_info().name
    );
    Ok(())
}
