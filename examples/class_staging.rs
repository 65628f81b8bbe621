//! The two ways past the register block on one device, timed in one run: classes staged
//! in workgroup memory (each logit read once per pass: shaders/staged.wgsl) against the
//! register path that reads classes past the block again where used, for cross-entropy
//! and Dice + CE, beside the shader copy of the same logits. scripts/gpu-bench.sh runs it
//! on a real GPU; BENCHMARKS.md, "Staged classes", has the numbers.
//!
//! cargo run --release --example class_staging -- [REPS] SHAPE... (e.g. 2,21,128,128)

use segloss::bench::{self, Problem};
use segloss::gpu::{GpuContext, Strategy};
use segloss::input::{LabelFormat, Layout, Shape};
use segloss::LossSpec;

fn main() -> segloss::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let reps = match args.first().and_then(|a| a.parse::<usize>().ok()) {
        Some(r) => {
            args.remove(0);
            r
        }
        None => 20,
    };
    if args.is_empty() {
        args = vec!["2,21,128,128".into(), "1,150,96,96".into()];
    }
    let ctx = GpuContext::new()?;
    // Two contexts on the one device, differing only in their strategy: the block of 8
    // GPUs keep, staged past it or not.
    let with = |staging: bool| {
        let s = Strategy {
            class_block: 8,
            class_staging: staging,
            ..ctx.strategy()
        };
        GpuContext::from_device(
            ctx.device().clone(),
            ctx.queue().clone(),
            ctx.adapter_info().clone(),
        )
        .with_strategy(s)
    };
    let (staged, register) = (with(true)?, with(false)?);
    println!("adapter: {}", ctx.adapter_info().name);
    println!(
        "{:16} {:7} {:>10} {:>12} {:>10} {:>9} {:>10}",
        "shape", "loss", "staged ms", "register ms", "copy ms", "x copy", "reg/staged"
    );
    for arg in &args {
        let d: Vec<usize> = arg.split(',').filter_map(|v| v.parse().ok()).collect();
        let shape = Shape::new(d[0], d[1], &d[2..]);
        for (name, json) in [
            ("ce", r#"{"terms":[{"kind":"cross_entropy"}]}"#),
            (
                "dicece",
                r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#,
            ),
        ] {
            let spec = LossSpec::from_json(json)?;
            let labels = (shape.classes > 255).then_some(LabelFormat::U16);
            let problem = Problem::new(&ctx, &spec, &shape, Layout::Nchw, labels)?;
            // Alternated, so both see the same machine state.
            let (mut s_ms, mut r_ms, mut copy) = (vec![], vec![], vec![]);
            for _ in 0..3 {
                let s = bench::run(&staged, &problem, reps, 2, || {})?;
                let r = bench::run(&register, &problem, reps, 2, || {})?;
                s_ms.push(s.median_ms);
                r_ms.push(r.median_ms);
                copy.push(s.shader_copy_median_ms);
            }
            let mid = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[1]
            };
            let (s, r, c) = (mid(s_ms), mid(r_ms), mid(copy));
            println!(
                "{:16} {:7} {:10.3} {:12.3} {:10.3} {:9.2} {:10.2}",
                arg,
                name,
                s,
                r,
                c,
                s / c,
                r / s
            );
        }
    }
    Ok(())
}
