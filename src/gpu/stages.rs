//! The stage table: every compute kernel segloss creates, declared once with its WGSL source
//! parts, entry point, workgroup size, bindings and override constants. Shader assembly,
//! the explicit bind-group layouts, the pipeline constants and the bind groups all derive
//! from it, and `tests/naga_validate.rs` checks each WGSL entry point against it (a binding,
//! workgroup size or override changed on one side alone fails there). ARCHITECTURE.md,
//! "The stage table".

use super::layout::{self, FIN_WG, NARROW_WG, PIXEL_WG_MAX, REDUCE_WG};

/// A WGSL file of `shaders/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The path under `shaders/`.
    pub path: &'static str,
    /// Its text.
    pub text: &'static str,
}

macro_rules! wgsl {
    ($path:literal) => {
        Source {
            path: $path,
            text: include_str!(concat!("../../shaders/", $path)),
        }
    };
}

const DISPATCH: Source = wgsl!("util/dispatch.wgsl");
const MATH: Source = wgsl!("util/math.wgsl");
const SPEC: Source = wgsl!("util/spec.wgsl");
const PIXELS: Source = wgsl!("util/pixels.wgsl");
const STATS: Source = wgsl!("stats.wgsl");
const TILE_SUM_WORKGROUP: Source = wgsl!("tile_sum/workgroup.wgsl");
const TILE_SUM_SUBGROUP: Source = wgsl!("tile_sum/subgroup.wgsl");
const TILE_SUM_INVOCATION: Source = wgsl!("tile_sum/invocation.wgsl");
const SUM_TILES: Source = wgsl!("sum_tiles.wgsl");
const FINALIZE: Source = wgsl!("finalize.wgsl");
const GRAD: Source = wgsl!("grad.wgsl");
const GRAD_PIXEL: Source = wgsl!("grad_pixel.wgsl");
const STATS_NO_GRAD: Source = wgsl!("stats_no_grad.wgsl");
const NARROW: Source = wgsl!("narrow.wgsl");
const STAGED: Source = wgsl!("staged.wgsl");
const STAGED_GRAD: Source = wgsl!("staged_grad.wgsl");
const STAGED_NO_GRAD: Source = wgsl!("staged_no_grad.wgsl");

/// The kernels, one per pipeline shape the host creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Stage 1 with `TileSum::Workgroup`.
    StatsWorkgroup,
    /// Stage 1 with `TileSum::Subgroup`.
    StatsSubgroup,
    /// Stage 1 with `TileSum::Invocation`.
    StatsInvocation,
    /// Stage 1 that also writes the gradient (specs of pixel terms only), with
    /// `TileSum::Workgroup`.
    StatsGradWorkgroup,
    /// The same with `TileSum::Subgroup`.
    StatsGradSubgroup,
    /// The same with `TileSum::Invocation`.
    StatsGradInvocation,
    /// Stage 2a, first half (only with more than one partial row per tile).
    SumTileRows,
    /// Stage 2a: the statistics rows.
    SumTiles,
    /// Stage 2b: term values and gradient coefficients.
    Finalize,
    /// Stage 3: the gradient.
    Grad,
    /// Stage 3 where the gradient shares a buffer with the inputs.
    GradShared,
    /// Stage 4 (16-bit gradients only).
    Narrow,
    /// Stage 1 for staged calls (more classes than the register block: every class of a
    /// sub-tile in workgroup memory, `Strategy::stage_pixels`), with its own row per tile.
    StatsStaged,
    /// The one-pass form of [`Kernel::StatsStaged`].
    StatsGradStaged,
    /// Stage 3 for staged calls.
    GradStaged,
    /// [`Kernel::GradStaged`] where the gradient shares a buffer with the inputs.
    GradStagedShared,
}

impl Kernel {
    /// Whether the kernel is a register-path stats stage, alone or in its one-pass form
    /// (their class block is `Variant::stats_block`).
    pub fn is_stats(self) -> bool {
        matches!(
            self,
            Kernel::StatsWorkgroup
                | Kernel::StatsSubgroup
                | Kernel::StatsInvocation
                | Kernel::StatsGradWorkgroup
                | Kernel::StatsGradSubgroup
                | Kernel::StatsGradInvocation
        )
    }

    /// Whether the kernel stages a sub-tile's classes in workgroup memory
    /// (shaders/staged.wgsl).
    pub fn is_staged(self) -> bool {
        matches!(
            self,
            Kernel::StatsStaged
                | Kernel::StatsGradStaged
                | Kernel::GradStaged
                | Kernel::GradStagedShared
        )
    }
}

/// A bound buffer, by role. Each role has one binding number in every kernel that binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binding {
    /// The caller's logits (u32 words).
    Logits,
    /// The caller's labels.
    Labels,
    /// This dispatch's `Dims` slot.
    Dims,
    /// Term records and class vectors.
    Params,
    /// Partial statistics rows of the stats tiles.
    Partial,
    /// One statistics row per image.
    Stats,
    /// Coefficients, scales, report, elements, pooled row.
    Fin,
    /// The f32 gradient (the caller's, or the scratch range the narrow stage converts).
    Grad,
    /// Per-pixel loss maps (reduction "none").
    LossMap,
    /// The caller's 16-bit gradient.
    Out16,
    /// Bad-input counters and the sequence number.
    Check,
    /// The logits' range again as vec4 (a quad's reads; a stand-in without `QUADS`).
    Logits4,
    /// The f32 gradient's range again as vec4 (a quad's stores; a stand-in without `QUADS`).
    Grad4,
    /// Each pixel's softmax pieces, from the stats stage to the chunked grad stage
    /// (pixels.wgsl `STORED_PIECES`; a stand-in without it).
    Pieces,
    /// The start of `Fin` again as a uniform binding: the coefficient table, one vec4 a
    /// class and image (grad_pixel.wgsl `UNIFORM_COEFS`; unread without it).
    FinCoefs,
}

impl Binding {
    /// The binding number.
    pub const fn slot(self) -> u32 {
        match self {
            Binding::Logits => 0,
            Binding::Labels => 1,
            Binding::Dims => 2,
            Binding::Params => 3,
            Binding::Partial => 4,
            Binding::Stats => 5,
            Binding::Fin => 6,
            Binding::Grad => 7,
            Binding::LossMap => 8,
            Binding::Out16 => 9,
            Binding::Check => 10,
            Binding::Logits4 => 11,
            Binding::Grad4 => 12,
            Binding::Pieces => 13,
            Binding::FinCoefs => 14,
        }
    }

    /// The variable's name in WGSL.
    pub fn wgsl_name(self) -> &'static str {
        match self {
            Binding::Logits => "logits",
            Binding::Labels => "labels",
            Binding::Dims => "dims",
            Binding::Params => "params",
            Binding::Partial => "partial",
            Binding::Stats => "stats",
            Binding::Fin => "fin",
            Binding::Grad => "grad",
            Binding::LossMap => "loss_map",
            Binding::Out16 => "out16",
            Binding::Check => "check",
            Binding::Logits4 => "logits4",
            Binding::Grad4 => "grad4",
            Binding::Pieces => "softmax_pieces",
            Binding::FinCoefs => "fin_coefs",
        }
    }
}

/// How a kernel binds a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>`.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// A pipeline-overridable constant (`override NAME` in WGSL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Override {
    /// Classes.
    C,
    /// Label storage (a `LABELS_*` code).
    LabelKind,
    /// Logit storage (a `FLOAT_*` code).
    LogitKind,
    /// 16-bit gradient storage (`FLOAT_F16` or `FLOAT_BF16`).
    GradKind,
    /// Sigmoid activation.
    Sigmoid,
    /// A region term with temperature T ≠ 1.
    Tempered,
    /// Channels-last layout.
    Nhwc,
    /// Pixel terms.
    NPix,
    /// Pixel-term kinds present (bit per kind code).
    PixelKinds,
    /// Pixel terms with a class vector (bit per term).
    PixelWeighted,
    /// Pixel terms with a loss map (bit per term).
    PixelMaps,
    /// Statistic-term kinds present (bit per kind code).
    StatKinds,
    /// Runs of consecutive pixels per invocation.
    Contiguous,
    /// Pixels per grad invocation.
    Ppt,
    /// The stats stage's labels-only form (the normalisers of the one-pass path).
    NormsOnly,
    /// The spec has statistic terms (the gradient reads coefficients).
    StatTerms,
    /// The stats stage sums each class's statistics (off: a spec of pixel terms only whose
    /// caller does not want the proportions).
    ClassSums,
    /// Pixels per staged sub-tile (`Strategy::stage_pixels`).
    StagePixels,
    /// The gradient is added to the target's values (a backward recording's choice).
    Accumulate,
    /// Four pixels a vec4 (pixels.wgsl `QUADS`).
    Quads,
    /// The grad stage takes every class in chunks (grad.wgsl `GRAD_CHUNKS`).
    GradChunks,
    /// The stats stage's class sums past its block read four pixels a vec4 (stats.wgsl
    /// `PAST_QUADS`).
    PastQuads,
    /// The stats stage stores each pixel's softmax pieces and the chunked grad stage reads
    /// them (pixels.wgsl `STORED_PIECES`).
    StoredPieces,
    /// The coefficient slots the spec's terms can make nonzero (bit per slot).
    CoefsUsed,
    /// The gradient reads the coefficients through the uniform binding `FinCoefs`
    /// (grad_pixel.wgsl `UNIFORM_COEFS`).
    UniformCoefs,
}

impl Override {
    /// Every override, in the order of [`Variant`]'s values.
    pub const ALL: [Override; 25] = [
        Override::C,
        Override::LabelKind,
        Override::LogitKind,
        Override::GradKind,
        Override::Sigmoid,
        Override::Tempered,
        Override::Nhwc,
        Override::NPix,
        Override::PixelKinds,
        Override::PixelWeighted,
        Override::PixelMaps,
        Override::StatKinds,
        Override::Contiguous,
        Override::Ppt,
        Override::NormsOnly,
        Override::StatTerms,
        Override::ClassSums,
        Override::StagePixels,
        Override::Accumulate,
        Override::Quads,
        Override::GradChunks,
        Override::PastQuads,
        Override::StoredPieces,
        Override::CoefsUsed,
        Override::UniformCoefs,
    ];

    /// The constant's name in WGSL.
    pub fn name(self) -> &'static str {
        match self {
            Override::C => "C",
            Override::LabelKind => "LABEL_KIND",
            Override::LogitKind => "LOGIT_KIND",
            Override::GradKind => "GRAD_KIND",
            Override::Sigmoid => "SIGMOID",
            Override::Tempered => "TEMPERED",
            Override::Nhwc => "NHWC",
            Override::NPix => "N_PIX",
            Override::PixelKinds => "PIXEL_KINDS",
            Override::PixelWeighted => "PIXEL_WEIGHTED",
            Override::PixelMaps => "PIXEL_MAPS",
            Override::StatKinds => "STAT_KINDS",
            Override::Contiguous => "CONTIGUOUS",
            Override::Ppt => "PPT",
            Override::NormsOnly => "NORMS_ONLY",
            Override::StatTerms => "STAT_TERMS",
            Override::ClassSums => "CLASS_SUMS",
            Override::StagePixels => "STAGE_PIXELS",
            Override::Accumulate => "ACCUMULATE",
            Override::Quads => "QUADS",
            Override::GradChunks => "GRAD_CHUNKS",
            Override::PastQuads => "PAST_QUADS",
            Override::StoredPieces => "STORED_PIECES",
            Override::CoefsUsed => "COEFS_USED",
            Override::UniformCoefs => "UNIFORM_COEFS",
        }
    }
}

/// One row of the stage table.
#[derive(Debug, Clone, Copy)]
pub struct KernelInfo {
    /// The kernel.
    pub kernel: Kernel,
    /// The shader module's name (kernels of one module share its compiled source).
    pub module: &'static str,
    /// The files the module is assembled from, after the generated prelude.
    pub parts: &'static [Source],
    /// The entry point.
    pub entry: &'static str,
    /// Invocations per workgroup (`@workgroup_size`, one-dimensional); for the pixel stages
    /// (stats, grad) the largest, `PIXEL_WG_MAX`: a call's strategy picks theirs
    /// (`Strategy::pixel_workgroup`, generated into the source as `PIXEL_WG`).
    pub workgroup_size: u32,
    /// The buffers it binds, in binding order.
    pub bindings: &'static [(Binding, Access)],
    /// The overrides its entry point uses.
    pub overrides: &'static [Override],
    /// Needs subgroup operations (naga's SUBGROUP capability, wgpu's `Features::SUBGROUP`).
    pub subgroups: bool,
    /// Bytes of workgroup memory its entry point declares, at `workgroup_size`
    /// (tests/naga_validate.rs checks the WGSL against it; `Strategy::validate` against the
    /// device's `max_compute_workgroup_storage_size`, which wgpu does not check).
    pub workgroup_bytes: u32,
}

use Access::{Read, ReadWrite, Uniform};
use Binding as B;
use Override as O;

/// The stats stage's bindings in the staged modules, which read no quads.
const STATS_STAGED_BINDINGS: &[(Binding, Access)] = &[
    (B::Logits, Read),
    (B::Labels, Read),
    (B::Dims, Uniform),
    (B::Params, Read),
    (B::Partial, ReadWrite),
    (B::LossMap, ReadWrite),
    (B::Check, ReadWrite),
];
/// The register-path pixel stages also bind the logits (and the gradient) as vec4: their
/// quads (pixels.wgsl `QUADS`).
const STATS_BINDINGS: &[(Binding, Access)] = &concat::<_, 9>(
    STATS_STAGED_BINDINGS,
    &[(B::Logits4, Read), (B::Pieces, ReadWrite)],
);
/// The overrides every pixel kernel takes, register path and staged alike.
const PIXEL_COMMON: [Override; 9] = [
    O::C,
    O::LabelKind,
    O::LogitKind,
    O::Sigmoid,
    O::Tempered,
    O::Nhwc,
    O::NPix,
    O::PixelKinds,
    O::PixelWeighted,
];
/// The overrides both register-path pixel stages take.
const PIXEL_OVERRIDES: [Override; 11] = overrides_and(&PIXEL_COMMON, &[O::Contiguous, O::Quads]);

/// `base` followed by `own` (the first `N` entries of the result).
const fn overrides_and<const N: usize>(base: &[Override], own: &[Override]) -> [Override; N] {
    concat(base, own)
}

/// `base` followed by `own`, `N` entries in all (`base` is not empty). A wrong `N` fails
/// the build, where it would drop or repeat a binding or an override.
const fn concat<T: Copy, const N: usize>(base: &[T], own: &[T]) -> [T; N] {
    assert!(
        N == base.len() + own.len(),
        "concat: N is not the sum of the lengths"
    );
    let mut all = [base[0]; N];
    let mut k = 0;
    while k < N {
        all[k] = if k < base.len() {
            base[k]
        } else {
            own[k - base.len()]
        };
        k += 1;
    }
    all
}

/// The pixel stages' overrides followed by `own`.
const fn pixel_overrides_and<const N: usize>(own: &[Override]) -> [Override; N] {
    overrides_and(&PIXEL_OVERRIDES, own)
}

/// The stats stage also writes loss maps, has its labels-only form, may leave the class
/// sums out and reads the classes past its block four pixels a vec4 where quads fit; every
/// kernel that writes the gradient skips coefficients without statistic terms and compiles
/// in either the store or the add (`GRAD_OWN`); the grad stage also sets its pixels per
/// invocation; the stats stage's one-pass form takes both lists.
const STATS_OWN: &[Override] = &[
    O::PixelMaps,
    O::NormsOnly,
    O::ClassSums,
    O::PastQuads,
    O::StoredPieces,
];
const GRAD_OWN: &[Override] = &[O::StatTerms, O::CoefsUsed, O::UniformCoefs, O::Accumulate];
const STATS_GRAD_OWN: &[Override] = &overrides_and::<9>(STATS_OWN, GRAD_OWN);
const STATS_OVERRIDES: &[Override] = &pixel_overrides_and::<16>(STATS_OWN);
const GRAD_OVERRIDES: &[Override] = &pixel_overrides_and::<18>(&overrides_and::<7>(
    &[O::Ppt, O::GradChunks, O::StoredPieces],
    GRAD_OWN,
));
const STATS_GRAD_OVERRIDES: &[Override] = &pixel_overrides_and::<20>(STATS_GRAD_OWN);
/// Every kernel that links grad_pixel.wgsl binds the coefficient table's uniform view
/// last (the highest binding number).
const FIN_COEFS: (Binding, Access) = (B::FinCoefs, Uniform);
/// The grad stages' bindings before their quads, pieces and `FinCoefs`.
const GRAD_COMMON_BINDINGS: &[(Binding, Access)] = &[
    (B::Logits, Read),
    (B::Labels, Read),
    (B::Dims, Uniform),
    (B::Params, Read),
    (B::Fin, Read),
    (B::Grad, ReadWrite),
];
const GRAD_STAGED_BINDINGS: &[(Binding, Access)] =
    &concat::<_, 7>(GRAD_COMMON_BINDINGS, &[FIN_COEFS]);
const GRAD_BINDINGS: &[(Binding, Access)] = &concat::<_, 10>(
    GRAD_COMMON_BINDINGS,
    &[
        (B::Logits4, Read),
        (B::Grad4, ReadWrite),
        (B::Pieces, Read),
        FIN_COEFS,
    ],
);
/// The grad stage's bindings where the gradient shares a buffer with the inputs (wgpu
/// refuses a buffer bound read-only and read-write in one dispatch): the inputs' views
/// (`Logits`, `Labels`, `Logits4`) bound read-write.
const GRAD_SHARED_STAGED_BINDINGS: &[(Binding, Access)] =
    &inputs_read_write::<7>(GRAD_STAGED_BINDINGS);
const GRAD_SHARED_BINDINGS: &[(Binding, Access)] = &inputs_read_write::<10>(GRAD_BINDINGS);

/// `bindings` (`N` of them) with the caller's inputs bound read-write.
const fn inputs_read_write<const N: usize>(
    bindings: &[(Binding, Access)],
) -> [(Binding, Access); N] {
    let mut all: [(Binding, Access); N] = concat(bindings, &[]);
    let mut k = 0;
    while k < N {
        if matches!(all[k].0, B::Logits | B::Labels | B::Logits4) {
            all[k].1 = ReadWrite;
        }
        k += 1;
    }
    all
}
const GRAD_PARTS: &[Source] = &[DISPATCH, MATH, SPEC, PIXELS, GRAD_PIXEL, GRAD];
/// The stats stage's bindings with the gradient's (fin read, grad written) in binding
/// order: the one-pass form, before its quads, pieces and `FinCoefs`.
const STATS_GRAD_COMMON_BINDINGS: &[(Binding, Access)] = &{
    let mut all = [(B::Fin, Read); STATS_STAGED_BINDINGS.len() + 2];
    let (mut k, mut j) = (0, 0);
    while k < STATS_STAGED_BINDINGS.len() {
        if STATS_STAGED_BINDINGS[k].0.slot() > B::Fin.slot() && j == k {
            all[j] = (B::Fin, Read);
            all[j + 1] = (B::Grad, ReadWrite);
            j += 2;
        }
        all[j] = STATS_STAGED_BINDINGS[k];
        j += 1;
        k += 1;
    }
    all
};
const STATS_GRAD_STAGED_BINDINGS: &[(Binding, Access)] =
    &concat::<_, 10>(STATS_GRAD_COMMON_BINDINGS, &[FIN_COEFS]);
const STATS_GRAD_BINDINGS: &[(Binding, Access)] = &concat::<_, 13>(
    STATS_GRAD_COMMON_BINDINGS,
    &[
        (B::Logits4, Read),
        (B::Grad4, ReadWrite),
        (B::Pieces, ReadWrite),
        FIN_COEFS,
    ],
);

const fn stats(kernel: Kernel, module: &'static str, parts: &'static [Source]) -> KernelInfo {
    let with_grad = matches!(
        kernel,
        Kernel::StatsGradWorkgroup | Kernel::StatsGradSubgroup | Kernel::StatsGradInvocation
    );
    KernelInfo {
        kernel,
        module,
        parts,
        entry: "main",
        workgroup_size: PIXEL_WG_MAX,
        bindings: if with_grad {
            STATS_GRAD_BINDINGS
        } else {
            STATS_BINDINGS
        },
        overrides: if with_grad {
            STATS_GRAD_OVERRIDES
        } else {
            STATS_OVERRIDES
        },
        subgroups: matches!(kernel, Kernel::StatsSubgroup | Kernel::StatsGradSubgroup),
        // tile_sum/workgroup.wgsl: three arrays of one vec4 an invocation.
        workgroup_bytes: if matches!(kernel, Kernel::StatsWorkgroup | Kernel::StatsGradWorkgroup) {
            3 * 16 * PIXEL_WG_MAX
        } else {
            0
        },
    }
}

const fn grad(kernel: Kernel, module: &'static str, inputs: Access) -> KernelInfo {
    KernelInfo {
        kernel,
        module,
        parts: GRAD_PARTS,
        entry: "main",
        workgroup_size: PIXEL_WG_MAX,
        bindings: match inputs {
            ReadWrite => GRAD_SHARED_BINDINGS,
            _ => GRAD_BINDINGS,
        },
        overrides: GRAD_OVERRIDES,
        subgroups: false,
        workgroup_bytes: 0,
    }
}

/// A stats module's parts: the shared ones, its tile sum, and the gradient or its stand-ins.
macro_rules! stats_parts {
    ($tile_sum:expr, $grad:expr) => {
        &[DISPATCH, MATH, SPEC, PIXELS, STATS, $tile_sum, $grad]
    };
}

/// Workgroup bytes of the staged kernels that do not scale with the workgroup: the
/// sub-tile (`STAGE_FLOATS` floats) and arrays of `STAGE_PIXELS_MAX`: the pieces and the
/// labels, and with a gradient two more vec4 (`px_grad`, `px_h`). Per invocation they add
/// one vec4 and one u32 (`shares`, `share_flags`).
const fn staged_fixed_bytes(kernel: Kernel) -> u32 {
    let per_pixel = match kernel {
        Kernel::StatsStaged => 16 + 4,
        _ => 3 * 16 + 4,
    };
    4 * layout::STAGE_FLOATS + per_pixel * layout::STAGE_PIXELS_MAX
}
const STAGED_BYTES_PER_INVOCATION: u32 = 16 + 4;
/// A staged module's parts: the shared ones, stats.wgsl (bindings, rules), the gradient or
/// its stand-ins, the staged stages.
const STAGED_STATS_PARTS: &[Source] = &[
    DISPATCH,
    MATH,
    SPEC,
    PIXELS,
    STATS,
    STATS_NO_GRAD,
    STAGED,
    STAGED_NO_GRAD,
];
const STAGED_GRAD_PARTS: &[Source] = &[
    DISPATCH,
    MATH,
    SPEC,
    PIXELS,
    STATS,
    GRAD_PIXEL,
    STAGED,
    STAGED_GRAD,
];
/// The overrides every staged kernel takes: the pixel stages' but `CONTIGUOUS` (a staged
/// sub-tile is copied in memory order whatever the adapter), and `STAGE_PIXELS`.
const STAGED_OVERRIDES: [Override; 10] = overrides_and(&PIXEL_COMMON, &[O::StagePixels]);

/// The staged overrides followed by `own`.
const fn staged_overrides_and<const N: usize>(own: &[Override]) -> [Override; N] {
    overrides_and(&STAGED_OVERRIDES, own)
}

/// The staged stats stage takes the gradient's overrides only in its one-pass form, and
/// none for classes past a block (it keeps none).
const STAGED_STATS_OWN: &[Override] = &[O::PixelMaps, O::NormsOnly, O::ClassSums];
const STAGED_STATS_OVERRIDES: &[Override] = &staged_overrides_and::<13>(STAGED_STATS_OWN);
const STAGED_STATS_GRAD_OVERRIDES: &[Override] =
    &staged_overrides_and::<17>(&overrides_and::<7>(STAGED_STATS_OWN, GRAD_OWN));
const STAGED_GRAD_OVERRIDES: &[Override] = &staged_overrides_and::<14>(GRAD_OWN);

const fn staged(
    kernel: Kernel,
    module: &'static str,
    parts: &'static [Source],
    entry: &'static str,
    bindings: &'static [(Binding, Access)],
    overrides: &'static [Override],
) -> KernelInfo {
    KernelInfo {
        kernel,
        module,
        parts,
        entry,
        workgroup_size: PIXEL_WG_MAX,
        bindings,
        overrides,
        subgroups: false,
        workgroup_bytes: staged_fixed_bytes(kernel) + STAGED_BYTES_PER_INVOCATION * PIXEL_WG_MAX,
    }
}

/// The class block the staged modules are built with (the smallest).
pub const STAGED_BLOCK: u32 = 8;

/// The stage table.
pub const KERNELS: [KernelInfo; 16] = [
    stats(
        Kernel::StatsWorkgroup,
        "stats_workgroup",
        stats_parts!(TILE_SUM_WORKGROUP, STATS_NO_GRAD),
    ),
    stats(
        Kernel::StatsSubgroup,
        "stats_subgroup",
        stats_parts!(TILE_SUM_SUBGROUP, STATS_NO_GRAD),
    ),
    stats(
        Kernel::StatsInvocation,
        "stats_invocation",
        stats_parts!(TILE_SUM_INVOCATION, STATS_NO_GRAD),
    ),
    stats(
        Kernel::StatsGradWorkgroup,
        "stats_grad_workgroup",
        stats_parts!(TILE_SUM_WORKGROUP, GRAD_PIXEL),
    ),
    stats(
        Kernel::StatsGradSubgroup,
        "stats_grad_subgroup",
        stats_parts!(TILE_SUM_SUBGROUP, GRAD_PIXEL),
    ),
    stats(
        Kernel::StatsGradInvocation,
        "stats_grad_invocation",
        stats_parts!(TILE_SUM_INVOCATION, GRAD_PIXEL),
    ),
    KernelInfo {
        kernel: Kernel::SumTileRows,
        module: "sum_tiles",
        parts: &[SUM_TILES],
        entry: "sum_tile_rows",
        workgroup_size: REDUCE_WG,
        bindings: &[(B::Dims, Read), (B::Partial, ReadWrite)],
        overrides: &[],
        subgroups: false,
        workgroup_bytes: 0,
    },
    KernelInfo {
        kernel: Kernel::SumTiles,
        module: "sum_tiles",
        parts: &[SUM_TILES],
        entry: "sum_tiles",
        workgroup_size: REDUCE_WG,
        bindings: &[
            (B::Dims, Read),
            (B::Partial, ReadWrite),
            (B::Stats, ReadWrite),
        ],
        overrides: &[],
        subgroups: false,
        workgroup_bytes: 0,
    },
    KernelInfo {
        kernel: Kernel::Finalize,
        module: "finalize",
        parts: &[MATH, SPEC, FINALIZE],
        entry: "finalize_terms",
        workgroup_size: FIN_WG,
        bindings: &[
            (B::Dims, Read),
            (B::Params, Read),
            (B::Partial, Read),
            (B::Stats, ReadWrite),
            (B::Fin, ReadWrite),
        ],
        overrides: &[O::C, O::Sigmoid, O::StatKinds],
        subgroups: false,
        // finalize.wgsl's `part`: one f32 an invocation.
        workgroup_bytes: 4 * FIN_WG,
    },
    grad(Kernel::Grad, "grad", Read),
    grad(Kernel::GradShared, "grad_shared", ReadWrite),
    KernelInfo {
        kernel: Kernel::Narrow,
        module: "narrow",
        parts: &[DISPATCH, NARROW],
        entry: "main",
        workgroup_size: NARROW_WG,
        bindings: &[(B::Dims, Uniform), (B::Grad, Read), (B::Out16, ReadWrite)],
        overrides: &[O::GradKind],
        subgroups: false,
        workgroup_bytes: 0,
    },
    staged(
        Kernel::StatsStaged,
        "staged_stats",
        STAGED_STATS_PARTS,
        "stats_main",
        STATS_STAGED_BINDINGS,
        STAGED_STATS_OVERRIDES,
    ),
    staged(
        Kernel::StatsGradStaged,
        "staged",
        STAGED_GRAD_PARTS,
        "stats_main",
        STATS_GRAD_STAGED_BINDINGS,
        STAGED_STATS_GRAD_OVERRIDES,
    ),
    staged(
        Kernel::GradStaged,
        "staged",
        STAGED_GRAD_PARTS,
        "grad_main",
        GRAD_STAGED_BINDINGS,
        STAGED_GRAD_OVERRIDES,
    ),
    staged(
        Kernel::GradStagedShared,
        "staged_shared",
        STAGED_GRAD_PARTS,
        "grad_main",
        GRAD_SHARED_STAGED_BINDINGS,
        STAGED_GRAD_OVERRIDES,
    ),
];

impl Kernel {
    /// The kernel's row of the stage table.
    pub fn info(self) -> &'static KernelInfo {
        KERNELS
            .iter()
            .find(|k| k.kernel == self)
            .expect("every kernel has a row in KERNELS")
    }
}

impl KernelInfo {
    /// Whether the module includes the pixel helpers (and so a class block and a
    /// strategy's workgroup size).
    pub fn has_pixels(&self) -> bool {
        self.parts.contains(&PIXELS)
    }

    /// Bytes of workgroup memory the entry point declares when built with `pixel_wg`
    /// invocations (the pixel stages' memory is per invocation).
    pub fn workgroup_bytes_with(&self, pixel_wg: u32) -> u32 {
        if self.kernel.is_staged() {
            staged_fixed_bytes(self.kernel) + STAGED_BYTES_PER_INVOCATION * pixel_wg
        } else if self.has_pixels() {
            self.workgroup_bytes / PIXEL_WG_MAX * pixel_wg
        } else {
            self.workgroup_bytes
        }
    }

    /// The module's WGSL as the device compiles it: the generated prelude (for the pixel
    /// stages with `BLOCK`, the class block, `PIXEL_WG`, their workgroup size, and
    /// `COEF_ROWS`, the device's `layout::coef_rows`), then the parts. The read-write
    /// variant of a module binds its inputs as the row says.
    pub fn source(&self, block: u32, pixel_wg: u32, coef_rows: u32) -> String {
        let mut s = layout::wgsl_prelude();
        if self.has_pixels() {
            s += &format!(
                "const BLOCK: u32 = {block}u;\nconst PIXEL_WG: u32 = {pixel_wg}u;\n\
                 const COEF_ROWS: u32 = {coef_rows}u;\n"
            );
        }
        for part in self.parts {
            s += &format!("\n// ---- shaders/{} ----\n{}", part.path, part.text);
        }
        // grad_shared: the one module whose bindings differ from its files' declarations
        // (wgpu refuses a buffer bound read-only and read-write in one dispatch).
        for (b, access) in self.bindings {
            if *access == ReadWrite {
                let name = b.wgsl_name();
                s = s.replace(
                    &format!("var<storage, read> {name}:"),
                    &format!("var<storage, read_write> {name}:"),
                );
            }
        }
        s
    }

    /// Groups of `workgroup_size` invocations that cover `items`.
    pub fn groups_for(&self, items: usize) -> usize {
        items.div_ceil(self.workgroup_size as usize)
    }

    /// The explicit bind-group layout entries of the row.
    pub fn layout_entries(&self) -> Vec<wgpu::BindGroupLayoutEntry> {
        self.bindings
            .iter()
            .map(|(b, access)| wgpu::BindGroupLayoutEntry {
                binding: b.slot(),
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match access {
                        Access::Uniform => wgpu::BufferBindingType::Uniform,
                        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect()
    }
}

/// Every module's WGSL as the device compiles it, by module name (one entry per module),
/// with class block `block`, workgroup size `pixel_wg` and `coef_rows` where a module has
/// them.
pub fn shader_sources(block: u32, pixel_wg: u32, coef_rows: u32) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = vec![];
    for k in &KERNELS {
        if !out.iter().any(|(m, _)| *m == k.module) {
            out.push((k.module, k.source(block, pixel_wg, coef_rows)));
        }
    }
    out
}

/// Everything a pipeline's override constants are derived from: one call's configuration.
/// With the kernel it is the pipeline cache key ([`PipelineKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Variant {
    /// Classes.
    pub classes: u32,
    /// `LABELS_*` code.
    pub label_kind: u32,
    /// `FLOAT_*` code of the logits.
    pub logit_kind: u32,
    /// `FLOAT_*` code of a 16-bit gradient (0 for f32).
    pub grad_kind: u32,
    /// Sigmoid activation.
    pub sigmoid: bool,
    /// Region terms with T ≠ 1.
    pub tempered: bool,
    /// Channels last.
    pub nhwc: bool,
    /// Pixel terms.
    pub n_pix: u32,
    /// `plan::pixel_kinds`.
    pub pixel_kinds: u32,
    /// `plan::pixel_weighted`.
    pub pixel_weighted: u32,
    /// `plan::pixel_maps`.
    pub pixel_maps: u32,
    /// `plan::stat_kinds`.
    pub stat_kinds: u32,
    /// Runs of consecutive pixels per invocation.
    pub contiguous: bool,
    /// The stats stage's labels-only form.
    pub norms_only: bool,
    /// The stats stage sums each class's statistics.
    pub class_sums: bool,
    /// Classes an invocation keeps once read (`Strategy::block_for`): a constant of the
    /// pixel stages' source, not an override (WGSL sizes function arrays by constants).
    pub block: u32,
    /// The stats stage's class block (`Strategy::stats_block_for`), for the stats kernels
    /// and their one-pass form.
    pub stats_block: u32,
    /// Invocations per pixel-stage workgroup (`Strategy::pixel_workgroup`), also a constant
    /// of their source (`@workgroup_size` and workgroup arrays take no overrides in naga).
    pub pixel_wg: u32,
    /// Pixels per staged sub-tile (`Strategy::stage_pixels`; 0: the call is not staged).
    pub stage_pixels: u32,
    /// The gradient pass adds to the target instead of overwriting it.
    pub accumulate: bool,
    /// Pixels four at a time (`plan::quads`).
    pub quads: bool,
    /// The grad stage takes every class in chunks, with `stats_block` as its block
    /// (`Strategy::grad_chunks`).
    pub grad_chunks: bool,
    /// The chunked grad stage takes its pixels four at a time (`plan::chunk_quads`; its
    /// `QUADS`, whatever `quads` says for the other stages), and so does the stats stage's
    /// class sums past its block (`PAST_QUADS`).
    pub chunk_quads: bool,
    /// The kernels are compiled with naga's clamp on variable indices into invocation and
    /// workgroup arrays (`Strategy::index_checks`).
    pub index_checks: bool,
    /// The stats stage stores each pixel's softmax pieces for the chunked grad stage, which
    /// reads them (pixels.wgsl `STORED_PIECES`; record.rs `variant` says when).
    pub stored_pieces: bool,
    /// `plan::coefs_used`.
    pub coefs_used: u32,
    /// The gradient reads the coefficients through `Binding::FinCoefs`
    /// (`Strategy::uniform_coefs`, where the table fits the binding).
    pub uniform_coefs: bool,
}

impl Variant {
    /// The value of one override.
    pub fn value(&self, o: Override) -> u32 {
        match o {
            O::C => self.classes,
            O::LabelKind => self.label_kind,
            O::LogitKind => self.logit_kind,
            O::GradKind => self.grad_kind,
            O::Sigmoid => self.sigmoid as u32,
            O::Tempered => self.tempered as u32,
            O::Nhwc => self.nhwc as u32,
            O::NPix => self.n_pix,
            O::PixelKinds => self.pixel_kinds,
            O::PixelWeighted => self.pixel_weighted,
            O::PixelMaps => self.pixel_maps,
            O::StatKinds => self.stat_kinds,
            O::Contiguous => self.contiguous as u32,
            O::Ppt => grad_pixels_per_invocation(self.contiguous) as u32,
            O::NormsOnly => self.norms_only as u32,
            O::StatTerms => (self.stat_kinds != 0) as u32,
            O::ClassSums => self.class_sums as u32,
            O::StagePixels => self.stage_pixels,
            O::Accumulate => self.accumulate as u32,
            O::Quads => self.quads as u32,
            O::GradChunks => self.grad_chunks as u32,
            O::PastQuads => self.chunk_quads as u32,
            O::StoredPieces => self.stored_pieces as u32,
            O::CoefsUsed => self.coefs_used,
            O::UniformCoefs => self.uniform_coefs as u32,
        }
    }
}

/// Pixels per grad invocation (the `PPT` override of grad.wgsl): 32 where invocations take
/// runs of consecutive pixels (CPU adapters), else 8.
pub fn grad_pixels_per_invocation(contiguous: bool) -> usize {
    if contiguous {
        32
    } else {
        8
    }
}

/// A compiled pipeline's identity: the kernel and the values of the overrides it takes (0
/// for those it does not, so calls that differ only there share the pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel.
    pub kernel: Kernel,
    /// Values by `Override::ALL` position.
    pub values: [u32; Override::ALL.len()],
    /// The source's class block (0 for kernels without the pixel helpers).
    pub block: u32,
    /// The source's pixel workgroup size (0 for kernels without the pixel helpers).
    pub pixel_wg: u32,
    /// Compiled with naga's index clamps (`Strategy::index_checks`).
    pub index_checks: bool,
}

impl PipelineKey {
    /// The key of `kernel` for a call configured as `variant`.
    pub fn new(kernel: Kernel, variant: &Variant) -> Self {
        let info = kernel.info();
        let mut values = [0; Override::ALL.len()];
        let chunked_grad =
            variant.grad_chunks && matches!(kernel, Kernel::Grad | Kernel::GradShared);
        for (k, o) in Override::ALL.iter().enumerate() {
            if info.overrides.contains(o) {
                values[k] = match o {
                    O::Quads if chunked_grad => variant.chunk_quads as u32,
                    _ => variant.value(*o),
                };
            }
        }
        let (block, pixel_wg) = if kernel.is_staged() {
            // The staged stages keep no register block (BLOCK sizes only the register
            // path's code, which their module compiles but never calls).
            (STAGED_BLOCK, variant.pixel_wg)
        } else if kernel.is_stats() || chunked_grad {
            (variant.stats_block, variant.pixel_wg)
        } else if info.has_pixels() {
            (variant.block, variant.pixel_wg)
        } else {
            (0, 0)
        };
        PipelineKey {
            kernel,
            values,
            block,
            pixel_wg,
            index_checks: variant.index_checks,
        }
    }

    /// The pipeline constants, as wgpu takes them.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        let info = self.kernel.info();
        Override::ALL
            .iter()
            .zip(self.values)
            .filter(|(o, _)| info.overrides.contains(o))
            .map(|(o, v)| (o.name(), v as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_one_row_and_distinct_binding_numbers() {
        for k in &KERNELS {
            assert_eq!(k.kernel.info().module, k.module);
            let mut slots: Vec<u32> = k.bindings.iter().map(|(b, _)| b.slot()).collect();
            slots.dedup();
            assert_eq!(slots.len(), k.bindings.len(), "{:?}", k.kernel);
            assert!(slots.windows(2).all(|w| w[0] < w[1]), "{:?}", k.kernel);
        }
    }

    #[test]
    fn keys_ignore_overrides_a_kernel_does_not_take() {
        let a = Variant {
            classes: 4,
            stat_kinds: 8,
            ..Default::default()
        };
        let b = Variant {
            stat_kinds: 16,
            ..a
        };
        let grad = |v| PipelineKey::new(Kernel::Grad, &v);
        assert_eq!(grad(a), grad(b));
        assert_ne!(
            PipelineKey::new(Kernel::Finalize, &a),
            PipelineKey::new(Kernel::Finalize, &b)
        );
        let c = PipelineKey::new(Kernel::Narrow, &a).constants();
        assert_eq!(c, vec![("GRAD_KIND", 0.0)]);
    }
}
