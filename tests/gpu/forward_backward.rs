//! The recording API as autodiff frameworks use it (segloss-burn): forward and backward as
//! separate recordings, the upstream gradient read on the device, accumulation, the loss
//! into a caller's buffer, i32/i64 labels as burn and PyTorch hold them, every array in one
//! buffer, and the device-side input status. Tolerances: tests/common/mod.rs.

use crate::common::{assert_gradient, close, gpu, spec};
use segloss::gpu::{BufferRegion, DeviceBatch, GpuContext, GradTarget};
use segloss::input::{GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape, IGNORE};
use segloss::reference;
use segloss::testing::{random_labels, random_logits, Rng};
use wgpu::util::DeviceExt;

const MIXED: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5},{"kind":"dice","weight":0.7},{"kind":"region","weight":0.1,"temperature":10}]}"#;

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// One buffer holding `parts` at 256-byte-aligned offsets (as burn's pages hold tensors),
/// and the offsets.
fn packed(ctx: &GpuContext, parts: &[&[u8]]) -> (wgpu::Buffer, Vec<u64>) {
    let mut bytes = vec![];
    let mut offsets = vec![];
    for p in parts {
        // Odd gaps between arrays, as a sub-allocator leaves them.
        bytes.resize(bytes.len().div_ceil(8) * 8 + 24, 0xAB);
        offsets.push(bytes.len() as u64);
        bytes.extend_from_slice(p);
    }
    bytes.resize(bytes.len().div_ceil(4) * 4 + 64, 0xAB);
    let buffer = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("packed"),
            contents: &bytes,
            usage: USAGE,
        });
    (buffer, offsets)
}

fn read_f32(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, n: usize) -> Vec<f32> {
    ctx.read_f32(buffer, offset, n).unwrap()
}

/// Class indices as i32 and i64 words, with ignored pixels as a mix of −1, −100 and the
/// spec's ignore_index (`ignore`).
fn signed_labels(y: &[u32], ignore: i64) -> (Vec<i32>, Vec<i64>) {
    let v: Vec<i64> = y
        .iter()
        .enumerate()
        .map(|(k, &c)| match (c == IGNORE, k % 3) {
            (false, _) => c as i64,
            (true, 0) => -1,
            (true, 1) => -100,
            (true, _) => ignore,
        })
        .collect();
    (v.iter().map(|&x| x as i32).collect(), v)
}

/// Forward then backward (upstream u from the buffer) on logits, i32 or i64 labels,
/// loss, upstream and gradient all in one buffer; checked against the reference.
#[test]
fn forward_backward_in_one_buffer_with_signed_labels() {
    let ctx = gpu();
    let mut rng = Rng::new(91);
    for (k, (classes, spatial)) in [(5, vec![37, 23]), (21, vec![19, 9, 5]), (3, vec![300])]
        .into_iter()
        .enumerate()
    {
        let shape = Shape::new(2 + k % 2, classes, &spatial);
        let json = MIXED.replace("\"terms\"", "\"ignore_index\": 7, \"terms\"");
        let sp = spec(&json);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.2);
        let want = reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
        let want_grad = want.gradient.clone().unwrap();
        let (y32, y64) = signed_labels(&y, 7);
        let upstream = 2.5f32;
        for (format, label_bytes) in [
            (
                LabelFormat::I32,
                bytemuck::cast_slice::<i32, u8>(&y32).to_vec(),
            ),
            (
                LabelFormat::I64,
                bytemuck::cast_slice::<i64, u8>(&y64).to_vec(),
            ),
        ] {
            let what = format!("{shape:?} {format:?}");
            let grad_init = vec![0x7Fu8; 4 * z.len()];
            let (buf, off) = packed(
                ctx,
                &[
                    bytemuck::cast_slice(&z),
                    &label_bytes,
                    &[0u8; 4],
                    bytemuck::bytes_of(&upstream),
                    &grad_init,
                ],
            );
            let batch = DeviceBatch {
                shape: &shape,
                layout: Layout::Nchw,
                logits: BufferRegion {
                    buffer: &buf,
                    offset: off[0],
                },
                logit_format: LogitFormat::F32,
                labels: BufferRegion {
                    buffer: &buf,
                    offset: off[1],
                },
                label_format: format,
                image_offset: 0,
                total_batch: 0,
            };
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            let loss_at = BufferRegion {
                buffer: &buf,
                offset: off[2],
            };
            let fwd = ctx
                .record_forward(&mut enc, &sp, &batch, Some(loss_at))
                .unwrap();
            let target = GradTarget {
                region: BufferRegion {
                    buffer: &buf,
                    offset: off[4],
                },
                format: GradFormat::F32,
            };
            let up = BufferRegion {
                buffer: &buf,
                offset: off[3],
            };
            ctx.record_backward(&mut enc, &fwd, &batch, target, Some(up), false)
                .unwrap();
            ctx.queue().submit([enc.finish()]);
            let out = fwd.read(ctx).unwrap();
            assert!(
                close(out.loss, want.loss),
                "{what}: {} vs {}",
                out.loss,
                want.loss
            );
            let loss = read_f32(ctx, &buf, off[2], 1)[0];
            assert_eq!(
                loss as f64, out.loss,
                "{what}: the loss copied to the caller"
            );
            let g = read_f32(ctx, &buf, off[4], z.len());
            let scaled: Vec<f32> = want_grad.iter().map(|v| v * upstream).collect();
            assert_gradient(&g, &scaled, &what);
            // Nothing around the arrays was written.
            let all = read_f32(ctx, &buf, 0, (buf.size() / 4) as usize);
            let gap = f32::from_bits(0xABABABAB);
            assert_eq!(
                all[(off[1] / 4 - 1) as usize].to_bits(),
                gap.to_bits(),
                "{what}"
            );
            assert_eq!(
                all[(off[4] / 4 - 1) as usize].to_bits(),
                gap.to_bits(),
                "{what}"
            );
            let end = ((off[4] + 4 * z.len() as u64) / 4) as usize;
            assert_eq!(
                all[end].to_bits(),
                gap.to_bits(),
                "{what}: past the gradient"
            );
            // A second backward of one forward is refused.
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            let err = ctx
                .record_backward(&mut enc, &fwd, &batch, target, None, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("already been recorded"), "{err}");
        }
    }
}

/// With `accumulate` the gradient is added to what the target holds; without an upstream
/// buffer the scale is 1; a 16-bit target, a `record()` handle and another shape are
/// refused.
#[test]
fn backward_accumulates_and_refuses_misuse() {
    let ctx = gpu();
    let mut rng = Rng::new(92);
    let shape = Shape::new(2, 9, &[33, 7]);
    let sp = spec(MIXED);
    let z = random_logits(&mut rng, &shape, 2.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let want = reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
    let before: Vec<f32> = (0..z.len()).map(|k| (k % 7) as f32 - 3.0).collect();
    let (buf, off) = packed(
        ctx,
        &[
            bytemuck::cast_slice(&z),
            bytemuck::cast_slice(&y),
            bytemuck::cast_slice(&before),
        ],
    );
    let batch = DeviceBatch {
        logits: BufferRegion {
            buffer: &buf,
            offset: off[0],
        },
        labels: BufferRegion {
            buffer: &buf,
            offset: off[1],
        },
        ..DeviceBatch::new(&shape, &buf, &buf, LabelFormat::U32)
    };
    let target = GradTarget {
        region: BufferRegion {
            buffer: &buf,
            offset: off[2],
        },
        format: GradFormat::F32,
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let fwd = ctx.record_forward(&mut enc, &sp, &batch, None).unwrap();
    ctx.record_backward(&mut enc, &fwd, &batch, target, None, true)
        .unwrap();
    ctx.queue().submit([enc.finish()]);
    let g = read_f32(ctx, &buf, off[2], z.len());
    let expect: Vec<f32> = before
        .iter()
        .zip(want.gradient.as_ref().unwrap())
        .map(|(a, b)| a + b)
        .collect();
    assert_gradient(&g, &expect, "accumulated");

    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let fwd = ctx.record_forward(&mut enc, &sp, &batch, None).unwrap();
    let half = GradTarget {
        format: GradFormat::F16,
        ..target
    };
    let err = ctx
        .record_backward(&mut enc, &fwd, &batch, half, None, false)
        .unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
    let other = Shape::new(1, 9, &[33, 7]);
    let smaller = DeviceBatch {
        shape: &other,
        ..batch
    };
    let err = ctx
        .record_backward(&mut enc, &fwd, &smaller, target, None, false)
        .unwrap_err();
    assert!(err.to_string().contains("not its forward"), "{err}");
    let plain = ctx.record(&mut enc, &sp, &batch, None).unwrap();
    let err = ctx
        .record_backward(&mut enc, &plain, &batch, target, None, false)
        .unwrap_err();
    assert!(err.to_string().contains("record_forward"), "{err}");
    // The loss range overlapping the logits is refused before anything is recorded.
    let on_logits = BufferRegion {
        buffer: &buf,
        offset: off[0],
    };
    let err = ctx
        .record_forward(&mut enc, &sp, &batch, Some(on_logits))
        .unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    // The rejected calls left the encoder valid.
    ctx.queue().submit([enc.finish()]);
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
}

/// Bad labels and non-finite logits are counted on the device, readable lazily as a value;
/// an i64 label past i32 and one ≥ C are invalid, negative ones ignored.
#[test]
fn input_status_counts_bad_input_on_the_device() {
    let ctx = gpu();
    let mut rng = Rng::new(93);
    let shape = Shape::new(2, 5, &[17, 11]);
    let mut z = random_logits(&mut rng, &shape, 1.0);
    let n_pix = shape.batch * shape.pixels();
    let mut y: Vec<i64> = (0..n_pix as i64).map(|k| k % 5).collect();
    y[3] = -7;
    y[40] = 5; // ≥ C
    y[41] = 1 << 33; // past i32
    z[100] = f32::NAN;
    let (buf, off) = packed(ctx, &[bytemuck::cast_slice(&z), bytemuck::cast_slice(&y)]);
    let batch = DeviceBatch {
        logits: BufferRegion {
            buffer: &buf,
            offset: off[0],
        },
        labels: BufferRegion {
            buffer: &buf,
            offset: off[1],
        },
        ..DeviceBatch::new(&shape, &buf, &buf, LabelFormat::I64)
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx
        .record_forward(&mut enc, &spec(MIXED), &batch, None)
        .unwrap();
    // Not yet submitted: an error, not stale counters.
    let early = rec.read_status_async(ctx);
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    assert!(pollster::block_on(early).is_err());
    ctx.queue().submit([enc.finish()]);
    let fut = rec.read_status_async(ctx);
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let status = pollster::block_on(fut).unwrap();
    assert_eq!(status.non_finite_logits, 1);
    assert_eq!(status.first_non_finite, Some(100));
    assert_eq!(status.invalid_labels, 2);
    assert_eq!(status.first_invalid_label, Some(40));
    assert!(!status.is_clean());
    // The blocking read still refuses the result.
    assert!(rec.read(ctx).is_err());
    // I64 labels off an 8-byte boundary, and an ignore_index past i32, are refused.
    let odd = DeviceBatch {
        labels: BufferRegion {
            buffer: &buf,
            offset: off[1] + 4,
        },
        ..batch
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let err = ctx
        .record_forward(&mut enc, &spec(MIXED), &odd, None)
        .unwrap_err();
    assert!(err.to_string().contains("multiple of 8"), "{err}");
    let big = MIXED.replace("\"terms\"", "\"ignore_index\": 4294967296, \"terms\"");
    let err = ctx
        .record_forward(&mut enc, &spec(&big), &batch, None)
        .unwrap_err();
    assert!(err.to_string().contains("ignore_index"), "{err}");
}
