//! Batch Dice + CE + the L1 region penalty over a global batch split across MPI ranks, one
//! process and one device per rank: each rank computes its shard's statistics, the ranks
//! all-reduce them (`MPI_Allreduce`, f64 sum), and each rank finalizes the loss of the
//! whole batch and writes its shard's gradient. Rank 0 prints the loss, the shards and the
//! comparison with one process holding the whole batch.
//!
//! mpirun -np 3 cargo run --release --features mpi --example mpi_data_parallel
//!
//! (As root, or with more ranks than cores, Open MPI wants `--allow-run-as-root` and
//! `--oversubscribe`; README.md's "Many devices, many nodes" has the commands.)

use segloss::distributed::{self, mpi::MpiAllReduce, AllReduce};
use segloss::gpu::{context, BufferRegion, DeviceBatch, GpuContext, GradTarget, Options};
use segloss::input::{LabelFormat, Labels, Layout, LogitFormat};
use segloss::output::Statistics;
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{LossSpec, Shape};
use wgpu::util::DeviceExt;

/// The global batch: 7 images, which no rank count from 2 to 6 divides.
const BATCH: usize = 7;
const CLASSES: usize = 4;
const HW: [usize; 2] = [64, 64];

/// This rank's device: on a node with several GPUs, the ranks of the node take different
/// ones (by the node-local rank Open MPI or MPICH sets); on lavapipe, each opens its own.
fn open_device(world: &MpiAllReduce) -> segloss::Result<GpuContext> {
    let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(world.rank());
    let all = context::enumerate();
    let gpus: Vec<&wgpu::Adapter> = all
        .iter()
        .filter(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
        .collect();
    match gpus.len() {
        0 => GpuContext::new(),
        n => GpuContext::on_adapter(gpus[local % n]),
    }
}

fn main() -> segloss::Result<()> {
    let world = MpiAllReduce::init()?;
    let (rank, size) = (world.rank(), world.size());
    let spec = LossSpec::from_json(
        r#"{"terms": [
            {"kind": "cross_entropy"},
            {"kind": "dice", "batch": true, "smooth_nr": 0, "smooth_dr": 0, "skip_empty": true},
            {"kind": "region", "weight": 0.1, "penalty": "l1", "temperature": 10}]}"#,
    )?;
    // Every rank builds the same global batch from a fixed seed and keeps its shard; a real
    // program loads only its shard.
    let shape = Shape::new(BATCH, CLASSES, &HW);
    let mut rng = Rng::new(9);
    let logits = random_logits(&mut rng, &shape, 3.0);
    let labels = random_labels(&mut rng, &shape, 0.05);
    let s = shape.pixels();
    let images = distributed::shard(BATCH, size, rank);
    let elems = images.start * CLASSES * s..images.end * CLASSES * s;

    let ctx = match open_device(&world) {
        Ok(c) => c,
        // Every rank reaches this point; a rank without a device must not leave the others
        // waiting in the all-reduce.
        Err(e) => world.abort(2, &format!("no device: {e}")),
    };
    let dev = ctx.device();
    use wgpu::BufferUsages as U;
    let upload = |bytes: &[u8]| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytes,
            usage: U::STORAGE | U::COPY_DST,
        })
    };
    let z_buf = upload(bytemuck::cast_slice(&logits[elems.clone()]));
    let y_buf = upload(bytemuck::cast_slice(
        &labels[images.start * s..images.end * s],
    ));
    let g_buf = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4 * elems.len() as u64,
        usage: U::STORAGE | U::COPY_SRC,
        mapped_at_creation: false,
    });
    let part = Shape::new(images.len(), CLASSES, &HW);
    let batch = DeviceBatch {
        shape: &part,
        layout: Layout::Nchw,
        logits: BufferRegion {
            buffer: &z_buf,
            offset: 0,
        },
        logit_format: LogitFormat::F32,
        labels: BufferRegion {
            buffer: &y_buf,
            offset: 0,
        },
        label_format: LabelFormat::U32,
        image_offset: images.start,
        total_batch: BATCH,
    };

    // The step: statistics, all-reduce, finalize, this shard's gradient.
    let t = std::time::Instant::now();
    let out = distributed::step(&ctx, &spec, &batch, Some(GradTarget::f32(&g_buf)), &world)?;
    let step_ms = t.elapsed().as_secs_f64() * 1e3;
    let grad = ctx.read_f32(&g_buf, 0, (g_buf.size() / 4) as usize)?;

    // The same batch in one process, for the comparison.
    let single = ctx.evaluate(
        &spec,
        &shape,
        &logits,
        Labels::index(&labels),
        Options {
            gradient: true,
            ..Default::default()
        },
    )?;
    let want = &single.gradient.as_ref().expect("gradient")[elems.clone()];
    let max_diff = grad
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let bitwise = out.loss.to_bits() == single.loss.to_bits()
        && grad
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits());

    // Each rank's report to rank 0, through the same all-reduce (a slot per rank).
    const REPORT: usize = 6;
    let mut report = vec![0.0; REPORT * size];
    report[REPORT * rank..REPORT * (rank + 1)].copy_from_slice(&[
        images.start as f64,
        images.len() as f64,
        out.loss,
        max_diff as f64,
        f64::from(u8::from(bitwise)),
        step_ms,
    ]);
    world.all_reduce_sum(&mut report)?;
    if rank == 0 {
        let terms = |o: &segloss::LossOutput| {
            o.terms
                .iter()
                .map(|t| format!("{} {:.7}", t.kind, t.value))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let st = out.statistics.as_ref().expect("statistics");
        let row = Statistics::flat_row(CLASSES, st.pixel_terms());
        let wire = 8 * Statistics::flat_len(BATCH, CLASSES, st.pixel_terms());
        println!(
            "{size} ranks, global batch {BATCH} images × {CLASSES} classes × {}×{} ({})",
            HW[0],
            HW[1],
            if BATCH.is_multiple_of(size) {
                "divides evenly"
            } else {
                "does not divide evenly"
            }
        );
        println!(
            "exchanged per step: {wire} bytes of statistics (B × (6·C + 2 + 2·T) = {BATCH} × {row} f64), beside {} bytes of f32 logits",
            4 * shape.len()
        );
        println!("adapter of rank 0: {}", ctx.adapter_info().name);
        for (r, p) in report.chunks_exact(REPORT).enumerate() {
            println!(
                "rank {r}: images {}..{} ({} images), loss {:.9}, first step {:.0} ms (with pipeline compilation), gradient vs single process max |Δ| {:.1e}{}",
                p[0],
                p[0] + p[1],
                p[1],
                p[2],
                p[5],
                p[3],
                if p[4] == 1.0 { " (bitwise equal)" } else { "" }
            );
        }
        println!(
            "loss, {size} ranks:     {:.9} (bits {:#018x})  [{}]",
            out.loss,
            out.loss.to_bits(),
            terms(&out)
        );
        println!(
            "loss, one process: {:.9} (bits {:#018x})  [{}]",
            single.loss,
            single.loss.to_bits(),
            terms(&single)
        );
        let every_rank_same = report
            .chunks_exact(REPORT)
            .all(|p| p[2].to_bits() == out.loss.to_bits());
        let all_bitwise = report.chunks_exact(REPORT).all(|p| p[4] == 1.0);
        println!(
            "difference {:.1e}; every rank the same loss: {every_rank_same}; loss and every gradient slice bitwise equal to one process: {all_bitwise}",
            (out.loss - single.loss).abs()
        );
    }
    Ok(())
}
