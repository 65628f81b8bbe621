//! Every WGSL stage parsed and validated by naga under exactly the capabilities it uses,
//! with its override constants set as the host sets them, so a shader that needs a
//! capability the host does not request is caught without a device; and every kernel of the
//! stage table (src/gpu/stages.rs) checked against its WGSL entry point.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use segloss::gpu::stages::{Access, KernelInfo, Override, KERNELS};

/// The capabilities a module needs: 16-bit unpacking and packing (unpack2x16float in
/// util/pixels.wgsl, pack2x16float in narrow.wgsl) are core WGSL that naga files under
/// SHADER_FLOAT16_IN_FLOAT32 (a downlevel flag every Vulkan, Metal and DX12 adapter has);
/// the subgroup strategy of the stats stage needs SUBGROUP (the host uses it only where the
/// adapter has it).
fn capabilities(module: &str) -> Capabilities {
    let k = KERNELS.iter().find(|k| k.module == module).unwrap();
    let mut caps = Capabilities::empty();
    if k.parts
        .iter()
        .any(|p| p.path == "util/pixels.wgsl" || p.path == "narrow.wgsl")
    {
        caps |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    if k.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    caps
}

fn validate(name: &str, src: &str, caps: Capabilities) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    let mut v = Validator::new(ValidationFlags::all(), caps);
    let info = v
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    // The host's override values must also validate (array sizes, constant folding); each
    // module gets the ones it declares.
    let declared: Vec<String> = module
        .overrides
        .iter()
        .filter_map(|(_, o)| o.name.clone())
        .collect();
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
        .filter(|(k, _)| declared.contains(k))
        .collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{name} with C={classes}: {e:?}"));
    }
}

/// The class blocks a pixel stage's source is generated with: the smallest and the largest
/// (`Strategy::block_for`).
const BLOCKS: [u32; 2] = [8, 1024];
/// The pixel stages' workgroup sizes (`Strategy::pixel_workgroup`): the smallest and the
/// largest.
const PIXEL_WGS: [u32; 2] = [32, 256];
/// Rows of the coefficient table's uniform view (`layout::coef_rows`): 64 KiB bindings.
const COEF_ROWS: u32 = segloss::gpu::layout::COEF_ROWS_MAX;
/// The view's length on every adapter, down to wgpu's downlevel limits (16 KiB), beside
/// `COEF_ROWS`.
const COEF_ROWS_EACH: [u32; 2] = [COEF_ROWS, 1024];

/// Each module validates with its capabilities, and is rejected without any one of them.
#[test]
fn stages_validate_with_exactly_the_capabilities_they_use() {
    let sources = BLOCKS
        .iter()
        .zip(PIXEL_WGS)
        .zip(COEF_ROWS_EACH)
        .flat_map(|((b, wg), rows)| segloss::gpu::shader_sources(*b, wg, rows));
    for (name, src) in sources {
        let caps = capabilities(name);
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

/// What the WGSL says about one entry point, after naga compacts the module to it.
struct Entry {
    workgroup_size: u32,
    /// Binding number, variable name, access.
    bindings: Vec<(u32, String, Access)>,
    overrides: Vec<String>,
    /// Bytes of the workgroup variables it uses.
    workgroup_bytes: u32,
}

fn wgsl_entry(k: &KernelInfo, pixel_wg: u32) -> Entry {
    let src = k.source(8, pixel_wg, COEF_ROWS);
    let mut module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{}: {}", k.module, e.emit_to_string(&src)));
    Validator::new(ValidationFlags::all(), capabilities(k.module))
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", k.module, e.emit_to_string(&src)));
    module.entry_points.retain(|ep| ep.name == k.entry);
    let ep = module.entry_points.first().unwrap_or_else(|| {
        panic!(
            "{:?}: no entry point `{}` in {}",
            k.kernel, k.entry, k.module
        )
    });
    let [x, y, z] = ep.workgroup_size;
    assert_eq!((y, z), (1, 1), "{:?}: one-dimensional workgroups", k.kernel);
    naga::compact::compact(&mut module, naga::compact::KeepUnused::No);
    let mut bindings: Vec<(u32, String, Access)> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| {
            let rb = g.binding?;
            assert_eq!(rb.group, 0, "{:?}: {:?} outside group 0", k.kernel, g.name);
            let access = match g.space {
                naga::AddressSpace::Uniform => Access::Uniform,
                naga::AddressSpace::Storage { access }
                    if access.contains(naga::StorageAccess::STORE) =>
                {
                    Access::ReadWrite
                }
                naga::AddressSpace::Storage { .. } => Access::Read,
                other => panic!("{:?}: binding in {other:?}", k.kernel),
            };
            Some((rb.binding, g.name.clone().unwrap_or_default(), access))
        })
        .collect();
    bindings.sort_by_key(|b| b.0);
    let overrides = module
        .overrides
        .iter()
        .filter_map(|(_, o)| o.name.clone())
        .collect();
    let workgroup_bytes = module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
        .sum();
    Entry {
        workgroup_size: x,
        bindings,
        overrides,
        workgroup_bytes,
    }
}

/// The stage table and the WGSL agree, kernel by kernel: workgroup size, every binding
/// (number, name, access), the overrides the entry point uses and its workgroup memory. A
/// binding number, a workgroup size, an override or a workgroup array changed on one side
/// alone fails here, not on a device. Every kernel fits the workgroup memory of the most
/// limited adapters (16,352 bytes, wgpu's downlevel limits). The pixel stages built with
/// the smallest workgroup say so in `@workgroup_size`, and need the memory
/// `workgroup_bytes_with` says.
#[test]
fn the_stage_table_matches_every_wgsl_entry_point() {
    let least = wgpu::Limits::downlevel_defaults().max_compute_workgroup_storage_size;
    for k in &KERNELS {
        let small = wgsl_entry(k, PIXEL_WGS[0]);
        let expected = if k.has_pixels() {
            PIXEL_WGS[0]
        } else {
            k.workgroup_size
        };
        assert_eq!(small.workgroup_size, expected, "{:?}", k.kernel);
        assert_eq!(
            small.workgroup_bytes,
            k.workgroup_bytes_with(PIXEL_WGS[0]),
            "{:?}",
            k.kernel
        );
        let Entry {
            workgroup_size: size,
            bindings,
            overrides,
            workgroup_bytes,
        } = wgsl_entry(k, PIXEL_WGS[1]);
        assert_eq!(
            size, k.workgroup_size,
            "{:?}: @workgroup_size in WGSL against the stage table",
            k.kernel
        );
        assert_eq!(
            workgroup_bytes, k.workgroup_bytes,
            "{:?}: workgroup memory in WGSL against the stage table",
            k.kernel
        );
        assert!(
            workgroup_bytes <= least,
            "{:?}: {workgroup_bytes} bytes of workgroup memory",
            k.kernel
        );
        let table: Vec<(u32, String, Access)> = k
            .bindings
            .iter()
            .map(|(b, a)| (b.slot(), b.wgsl_name().to_string(), *a))
            .collect();
        assert_eq!(
            bindings, table,
            "{:?} (`{}` in {}): bindings used by the WGSL entry point (left) against the stage table (right)",
            k.kernel, k.entry, k.module
        );
        let mut want: Vec<String> = k.overrides.iter().map(|o| o.name().to_string()).collect();
        let mut got = overrides;
        want.sort();
        got.sort();
        assert_eq!(
            got, want,
            "{:?} (`{}` in {}): overrides used by the WGSL entry point (left) against the stage table (right)",
            k.kernel, k.entry, k.module
        );
    }
    // Every override the host can set is taken by some kernel.
    for o in Override::ALL {
        assert!(
            KERNELS.iter().any(|k| k.overrides.contains(&o)),
            "{o:?} is unused"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Every stage variant the host can create, translated by the three backends wgpu 30 uses
// where no such device exists here: SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12), with the
// options wgpu-hal 30.0.2 passes them (file paths under wgpu-hal-30.0.2/src below).
//
// As wgpu does (vulkan/device.rs `compile_stage`, metal/device.rs `load_shader`,
// dx12/device.rs `load_shader`), each variant first goes through
// `naga::back::pipeline_constants::process_overrides` for its one entry point, which
// compacts the module to that entry point, evaluates every override and revalidates; the
// writers then see the module the device would.
//
// Versions: each backend is written at the lowest version wgpu 30 hands a device that runs
// the variant, and at the highest it can hand one, since the writers emit
// version-dependent code at both ends.
// - SPIR-V (vulkan/adapter.rs, `spv::Options { lang_version, .. }`): 1.0 for a Vulkan 1.0
//   device up to 1.6 for Vulkan 1.3+. `Features::SUBGROUP` needs Vulkan 1.3 or
//   VK_EXT_subgroup_size_control (vulkan/adapter.rs, `caps.subgroup`), so never below
//   Vulkan 1.1, i.e. SPIR-V 1.3, and only then are the GroupNonUniform* capabilities in the
//   writer's capability list. The list otherwise is the always-present set (Shader, Matrix,
//   Sampled1D, Image1D, ImageQuery, DerivativeControl, StorageImageExtendedFormats, plus
//   SampledCubeArray and SampleRateShading on compliant devices); Float16 only with
//   `Features::SHADER_F16`, which the host requests but not every device has, so it is
//   left out: a stage that needed it would fail here.
// - MSL (metal/adapter.rs: `msl_version` from the OS; metal/device.rs maps it to
//   `msl::Options::lang_version`): wgpu 30's stated minimum target is macOS 10.13
//   (metal/mod.rs, the comment on `mod adapter`), where the table in metal/adapter.rs picks
//   MSL 2.0 (iOS 11 likewise); the newest is 4.0 (macOS/iOS 26). `Features::SUBGROUP`
//   needs `supports_simd_scoped_operations`, which needs `family_check` (macOS 10.15 /
//   iOS 13), so the subgroup strategy is never compiled below MSL 2.2.
// - HLSL (dx12/adapter.rs): shader model 5.1 where only FXC is available (no DXC:
//   `compiler_container.max_shader_model()` is None), else the highest both the device and
//   DXC support, 6.0 (DXIL adapters below 6.0 are not exposed) to 6.9.
//   `Features::SUBGROUP` needs shader model 6.0 and WaveOps, so the subgroup strategy is
//   never compiled below 6.0.
// - Validation capabilities (wgpu-naga-bridge-30.0.2/src/lib.rs,
//   `features_to_naga_capabilities`): SUBGROUP only where the device was created with
//   `Features::SUBGROUP` (src/gpu/context.rs requests it where the adapter has it), and
//   SHADER_FLOAT16_IN_FLOAT32 from `DownlevelFlags::SHADER_F16_IN_F32`, which Metal and
//   DX12 report unconditionally (`DownlevelCapabilities::default()`, all flags) and
//   Vulkan always sets.
// - Per-pipeline options: `zero_initialize_workgroup_memory: false` (the host's
//   `PipelineCompilationOptions`), bounds checks on (wgpu's default
//   `ShaderRuntimeChecks::checked()` for `create_shader_module`), `force_loop_bounding`,
//   no fake bindings: each global gets a slot the way the pipeline layout assigns them.

use naga::back::{hlsl, msl, spv};
use std::collections::{BTreeMap, BTreeSet};

/// One value of a dimension of the variant space: the override constants it sets together
/// (a spec's pixel terms set SIGMOID, N_PIX, PIXEL_KINDS, ... at once; CONTIGUOUS sets
/// PPT).
type Value = Vec<(&'static str, f64)>;
type Constants = BTreeMap<&'static str, f64>;

fn dim(name: &'static str, values: &[f64]) -> Vec<Value> {
    values.iter().map(|&v| vec![(name, v)]).collect()
}

/// Whether the host can create a pipeline with these constants (a partial set: only
/// constraints between constants present are checked). The rules are closed under the
/// implications between them (C = 1 implies sigmoid implies soft labels), so a partial set
/// that passes always extends to a full one.
fn host_can_create(c: &Constants) -> bool {
    let get = |k| c.get(k).copied();
    // Softmax needs C ≥ 2 (spec.rs); sigmoid takes f32 masks only (record.rs `check_request`).
    if get("C") == Some(1.0)
        && (get("SIGMOID") == Some(0.0) || get("LABEL_KIND").is_some_and(|l| l != 2.0))
    {
        return false;
    }
    if get("SIGMOID") == Some(1.0) && get("LABEL_KIND").is_some_and(|l| l != 2.0) {
        return false;
    }
    // u8 labels hold at most 255 classes (input.rs `LabelFormat::check_classes`).
    if get("LABEL_KIND") == Some(1.0) && get("C").is_some_and(|n| n > 255.0) {
        return false;
    }
    // A temperature T ≠ 1 comes only with region terms (spec.rs `tempered`).
    if get("TEMPERED") == Some(1.0) && get("STAT_KINDS").is_some_and(|k| (k as u32) & 64 == 0) {
        return false;
    }
    // Without statistic terms there is no temperature and at least one pixel term; the
    // labels-only pass exists for specs of pixel terms only (record.rs `one_pass`).
    if get("STAT_TERMS") == Some(0.0) && (get("TEMPERED") == Some(1.0) || get("N_PIX") == Some(0.0))
    {
        return false;
    }
    if get("NORMS_ONLY") == Some(1.0) && (get("TEMPERED") == Some(1.0) || get("N_PIX") == Some(0.0))
    {
        return false;
    }
    // The class sums are left out only for specs of pixel terms only (record.rs
    // `Request::class_sums`): no temperature, at least one pixel term.
    if get("CLASS_SUMS") == Some(0.0) && (get("TEMPERED") == Some(1.0) || get("N_PIX") == Some(0.0))
    {
        return false;
    }
    true
}

/// The pixel terms a spec can have, as the host derives the overrides from them
/// (plan.rs `pixel_kinds`, `pixel_weighted`, `pixel_maps`; N_PIX is their count, at most
/// spec.rs MAX_PIXEL_TERMS = 4): softmax specs take cross-entropy (kind bit 1) and focal (2),
/// sigmoid specs BCE (4); loss maps only for cross-entropy. Every N_PIX, every kind set,
/// every weight and map bit occurs, in both activations.
fn pixel_terms(maps: bool) -> Vec<Value> {
    // (SIGMOID, N_PIX, PIXEL_KINDS, PIXEL_WEIGHTED, PIXEL_MAPS)
    let specs: [(f64, f64, f64, f64, f64); 14] = [
        (0.0, 0.0, 0.0, 0.0, 0.0),   // statistic terms only
        (0.0, 1.0, 1.0, 0.0, 0.0),   // CE
        (0.0, 1.0, 1.0, 1.0, 1.0),   // weighted CE with a loss map
        (0.0, 1.0, 2.0, 1.0, 0.0),   // focal with α
        (0.0, 2.0, 3.0, 2.0, 1.0),   // CE (map), focal (α)
        (0.0, 3.0, 3.0, 5.0, 3.0),   // CE (weights, map), CE (map), focal (α)
        (0.0, 4.0, 1.0, 15.0, 15.0), // four weighted CE with maps
        (0.0, 4.0, 3.0, 10.0, 5.0),  // CE (map), focal (α), CE (map), focal (α)
        (1.0, 0.0, 0.0, 0.0, 0.0),   // sigmoid, statistic terms only
        (1.0, 1.0, 4.0, 0.0, 0.0),   // BCE
        (1.0, 1.0, 4.0, 1.0, 0.0),   // BCE with pos_weight
        (1.0, 2.0, 4.0, 2.0, 0.0),   // BCE, BCE (pos_weight)
        (1.0, 3.0, 4.0, 5.0, 0.0),   // BCE (pos_weight), BCE, BCE (pos_weight)
        (1.0, 4.0, 4.0, 15.0, 0.0),  // four BCE with pos_weight
    ];
    specs
        .iter()
        .map(|&(sigmoid, n, kinds, weighted, map)| {
            let mut v = vec![
                ("SIGMOID", sigmoid),
                ("N_PIX", n),
                ("PIXEL_KINDS", kinds),
                ("PIXEL_WEIGHTED", weighted),
            ];
            if maps {
                v.push(("PIXEL_MAPS", map));
            }
            v
        })
        .collect()
}

/// A pipeline the host creates: a kernel of the stage table, its entry point, its module
/// and the dimensions of its constants.
struct HostStage {
    stage: String,
    entry: &'static str,
    modules: Vec<&'static str>,
    dims: Vec<Vec<Value>>,
}

/// The values the host gives each override a kernel takes (stages.rs `Variant::value`).
fn kernel_dims(k: &KernelInfo) -> Vec<Vec<Value>> {
    let has = |o| k.overrides.contains(&o);
    let mut d = vec![];
    if has(Override::StagePixels) {
        // strategy.rs `stage_pixels_for`: staged past the block of 8, the most pixels (up
        // to 32) whose classes fit 2,048 floats; the staged modules keep a block of 8.
        d.push(
            [
                (9.0, 32.0),
                (21.0, 32.0),
                (150.0, 8.0),
                (1000.0, 2.0),
                (1500.0, 1.0),
            ]
            .iter()
            .map(|&(c, sp)| vec![("C", c), ("BLOCK", 8.0), ("STAGE_PIXELS", sp)])
            .collect(),
        );
    } else if has(Override::C) && k.has_pixels() {
        // `BLOCK` is no override: it picks the source (strategy.rs `block_for`: the
        // smallest power of two ≥ C from 8, capped at 8 on GPUs and 1024 on CPUs).
        let mut v: Vec<Value> = vec![];
        for c in [1.0, 2.0, 3.0, 8.0, 9.0, 16.0, 21.0, 150.0, 1000.0, 1500.0] {
            let bucket = (c as usize).max(8).next_power_of_two().min(1024) as f64;
            v.push(vec![("C", c), ("BLOCK", 8.0)]);
            if bucket != 8.0 {
                v.push(vec![("C", c), ("BLOCK", bucket)]);
            }
        }
        d.push(v);
    } else if has(Override::C) {
        d.push(dim(
            "C",
            &[1.0, 2.0, 3.0, 8.0, 9.0, 16.0, 21.0, 150.0, 1000.0],
        ));
    }
    if has(Override::NPix) {
        d.push(pixel_terms(has(Override::PixelMaps)));
    } else if has(Override::Sigmoid) {
        d.push(dim("SIGMOID", &[0.0, 1.0]));
    }
    if has(Override::LabelKind) {
        d.push(dim("LABEL_KIND", &[0.0, 1.0, 2.0, 3.0])); // u32, u8, soft, u16
    }
    if has(Override::LogitKind) {
        d.push(dim("LOGIT_KIND", &[0.0, 1.0, 2.0])); // f32, f16, bf16
    }
    if has(Override::Tempered) {
        d.push(dim("TEMPERED", &[0.0, 1.0]));
    }
    if has(Override::Nhwc) {
        d.push(dim("NHWC", &[0.0, 1.0]));
    }
    if has(Override::Ppt) {
        // stages.rs `grad_pixels_per_invocation`: PPT = 32 exactly where CONTIGUOUS; QUADS
        // only with CONTIGUOUS (plan.rs `quads`).
        d.push(vec![
            vec![("CONTIGUOUS", 0.0), ("PPT", 8.0), ("QUADS", 0.0)],
            vec![("CONTIGUOUS", 1.0), ("PPT", 32.0), ("QUADS", 0.0)],
            vec![("CONTIGUOUS", 1.0), ("PPT", 32.0), ("QUADS", 1.0)],
        ]);
    } else if has(Override::Contiguous) {
        d.push(vec![
            vec![("CONTIGUOUS", 0.0), ("QUADS", 0.0)],
            vec![("CONTIGUOUS", 1.0), ("QUADS", 0.0)],
            vec![("CONTIGUOUS", 1.0), ("QUADS", 1.0)],
        ]);
    }
    if has(Override::StatKinds) {
        // plan.rs `stat_kinds`: any set of dice (8), Tversky (16), generalized dice (32)
        // and region (64) terms, none included.
        d.push(dim(
            "STAT_KINDS",
            &(0..16).map(|s| (s << 3) as f64).collect::<Vec<_>>(),
        ));
    }
    if has(Override::NormsOnly) {
        d.push(dim("NORMS_ONLY", &[0.0, 1.0]));
    }
    if has(Override::StatTerms) {
        d.push(dim("STAT_TERMS", &[0.0, 1.0]));
    }
    if has(Override::ClassSums) {
        d.push(dim("CLASS_SUMS", &[0.0, 1.0]));
    }
    if has(Override::GradKind) {
        d.push(dim("GRAD_KIND", &[1.0, 2.0])); // f16, bf16
    }
    if has(Override::Accumulate) {
        d.push(dim("ACCUMULATE", &[0.0, 1.0]));
    }
    if has(Override::GradChunks) {
        d.push(dim("GRAD_CHUNKS", &[0.0, 1.0]));
    }
    if has(Override::PastQuads) {
        d.push(dim("PAST_QUADS", &[0.0, 1.0]));
    }
    if has(Override::CoefsUsed) {
        d.push(dim("COEFS_USED", &[0.0, 5.0, 6.0, 8.0, 15.0]));
    }
    if has(Override::StoredPieces) {
        d.push(dim("STORED_PIECES", &[0.0, 1.0]));
    }
    if has(Override::UniformCoefs) {
        d.push(dim("UNIFORM_COEFS", &[0.0, 1.0]));
    }
    // Every override of the kernel has values here, and nothing else.
    let mut named: Vec<&str> = d
        .iter()
        .flat_map(|v| v[0].iter().map(|(n, _)| *n))
        .collect();
    named.retain(|n| *n != "BLOCK");
    let mut want: Vec<&str> = k.overrides.iter().map(|o| o.name()).collect();
    named.sort();
    want.sort();
    assert_eq!(named, want, "{:?}: kernel_dims is stale", k.kernel);
    d
}

fn host_stages() -> Vec<HostStage> {
    KERNELS
        .iter()
        .map(|k| HostStage {
            stage: format!("{:?}", k.kernel),
            entry: k.entry,
            modules: vec![k.module],
            dims: kernel_dims(k),
        })
        .collect()
}

fn merged(dims: &[Vec<Value>], row: &[Option<usize>]) -> Constants {
    let mut c = Constants::new();
    for (d, v) in dims.iter().zip(row) {
        if let Some(v) = v {
            c.extend(d[*v].iter().copied());
        }
    }
    c
}

/// A covering set of the variants the host can create: every pair of values of two
/// dimensions that the host can combine occurs in some row (so every value occurs, and
/// every interaction between two constants, e.g. each C with each label kind, each
/// strategy with each pixel-term set), plus the two corners (all first values, all last)
/// where the host can create them. The full product (~3·10⁴ stats variants alone) would
/// take minutes; a construct a backend cannot express comes from one constant's value or
/// from two meeting in one branch, which the pairs cover. Greedy and deterministic.
fn covering_rows(dims: &[Vec<Value>]) -> Vec<Vec<usize>> {
    let n = dims.len();
    let ok = |row: &[Option<usize>]| host_can_create(&merged(dims, row));
    let mut uncovered = BTreeSet::new();
    for i in 0..n {
        for j in i + 1..n {
            for a in 0..dims[i].len() {
                for b in 0..dims[j].len() {
                    let mut row = vec![None; n];
                    row[i] = Some(a);
                    row[j] = Some(b);
                    if ok(&row) {
                        uncovered.insert((i, a, j, b));
                    }
                }
            }
        }
    }
    let mut rows: Vec<Vec<usize>> = vec![];
    let mut take = |row: Vec<usize>, uncovered: &mut BTreeSet<_>| {
        for i in 0..n {
            for j in i + 1..n {
                uncovered.remove(&(i, row[i], j, row[j]));
            }
        }
        rows.push(row);
    };
    let corners = [vec![0; n], dims.iter().map(|d| d.len() - 1).collect()];
    for corner in corners {
        if ok(&corner.iter().copied().map(Some).collect::<Vec<_>>()) {
            take(corner, &mut uncovered);
        }
    }
    while let Some(&(i, a, j, b)) = uncovered.iter().next() {
        let mut row = vec![None; n];
        row[i] = Some(a);
        row[j] = Some(b);
        for k in 0..n {
            if row[k].is_some() {
                continue;
            }
            // The value that covers the most new pairs with the dimensions already set.
            let gain = |v: usize, row: &[Option<usize>]| {
                (0..n)
                    .filter_map(|m| row[m].map(|w| (m, w)))
                    .filter(|&(m, w)| {
                        let key = if m < k { (m, w, k, v) } else { (k, v, m, w) };
                        uncovered.contains(&key)
                    })
                    .count()
            };
            let mut best: Option<(usize, usize)> = None;
            for v in 0..dims[k].len() {
                row[k] = Some(v);
                if ok(&row) && best.is_none_or(|(g, _)| gain(v, &row) > g) {
                    best = Some((gain(v, &row), v));
                }
            }
            let (_, v) = best.unwrap_or_else(|| {
                panic!(
                    "no variant the host can create extends {:?}",
                    merged(dims, &row)
                )
            });
            row[k] = Some(v);
        }
        take(
            row.into_iter().map(Option::unwrap).collect(),
            &mut uncovered,
        );
    }
    rows
}

fn spirv_out(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    version: (u8, u8),
    subgroup: bool,
) -> Result<(), String> {
    use spv::Capability as Cap;
    let mut caps = vec![
        Cap::Shader,
        Cap::Matrix,
        Cap::Sampled1D,
        Cap::Image1D,
        Cap::ImageQuery,
        Cap::DerivativeControl,
        Cap::StorageImageExtendedFormats,
        Cap::SampledCubeArray,
        Cap::SampleRateShading,
    ];
    if subgroup {
        caps.extend([
            Cap::GroupNonUniform,
            Cap::GroupNonUniformVote,
            Cap::GroupNonUniformArithmetic,
            Cap::GroupNonUniformBallot,
            Cap::GroupNonUniformShuffle,
            Cap::GroupNonUniformShuffleRelative,
            Cap::GroupNonUniformQuad,
        ]);
    }
    // vulkan/device.rs `create_pipeline_layout`: each entry of a group gets the next
    // binding number, in the layout's order.
    let mut binding_map = spv::BindingMap::default();
    for (k, rb) in bindings(module).into_iter().enumerate() {
        binding_map.insert(
            rb,
            spv::BindingInfo {
                descriptor_set: rb.group,
                binding: k as u32,
                binding_array_size: None,
            },
        );
    }
    let options = spv::Options {
        lang_version: version,
        flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
        fake_missing_bindings: false,
        binding_map,
        capabilities: Some(caps.into_iter().collect()),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: naga::proc::BoundsCheckPolicy::Restrict,
            buffer: naga::proc::BoundsCheckPolicy::Restrict,
            image_load: naga::proc::BoundsCheckPolicy::Restrict,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: true,
        use_storage_input_output_16: false,
        ..Default::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    spv::write_vec(module, info, &options, Some(&pipeline))
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// The module's resource bindings in (group, binding) order, as an automatic pipeline
/// layout lists them (the module is already compacted to one entry point).
fn bindings(module: &naga::Module) -> Vec<naga::ResourceBinding> {
    let mut b: Vec<_> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| g.binding)
        .collect();
    b.sort_by_key(|rb| (rb.group, rb.binding));
    b
}

/// The address space of the global bound at `rb`.
fn space_of(module: &naga::Module, rb: naga::ResourceBinding) -> naga::AddressSpace {
    module
        .global_variables
        .iter()
        .find(|(_, g)| g.binding == Some(rb))
        .map(|(_, g)| g.space)
        .unwrap()
}

fn msl_out(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    version: (u8, u8),
) -> Result<(), String> {
    // metal/device.rs `create_pipeline_layout`: buffers take the next buffer slot in
    // layout order, storage buffers are `mutable` unless read-only, and a sizes buffer
    // follows where any storage buffer is visible.
    let mut resources = msl::BindingMap::default();
    let mut slot = 0u8;
    let mut storage = false;
    for rb in bindings(module) {
        let mutable = match space_of(module, rb) {
            naga::AddressSpace::Storage { access } => {
                storage = true;
                access.contains(naga::StorageAccess::STORE)
            }
            _ => false,
        };
        resources.insert(
            rb,
            msl::BindTarget {
                buffer: Some(slot),
                mutable,
                ..Default::default()
            },
        );
        slot += 1;
    }
    let checked = naga::proc::BoundsCheckPolicy::Restrict;
    let options = msl::Options {
        lang_version: version,
        per_entry_point_map: msl::EntryPointResourceMap::from([(
            entry.to_string(),
            msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                sizes_buffer: storage.then_some(slot),
            },
        )]),
        fake_missing_bindings: false,
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: checked,
            buffer: checked,
            image_load: checked,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: false,
        force_loop_bounding: true,
        emit_int_div_checks: true,
        ..Default::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
        vertex_pulling_transform: true,
        ..Default::default()
    };
    // An entry point whose bindings fail is left out with its error, not failed outright.
    let (_, translation) =
        msl::write_string(module, info, &options, &pipeline).map_err(|e| format!("{e:?}"))?;
    match translation.entry_point_names.as_slice() {
        [Ok(_)] => Ok(()),
        other => Err(format!("entry points written: {other:?}")),
    }
}

fn hlsl_out(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    shader_model: hlsl::ShaderModel,
) -> Result<(), String> {
    // dx12/device.rs `create_pipeline_layout`: uniform buffers take CBV registers,
    // read-only storage SRV, read-write storage UAV, each counting up in layout order; the
    // special constants (num_workgroups) take the next CBV register, since wgpu-core asks
    // for them in every layout (`PipelineLayoutFlags::NUM_WORK_GROUPS`).
    let (mut cbv, mut srv, mut uav) = (0u32, 0u32, 0u32);
    let mut binding_map = hlsl::BindingMap::default();
    for rb in bindings(module) {
        let register = match space_of(module, rb) {
            naga::AddressSpace::Storage { access }
                if access.contains(naga::StorageAccess::STORE) =>
            {
                &mut uav
            }
            naga::AddressSpace::Storage { .. } => &mut srv,
            _ => &mut cbv,
        };
        binding_map.insert(
            rb,
            hlsl::BindTarget {
                space: 0,
                register: *register,
                ..Default::default()
            },
        );
        *register += 1;
    }
    let options = hlsl::Options {
        shader_model,
        binding_map,
        fake_missing_bindings: false,
        special_constants_binding: Some(hlsl::BindTarget {
            space: 0,
            register: cbv,
            ..Default::default()
        }),
        zero_initialize_workgroup_memory: false,
        restrict_indexing: true,
        force_loop_bounding: true,
        ..Default::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
    };
    let mut out = String::new();
    let reflection = hlsl::Writer::new(&mut out, &options, &pipeline)
        .write(module, info, None)
        .map_err(|e| format!("{e:?}"))?;
    match reflection.entry_point_names.as_slice() {
        [Ok(_)] => Ok(()),
        other => Err(format!("entry points written: {other:?}")),
    }
}

/// Each variant (stage, entry point, override values) translated by each backend.
/// Returns the failures, each naming the stage, entry point, variant and backend.
fn translate_variants(
    sources: &[(u32, &'static str, String)],
    stages: &[HostStage],
) -> (usize, Vec<String>) {
    let mut parsed = BTreeMap::new();
    for (block, name, src) in sources {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        let info = Validator::new(ValidationFlags::all(), capabilities(name))
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        parsed.insert((*name, *block), (module, info));
    }
    let mut failures = vec![];
    let mut variants = 0;
    for st in stages {
        let rows = covering_rows(&st.dims);
        for row in rows {
            let mut constants =
                merged(&st.dims, &row.iter().copied().map(Some).collect::<Vec<_>>());
            let block = constants.remove("BLOCK").unwrap_or(8.0) as u32;
            let module_name = st.modules[0];
            let subgroup = capabilities(module_name).contains(Capabilities::SUBGROUP);
            let (module, info) = &parsed[&(module_name, block)];
            let variant = format!(
                "stage {} (`{module_name}` with BLOCK = {block}, entry point `{}`) with {}",
                st.stage,
                st.entry,
                constants
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            variants += 1;
            let pipeline_constants: naga::back::PipelineConstants =
                constants.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let (module, info) = match naga::back::pipeline_constants::process_overrides(
                module,
                info,
                Some((naga::ShaderStage::Compute, st.entry)),
                &pipeline_constants,
            ) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{variant}: process_overrides: {e:?}"));
                    continue;
                }
            };
            let spv_versions = if subgroup {
                [(1, 3), (1, 6)]
            } else {
                [(1, 0), (1, 6)]
            };
            let msl_versions = if subgroup {
                [(2, 2), (4, 0)]
            } else {
                [(2, 0), (4, 0)]
            };
            let lowest_model = if subgroup {
                hlsl::ShaderModel::V6_0
            } else {
                hlsl::ShaderModel::V5_1
            };
            let hlsl_models = [lowest_model, hlsl::ShaderModel::V6_9];
            let mut check = |backend: String, r: Result<(), String>| {
                if let Err(e) = r {
                    failures.push(format!("{variant}: {backend}: {e}"));
                }
            };
            for v in spv_versions {
                check(
                    format!("SPIR-V {}.{}", v.0, v.1),
                    spirv_out(&module, &info, st.entry, v, subgroup),
                );
            }
            for v in msl_versions {
                check(
                    format!("MSL {}.{}", v.0, v.1),
                    msl_out(&module, &info, st.entry, v),
                );
            }
            for sm in hlsl_models {
                check(
                    format!("HLSL {}", sm.to_str()),
                    hlsl_out(&module, &info, st.entry, sm),
                );
            }
        }
    }
    (variants, failures)
}

/// Metal and DX12 compiled, not only claimed: every stage variant the host can create
/// (see `covering_rows`) translates to SPIR-V, MSL and HLSL at the versions wgpu 30 uses.
#[test]
fn every_host_variant_translates_to_spirv_msl_and_hlsl() {
    // The two pixel workgroup sizes alternate over the blocks (CPU adapters, WARP on DX12
    // among them, take 32 at every block).
    let sources: Vec<(u32, &'static str, String)> = [8, 16, 32, 64, 128, 256, 512, 1024]
        .into_iter()
        .enumerate()
        .flat_map(|(k, b)| {
            segloss::gpu::shader_sources(b, PIXEL_WGS[k % 2], COEF_ROWS)
                .into_iter()
                .map(move |(n, s)| (b, n, s))
        })
        .collect();
    let stages = host_stages();
    // Every module the host uses is covered by some stage, and no stage names another.
    for (_, name, _) in &sources {
        assert!(
            stages.iter().any(|s| s.modules.contains(name)),
            "{name} is not translated here: add its stage to host_stages()"
        );
    }
    let (variants, failures) = translate_variants(&sources, &stages);
    assert!(variants > 0);
    assert!(
        failures.is_empty(),
        "{} translations failed ({variants} variants):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
