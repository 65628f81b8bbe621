//! Misuse of the backend API is an error from the call that caused it, never a wrong
//! number and never an error charged to a later call (one test per defect found by trying
//! the API as a new user would).

use crate::common;
use crate::common::{assert_gradient, close, device_with_workgroup_memory, new_ctx, spec};
use segloss::gpu::{context, BufferRegion, DeviceBatch, GpuContext, GradTarget, TileSum};
use segloss::input::{LabelFormat, Labels, Shape, IGNORE};
use segloss::reference;
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::wgpu::{self, util::DeviceExt};

const DICE_CE: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn buffer(ctx: &GpuContext, bytes: &[u8]) -> wgpu::Buffer {
    ctx.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test"),
            contents: bytes,
            usage: USAGE,
        })
}

struct Problem {
    shape: Shape,
    z: Vec<f32>,
    y: Vec<u32>,
}

fn problem(seed: u64) -> Problem {
    let shape = Shape::new(2, 3, &[13, 11]);
    let mut rng = Rng::new(seed);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    Problem { shape, z, y }
}

/// Records, submits and reads one plain call on its own buffers: the context still works
/// and no earlier misuse is charged to it.
fn plain_call_is_ok(ctx: &GpuContext, p: &Problem) {
    let sp = spec(DICE_CE);
    let logits = buffer(ctx, bytemuck::cast_slice(&p.z));
    let labels = buffer(ctx, bytemuck::cast_slice(&p.y));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let batch = DeviceBatch::new(&p.shape, &logits, &labels, LabelFormat::U32);
    let rec = ctx.record(&mut enc, &sp, &batch, None).unwrap();
    ctx.queue().submit([enc.finish()]);
    let got = rec.read(ctx).unwrap();
    let want = reference::evaluate(&sp, &p.shape, &p.z, Labels::index(&p.y), false).unwrap();
    assert!(close(got.loss, want.loss), "{} vs {}", got.loss, want.loss);
    ctx.check_device().unwrap();
}

/// Defect 1: a gradient target overlapping the logits was accepted, the next call got the
/// wgpu error. Overlapping ranges are refused by `record`; distinct ranges of one buffer
/// (burn packs tensors into shared pages) work and are exact.
#[test]
fn overlapping_ranges_are_refused_and_distinct_ranges_of_one_buffer_work() {
    let ctx = new_ctx();
    let p = problem(1);
    let sp = spec(DICE_CE);
    let logits = buffer(&ctx, bytemuck::cast_slice(&p.z));
    let labels = buffer(&ctx, bytemuck::cast_slice(&p.y));
    let batch = DeviceBatch::new(&p.shape, &logits, &labels, LabelFormat::U32);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e = ctx
        .record(&mut enc, &sp, &batch, Some(GradTarget::f32(&logits)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
    // Labels overlapping the gradient by one word are refused too.
    let shifted = GradTarget {
        region: BufferRegion {
            buffer: &labels,
            offset: 4 * (p.y.len() as u64 - 1),
        },
        format: segloss::input::GradFormat::F32,
    };
    assert!(ctx.record(&mut enc, &sp, &batch, Some(shifted)).is_err());
    // The refused calls left the encoder valid and charged nothing to the next call.
    ctx.queue().submit([enc.finish()]);
    plain_call_is_ok(&ctx, &p);

    // One buffer: logits, then labels, then the gradient, at 256-byte aligned offsets.
    let align = 256u64;
    let lz = (4 * p.z.len() as u64).div_ceil(align) * align;
    let ly = (4 * p.y.len() as u64).div_ceil(align) * align;
    let mut bytes = vec![0u8; (lz + ly + lz) as usize];
    bytes[..4 * p.z.len()].copy_from_slice(bytemuck::cast_slice(&p.z));
    bytes[lz as usize..lz as usize + 4 * p.y.len()].copy_from_slice(bytemuck::cast_slice(&p.y));
    let page = buffer(&ctx, &bytes);
    let shared = DeviceBatch {
        labels: BufferRegion {
            buffer: &page,
            offset: lz,
        },
        ..DeviceBatch::new(&p.shape, &page, &page, LabelFormat::U32)
    };
    let target = GradTarget {
        region: BufferRegion {
            buffer: &page,
            offset: lz + ly,
        },
        format: segloss::input::GradFormat::F32,
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record(&mut enc, &sp, &shared, Some(target)).unwrap();
    ctx.queue().submit([enc.finish()]);
    let got = rec.read(&ctx).unwrap();
    let want = reference::evaluate(&sp, &p.shape, &p.z, Labels::index(&p.y), true).unwrap();
    assert!(close(got.loss, want.loss), "{} vs {}", got.loss, want.loss);
    let g = ctx.read_f32(&page, lz + ly, p.z.len()).unwrap();
    assert_gradient(&g, want.gradient.as_ref().unwrap(), "shared buffer");
    // The inputs in the same buffer are untouched.
    assert_eq!(ctx.read_f32(&page, 0, p.z.len()).unwrap(), p.z);
    ctx.check_device().unwrap();
}

/// Defect 2: `read` before the encoder was submitted returned the previous call's loss.
#[test]
fn reading_an_unsubmitted_recording_is_an_error() {
    let ctx = new_ctx();
    let p = problem(2);
    plain_call_is_ok(&ctx, &p); // a previous result the stale read would have returned
    let sp = spec(DICE_CE);
    let logits = buffer(&ctx, bytemuck::cast_slice(&p.z));
    let labels = buffer(&ctx, bytemuck::cast_slice(&p.y));
    let batch = DeviceBatch::new(&p.shape, &logits, &labels, LabelFormat::U32);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record(&mut enc, &sp, &batch, None).unwrap();
    let e = rec.read(&ctx).unwrap_err().to_string();
    assert!(e.contains("has not run") && e.contains("submit"), "{e}");
    let e = pollster::block_on(async {
        let f = rec.read_loss_async(&ctx);
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        f.await
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("has not run"), "{e}");
    // Once submitted, the same handle reads the right values.
    ctx.queue().submit([enc.finish()]);
    let want = reference::evaluate(&sp, &p.shape, &p.z, Labels::index(&p.y), false).unwrap();
    assert!(close(rec.read(&ctx).unwrap().loss, want.loss));
    let loss = pollster::block_on(async {
        let f = rec.read_loss_async(&ctx);
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        f.await
    })
    .unwrap();
    assert!(close(loss as f64, want.loss));
}

/// Defect 3: a buffer of a second context (the data-parallel pattern) gave the loss of an
/// unrelated buffer. Contexts share one wgpu instance, so wgpu itself sees the foreign
/// device, and `record` returns its error.
#[test]
fn a_buffer_of_another_device_is_an_error() {
    let (ctx, other) = (new_ctx(), new_ctx());
    let p = problem(3);
    plain_call_is_ok(&ctx, &p);
    let sp = spec(DICE_CE);
    let foreign = buffer(&other, bytemuck::cast_slice(&p.z));
    let labels = buffer(&ctx, bytemuck::cast_slice(&p.y));
    let batch = DeviceBatch::new(&p.shape, &foreign, &labels, LabelFormat::U32);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e = ctx
        .record(&mut enc, &sp, &batch, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("GPU error"), "{e}");
    ctx.queue().submit([enc.finish()]);
    ctx.check_device().unwrap();
    plain_call_is_ok(&ctx, &p);
}

/// Defect 4: a device opened without SUBGROUP took the workgroup-memory strategy, whose
/// barriers lavapipe compiles for a minute. Such a device on a CPU adapter now sums without
/// barriers, and the features segloss wants are public.
#[test]
fn a_device_without_subgroups_uses_the_barrier_free_sum_on_cpu_adapters() {
    let adapter = context::choose(context::enumerate()).unwrap();
    let mut desc = context::device_descriptor(&adapter);
    assert_eq!(
        desc.required_features,
        adapter.features() & context::wanted_features()
    );
    desc.required_features = desc.required_features.difference(wgpu::Features::SUBGROUP);
    let (device, queue) = pollster::block_on(adapter.request_device(&desc)).unwrap();
    let info = adapter.get_info();
    let cpu = info.device_type == wgpu::DeviceType::Cpu;
    let ctx = GpuContext::from_device(device, queue, info);
    assert!(!ctx.uses_subgroups());
    let want = if cpu {
        TileSum::Invocation
    } else {
        TileSum::Workgroup
    };
    assert_eq!(ctx.tile_sum(), want);
    plain_call_is_ok(&ctx, &problem(4));
}

/// Defect 5: `ignore_index` was ignored for host index labels; labels of any integer type
/// are taken as they are.
#[test]
fn ignore_index_and_integer_label_types_are_honoured() {
    let ctx = new_ctx();
    let p = problem(5);
    let sp = spec(
        r#"{"ignore_index": 255, "terms":[{"kind":"cross_entropy"},{"kind":"dice","batch":true}]}"#,
    );
    let as_u8: Vec<u8> =
        p.y.iter()
            .map(|&v| if v == IGNORE { 255 } else { v as u8 })
            .collect();
    let want = reference::evaluate(&sp, &p.shape, &p.z, Labels::index(&p.y), true).unwrap();
    assert!(p.y.contains(&IGNORE), "the problem has ignored pixels");
    let as_i64: Vec<i64> = as_u8.iter().map(|&v| v as i64).collect();
    let as_i32: Vec<i32> = as_u8.iter().map(|&v| v as i32).collect();
    let as_u32: Vec<u32> = as_u8.iter().map(|&v| v as u32).collect();
    let forms = [
        Labels::index(&as_u8),
        Labels::index(&as_i64),
        Labels::index(&as_i32),
        Labels::index(&as_u32),
    ];
    for labels in forms {
        let got = ctx
            .evaluate(&sp, &p.shape, &p.z, labels, common::GRADIENT)
            .unwrap_or_else(|e| panic!("{labels:?}: {e}"));
        assert!(
            close(got.loss, want.loss),
            "{labels:?}: {} vs {}",
            got.loss,
            want.loss
        );
        assert_gradient(
            got.gradient.as_ref().unwrap(),
            want.gradient.as_ref().unwrap(),
            "u8",
        );
        let cpu = reference::evaluate(&sp, &p.shape, &p.z, labels, false).unwrap();
        assert!(close(cpu.loss, want.loss));
    }
    // PyTorch's default −100 with i64 labels.
    let torch: Vec<i64> =
        p.y.iter()
            .map(|&v| if v == IGNORE { -100 } else { v as i64 })
            .collect();
    let sp = spec(DICE_CE);
    let want = reference::evaluate(&sp, &p.shape, &p.z, Labels::index(&p.y), false).unwrap();
    let got = ctx
        .evaluate(&sp, &p.shape, &p.z, Labels::index(&torch), common::GRADIENT)
        .unwrap();
    assert!(close(got.loss, want.loss));
    // 255 without ignore_index 255 is a bad label, named.
    let e = ctx
        .evaluate(&sp, &p.shape, &p.z, Labels::index(&as_u8), common::GRADIENT)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 255"), "{e}");
}

/// Defect 6: u8 label storage with C > 255 was refused by the host path only.
#[test]
fn u8_labels_with_more_than_255_classes_are_refused_everywhere() {
    let ctx = new_ctx();
    let shape = Shape::new(1, 300, &[4, 4]);
    let sp = spec(DICE_CE);
    let z = vec![0.0f32; shape.len()];
    let y = vec![7u32; 16];
    let host = segloss::gpu::HostBatch {
        label_format: Some(LabelFormat::U8),
        ..segloss::gpu::HostBatch::new(&shape, &z, Labels::index(&y))
    };
    let e1 = ctx
        .evaluate_host(&sp, &host, common::GRADIENT)
        .unwrap_err()
        .to_string();
    let logits = buffer(&ctx, bytemuck::cast_slice(&z));
    let labels = buffer(&ctx, &[7u8; 16]);
    let batch = DeviceBatch::new(&shape, &logits, &labels, LabelFormat::U8);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e2 = ctx
        .record(&mut enc, &sp, &batch, None)
        .unwrap_err()
        .to_string();
    let e3 = match segloss::bench::Problem::new(
        &ctx,
        &sp,
        &shape,
        segloss::input::Layout::Nchw,
        Some(LabelFormat::U8),
    ) {
        Ok(_) => panic!("the bench accepted u8 labels for 300 classes"),
        Err(e) => e.to_string(),
    };
    assert!(e1.contains("at most 255 classes"), "{e1}");
    assert_eq!(e1, e2);
    assert_eq!(e1, e3);
}

/// Found while building the MPI combiner: a shard's statistics (two-phase API) held the
/// rows of the other images from an earlier call on the same context and shape.
#[test]
fn a_shard_reports_no_statistics_for_images_it_does_not_hold() {
    let ctx = new_ctx();
    let shape = Shape::new(4, 3, &[13, 11]);
    let mut rng = Rng::new(6);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let sp = spec(r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice","batch":true}]}"#);
    let logits = buffer(&ctx, bytemuck::cast_slice(&z));
    let labels = buffer(&ctx, bytemuck::cast_slice(&y));
    // The whole batch first: every image's rows are written.
    let whole = DeviceBatch::new(&shape, &logits, &labels, LabelFormat::U32);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record_statistics(&mut enc, &sp, &whole).unwrap();
    ctx.queue().submit([enc.finish()]);
    let all = rec.statistics(&ctx).unwrap();
    drop(rec);
    // Then image 2 alone, as the third shard of the same global batch.
    let one = Shape::new(1, 3, &[13, 11]);
    let per_image = 3 * 13 * 11;
    let shard = DeviceBatch {
        logits: BufferRegion {
            buffer: &logits,
            offset: 4 * 2 * per_image as u64,
        },
        labels: BufferRegion {
            buffer: &labels,
            offset: 4 * 2 * 13 * 11,
        },
        image_offset: 2,
        total_batch: 4,
        ..DeviceBatch::new(&one, &logits, &labels, LabelFormat::U32)
    };
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record_statistics(&mut enc, &sp, &shard).unwrap();
    ctx.queue().submit([enc.finish()]);
    let st = rec.statistics(&ctx).unwrap();
    for b in 0..4 {
        if b == 2 {
            assert_eq!(st.valid[b], all.valid[b]);
            assert_eq!(st.per_class[2 * 3..3 * 3], all.per_class[2 * 3..3 * 3]);
        } else {
            assert_eq!(
                st.valid[b], 0.0,
                "image {b} is not in the shard: {:?}",
                st.valid
            );
            assert!(st.per_class[b * 3..(b + 1) * 3]
                .iter()
                .all(|r| r.iter().all(|v| *v == 0.0)));
        }
    }
}

/// An adapter limited to 16 KiB of workgroup memory (the least any adapter has) runs every
/// strategy: each tile sum, classes past the GPU register block, and the one-pass path,
/// each against the reference, all with GPUs' workgroups of 256 (the workgroup sum's
/// 12 KiB). (wgpu does not check workgroup memory against the limit;
/// tests/naga_validate.rs checks each kernel's declaration.)
#[test]
fn an_adapter_limited_to_16_kib_of_workgroup_memory_runs_every_strategy() {
    let ctx = device_with_workgroup_memory(16 << 10);
    let mut tile_sums = vec![TileSum::Invocation];
    if ctx.uses_subgroups() {
        tile_sums.push(TileSum::Subgroup);
    }
    let mut rng = Rng::new(16);
    // The workgroup sum (the one kernel with 12 KiB of workgroup memory) with the smallest
    // stats module, a Dice term alone: llvmpipe compiles its barriers slowly, and this
    // context shares no pipeline with the others of the run.
    let dice = r#"{"terms":[{"kind":"dice"}]}"#;
    let focal =
        r#"{"terms":[{"kind":"focal","gamma":2},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#;
    let cases = [
        (Shape::new(2, 2, &[45, 101]), dice, vec![TileSum::Workgroup]),
        (Shape::new(2, 3, &[45, 101]), DICE_CE, tile_sums),
        (Shape::new(2, 21, &[33, 37]), focal, vec![ctx.tile_sum()]),
    ];
    for (shape, json, sums) in cases {
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        for tile_sum in sums {
            let strategy = segloss::gpu::Strategy {
                tile_sum,
                pixel_workgroup: 256,
                ..ctx.strategy()
            };
            assert!(strategy.validate(ctx.device(), ctx.adapter_info()).is_ok());
            let what = format!("{tile_sum:?} within 16 KiB on {shape:?}: {json}");
            common::check_with(
                &ctx,
                Some(strategy),
                &spec(json),
                &shape,
                &z,
                Labels::index(&y),
                &what,
            );
        }
    }
    let one_pass = segloss::gpu::Strategy {
        one_pass_min_elements: 0,
        pixel_workgroup: 256,
        ..ctx.strategy()
    };
    let shape = Shape::new(2, 9, &[31, 37]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    common::check_with(
        &ctx,
        Some(one_pass),
        &spec(r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1}]}"#),
        &shape,
        &z,
        Labels::index(&y),
        "one pass within 16 KiB",
    );
}

/// A device with less workgroup memory than the workgroup-memory sum declares at GPUs'
/// workgroups of 256 (12 KiB): that strategy is refused with an error naming the limit, a
/// GPU without subgroups would not choose it (it would with 16 KiB), the same sum in
/// workgroups of 32 (1.5 KiB) runs, and calls under the default strategy work.
#[test]
fn a_strategy_needing_more_workgroup_memory_than_the_device_has_is_refused() {
    let ctx = device_with_workgroup_memory(8 << 10);
    assert_ne!(ctx.tile_sum(), TileSum::Workgroup);
    // The choice a GPU adapter without subgroups makes (on a CPU adapter the sum without
    // barriers is chosen before memory is looked at).
    let as_gpu = wgpu::AdapterInfo {
        device_type: wgpu::DeviceType::DiscreteGpu,
        ..ctx.adapter_info().clone()
    };
    assert_eq!(
        TileSum::without_subgroups(ctx.device(), &as_gpu),
        TileSum::Invocation
    );
    let roomy = device_with_workgroup_memory(16 << 10);
    assert_eq!(
        TileSum::without_subgroups(roomy.device(), &as_gpu),
        TileSum::Workgroup
    );
    let workgroup = segloss::gpu::Strategy {
        tile_sum: TileSum::Workgroup,
        pixel_workgroup: 256,
        ..ctx.strategy()
    };
    let err = workgroup
        .validate(ctx.device(), ctx.adapter_info())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("workgroup memory") && err.contains("8192"),
        "{err}"
    );
    let p = problem(8);
    let opts = segloss::gpu::Options {
        strategy: Some(workgroup),
        ..common::GRADIENT
    };
    let refused = ctx.evaluate(&spec(DICE_CE), &p.shape, &p.z, Labels::index(&p.y), opts);
    assert!(
        refused.is_err_and(|e| e.to_string().contains("workgroup memory")),
        "the call was not refused"
    );
    let small = segloss::gpu::Strategy {
        pixel_workgroup: 32,
        ..workgroup
    };
    assert!(small.validate(ctx.device(), ctx.adapter_info()).is_ok());
    // The shape and spec of the 16 KiB test's case of three classes.
    let shape = Shape::new(2, 3, &[45, 101]);
    let mut rng = Rng::new(8);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    common::check_with(
        &ctx,
        Some(small),
        &spec(DICE_CE),
        &shape,
        &z,
        Labels::index(&y),
        "the workgroup sum in workgroups of 32 within 8 KiB",
    );
    plain_call_is_ok(&ctx, &p);
}

/// A pixel workgroup that is not a power of two from 32 to 256, or (with subgroup sums)
/// smaller than the adapter's largest subgroup, is refused by `validate` and by the call.
#[test]
fn a_pixel_workgroup_out_of_range_is_refused() {
    let ctx = common::gpu();
    let p = problem(9);
    if ctx.uses_subgroups() {
        // As on an adapter whose subgroups are 64 wide.
        let wide = wgpu::AdapterInfo {
            subgroup_min_size: 64,
            subgroup_max_size: 64,
            ..ctx.adapter_info().clone()
        };
        let subgroup = segloss::gpu::Strategy {
            tile_sum: TileSum::Subgroup,
            pixel_workgroup: 32,
            planned_subgroup_size: 0,
            ..ctx.strategy()
        };
        let err = subgroup.validate(ctx.device(), &wide).unwrap_err();
        assert!(err.to_string().contains("subgroups"), "{err}");
    }
    for wg in [0, 16, 48, 512] {
        let strategy = segloss::gpu::Strategy {
            pixel_workgroup: wg,
            ..ctx.strategy()
        };
        assert!(
            strategy.validate(ctx.device(), ctx.adapter_info()).is_err(),
            "pixel_workgroup {wg} was accepted"
        );
        let opts = segloss::gpu::Options {
            strategy: Some(strategy),
            ..common::GRADIENT
        };
        let refused = ctx.evaluate(&spec(DICE_CE), &p.shape, &p.z, Labels::index(&p.y), opts);
        assert!(
            refused.is_err(),
            "pixel_workgroup {wg}: the call was not refused"
        );
    }
    plain_call_is_ok(ctx, &p);
}
