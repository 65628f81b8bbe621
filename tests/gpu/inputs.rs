//! Inputs as users hold them: layouts, precisions, label formats, chunking, the backend and
//! two-phase APIs, and use from several threads. Tolerances: tests/common/mod.rs; 16-bit
//! gradients are compared after rounding the reference the same way.

use crate::common;
use crate::common::spec;

use crate::common::{check, close, gpu};
use segloss::gpu::{
    BufferRegion, DeviceBatch, GpuContext, GradTarget, HostBatch, HostLogits, Options, Strategy,
};
use segloss::input::{
    permute, GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape, IGNORE,
};
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};
use segloss::{reference, LossOutput};
use wgpu::util::DeviceExt;

const MIXED: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5},{"kind":"dice","weight":0.7},{"kind":"region","weight":0.1,"temperature":10}]}"#;

fn host(batch: &HostBatch<'_>, grad: bool) -> LossOutput {
    gpu()
        .evaluate_host(
            &spec(MIXED),
            batch,
            Options {
                gradient: grad,
                statistics: true,
                poison: true,
                strategy: None,
                proportions: true,
            },
        )
        .unwrap()
}

#[test]
fn nhwc_is_read_in_place() {
    let mut rng = Rng::new(31);
    for spatial in [vec![517], vec![33, 29], vec![7, 9, 11]] {
        let shape = Shape::new(3, 5, &spatial);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let want = reference::evaluate(&spec(MIXED), &shape, &z, Labels::index(&y), true).unwrap();
        let zh = permute(&z, &shape, false);
        let got = host(
            &HostBatch {
                shape: &shape,
                layout: Layout::Nhwc,
                logits: HostLogits::F32(&zh),
                labels: Labels::index(&y),
                label_format: None,
                grad_format: GradFormat::F32,
            },
            true,
        );
        assert!(
            close(got.loss, want.loss),
            "{spatial:?}: {} vs {}",
            got.loss,
            want.loss
        );
        let g = permute(got.gradient.as_ref().unwrap(), &shape, true);
        for (a, b) in g.iter().zip(want.gradient.as_ref().unwrap()) {
            assert!((a - b).abs() < 1e-6, "{spatial:?}: {a} vs {b}");
        }
        // Soft labels follow the layout too.
        let soft = random_soft_labels(&mut rng, &shape);
        let want =
            reference::evaluate(&spec(MIXED), &shape, &z, Labels::Soft(&soft), false).unwrap();
        let softh = permute(&soft, &shape, false);
        let got = host(
            &HostBatch {
                shape: &shape,
                layout: Layout::Nhwc,
                logits: HostLogits::F32(&zh),
                labels: Labels::Soft(&softh),
                label_format: None,
                grad_format: GradFormat::F32,
            },
            false,
        );
        assert!(close(got.loss, want.loss));
    }
}

#[test]
fn half_precision_logits_and_gradients() {
    let mut rng = Rng::new(32);
    let shape = Shape::new(2, 4, &[41, 27]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let f16: Vec<half::f16> = z.iter().map(|v| half::f16::from_f32(*v)).collect();
    let bf16: Vec<half::bf16> = z.iter().map(|v| half::bf16::from_f32(*v)).collect();
    for (name, logits) in [
        ("f16", HostLogits::F16(&f16)),
        ("bf16", HostLogits::Bf16(&bf16)),
    ] {
        // The reference sees the same (rounded) values, widened.
        let widened = logits.to_f32();
        let want =
            reference::evaluate(&spec(MIXED), &shape, &widened, Labels::index(&y), true).unwrap();
        for grad_format in [GradFormat::F32, logits.format()] {
            for layout in [Layout::Nchw, Layout::Nhwc] {
                let (lg, wg);
                let input = if layout == Layout::Nhwc {
                    match logits {
                        HostLogits::F16(v) => {
                            lg = permute(v, &shape, false);
                            HostLogits::F16(&lg)
                        }
                        HostLogits::Bf16(v) => {
                            wg = permute(v, &shape, false);
                            HostLogits::Bf16(&wg)
                        }
                        other => other,
                    }
                } else {
                    logits
                };
                let got = host(
                    &HostBatch {
                        shape: &shape,
                        layout,
                        logits: input,
                        labels: Labels::index(&y),
                        label_format: None,
                        grad_format,
                    },
                    true,
                );
                assert!(
                    close(got.loss, want.loss),
                    "{name}: {} vs {}",
                    got.loss,
                    want.loss
                );
                let mut g = got.gradient.unwrap();
                if layout == Layout::Nhwc {
                    g = permute(&g, &shape, true);
                }
                for (k, (a, b)) in g.iter().zip(want.gradient.as_ref().unwrap()).enumerate() {
                    // A 16-bit gradient holds the reference rounded to 16 bits (±1 ulp).
                    let want_b = match grad_format {
                        LogitFormat::F32 => *b,
                        LogitFormat::F16 => half::f16::from_f32(*b).to_f32(),
                        LogitFormat::Bf16 => half::bf16::from_f32(*b).to_f32(),
                    };
                    let ulp = match grad_format {
                        LogitFormat::F32 => 1e-6,
                        LogitFormat::F16 => 2e-3 * b.abs() + 1e-7,
                        LogitFormat::Bf16 => 1.6e-2 * b.abs() + 1e-9,
                    };
                    assert!(
                        (a - want_b).abs() <= ulp,
                        "{name} {grad_format:?} {layout:?} [{k}]: {a} vs {want_b}"
                    );
                }
            }
        }
    }
}

#[test]
fn label_formats_give_identical_results() {
    let mut rng = Rng::new(33);
    let shape = Shape::new(3, 6, &[31, 17]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.2);
    let run = |f| {
        host(
            &HostBatch {
                shape: &shape,
                layout: Layout::Nchw,
                logits: HostLogits::F32(&z),
                labels: Labels::index(&y),
                label_format: Some(f),
                grad_format: GradFormat::F32,
            },
            true,
        )
    };
    let a = run(LabelFormat::U8);
    for f in [
        LabelFormat::U16,
        LabelFormat::U32,
        LabelFormat::I32,
        LabelFormat::I64,
    ] {
        let b = run(f);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{f:?}");
        assert_eq!(a.gradient, b.gradient, "{f:?}");
    }
    check(&spec(MIXED), &shape, &z, Labels::index(&y), "u8 labels");
}

#[test]
fn chunked_runs_equal_the_unchunked_one() {
    let mut rng = Rng::new(34);
    let ctx = common::new_ctx();
    for (layout, format) in [
        (Layout::Nchw, GradFormat::F32),
        (Layout::Nhwc, GradFormat::F16),
        (Layout::Nchw, GradFormat::Bf16),
    ] {
        let shape = Shape::new(5, 3, &[37, 23]);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let m = random_masks(&mut rng, &shape);
        for (json, labels) in [
            (MIXED, Labels::index(&y)),
            (
                r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"dice","batch":true}]}"#,
                Labels::Soft(&m),
            ),
        ] {
            let batch = HostBatch {
                shape: &shape,
                layout,
                logits: HostLogits::F32(&z),
                labels,
                label_format: None,
                grad_format: format,
            };
            let opts = Options {
                gradient: true,
                statistics: true,
                poison: true,
                strategy: None,
                proportions: true,
            };
            let whole = ctx.evaluate_host(&spec(json), &batch, opts).unwrap();
            // One image (3·851·4 bytes) per binding: five chunks.
            let small_bindings = Strategy {
                binding_limit: 3 * 851 * 4 + 600,
                ..ctx.strategy()
            };
            let chunked_opts = Options {
                strategy: Some(small_bindings),
                ..opts
            };
            let chunked = ctx
                .evaluate_host(&spec(json), &batch, chunked_opts)
                .unwrap();
            assert_eq!(ctx.last_chunks(), 5);
            assert_eq!(
                whole.loss.to_bits(),
                chunked.loss.to_bits(),
                "{json} {layout:?}"
            );
            assert_eq!(
                whole.gradient, chunked.gradient,
                "{json} {layout:?} {format:?}"
            );
            assert_eq!(whole.statistics, chunked.statistics);
        }
    }
}

#[test]
fn logits_beyond_one_binding() {
    // 3 × 4 × 2048 × 2048 f32 = 192 MiB of logits, over lavapipe's 128 MiB binding limit.
    let shape = Shape::new(3, 4, &[2048, 2048]);
    let s = shape.pixels();
    let z: Vec<f32> = (0..shape.len())
        .map(|k| (((k as u64).wrapping_mul(2654435761) >> 7) % 2000) as f32 / 250.0 - 4.0)
        .collect();
    let y: Vec<u32> = (0..3 * s)
        .map(|k| {
            if k % 97 == 0 {
                IGNORE
            } else {
                ((k as u64).wrapping_mul(40503) % 4) as u32
            }
        })
        .collect();
    let ctx = common::new_ctx();
    let out = ctx
        .evaluate(
            &spec(r#"{"terms":[{"kind":"cross_entropy"}]}"#),
            &shape,
            &z,
            Labels::index(&y),
            common::GRADIENT,
        )
        .unwrap();
    assert!(
        ctx.last_chunks() > 1,
        "192 MiB of logits fit one binding: the test no longer tests chunking"
    );
    // f64 cross-entropy and its gradient, every element.
    let valid = y.iter().filter(|v| **v != IGNORE).count() as f64;
    let mut loss = 0.0f64;
    let mut worst = 0.0f64;
    let g = out.gradient.as_ref().unwrap();
    for b in 0..3 {
        for i in 0..s {
            let at = |c: usize| (b * 4 + c) * s + i;
            let yy = y[b * s + i];
            if yy == IGNORE {
                assert!((0..4).all(|c| g[at(c)] == 0.0));
                continue;
            }
            let zz: Vec<f64> = (0..4).map(|c| z[at(c)] as f64).collect();
            let m = zz.iter().cloned().fold(f64::MIN, f64::max);
            let se: f64 = zz.iter().map(|v| (v - m).exp()).sum();
            loss += m + se.ln() - zz[yy as usize];
            for c in 0..4 {
                let want =
                    ((zz[c] - m).exp() / se - if c as u32 == yy { 1.0 } else { 0.0 }) / valid;
                worst = worst.max((g[at(c)] as f64 - want).abs() * valid);
            }
        }
    }
    let loss = loss / valid;
    assert!(
        (out.loss - loss).abs() < 1e-5 * loss,
        "{} vs {loss}",
        out.loss
    );
    assert!(worst < 1e-5, "largest gradient error (×N) {worst}");
}

/// A device the caller owns, buffers with offsets, a recording encoder, no host sync until
/// the caller reads.
#[test]
fn backend_api_on_caller_buffers() {
    let adapter = segloss::gpu::context::choose(segloss::gpu::context::enumerate())
        .expect("GPU tests need a Vulkan device");
    let (device, queue) = segloss::gpu::context::open(&adapter).unwrap();
    let ctx = GpuContext::from_device(device.clone(), queue.clone(), adapter.get_info());
    let mut rng = Rng::new(35);
    let shape = Shape::new(2, 3, &[45, 13]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let want = reference::evaluate(&spec(MIXED), &shape, &z, Labels::index(&y), true).unwrap();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    // Logits after 36 bytes of other data, labels as u32 after 8 bytes, gradient after 12.
    let mut lbytes = vec![0u8; 36];
    lbytes.extend(bytemuck::cast_slice(&z));
    let logits = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &lbytes,
        usage,
    });
    let mut ybytes = vec![0u8; 8];
    ybytes.extend(bytemuck::cast_slice(&y));
    let labels = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &ybytes,
        usage,
    });
    let grad = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 12 + 4 * z.len() as u64 + 16,
        usage,
        mapped_at_creation: false,
    });
    let batch = DeviceBatch {
        shape: &shape,
        layout: Layout::Nchw,
        logits: BufferRegion {
            buffer: &logits,
            offset: 36,
        },
        logit_format: LogitFormat::F32,
        labels: BufferRegion {
            buffer: &labels,
            offset: 8,
        },
        label_format: LabelFormat::U32,
        image_offset: 0,
        total_batch: 0,
    };
    let mut enc = device.create_command_encoder(&Default::default());
    let rec = ctx
        .record(
            &mut enc,
            &spec(MIXED),
            &batch,
            Some(GradTarget {
                region: BufferRegion {
                    buffer: &grad,
                    offset: 12,
                },
                format: GradFormat::F32,
            }),
        )
        .unwrap();
    // The loss stays on the device: copy it with the caller's own commands.
    let (loss_buf, loss_off) = rec.loss_location();
    let mine = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4,
        usage,
        mapped_at_creation: false,
    });
    enc.copy_buffer_to_buffer(loss_buf, loss_off, &mine, 0, 4);
    queue.submit([enc.finish()]);
    let out = rec.read(&ctx).unwrap();
    assert!(close(out.loss, want.loss));
    // The asynchronous read-back, driven by polling.
    let fut = rec.read_loss_async(&ctx);
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let async_loss = pollster::block_on(fut).unwrap();
    assert_eq!(async_loss as f64, out.loss);
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: grad.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&grad, 0, &staging, 0, grad.size());
    queue.submit([enc.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let bytes = staging.slice(..).get_mapped_range().unwrap().to_vec();
    let g: Vec<f32> = bytes[12..12 + 4 * z.len()]
        .chunks(4)
        .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    assert!(
        bytes[..12].iter().all(|b| *b == 0),
        "wrote before the gradient's offset"
    );
    assert!(
        bytes[12 + 4 * z.len()..].iter().all(|b| *b == 0),
        "wrote past the gradient"
    );
    for (a, b) in g.iter().zip(want.gradient.as_ref().unwrap()) {
        assert!((a - b).abs() < 1e-6);
    }
    // A misaligned offset and a too-small buffer are errors, not panics.
    let bad = DeviceBatch {
        logits: BufferRegion {
            buffer: &logits,
            offset: 2,
        },
        ..batch
    };
    let mut enc = device.create_command_encoder(&Default::default());
    assert!(ctx
        .record(&mut enc, &spec(MIXED), &bad, None)
        .unwrap_err()
        .to_string()
        .contains("multiple of 4"));
    let bad = DeviceBatch {
        logits: BufferRegion {
            buffer: &labels,
            offset: 0,
        },
        ..batch
    };
    assert!(ctx
        .record(&mut enc, &spec(MIXED), &bad, None)
        .unwrap_err()
        .to_string()
        .contains("needs"));
}

/// Batch Dice and region terms over a batch split across two devices through the two-phase
/// API equal the single-device result.
#[test]
fn two_phase_across_two_devices() {
    let devices: Vec<GpuContext> = (0..2).map(|_| common::new_ctx()).collect();
    let mut rng = Rng::new(36);
    let shape = Shape::new(5, 4, &[29, 31]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let json = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice","batch":true,"smooth_nr":0,"smooth_dr":0,"skip_empty":true},{"kind":"region","weight":0.5,"penalty":"kl","temperature":10},{"kind":"generalized_dice","batch":true}]}"#;
    let sp = spec(json);
    let single = gpu()
        .evaluate(
            &sp,
            &shape,
            &z,
            Labels::index(&y),
            Options {
                gradient: true,
                statistics: true,
                poison: false,
                strategy: None,
                proportions: true,
            },
        )
        .unwrap();
    let s = shape.pixels();
    let split = [(0usize, 2usize), (2, 3)];
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    // Phase 1 on each device, for its shard.
    let mut shards = vec![];
    let mut total: Option<segloss::output::Statistics> = None;
    for (ctx, &(first, count)) in devices.iter().zip(&split) {
        let dev = ctx.device();
        let part = Shape::new(count, 4, &[29, 31]);
        let zl = &z[first * 4 * s..(first + count) * 4 * s];
        let yl = &y[first * s..(first + count) * s];
        let logits = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(zl),
            usage,
        });
        let labels = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(yl),
            usage,
        });
        let grad = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * zl.len() as u64,
            usage,
            mapped_at_creation: false,
        });
        let batch = DeviceBatch {
            image_offset: first,
            total_batch: 5,
            ..DeviceBatch::new(&part, &logits, &labels, LabelFormat::U32)
        };
        let mut enc = dev.create_command_encoder(&Default::default());
        let rec = ctx.record_statistics(&mut enc, &sp, &batch).unwrap();
        ctx.queue().submit([enc.finish()]);
        let st = rec.statistics(ctx).unwrap();
        // What a distributed runtime would all-reduce: a sum.
        total = Some(match total {
            None => st,
            Some(mut t) => {
                t.add(&st).unwrap();
                t
            }
        });
        shards.push((part, logits, labels, grad, first, count));
    }
    let total = total.unwrap();
    // Phase 2 on each device with the combined statistics.
    for (ctx, (part, logits, labels, grad, first, count)) in devices.iter().zip(&shards) {
        let batch = DeviceBatch {
            image_offset: *first,
            total_batch: 5,
            ..DeviceBatch::new(part, logits, labels, LabelFormat::U32)
        };
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let rec = ctx
            .record_with_statistics(
                &mut enc,
                &sp,
                &batch,
                &total,
                Some(GradTarget {
                    region: BufferRegion {
                        buffer: grad,
                        offset: 0,
                    },
                    format: GradFormat::F32,
                }),
            )
            .unwrap();
        ctx.queue().submit([enc.finish()]);
        let out = rec.read(ctx).unwrap();
        assert!(
            close(out.loss, single.loss),
            "device loss {} vs single {}",
            out.loss,
            single.loss
        );
        for (a, b) in out.terms.iter().zip(&single.terms) {
            assert!(
                close(a.value, b.value),
                "{}: {} vs {}",
                a.kind,
                a.value,
                b.value
            );
        }
        let g = ctx.read_f32(grad, 0, (grad.size() / 4) as usize).unwrap();
        let want = &single.gradient.as_ref().unwrap()[first * 4 * s..(first + count) * 4 * s];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }
}

#[test]
fn the_context_is_send_and_sync_and_correct_from_many_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GpuContext>();
    assert_send_sync::<segloss::Segloss>();
    let ctx = gpu();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            scope.spawn(move || {
                let mut rng = Rng::new(100 + t);
                for round in 0..3 {
                    let shape = Shape::new(
                        1 + (t as usize + round) % 3,
                        2 + t as usize,
                        &[17 + round, 13],
                    );
                    let z = random_logits(&mut rng, &shape, 3.0);
                    let y = random_labels(&mut rng, &shape, 0.1);
                    let want =
                        reference::evaluate(&spec(MIXED), &shape, &z, Labels::index(&y), true)
                            .unwrap();
                    let got = ctx
                        .evaluate(
                            &spec(MIXED),
                            &shape,
                            &z,
                            Labels::index(&y),
                            Options {
                                gradient: true,
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    assert!(close(got.loss, want.loss), "thread {t}");
                    for (a, b) in got.gradient.unwrap().iter().zip(want.gradient.unwrap()) {
                        assert!((a - b).abs() < 1e-6, "thread {t}");
                    }
                }
            });
        }
    });
}

/// 4200² pixels of one channel in grad workgroups of 32 invocations × 8 pixels (GPUs'
/// pixel order, the smallest workgroup): 68 906 gradient workgroups, more than one dispatch
/// dimension holds (65 535), so the 2D dispatch path runs.
#[test]
fn more_workgroups_than_one_dimension_holds() {
    let shape = Shape::new(1, 1, &[4200, 4200]);
    let n = shape.len();
    let z: Vec<f32> = (0..n)
        .map(|k| (((k as u64).wrapping_mul(2654435761) >> 9) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let m: Vec<f32> = (0..n)
        .map(|k| ((k as u64).wrapping_mul(40503) % 3) as f32 / 2.0)
        .collect();
    let ctx = common::new_ctx();
    let strategy = Strategy {
        pixel_workgroup: 32,
        contiguous_pixels: false,
        ..ctx.strategy()
    };
    let per_group = 32 * segloss::gpu::stages::grad_pixels_per_invocation(false);
    assert!((4200 * 4200usize).div_ceil(per_group) > 65_535);
    let out = ctx
        .evaluate(
            &spec(r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#),
            &shape,
            &z,
            Labels::Soft(&m),
            Options {
                strategy: Some(strategy),
                ..common::GRADIENT
            },
        )
        .unwrap();
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let mut loss = 0.0;
    let g = out.gradient.unwrap();
    let mut worst = 0.0f64;
    for k in 0..n {
        let (x, y) = (z[k] as f64, m[k] as f64);
        loss += y * softplus(-x) + (1.0 - y) * softplus(x);
        let want = (1.0 / (1.0 + (-x).exp()) - y) / n as f64;
        worst = worst.max((g[k] as f64 - want).abs() * n as f64);
    }
    loss /= n as f64;
    assert!(
        (out.loss - loss).abs() < 1e-5 * loss,
        "{} vs {loss}",
        out.loss
    );
    assert!(worst < 1e-5, "largest gradient error (×N) {worst}");
}
