//! Device time of each stage alone, for performance work: the statistics pass, the whole
//! forward (statistics + finalize) and forward + gradient, against a copy of the logits.
//!
//! cargo run --release --example stage_times -- 8,4,256,256 [ROUNDS] [SPEC] [scalar | block=N | stats_block=N | grad_chunks=0 | uniform_coefs=0 | index_checks=1]
//!
//! SPEC is a loss spec in JSON (default DiceCE: cross_entropy + dice). With a spec of pixel
//! terms only, "+grad" takes the one-pass path where it applies (ARCHITECTURE.md, "One pass
//! for pixel terms"). `scalar` also times the stats pass and the whole call with the pixel
//! stages reading one pixel at a time where they would take quads (`Strategy::quad_pixels`
//! off), on a second device of the same adapter, interleaved with the others; `block=N`
//! `stats_block=N`, `grad_chunks=0`, `uniform_coefs=0` and `index_checks=1` do the same
//! with `Strategy::class_block`, `Strategy::stats_class_block` N, `Strategy::grad_chunks`
//! or `Strategy::uniform_coefs` off or `Strategy::index_checks` on instead.

use segloss::gpu::{DeviceBatch, GpuContext, GradTarget};
use segloss::input::{LabelFormat, Labels, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::LossSpec;
use std::time::Instant;
use wgpu::util::DeviceExt;

/// A context with the problem's logits, labels and a gradient buffer on its device.
struct Setup {
    ctx: GpuContext,
    logits: wgpu::Buffer,
    labels: wgpu::Buffer,
    grad: wgpu::Buffer,
}

impl Setup {
    fn new(ctx: GpuContext, shape: &Shape) -> segloss::Result<Self> {
        let mut rng = Rng::new(1);
        let z = random_logits(&mut rng, shape, 3.0);
        let y = random_labels(&mut rng, shape, 0.0);
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let dev = ctx.device();
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
        Ok(Setup {
            ctx,
            logits,
            labels,
            grad,
        })
    }

    fn batch<'a>(&'a self, shape: &'a Shape) -> DeviceBatch<'a> {
        DeviceBatch::new(shape, &self.logits, &self.labels, LabelFormat::U8)
    }
}

type Variant<'a> = Box<dyn Fn(&mut wgpu::CommandEncoder) -> segloss::Result<()> + 'a>;

fn main() -> segloss::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = args.get(1).cloned().unwrap_or_else(|| "8,4,256,256".into());
    let d: Vec<usize> = arg.split(',').filter_map(|v| v.parse().ok()).collect();
    let shape = Shape::new(d[0], d[1], &d[2..]);
    let spec = LossSpec::from_json(
        args.get(3)
            .map(String::as_str)
            .unwrap_or(r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#),
    )?;
    let main = Setup::new(GpuContext::new()?, &shape)?;
    // The second device's strategy, and what its lines are called.
    let other = args.get(4).map(String::as_str).unwrap_or("");
    let scalar = if other.is_empty() {
        None
    } else {
        let ctx = GpuContext::new()?;
        let mut strategy = ctx.strategy();
        let bad = || segloss::Error::Input(format!("unknown comparison {other}"));
        match other.split_once('=') {
            None if other == "scalar" => strategy.quad_pixels = false,
            Some(("block", n)) => strategy.class_block = n.parse().map_err(|_| bad())?,
            Some(("stats_block", n)) => {
                strategy.stats_class_block = n.parse().map_err(|_| bad())?
            }
            Some(("grad_chunks", n)) => strategy.grad_chunks = n == "1",
            Some(("uniform_coefs", n)) => strategy.uniform_coefs = n == "1",
            Some(("index_checks", n)) => strategy.index_checks = n == "1",
            _ => return Err(bad()),
        }
        Some(Setup::new(ctx.with_strategy(strategy)?, &shape)?)
    };
    // Finalize alone: the two-phase API given the statistics, without the gradient.
    let (ctx, batch) = (&main.ctx, main.batch(&shape));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let st = ctx.record_statistics(&mut enc, &spec, &batch)?;
    ctx.queue().submit([enc.finish()]);
    let st = st.statistics(ctx)?;
    let (spec, st, main_grad) = (&spec, &st, &main.grad);
    // (name, the device it runs on, what it records)
    let mut variants: Vec<(&str, &Setup, Variant)> = vec![
        (
            "copy",
            &main,
            Box::new(|enc: &mut wgpu::CommandEncoder| {
                enc.copy_buffer_to_buffer(&main.logits, 0, &main.grad, 0, main.logits.size());
                Ok(())
            }),
        ),
        (
            "stats",
            &main,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                ctx.record_statistics(enc, spec, &batch).map(|_| ())
            }),
        ),
        (
            "stats+finalize",
            &main,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                ctx.record(enc, spec, &batch, None).map(|_| ())
            }),
        ),
        (
            "+grad",
            &main,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                let g = Some(GradTarget::f32(main_grad));
                ctx.record(enc, spec, &batch, g).map(|_| ())
            }),
        ),
        (
            "finalize alone",
            &main,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                ctx.record_with_statistics(enc, spec, &batch, st, None)
                    .map(|_| ())
            }),
        ),
    ];
    if let Some(sc) = &scalar {
        let b = sc.batch(&shape);
        variants.push((
            Box::leak(format!("stats ({other})").into_boxed_str()),
            sc,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                sc.ctx.record_statistics(enc, spec, &b).map(|_| ())
            }),
        ));
        variants.push((
            Box::leak(format!("+grad ({other})").into_boxed_str()),
            sc,
            Box::new(move |enc: &mut wgpu::CommandEncoder| {
                let g = Some(GradTarget::f32(&sc.grad));
                sc.ctx.record(enc, spec, &b, g).map(|_| ())
            }),
        ));
    }
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(15);
    // Each round times every variant once, in turn, so all see the same machine state
    // (lavapipe's times drift by tens of percent within a minute); medians of the rounds.
    let mut times = vec![vec![]; variants.len()];
    for round in 0..rounds + 2 {
        for (k, (_, on, f)) in variants.iter().enumerate() {
            let dev = on.ctx.device();
            let t = Instant::now();
            let mut enc = dev.create_command_encoder(&Default::default());
            f(&mut enc)?;
            on.ctx.queue().submit([enc.finish()]);
            dev.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| segloss::Error::Gpu(e.to_string()))?;
            // The first two rounds compile the pipelines and warm the pools.
            if round >= 2 {
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let medians: Vec<String> = variants
        .iter()
        .zip(&mut times)
        .map(|((name, _, _), v)| {
            v.sort_by(f64::total_cmp);
            format!("{name} {:.3}", v[v.len() / 2])
        })
        .collect();
    println!(
        "{arg} on {}: {} ms",
        ctx.adapter_info().name,
        medians.join(" | ")
    );
    Ok(())
}
