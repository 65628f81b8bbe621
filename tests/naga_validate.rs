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

/// Every stage includes common.wgsl, which reads 16-bit logits with WGSL's unpack2x16float (and the narrow stage writes
/// them with pack2x16float): core WGSL, which naga files under SHADER_FLOAT16_IN_FLOAT32
/// (a downlevel flag every Vulkan, Metal and DX12 adapter has). The subgroup variant of
/// the stats stage also needs SUBGROUP (the host uses it only where the adapter has it);
/// the checks below also prove the other variant does not.
#[test]
fn stages_validate_with_exactly_the_capabilities_they_use() {
    for (name, src) in segloss::gpu::shader_sources() {
        let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        // The subgroup reduction strategy, used only where the adapter has SUBGROUP.
        if name == "stats_subgroup" {
            caps |= Capabilities::SUBGROUP;
        }
        validate(name, &src, caps);
        // Each capability is needed: without any one of them the stage is rejected.
        for cap in caps.iter() {
            let module = naga::front::wgsl::parse_str(&src).unwrap();
            let rejected = Validator::new(ValidationFlags::all(), caps - cap)
                .validate(&module)
                .is_err();
            assert!(
                rejected,
                "{name} validated without {cap:?}: the capability list is stale"
            );
        }
    }
}
