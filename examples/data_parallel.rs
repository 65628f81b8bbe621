//! Batch Dice with the region penalty over a batch split across every adapter found,
//! through the two-phase API: each device computes its shard's statistics, the host sums
//! them (what an all-reduce does in a distributed run), and each device finalizes with the
//! sum and writes its shard's gradient. The result equals one device holding the batch.
//!
//! cargo run --release --example data_parallel

use segloss::gpu::{context, BufferRegion, DeviceBatch, GpuContext, GradTarget, Options};
use segloss::input::{LabelFormat, Labels, Layout, LogitFormat};
use segloss::output::Statistics;
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{LossSpec, Shape};
use wgpu::util::DeviceExt;

struct Shard {
    shape: Shape,
    first: usize,
    total: usize,
    logits: wgpu::Buffer,
    labels: wgpu::Buffer,
    grad: wgpu::Buffer,
}

fn device_batch(sh: &Shard) -> DeviceBatch<'_> {
    DeviceBatch {
        shape: &sh.shape,
        layout: Layout::Nchw,
        logits: BufferRegion {
            buffer: &sh.logits,
            offset: 0,
        },
        logit_format: LogitFormat::F32,
        labels: BufferRegion {
            buffer: &sh.labels,
            offset: 0,
        },
        label_format: LabelFormat::U32,
        image_offset: sh.first,
        total_batch: sh.total,
    }
}

fn main() -> segloss::Result<()> {
    let spec = LossSpec::from_json(
        r#"{"terms": [
            {"kind": "cross_entropy"},
            {"kind": "dice", "batch": true, "smooth_nr": 0, "smooth_dr": 0, "skip_empty": true},
            {"kind": "region", "weight": 0.1, "penalty": "l1", "temperature": 10}]}"#,
    )?;
    let (batch, classes, hw) = (6, 4, [48, 40]);
    let shape = Shape::new(batch, classes, &hw);
    let mut rng = Rng::new(9);
    let logits = random_logits(&mut rng, &shape, 3.0);
    let labels = random_labels(&mut rng, &shape, 0.05);
    let s = shape.pixels();

    // Every adapter; with only one, two devices on it stand in for two GPUs.
    let adapters = context::enumerate();
    let mut devices: Vec<GpuContext> = adapters
        .iter()
        .map(GpuContext::on_adapter)
        .collect::<segloss::Result<_>>()?;
    if devices.is_empty() {
        return Err(segloss::Error::NoAdapter(context::NO_ADAPTER_HELP.into()));
    }
    if devices.len() == 1 {
        println!("one adapter found: splitting the batch over two devices opened on it");
        devices.push(GpuContext::on_adapter(&adapters[0])?);
    }
    let n = devices.len();
    let shards: Vec<(usize, usize)> = (0..n)
        .map(|k| (k * batch / n, (k + 1) * batch / n - k * batch / n))
        .collect();

    // Each device's own buffers hold its images only.
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let shard_data: Vec<Shard> = devices
        .iter()
        .zip(&shards)
        .map(|(ctx, &(first, count))| {
            let dev = ctx.device();
            let z = &logits[first * classes * s..(first + count) * classes * s];
            let y = &labels[first * s..(first + count) * s];
            Shard {
                shape: Shape::new(count, classes, &hw),
                first,
                total: batch,
                logits: dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(z),
                    usage,
                }),
                labels: dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(y),
                    usage,
                }),
                grad: dev.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 4 * z.len() as u64,
                    usage,
                    mapped_at_creation: false,
                }),
            }
        })
        .collect();

    // Phase 1: statistics per shard, summed on the host.
    let mut total: Option<Statistics> = None;
    for (ctx, sh) in devices.iter().zip(&shard_data) {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let rec = ctx.record_statistics(&mut enc, &spec, &device_batch(sh))?;
        ctx.queue().submit([enc.finish()]);
        let st = rec.statistics(ctx)?;
        match total.as_mut() {
            None => total = Some(st),
            Some(t) => t.add(&st)?,
        }
    }
    let total = total.expect("at least one shard");

    // Phase 2: finalize with the sum and write each shard's gradient.
    let mut losses = vec![];
    for (ctx, sh) in devices.iter().zip(&shard_data) {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let grad = GradTarget::f32(&sh.grad);
        let rec =
            ctx.record_with_statistics(&mut enc, &spec, &device_batch(sh), &total, Some(grad))?;
        ctx.queue().submit([enc.finish()]);
        losses.push(rec.read(ctx)?);
    }

    // The same batch on one device.
    let single = devices[0].evaluate(
        &spec,
        &shape,
        &logits,
        Labels::index(&labels),
        Options {
            gradient: true,
            ..Default::default()
        },
    )?;
    println!("{n} shards {shards:?}");
    for (k, out) in losses.iter().enumerate() {
        println!(
            "device {k}: loss {:.7}  terms {:?}",
            out.loss,
            out.terms.iter().map(|t| t.value).collect::<Vec<_>>()
        );
    }
    println!(
        "one device: loss {:.7}  terms {:?}",
        single.loss,
        single.terms.iter().map(|t| t.value).collect::<Vec<_>>()
    );
    let worst = losses
        .iter()
        .map(|o| (o.loss - single.loss).abs())
        .fold(0.0, f64::max);
    println!("largest loss difference to one device: {worst:.2e}");
    Ok(())
}
