//! The `segloss` command line against its contract (ARCHITECTURE.md): JSON fields, the gradient
//! file, layouts, and bad input (one line on stderr, exit status 2, no output file).

use segloss::input::{Labels, Shape};
use segloss::npy::{self, NpyData};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{reference, LossSpec};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A test's own folder under the system's temporary folder, removed with everything in it
/// when the test is done with it (also when it fails).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("segloss-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A .npy of little-endian i64 labels, as NumPy and PyTorch write them.
fn write_i64(path: &Path, shape: &[usize], v: &[i64]) {
    let body: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_npy(path, "<i8", shape, &body);
}

fn segloss(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_segloss"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const SPEC: &str = r#"{"ignore_index": 255, "terms": [{"kind": "cross_entropy", "class_weights": [1, 2, 0.5]}, {"kind": "dice", "weight": 0.5}, {"kind": "region", "weight": 0.1, "temperature": 10}]}"#;

struct Case {
    dir: TempDir,
    shape: Shape,
    logits: Vec<f32>,
    labels: Vec<u32>,
}

fn case(name: &str) -> Case {
    let d = dir(name);
    let shape = Shape::new(2, 3, &[9, 7]);
    let mut rng = Rng::new(3);
    let logits = random_logits(&mut rng, &shape, 3.0);
    let labels = random_labels(&mut rng, &shape, 0.1);
    npy::write_f32(&d.join("x.npy"), &[2, 3, 9, 7], &logits).unwrap();
    let as_i64: Vec<i64> = labels
        .iter()
        .map(|&v| if v == u32::MAX { 255 } else { v as i64 })
        .collect();
    write_i64(&d.join("y.npy"), &[2, 9, 7], &as_i64);
    Case {
        dir: d,
        shape,
        logits,
        labels,
    }
}

fn p(c: &Case, f: &str) -> String {
    c.dir.join(f).to_string_lossy().into_owned()
}

#[test]
fn eval_prints_the_contract_fields_and_writes_the_gradient() {
    let c = case("eval");
    for device in ["cpu", "gpu"] {
        let (code, out, err) = segloss(&[
            "eval",
            "--logits",
            &p(&c, "x.npy"),
            "--labels",
            &p(&c, "y.npy"),
            "--spec",
            SPEC,
            "--grad-out",
            &p(&c, "g.npy"),
            "--device",
            device,
        ]);
        assert_eq!(code, 0, "{device}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let spec = LossSpec::from_json(SPEC).unwrap();
        let want = reference::evaluate(&spec, &c.shape, &c.logits, Labels::index(&c.labels), true)
            .unwrap();
        assert!(
            (v["loss"].as_f64().unwrap() - want.loss).abs() < 1e-5,
            "{device}: {out}"
        );
        let terms = v["terms"].as_array().unwrap();
        assert_eq!(terms.len(), 3);
        assert_eq!(terms[1]["kind"], "dice");
        assert_eq!(terms[1]["weight"], 0.5);
        assert!((terms[1]["value"].as_f64().unwrap() - want.terms[1].value).abs() < 1e-5);
        assert_eq!(v["predicted_proportions"].as_array().unwrap().len(), 2);
        assert_eq!(v["target_proportions"][1].as_array().unwrap().len(), 3);
        assert_eq!(v["valid_pixels"][0].as_u64().unwrap(), want.valid_pixels[0]);
        for key in ["ce", "kl", "matching", "dice_region"] {
            assert!(v["decomposition"][1][key].is_number(), "{key}");
        }
        let g = npy::read(&c.dir.join("g.npy")).unwrap();
        assert_eq!(g.shape, vec![2, 3, 9, 7]);
        let NpyData::Float(g) = g.data else {
            panic!("gradient is not float32")
        };
        for (a, b) in g.iter().zip(want.gradient.as_ref().unwrap()) {
            assert!((a - b).abs() < 1e-5, "{device}: {a} vs {b}");
        }
    }
}

#[test]
fn nhwc_layout_gives_the_same_loss_and_a_transposed_gradient() {
    let c = case("nhwc");
    let (b_n, c_n, s) = (2, 3, 63);
    let mut nhwc = vec![0.0f32; c.logits.len()];
    for b in 0..b_n {
        for k in 0..c_n {
            for i in 0..s {
                nhwc[(b * s + i) * c_n + k] = c.logits[(b * c_n + k) * s + i];
            }
        }
    }
    npy::write_f32(&c.dir.join("xh.npy"), &[2, 9, 7, 3], &nhwc).unwrap();
    let run = |x: &str, layout: &str, g: &str| {
        let (code, out, err) = segloss(&[
            "eval",
            "--logits",
            &p(&c, x),
            "--labels",
            &p(&c, "y.npy"),
            "--spec",
            SPEC,
            "--layout",
            layout,
            "--grad-out",
            &p(&c, g),
            "--device",
            "cpu",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(
        run("x.npy", "nchw", "g.npy"),
        run("xh.npy", "nhwc", "gh.npy")
    );
    let g = npy::read(&c.dir.join("g.npy")).unwrap();
    let gh = npy::read(&c.dir.join("gh.npy")).unwrap();
    assert_eq!(gh.shape, vec![2, 9, 7, 3]);
    let (NpyData::Float(g), NpyData::Float(gh)) = (g.data, gh.data) else {
        panic!()
    };
    assert_eq!(gh[(9 * 7 + 5) * 3 + 2], g[(3 + 2) * 63 + 5]);
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_output_file() {
    let c = case("bad");
    std::fs::write(c.dir.join("garbage.npy"), b"\x93NUMPY\x01\x00garbage").unwrap();
    let mut y_bad: Vec<i64> = c
        .labels
        .iter()
        .map(|&v| if v == u32::MAX { 255 } else { v as i64 })
        .collect();
    y_bad[17] = 7;
    write_i64(&c.dir.join("y_bad.npy"), &[2, 9, 7], &y_bad);
    write_i64(&c.dir.join("y_shape.npy"), &[2, 63], &y_bad);
    let x = p(&c, "x.npy");
    let y = p(&c, "y.npy");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![x.clone(), p(&c, "y_bad.npy"), SPEC.into()],
            "label 7 at flat position 17",
        ),
        (vec![x.clone(), p(&c, "y_shape.npy"), SPEC.into()], "shape"),
        (
            vec![p(&c, "missing.npy"), y.clone(), SPEC.into()],
            "missing.npy",
        ),
        (
            vec![p(&c, "garbage.npy"), y.clone(), SPEC.into()],
            "garbage.npy",
        ),
        (
            vec![x.clone(), y.clone(), r#"{"terms": []}"#.into()],
            "terms",
        ),
        (
            vec![
                x.clone(),
                y.clone(),
                r#"{"terms": [{"kind": "dice", "smooth_nr": -1}]}"#.into(),
            ],
            "smooth_nr",
        ),
        (
            vec![
                x.clone(),
                y.clone(),
                r#"{"terms": [{"kind": "cross_entropy", "class_weights": [1, 2]}]}"#.into(),
            ],
            "class_weights",
        ),
        (
            vec![x.clone(), y.clone(), "@/nonexistent/spec.json".into()],
            "spec.json",
        ),
        (
            vec![x.clone(), y.clone(), "{not json".into()],
            "invalid spec",
        ),
    ];
    for (args, needle) in cases {
        let g = c.dir.join("never.npy");
        let (code, out, err) = segloss(&[
            "eval",
            "--logits",
            &args[0],
            "--labels",
            &args[1],
            "--spec",
            &args[2],
            "--grad-out",
            &g.to_string_lossy(),
            "--device",
            "cpu",
        ]);
        assert_eq!(code, 2, "{needle}: {err}");
        assert!(out.is_empty(), "{needle}: printed {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{needle}: {err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert!(!g.exists(), "{needle}: an output file was written");
    }
}

#[test]
fn info_lists_adapters() {
    let (code, out, err) = segloss(&["info"]);
    assert_eq!(
        code, 0,
        "segloss info needs a Vulkan device (apt-get install mesa-vulkan-drivers): {err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["adapters"].as_array().unwrap().is_empty());
    assert!(
        v["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn float16_logits_are_accepted() {
    let c = case("f16");
    let halves: Vec<half::f16> = c.logits.iter().map(|v| half::f16::from_f32(*v)).collect();
    let header = "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3, 9, 7), }\n";
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for h in &halves {
        out.extend(h.to_bits().to_le_bytes());
    }
    std::fs::write(c.dir.join("x16.npy"), out).unwrap();
    let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
    let want = reference::evaluate(
        &LossSpec::from_json(SPEC).unwrap(),
        &c.shape,
        &widened,
        Labels::index(&c.labels),
        false,
    )
    .unwrap();
    for device in ["cpu", "gpu"] {
        let (code, out, err) = segloss(&[
            "eval",
            "--logits",
            &p(&c, "x16.npy"),
            "--labels",
            &p(&c, "y.npy"),
            "--spec",
            SPEC,
            "--device",
            device,
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            (v["loss"].as_f64().unwrap() - want.loss).abs() < 1e-5,
            "{device}: {out}"
        );
    }
}

/// A .npy file of any dtype from its raw little-endian body.
fn write_npy(path: &Path, descr: &str, shape: &[usize], body: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}\n",
        dims.join(", ")
    );
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(body);
    std::fs::write(path, out).unwrap();
}

fn eval_loss(c: &Case, x: &str, y: &str, spec: &str) -> f64 {
    let (code, out, err) = segloss(&[
        "eval",
        "--logits",
        &p(c, x),
        "--labels",
        &p(c, y),
        "--spec",
        spec,
        "--device",
        "gpu",
    ]);
    assert_eq!(code, 0, "{x} {y}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["loss"].as_f64().unwrap()
}

/// NumPy's default float64 logits and soft labels, float16 soft labels and MONAI's
/// (B, 1, H, W) index labels are read as they are.
#[test]
fn float64_float16_soft_and_channel_axis_labels_are_accepted() {
    let c = case("dtypes");
    let sp = LossSpec::from_json(SPEC).unwrap();
    let want = reference::evaluate(&sp, &c.shape, &c.logits, Labels::index(&c.labels), false)
        .unwrap()
        .loss;
    let f64_body: Vec<u8> = c
        .logits
        .iter()
        .flat_map(|v| (*v as f64).to_le_bytes())
        .collect();
    write_npy(&c.dir.join("x64.npy"), "<f8", &[2, 3, 9, 7], &f64_body);
    assert!((eval_loss(&c, "x64.npy", "y.npy", SPEC) - want).abs() < 1e-5);
    // (B, 1, H, W) labels: the same values with a class axis of size 1.
    let y: Vec<i64> = c
        .labels
        .iter()
        .map(|&v| if v == u32::MAX { 255 } else { v as i64 })
        .collect();
    write_i64(&c.dir.join("y1.npy"), &[2, 1, 9, 7], &y);
    assert!((eval_loss(&c, "x.npy", "y1.npy", SPEC) - want).abs() < 1e-5);
    // Soft labels (one-hot of the same labels, ignored pixels dropped) as f64 and f16.
    let soft_spec = r#"{"terms": [{"kind": "cross_entropy"}, {"kind": "dice"}]}"#;
    let mut rng = Rng::new(9);
    let soft = segloss::testing::random_soft_labels(&mut rng, &c.shape);
    let soft16: Vec<half::f16> = soft.iter().map(|v| half::f16::from_f32(*v)).collect();
    let widened: Vec<f32> = soft16.iter().map(|h| h.to_f32()).collect();
    let sp = LossSpec::from_json(soft_spec).unwrap();
    let want16 = reference::evaluate(&sp, &c.shape, &c.logits, Labels::Soft(&widened), false)
        .unwrap()
        .loss;
    let want64 = reference::evaluate(&sp, &c.shape, &c.logits, Labels::Soft(&soft), false)
        .unwrap()
        .loss;
    let body16: Vec<u8> = soft16
        .iter()
        .flat_map(|h| h.to_bits().to_le_bytes())
        .collect();
    write_npy(&c.dir.join("g16.npy"), "<f2", &[2, 3, 9, 7], &body16);
    let body64: Vec<u8> = soft
        .iter()
        .flat_map(|v| (*v as f64).to_le_bytes())
        .collect();
    write_npy(&c.dir.join("g64.npy"), "<f8", &[2, 3, 9, 7], &body64);
    assert!((eval_loss(&c, "x.npy", "g16.npy", soft_spec) - want16).abs() < 1e-5);
    assert!((eval_loss(&c, "x.npy", "g64.npy", soft_spec) - want64).abs() < 1e-5);
    // A format problem names the file and the reason, never "I/O error".
    write_npy(
        &c.dir.join("complex.npy"),
        "<c8",
        &[2, 3, 9, 7],
        &[0; 8 * 378],
    );
    let (code, _, err) = segloss(&[
        "eval",
        "--logits",
        &p(&c, "complex.npy"),
        "--labels",
        &p(&c, "y.npy"),
        "--spec",
        SPEC,
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("complex.npy") && err.contains("unsupported dtype"),
        "{err}"
    );
    assert!(!err.contains("I/O error"), "{err}");
}

/// `segloss eval … | head`: a reader that closes the pipe ends the program quietly.
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    let c = case("pipe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_segloss"))
        .args([
            "eval",
            "--logits",
            &p(&c, "x.npy"),
            "--labels",
            &p(&c, "y.npy"),
            "--spec",
            SPEC,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // closed before the program writes
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// A `WGPU_BACKEND` that selects nothing is named, with the adapters that exist.
#[test]
fn a_backend_variable_that_selects_nothing_is_named() {
    for value in ["gl", "vulkn"] {
        let out = Command::new(env!("CARGO_BIN_EXE_segloss"))
            .arg("info")
            .env("WGPU_BACKEND", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("WGPU_BACKEND={value}")), "{err}");
        assert!(err.contains("adapters present are"), "{err}");
        assert!(!err.contains("install"), "{err}");
    }
}

/// `bench --json` reports every figure, the softmax floor for a softmax spec (its gradient
/// checked against f64 inside `bench`, on an odd shape with a partial tile) and none for a
/// sigmoid one.
#[test]
fn bench_reports_the_copies_and_the_softmax_floor() {
    for (spec, floor) in [
        (r#"{"terms":[{"kind":"cross_entropy"}]}"#, true),
        (
            r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#,
            false,
        ),
    ] {
        let (code, out, err) = segloss(&[
            "bench",
            "--shape",
            "2,5,13,17",
            "--spec",
            spec,
            "--reps",
            "2",
            "--json",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        for key in [
            "median_ms",
            "copy_median_ms",
            "empty_dispatch_median_ms",
            "shader_copy_median_ms",
        ] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {out}");
        }
        assert_eq!(
            v["softmax_floor_median_ms"]
                .as_f64()
                .is_some_and(|x| x > 0.0),
            floor,
            "{out}"
        );
    }
}

/// `--reps 0` and u8 labels for more than 255 classes are refused by `bench`.
#[test]
fn bench_refuses_what_it_cannot_time() {
    let spec = r#"{"terms":[{"kind":"cross_entropy"}]}"#;
    let (code, out, err) = segloss(&["bench", "--shape", "1,2,8,8", "--spec", spec, "--reps", "0"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--reps 0"), "{err}");
    let (code, out, err) = segloss(&[
        "bench",
        "--shape",
        "1,300,4,4",
        "--spec",
        spec,
        "--labels",
        "u8",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("at most 255 classes"), "{err}");
}

/// `info` lists the features by name; `eval --help` documents every term kind.
#[test]
fn info_and_help_read_plainly() {
    let (code, out, err) = segloss(&["info"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for f in v["features"].as_array().unwrap() {
        let name = f.as_str().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
    }
    let (code, out, _) = segloss(&["eval", "--help"]);
    assert_eq!(code, 0);
    for kind in [
        "cross_entropy",
        "focal",
        "dice",
        "tversky",
        "generalized_dice",
        "region",
        "bce",
        "temperature",
        "ignore_index",
    ] {
        assert!(out.contains(kind), "eval --help lacks {kind}");
    }
}
