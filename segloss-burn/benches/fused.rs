//! The fused loss step against burn's composed tensor ops, forward + backward, and against
//! segloss's own loss + gradient on the same device, all in one run:
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo bench -p segloss-burn            # every shape
//! WGPU_BACKEND=vulkan cargo bench -p segloss-burn -- --quick # 1 shape, few repetitions
//! ```
//!
//! Rows: median milliseconds per step (the step ends when the gradient is on the device:
//! `device.sync()`), and the ratios. Results and the machine: BENCHMARKS.md, "burn".

use burn::tensor::{Device, Int, Tensor, TensorData};
use segloss::gpu::{BufferRegion, DeviceBatch, GradTarget};
use segloss::input::{GradFormat, LabelFormat, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::wgpu::util::DeviceExt;
use segloss_burn::{SeglossLoss, SharedDevice};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: pipelines, pools
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let shared = SharedDevice::new().expect("a Vulkan device (scripts/install-lavapipe.sh)");
    let ctx = shared.context().clone();
    let device: Device = shared.device().clone().autodiff();
    let loss_fn = SeglossLoss::dice_ce(&shared).unwrap();
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_info().name,
        ctx.adapter_info().backend
    );
    println!("| shape | segloss loss + gradient (ms) | fused autodiff step (ms) | burn composed CE + Dice (ms) | fused / segloss | composed / fused |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let shapes: &[(usize, usize, usize)] = if quick {
        &[(2, 4, 64)]
    } else {
        &[(8, 4, 256), (2, 21, 128), (1, 150, 96)]
    };
    for &(b, c, s) in shapes {
        let reps = if quick { 3 } else { 9 };
        let shape = Shape::new(b, c, &[s, s]);
        let mut rng = Rng::new(5);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.0);
        let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        // segloss alone: device buffers, record, submit, wait.
        let usage = segloss::wgpu::BufferUsages::STORAGE | segloss::wgpu::BufferUsages::COPY_DST;
        let dev = ctx.device();
        let zb = dev.create_buffer_init(&segloss::wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&z),
            usage,
        });
        let yb = dev.create_buffer_init(&segloss::wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&y32),
            usage,
        });
        let gb = dev.create_buffer(&segloss::wgpu::BufferDescriptor {
            label: None,
            size: 4 * z.len() as u64,
            usage,
            mapped_at_creation: false,
        });
        let batch = DeviceBatch::new(&shape, &zb, &yb, LabelFormat::I32);
        let spec = loss_fn.spec().clone();
        let alone = time(reps, || {
            let mut enc = dev.create_command_encoder(&Default::default());
            let target = GradTarget {
                region: BufferRegion {
                    buffer: &gb,
                    offset: 0,
                },
                format: GradFormat::F32,
            };
            let _rec = ctx.record(&mut enc, &spec, &batch, Some(target)).unwrap();
            ctx.queue().submit([enc.finish()]);
            dev.poll(segloss::wgpu::PollType::wait_indefinitely())
                .unwrap();
        });
        let dims = [b, c, s, s];
        let zt = Tensor::<4>::from_data(TensorData::new(z.clone(), dims), &device);
        let yt = Tensor::<3, Int>::from_data(TensorData::new(y32.clone(), [b, s, s]), &device);
        let fused = time(reps, || {
            let zg = zt.clone().require_grad();
            let loss = loss_fn.forward(zg.clone(), yt.clone()).unwrap();
            let g = zg.grad(&loss.backward()).unwrap();
            drop(g);
            device.sync().unwrap();
        });
        let composed_ms = time(reps.min(5), || {
            let zg = zt.clone().require_grad();
            let loss = segloss_burn::composed::ce_dice(zg.clone(), yt.clone(), c);
            let g = zg.grad(&loss.backward()).unwrap();
            drop(g);
            device.sync().unwrap();
        });
        println!(
            "| {b}×{c}×{s}×{s} | {alone:.2} | {fused:.2} | {composed_ms:.1} | {:.2} | {:.1} |",
            fused / alone,
            composed_ms / fused
        );
    }
}
