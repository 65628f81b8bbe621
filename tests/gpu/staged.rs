//! The staged pixel stages (ARCHITECTURE.md, "Staged classes"; shaders/staged.wgsl): calls
//! with more classes than the register block stage every class of a sub-tile in workgroup
//! memory and read each logit once per pass. Every output element against the f64
//! reference at C = 9, 21, 150, 600 and 1,024 with partial tiles and partial sub-tiles,
//! in both workgroup sizes (GPUs' 256, CPU adapters' 32), two passes and one, every pixel
//! term option, soft labels, sigmoid mode, tempered region terms, channels last, 16-bit
//! logits, images with every pixel ignored, bad input past the first classes, an adapter
//! limited to 16 KiB of workgroup memory; and the kernels each call ran, so a test cannot
//! pass on the register path by mistake.

use crate::common;
use crate::common::{check_with, device_call, new_ctx, spec};
use segloss::gpu::stages::Kernel;
use segloss::gpu::{BufferRegion, DeviceBatch, GpuContext, GradTarget, Options, Strategy};
use segloss::input::{GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape, IGNORE};
use segloss::reference;
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};
use wgpu::util::DeviceExt;

/// The context's strategy staging every call past a register block of 8 (GPUs' block),
/// with workgroups of `wg`, the one-pass path from `one_pass_min` logits up.
fn staged(ctx: &GpuContext, wg: u32, one_pass_min: u64) -> Strategy {
    Strategy {
        class_block: 8,
        class_staging: true,
        pixel_workgroup: wg,
        one_pass_min_elements: one_pass_min,
        ..ctx.strategy()
    }
}

/// The last call ran the staged kernels only (and the one-pass form when `one_pass`).
fn assert_staged(ctx: &GpuContext, one_pass: bool, what: &str) {
    let k = ctx.last_kernels();
    let register = [
        Kernel::StatsWorkgroup,
        Kernel::StatsSubgroup,
        Kernel::StatsInvocation,
        Kernel::StatsGradWorkgroup,
        Kernel::StatsGradSubgroup,
        Kernel::StatsGradInvocation,
        Kernel::Grad,
        Kernel::GradShared,
    ];
    assert!(
        !k.iter().any(|x| register.contains(x)),
        "{what}: a register-path kernel in {k:?}"
    );
    assert!(k.contains(&Kernel::StatsStaged) || k.contains(&Kernel::StatsGradStaged));
    assert_eq!(
        k.contains(&Kernel::StatsGradStaged),
        one_pass,
        "{what}: one pass {one_pass}: {k:?}"
    );
    assert_eq!(k.contains(&Kernel::GradStaged), !one_pass, "{what}: {k:?}");
}

fn class_vector(rng: &mut Rng, c: usize) -> String {
    let v: Vec<String> = (0..c)
        .map(|_| format!("{:.3}", 0.1 + 2.0 * rng.uniform()))
        .collect();
    format!("[{}]", v.join(","))
}

const DICE_CE_TEMPERED: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"},{"kind":"region","weight":0.5,"penalty":"l1","temperature":10}]}"#;
const FOCAL_TVERSKY: &str =
    r#"{"terms":[{"kind":"focal","gamma":2},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#;
const CE_OPTIONS: &str = r#"{"ignore_index":1,"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.1}]}"#;
const CE_FOCAL_MAP: &str = r#"{"terms":[{"kind":"cross_entropy","reduction":"none"},{"kind":"focal","weight":2.0,"gamma":0.5,"alpha":{W}}]}"#;
const CE_SUM: &str =
    r#"{"terms":[{"kind":"cross_entropy","reduction":"sum","label_smoothing":0.05}]}"#;
const CE: &str = r#"{"terms":[{"kind":"cross_entropy"}]}"#;

/// Classes, image size, specs, workgroup sizes.
type Case = (
    usize,
    &'static [usize],
    &'static [&'static str],
    &'static [u32],
);

/// C = 9 to 1,024, odd image sizes (partial tiles, and partial sub-tiles of 32, 8 and 2
/// pixels), GPUs' workgroups of 256 (up to 128 invocations a pixel) and, at 21 and 600
/// classes, CPU adapters' 32 (one invocation a pixel at 21), specs with statistic terms (two passes) and of pixel terms
/// only (one pass and two), against the reference.
#[test]
fn staged_calls_match_the_reference_at_every_class_count() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(4096);
    let cases: [Case; 5] = [
        (
            9,
            &[93, 97],
            &[DICE_CE_TEMPERED, CE_OPTIONS, CE_FOCAL_MAP],
            &[256],
        ),
        (
            21,
            &[41, 37],
            &[FOCAL_TVERSKY, CE_SUM, CE_OPTIONS],
            &[32, 256],
        ),
        (150, &[37, 29], &[DICE_CE_TEMPERED, CE_FOCAL_MAP], &[256]),
        (600, &[19, 23], &[FOCAL_TVERSKY, CE_OPTIONS], &[32]),
        (1024, &[13, 17], &[DICE_CE_TEMPERED, CE], &[256]),
    ];
    for (c, spatial, specs, wgs) in cases {
        let shape = Shape::new(2, c, spatial);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let w = class_vector(&mut rng, c);
        for json in specs {
            let json = json.replace("{W}", &w);
            let pixel_only = spec(&json).pixel_terms_only();
            for &wg in wgs {
                let passes: &[u64] = if pixel_only { &[0, u64::MAX] } else { &[0] };
                for &min in passes {
                    let strategy = staged(ctx, wg, min);
                    let what = format!(
                        "staged, C = {c}, workgroup {wg}, one pass {}: {json}",
                        min == 0
                    );
                    check_with(
                        ctx,
                        Some(strategy),
                        &spec(&json),
                        &shape,
                        &z,
                        Labels::index(&y),
                        &what,
                    );
                    assert_staged(ctx, pixel_only && min == 0, &what);
                }
            }
        }
    }
}

/// Soft labels (targets staged beside the logits, so half the pixels a sub-tile), sigmoid
/// mode, channels last and 16-bit logits, staged.
#[test]
fn staged_calls_take_every_input_form() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(4097);
    for (c, wg) in [(21, 256), (150, 32), (1024, 32)] {
        let shape = Shape::new(2, c, &[11, 13]);
        let z = random_logits(&mut rng, &shape, 3.0);
        let soft = random_soft_labels(&mut rng, &shape);
        for (json, min) in [
            (DICE_CE_TEMPERED, 0),
            (FOCAL_TVERSKY, 0),
            (CE_SUM, 0),
            (CE_SUM, u64::MAX),
        ] {
            let what = format!("soft labels, C = {c}, workgroup {wg}: {json}");
            check_with(
                ctx,
                Some(staged(ctx, wg, min)),
                &spec(json),
                &shape,
                &z,
                Labels::Soft(&soft),
                &what,
            );
            assert_staged(ctx, spec(json).pixel_terms_only() && min == 0, &what);
        }
        let masks = random_masks(&mut rng, &shape);
        for json in [
            r#"{"activation":"sigmoid","terms":[{"kind":"bce","pos_weight":{W}},{"kind":"dice"}]}"#,
            r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#,
            r#"{"activation":"sigmoid","terms":[{"kind":"dice"},{"kind":"region","penalty":"l2","temperature":5}]}"#,
        ] {
            let json = json.replace("{W}", &class_vector(&mut rng, c));
            let what = format!("sigmoid, C = {c}, workgroup {wg}: {json}");
            check_with(
                ctx,
                Some(staged(ctx, wg, 0)),
                &spec(&json),
                &shape,
                &z,
                Labels::Soft(&masks),
                &what,
            );
            assert_staged(ctx, spec(&json).pixel_terms_only(), &what);
        }
    }
    // Channels last and 16-bit logits: the host converts the reference's input; the
    // kernels read the caller's layout and format in place.
    for (c, wg) in [(21, 256), (150, 32)] {
        let shape = Shape::new(2, c, &[9, 14]);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        for json in [DICE_CE_TEMPERED, CE_SUM] {
            for (layout, format) in [
                (Layout::Nhwc, LogitFormat::F32),
                (Layout::Nchw, LogitFormat::F16),
                (Layout::Nhwc, LogitFormat::Bf16),
            ] {
                let what = format!("{layout:?} {format:?}, C = {c}, workgroup {wg}: {json}");
                common::check_layout_format(
                    ctx,
                    Some(staged(ctx, wg, 0)),
                    &spec(json),
                    &shape,
                    &z,
                    &y,
                    layout,
                    format,
                    &what,
                );
                assert_staged(ctx, spec(json).pixel_terms_only(), &what);
            }
        }
    }
}

/// Images with every pixel ignored beside images with none, staged, one pass and two.
#[test]
fn staged_calls_with_ignored_images() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(4098);
    let shape = Shape::new(3, 150, &[7, 11]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let mut y = random_labels(&mut rng, &shape, 0.2);
    let s = shape.pixels();
    y[s..2 * s].fill(IGNORE);
    // Workgroup sizes as staged_calls_match_the_reference_at_every_class_count pairs them:
    // what an ignored image changes does not depend on them.
    for (json, min, sizes) in [
        (CE_OPTIONS, 0, &[256][..]),
        (CE_OPTIONS, u64::MAX, &[32]),
        (DICE_CE_TEMPERED, 0, &[32, 256]),
    ] {
        let json = json.replace("{W}", &class_vector(&mut rng, 150));
        for &wg in sizes {
            let what = format!("an image all ignored, workgroup {wg}: {json}");
            check_with(
                ctx,
                Some(staged(ctx, wg, min)),
                &spec(&json),
                &shape,
                &z,
                Labels::index(&y),
                &what,
            );
            assert_staged(ctx, spec(&json).pixel_terms_only() && min == 0, &what);
        }
    }
}

/// Bad input past the first classes, found on the device by the staged stats stage (a
/// context whose calls stage past a block of 8): non-finite logits at class 700 of 1,024,
/// a soft target outside [0, 1] at class 590 of 600, labels ≥ C are errors with their
/// count and first position, as on the register path.
#[test]
fn staged_calls_report_bad_input_past_the_first_classes() {
    let own = new_ctx();
    let strategy = staged(&own, own.strategy().pixel_workgroup, u64::MAX);
    let ctx = &own.with_strategy(strategy).unwrap();
    let mut rng = Rng::new(4099);
    let shape = Shape::new(2, 1024, &[5, 7]);
    let s = shape.pixels();
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let y_bytes: &[u8] = bytemuck::cast_slice(&y);
    for json in [CE, DICE_CE_TEMPERED] {
        assert!(device_call(ctx, json, &shape, &z, y_bytes, LabelFormat::U32, false).is_ok());
        assert!(
            ctx.last_kernels().contains(&Kernel::StatsStaged),
            "{:?}",
            ctx.last_kernels()
        );
        let mut bad = z.clone();
        let at = (1024 + 700) * s + 17; // image 1, class 700, pixel 17
        bad[at] = f32::NAN;
        bad[at + 3] = f32::INFINITY;
        bad[(1024 + 900) * s + 30] = f32::NEG_INFINITY;
        let e = device_call(ctx, json, &shape, &bad, y_bytes, LabelFormat::U32, false).unwrap_err();
        assert!(
            e.contains("3 non-finite") && e.contains(&format!("position {at}")),
            "{json}: {e}"
        );
        let mut bad_y = y.clone();
        bad_y[40] = 1024;
        bad_y[11] = 5000;
        let e = device_call(
            ctx,
            json,
            &shape,
            &z,
            bytemuck::cast_slice(&bad_y),
            LabelFormat::U32,
            false,
        )
        .unwrap_err();
        assert!(
            e.contains("2 invalid") && e.contains("position 11"),
            "{json}: {e}"
        );
        // Good input again on the same workspace: clean.
        assert!(device_call(ctx, json, &shape, &z, y_bytes, LabelFormat::U32, false).is_ok());
    }
    let shape = Shape::new(1, 600, &[6, 5]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let mut soft = random_soft_labels(&mut rng, &shape);
    let at = 590 * 30 + 4;
    soft[at] = 1.5;
    soft[595 * 30 + 9] = -0.5;
    let e = device_call(
        ctx,
        CE,
        &shape,
        &z,
        bytemuck::cast_slice(&soft),
        LabelFormat::Soft,
        false,
    )
    .unwrap_err();
    assert!(
        ctx.last_kernels().contains(&Kernel::StatsStaged),
        "{:?}",
        ctx.last_kernels()
    );
    assert!(
        e.contains("2 invalid") && e.contains(&format!("position {at}")),
        "{e}"
    );
}

/// An adapter limited to 16 KiB of workgroup memory stages (the staged kernels need
/// 14,976 bytes at workgroups of 256) and matches the reference at 1,024 classes; one
/// limited to 8 KiB does not stage by default (a GPU would not either), refuses a strategy
/// that asks it to, and runs the call on the register path.
#[test]
fn staging_fits_an_adapter_limited_to_16_kib() {
    let mut rng = Rng::new(4100);
    let shape = Shape::new(2, 1024, &[9, 7]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let small = common::device_with_workgroup_memory(16 * 1024);
    let gpu_like = Strategy {
        class_block: 8,
        class_staging: true,
        pixel_workgroup: 256,
        one_pass_min_elements: 0,
        ..small.strategy()
    };
    assert!(gpu_like
        .validate(small.device(), small.adapter_info())
        .is_ok());
    for json in [DICE_CE_TEMPERED, CE] {
        let what = format!("16 KiB adapter: {json}");
        check_with(
            &small,
            Some(gpu_like),
            &spec(json),
            &shape,
            &z,
            Labels::index(&y),
            &what,
        );
        assert_staged(&small, spec(json).pixel_terms_only(), &what);
    }
    let tiny = common::device_with_workgroup_memory(8 * 1024);
    assert!(!tiny.strategy().class_staging);
    let forced = Strategy {
        class_block: 8,
        class_staging: true,
        pixel_workgroup: 256,
        ..tiny.strategy()
    };
    let opts = Options {
        gradient: true,
        strategy: Some(forced),
        ..Default::default()
    };
    let err = tiny
        .evaluate(&spec(CE), &shape, &z, Labels::index(&y), opts)
        .expect_err("the staged kernels do not fit 8 KiB");
    assert!(err.to_string().contains("workgroup memory"), "{err}");
    // Without staging the same call runs the register path, against the reference.
    let register = Strategy {
        class_staging: false,
        ..forced
    };
    check_with(
        &tiny,
        Some(register),
        &spec(CE),
        &shape,
        &z,
        Labels::index(&y),
        "8 KiB, register path",
    );
}

/// Logits, labels and gradient at distinct ranges of one buffer (burn packs tensors into
/// shared pages): the staged grad stage binds its inputs read-write there
/// (`Kernel::GradStagedShared`), and the gradient matches the reference with the inputs
/// untouched.
#[test]
fn staged_gradient_into_a_buffer_shared_with_the_inputs() {
    let own = new_ctx();
    let strategy = staged(&own, own.strategy().pixel_workgroup, u64::MAX);
    let ctx = &own.with_strategy(strategy).unwrap();
    let mut rng = Rng::new(4101);
    let shape = Shape::new(2, 150, &[9, 13]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let align = 256u64;
    let lz = (4 * z.len() as u64).div_ceil(align) * align;
    let ly = (4 * y.len() as u64).div_ceil(align) * align;
    let mut bytes = vec![0u8; (lz + ly + lz) as usize];
    bytes[..4 * z.len()].copy_from_slice(bytemuck::cast_slice(&z));
    bytes[lz as usize..lz as usize + 4 * y.len()].copy_from_slice(bytemuck::cast_slice(&y));
    let page = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        });
    let batch = DeviceBatch {
        labels: BufferRegion {
            buffer: &page,
            offset: lz,
        },
        ..DeviceBatch::new(&shape, &page, &page, LabelFormat::U32)
    };
    let target = GradTarget {
        region: BufferRegion {
            buffer: &page,
            offset: lz + ly,
        },
        format: GradFormat::F32,
    };
    for json in [DICE_CE_TEMPERED, CE] {
        let sp = spec(json);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let rec = ctx.record(&mut enc, &sp, &batch, Some(target)).unwrap();
        ctx.queue().submit([enc.finish()]);
        let got = rec.read(ctx).unwrap();
        assert!(
            ctx.last_kernels().contains(&Kernel::GradStagedShared),
            "{:?}",
            ctx.last_kernels()
        );
        let want = reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
        assert!(
            common::close(got.loss, want.loss),
            "{} vs {}",
            got.loss,
            want.loss
        );
        let g = ctx.read_f32(&page, lz + ly, z.len()).unwrap();
        common::assert_gradient(&g, want.gradient.as_ref().unwrap(), json);
        assert_eq!(ctx.read_f32(&page, 0, z.len()).unwrap(), z);
    }
}
