//! CI's run of the region-bias experiment (`--quick`: a few steps, one seed, small images):
//! every (setting, loss) trains, every reported number is finite (the example's own check),
//! and the table and the three pictures are written.

#[path = "../examples/unet_region_bias.rs"]
#[allow(dead_code)]
mod unet_region_bias;

use unet_region_bias::{losses, run, Args, BIN_NAMES};

#[test]
fn the_region_bias_experiment_writes_every_output() {
    let out = std::env::temp_dir().join(format!("segloss-region-bias-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = Args {
        out: out.clone(),
        ..Args::quick()
    };
    let result = run(&args).unwrap_or_else(|e| {
        panic!("the region-bias example failed (a Vulkan device is needed: scripts/install-lavapipe.sh): {e}")
    });
    let names = losses();
    assert_eq!(result.runs.len(), 2 * names.len() * args.seeds);
    for r in &result.runs {
        // steps 0, 2 and the last (3): the log_every readings and the final one.
        assert_eq!(r.log.len(), 3, "{}/{}", r.setting, r.loss);
        assert!(r.dice.iter().all(|d| (0.0..=1.0).contains(d)));
        let pairs: usize = r.bins.iter().map(|b| b.n).sum();
        assert_eq!(
            pairs,
            args.eval_images * 3,
            "every (image, foreground class) binned"
        );
        for p in &r.log {
            assert!(p.kl >= -1e-9 && p.matching >= -1e-9, "{p:?}");
            assert!((p.kl + p.matching).is_finite());
        }
    }
    let table = std::fs::read_to_string(out.join("unet_region_bias.md")).unwrap();
    for (name, _) in &names {
        assert_eq!(
            table.matches(&format!("| {name} |")).count(),
            2 * 5,
            "{name}: one row per setting in each of the five tables"
        );
    }
    for bin in BIN_NAMES {
        assert!(table.contains(bin));
    }
    assert!(!table.contains("NaN") && !table.contains("inf"));
    let csv = std::fs::read_to_string(out.join("unet_region_bias_runs.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + result.runs.len(),
        "a header and a line per run"
    );
    assert!(!csv.contains("NaN") && !csv.contains("inf"));
    for png in [
        "unet_region_bias.png",
        "decomposition.png",
        "region_terms.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{png} is not a PNG"
        );
        assert!(bytes.len() > 20_000, "{png}: only {} bytes", bytes.len());
        assert!(result.files.contains(&out.join(png)));
    }
    let _ = std::fs::remove_dir_all(&out);
}
