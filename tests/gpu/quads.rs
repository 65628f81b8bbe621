//! Quads (shaders/util/pixels.wgsl `QUADS`, src/gpu/plan.rs `quads`): the pixel stages
//! reading and writing four pixels a vec4 where every quad is whole and aligned. Every
//! output element against the f64 reference at C = 2 to 4 (the quad limit) with partial
//! tiles, every index-label format, ignored pixels, the stats, grad and one-pass stages, a
//! backward that adds to the caller's gradient, and caller buffers at offsets; and the calls
//! that must not take quads (odd pixel counts, misaligned ranges, C past the limit, soft
//! labels, channels last, 16-bit logits) don't. The strategy asks for quads of runs of
//! pixels per invocation (`quad_pixels`, `contiguous_pixels`) on any adapter, so the quads
//! run on GPUs too. Each test
//! has a context of its own: `last_quads` is the last call's on that context.

use crate::common::{assert_gradient, assert_loss_and_gradient, check_with, close, new_ctx, spec};
use segloss::gpu::{
    BufferRegion, DeviceBatch, GpuContext, GradTarget, HostBatch, Options, Strategy,
};
use segloss::input::{GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape};
use segloss::reference;
use segloss::testing::{random_labels, random_logits, random_soft_labels, Rng};
use wgpu::util::DeviceExt;

/// The context's strategy with runs of pixels per invocation, and the one-pass path for
/// every size of call where `one_pass`.
fn runs(ctx: &GpuContext, one_pass: bool) -> Strategy {
    let s = ctx.strategy();
    Strategy {
        contiguous_pixels: true,
        quad_pixels: true,
        one_pass_min_elements: if one_pass { 0 } else { s.one_pass_min_elements },
        ..s
    }
}

/// A random shape whose images have a multiple of 4 pixels, rarely a multiple of a tile.
fn quad_shape(rng: &mut Rng, classes: usize) -> Shape {
    let b = rng.range(1, 4);
    let spatial = match rng.range(0, 3) {
        0 => vec![4 * rng.range(1, 700)],
        1 => vec![rng.range(1, 45), 4 * rng.range(1, 12)],
        _ => vec![rng.range(1, 9), 2 * rng.range(1, 6), 2 * rng.range(1, 6)],
    };
    Shape::new(b, classes, &spatial)
}

/// Specs over every stage the quads run in: statistics and gradient passes (Dice and
/// Tversky beside CE and focal), and the one-pass path (pixel terms only), with class
/// weights, focal α, smoothing, ignore_index and loss maps. (A tempered term takes no
/// quads.)
const SPECS: &[&str] = &[
    r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5},{"kind":"dice","weight":0.7}]}"#,
    r#"{"ignore_index":1,"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.2}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"none"},{"kind":"focal","gamma":2.0,"alpha":{W}}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"sum"},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#,
];

/// `spec` with labels stored as `format` (host upload): loss, terms and every gradient
/// element against the reference.
#[allow(clippy::too_many_arguments)]
fn check_format(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    z: &[f32],
    y: &[u32],
    format: LabelFormat,
    what: &str,
) {
    let sp = spec(json);
    let want = reference::evaluate(&sp, shape, z, Labels::index(y), true).unwrap();
    let got = ctx
        .evaluate_host(
            &sp,
            &HostBatch {
                label_format: Some(format),
                ..HostBatch::new(shape, z, Labels::index(y))
            },
            Options {
                gradient: true,
                poison: true,
                strategy: Some(strategy),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_loss_and_gradient(&got, got.gradient.as_ref().unwrap(), &want, what);
}

#[test]
fn quads_match_the_reference_at_every_class_count_they_take() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(404);
    let formats = [
        LabelFormat::U16,
        LabelFormat::U32,
        LabelFormat::I32,
        LabelFormat::I64,
    ];
    for (round, c) in [2, 3, 4, 4].into_iter().enumerate() {
        for (k, template) in SPECS.iter().enumerate() {
            let shape = quad_shape(&mut rng, c);
            let z = random_logits(&mut rng, &shape, 4.0);
            let y = random_labels(&mut rng, &shape, [0.0, 0.15, 0.7][(round + k) % 3]);
            let w: Vec<String> = (0..c)
                .map(|_| format!("{:.3}", 0.1 + 2.0 * rng.uniform()))
                .collect();
            let json = template.replace("{W}", &format!("[{}]", w.join(",")));
            let strategy = runs(ctx, k % 2 == 0);
            let what = format!("{json} on {shape:?}");
            // u8 labels (the compact format): every output, statistics included.
            check_with(
                ctx,
                Some(strategy),
                &spec(&json),
                &shape,
                &z,
                Labels::index(&y),
                &what,
            );
            assert!(ctx.last_quads(), "{what}: no quads");
            let format = formats[(round + k) % formats.len()];
            let what = format!("{what}, {format:?} labels");
            check_format(ctx, strategy, &json, &shape, &z, &y, format, &what);
            assert!(ctx.last_quads(), "{what}: no quads");
        }
    }
}

/// Where a quad would straddle a class plane or a bound range's 16-byte boundary, past the
/// class limit, with a tempered term, or where the logits are not f32
/// NCHW or the labels not indices, the pixel stages read one pixel at a time (and the
/// results are the reference's).
#[test]
fn quads_only_where_every_quad_is_whole_and_aligned() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(405);
    let strategy = runs(ctx, false);
    let json = SPECS[0];
    let sp = spec(json);
    for (shape, why) in [
        (Shape::new(2, 4, &[13, 7]), "91 pixels an image"),
        (Shape::new(1, 5, &[8, 8]), "5 classes"),
    ] {
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        check_with(ctx, Some(strategy), &sp, &shape, &z, Labels::index(&y), why);
        assert!(!ctx.last_quads(), "{why}: quads");
    }
    let shape = Shape::new(2, 4, &[8, 6]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    for json in [
        r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","penalty":"l1","temperature":10}]}"#,
        r#"{"terms":[{"kind":"dice"},{"kind":"region","penalty":"kl","temperature":2}]}"#,
    ] {
        check_with(
            ctx,
            Some(strategy),
            &spec(json),
            &shape,
            &z,
            Labels::index(&y),
            json,
        );
        assert!(!ctx.last_quads(), "{json}: quads");
    }
    let soft = random_soft_labels(&mut rng, &shape);
    check_with(
        ctx,
        Some(strategy),
        &sp,
        &shape,
        &z,
        Labels::Soft(&soft),
        "soft labels",
    );
    assert!(!ctx.last_quads(), "soft labels: quads");
    for (layout, format) in [
        (Layout::Nhwc, LogitFormat::F32),
        (Layout::Nchw, LogitFormat::F16),
    ] {
        crate::common::check_layout_format(
            ctx,
            Some(strategy),
            &sp,
            &shape,
            &z,
            &y,
            layout,
            format,
            &format!("{layout:?} {format:?}"),
        );
        assert!(!ctx.last_quads(), "{layout:?} {format:?}: quads");
    }
    // A one-pixel (4-byte) shift of the logits within their buffer: device_at below.
    device_at(ctx, &mut rng, 4, SPECS[1], 4, false);
}

/// Forward and backward of `json` at C classes on caller buffers: the logits `shift` bytes
/// past a 256-byte boundary, the backward adding to what the gradient holds. Quads exactly
/// where `quads`.
fn device_at(ctx: &GpuContext, rng: &mut Rng, classes: usize, json: &str, shift: u64, quads: bool) {
    let shape = Shape::new(3, classes, &[12, 20]);
    let sp = spec(json);
    let z = random_logits(rng, &shape, 3.0);
    let y = random_labels(rng, &shape, 0.2);
    let want = reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
    let before: Vec<f32> = (0..z.len()).map(|k| (k % 5) as f32 - 2.0).collect();
    // [gap][logits][pad][labels (u16)][pad][gradient]: every array on a 256-byte boundary
    // but the logits, `shift` past one.
    let at = |n: usize| (n as u64).div_ceil(256) * 256;
    let logits_at = 256 + shift;
    let labels_at = at(logits_at as usize + 4 * z.len());
    let y16: Vec<u16> = y.iter().map(|v| *v as u16).collect();
    let grad_at = at(labels_at as usize + 2 * y16.len());
    let mut bytes = vec![0xABu8; (grad_at + 4 * z.len() as u64 + 64) as usize];
    let put = |bytes: &mut Vec<u8>, off: u64, src: &[u8]| {
        bytes[off as usize..off as usize + src.len()].copy_from_slice(src)
    };
    put(&mut bytes, logits_at, bytemuck::cast_slice(&z));
    put(&mut bytes, labels_at, bytemuck::cast_slice(&y16));
    put(&mut bytes, grad_at, bytemuck::cast_slice(&before));
    let buf = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("quads"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        });
    let region = |offset| BufferRegion {
        buffer: &buf,
        offset,
    };
    let batch = DeviceBatch {
        logits: region(logits_at),
        labels: region(labels_at),
        ..DeviceBatch::new(&shape, &buf, &buf, LabelFormat::U16)
    };
    let target = GradTarget {
        region: region(grad_at),
        format: GradFormat::F32,
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let fwd = ctx.record_forward(&mut enc, &sp, &batch, None).unwrap();
    let forward_quads = ctx.last_quads();
    ctx.record_backward(&mut enc, &fwd, &batch, target, None, true)
        .unwrap();
    let what = format!("{classes} classes, logits {shift} bytes past a boundary");
    assert_eq!(forward_quads, quads, "{what}: forward");
    assert_eq!(ctx.last_quads(), quads, "{what}: backward");
    ctx.queue().submit([enc.finish()]);
    let out = fwd.read(ctx).unwrap();
    assert!(
        close(out.loss, want.loss),
        "{what}: {} vs {}",
        out.loss,
        want.loss
    );
    let g = ctx.read_f32(&buf, grad_at, z.len()).unwrap();
    let expect: Vec<f32> = before
        .iter()
        .zip(want.gradient.as_ref().unwrap())
        .map(|(a, b)| a + b)
        .collect();
    assert_gradient(&g, &expect, &what);
    // Nothing past the gradient was written.
    let all = ctx.read_f32(&buf, 0, (buf.size() / 4) as usize).unwrap();
    let end = ((grad_at + 4 * z.len() as u64) / 4) as usize;
    assert_eq!(all[end].to_bits(), 0xABABABAB, "{what}: past the gradient");
}

/// On caller buffers the quads run when the logits sit on a 16-byte boundary, and the
/// backward adds to the gradient there as the reference says; past the stats stage's
/// block (40 classes) the chunked grad stage's quads and the stats stage's past the block
/// (`Strategy::grad_chunks`, CPU adapters), in the forward and in the backward alike.
#[test]
fn quads_on_caller_buffers_with_an_accumulating_backward() {
    let ctx = &new_ctx();
    let own = ctx.strategy();
    let mut rng = Rng::new(406);
    device_at(ctx, &mut rng, 4, SPECS[1], 0, own.contiguous_pixels);
    device_at(ctx, &mut rng, 4, SPECS[1], 16, own.contiguous_pixels);
    let chunked = own.grad_chunks && own.quad_pixels && own.contiguous_pixels;
    for json in [SPECS[0], SPECS[1]] {
        device_at(ctx, &mut rng, 40, json, 16, chunked);
        device_at(ctx, &mut rng, 40, json, 4, false);
    }
}
