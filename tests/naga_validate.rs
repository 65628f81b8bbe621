//! Every WGSL stage parsed and validated by naga under exactly the capabilities it uses,
//! with its override constants set as the host sets them, so a shader that needs a
//! capability the host does not request is caught without a device.

use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(name: &str, src: &str, caps: Capabilities) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    let mut v = Validator::new(ValidationFlags::all(), caps);
    let info = v
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    // The host's override values must also validate (array sizes, constant folding).
    for (classes, label_kind, sigmoid, tempered) in [
        (2.0, 1.0, 0.0, 0.0),
        (40.0, 0.0, 0.0, 1.0),
        (3.0, 2.0, 1.0, 1.0),
    ] {
        let constants: naga::back::PipelineConstants = [
            ("C".to_string(), classes),
            ("LABEL_KIND".to_string(), label_kind),
            ("SIGMOID".to_string(), sigmoid),
            ("TEMPERED".to_string(), tempered),
        ]
        .into_iter()
        .collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{name} with C={classes}: {e:?}"));
    }
}

#[test]
fn stages_validate_without_optional_capabilities() {
    for (name, src) in segloss::gpu::shader_sources() {
        validate(name, &src, Capabilities::empty());
    }
}
