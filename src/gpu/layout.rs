//! The data layout the host and the shaders share, named once here and generated into every
//! WGSL stage as its first lines ([`wgsl_prelude`]): term kinds and their codes, the fields
//! of a term record in `params`, the columns of a statistics row, the coefficient slots of
//! `fin`, the per-dispatch header `Dims` and the workgroup sizes. A WGSL file names these
//! (`record(slot, DICE_SQUARED)`, `ROW_LOSS + t`), never their numbers; ARCHITECTURE.md,
//! "Data layouts", draws the buffers.

use bytemuck::{Pod, Zeroable};

/// Declares `pub const NAME: u32` items and the list [`CONSTANTS`] the WGSL prelude is
/// generated from, so a name and its value exist once for both languages.
macro_rules! shared_constants {
    ($($(#[$doc:meta])* $name:ident = $value:expr;)*) => {
        $($(#[$doc])* pub const $name: u32 = $value;)*
        /// Every shared constant as (name, value), in declaration order.
        pub const CONSTANTS: &[(&str, u32)] = &[$((stringify!($name), $name)),*];
    };
}

shared_constants! {
    // Term kinds (field REC_KIND of a record; bit k of the kind masks).
    /// Softmax cross-entropy (pixel term).
    KIND_CE = 0;
    /// Focal loss (pixel term).
    KIND_FOCAL = 1;
    /// Binary cross-entropy per channel (pixel term, sigmoid mode).
    KIND_BCE = 2;
    /// Soft Dice, Jaccard and log-Dice (statistic term).
    KIND_DICE = 3;
    /// Tversky and focal Tversky (statistic term).
    KIND_TVERSKY = 4;
    /// Generalized Dice (statistic term).
    KIND_GDL = 5;
    /// Region-proportion penalty (statistic term).
    KIND_REGION = 6;

    // A term record: RECORD floats in `params`; pixel terms in slots 0..MAX_PIXEL_TERMS,
    // statistic terms after them, per-class vectors after all records.
    /// Floats per term record.
    RECORD = 16;
    /// Record slots reserved for pixel terms.
    MAX_PIXEL_TERMS = 4;
    /// Terms a spec may have (the report holds one value each).
    MAX_TERMS = 16;
    /// Record field: the term kind.
    REC_KIND = 0;
    /// Record field: the term's weight λ.
    REC_WEIGHT = 1;
    /// Record field: the term's position in the spec (where its value is reported).
    REC_POSITION = 2;
    /// Record field: offset of the term's per-class vector in `params`, −1 when it has none.
    REC_VECTOR = 3;
    /// Record field of pixel terms: ε of cross-entropy, γ of focal (one read serves both).
    PIXEL_OPTION = 4;
    /// Record field: the cross-entropy reduction (a REDUCTION_* code).
    CE_REDUCTION = 5;
    /// Dice record: include the background class (bool as 0/1).
    DICE_BACKGROUND = 4;
    /// Dice record: squared denominator.
    DICE_SQUARED = 5;
    /// Dice record: Jaccard.
    DICE_JACCARD = 6;
    /// Dice record: log-Dice.
    DICE_LOG = 7;
    /// Dice record: statistics pooled over the batch.
    DICE_BATCH = 8;
    /// Dice record: smoothing of the numerator.
    DICE_SMOOTH_NR = 9;
    /// Dice record: smoothing of the denominator.
    DICE_SMOOTH_DR = 10;
    /// Dice record: skip classes absent from the target.
    DICE_SKIP_EMPTY = 11;
    /// Dice record: reduction (a REDUCTION_* code).
    DICE_REDUCTION = 12;
    /// Tversky record: α (false-positive weight).
    TVERSKY_ALPHA = 4;
    /// Tversky record: β (false-negative weight).
    TVERSKY_BETA = 5;
    /// Tversky record: γ (focal Tversky exponent).
    TVERSKY_GAMMA = 6;
    /// Tversky record: include the background class.
    TVERSKY_BACKGROUND = 7;
    /// Tversky record: statistics pooled over the batch.
    TVERSKY_BATCH = 8;
    /// Tversky record: smoothing of the numerator.
    TVERSKY_SMOOTH_NR = 9;
    /// Tversky record: smoothing of the denominator.
    TVERSKY_SMOOTH_DR = 10;
    /// Generalized Dice record: the class weighting (a GDL_WEIGHT_* code).
    GDL_WEIGHTING = 4;
    /// Generalized Dice record: include the background class.
    GDL_BACKGROUND = 5;
    /// Generalized Dice record: statistics pooled over the batch.
    GDL_BATCH = 6;
    /// Generalized Dice record: smoothing of the numerator.
    GDL_SMOOTH_NR = 9;
    /// Generalized Dice record: smoothing of the denominator.
    GDL_SMOOTH_DR = 10;
    /// Region record: the penalty (a PENALTY_* code).
    REGION_PENALTY = 4;
    /// Region record: the target proportions (a TARGET_* code).
    REGION_TARGET = 5;

    // Codes stored in record fields.
    /// Reduction: mean.
    REDUCTION_MEAN = 0;
    /// Reduction: sum.
    REDUCTION_SUM = 1;
    /// Reduction: none (per-element values are written out).
    REDUCTION_NONE = 2;
    /// Region penalty |û − τ|.
    PENALTY_L1 = 0;
    /// Region penalty KL(τ‖û).
    PENALTY_KL = 1;
    /// Region penalty (û − τ)².
    PENALTY_L2 = 2;
    /// Region penalty log(û + τ).
    PENALTY_LOG_SUM = 3;
    /// Region target: the ground-truth proportions.
    TARGET_GROUND_TRUTH = 0;
    /// Region target: uniform proportions.
    TARGET_UNIFORM = 1;
    /// Region target: a prior vector (the record's class vector).
    TARGET_PRIOR = 2;
    /// Generalized Dice weights 1/G².
    GDL_WEIGHT_SQUARE = 0;
    /// Generalized Dice weights 1/G.
    GDL_WEIGHT_SIMPLE = 1;
    /// Generalized Dice weights 1.
    GDL_WEIGHT_UNIFORM = 2;

    // Device formats (the LABEL_KIND, LOGIT_KIND and GRAD_KIND overrides).
    /// One u32 class index per pixel.
    LABELS_U32 = 0;
    /// u8 class indices, four per word, 255 ignored.
    LABELS_U8 = 1;
    /// f32 soft labels of the logits' shape.
    LABELS_SOFT = 2;
    /// u16 class indices, two per word, 65535 ignored.
    LABELS_U16 = 3;
    /// i32 class indices (burn's Int tensors); negative values and ignore_index ignored.
    LABELS_I32 = 4;
    /// i64 class indices, two words each (low word first); negative values and
    /// ignore_index ignored.
    LABELS_I64 = 5;
    /// f32 values.
    FLOAT_F32 = 0;
    /// IEEE half values, two per word.
    FLOAT_F16 = 1;
    /// bfloat16 values, two per word.
    FLOAT_BF16 = 2;

    // A statistics row: PER_CLASS floats per class, then ROW_SCALARS scalars.
    /// Floats per class in a statistics row.
    PER_CLASS = 8;
    /// Class column: Σ p (the predicted mass).
    STAT_P = 0;
    /// Class column: Σ p².
    STAT_Q = 1;
    /// Class column: Σ p·g (the intersection).
    STAT_I = 2;
    /// Class column: Σ g (the target mass).
    STAT_G = 3;
    /// Class column: Σ g².
    STAT_H = 4;
    /// Class column: Σ s (the tempered predicted mass of the region terms).
    STAT_U = 5;
    /// Scalars after the classes: (valid, plain CE, two spare), losses, normalisers.
    ROW_SCALARS = 12;
    /// Scalar column (after C·PER_CLASS): valid pixels.
    ROW_VALID = 0;
    /// Scalar column: the plain CE of the decomposition, −Σ g log p.
    ROW_PLAIN_CE = 1;
    /// Scalar columns ROW_LOSS + t: pixel term t's summed loss.
    ROW_LOSS = 4;
    /// Scalar columns ROW_NORM + t: pixel term t's summed normaliser.
    ROW_NORM = 8;

    // `fin`: four coefficients per (image, class), λ-weighted.
    /// Coefficients per (image, class).
    COEFS = 4;
    /// Coefficient slot ∂L/∂P.
    COEF_P = 0;
    /// Coefficient slot ∂L/∂Q.
    COEF_Q = 1;
    /// Coefficient slot ∂L/∂I.
    COEF_I = 2;
    /// Coefficient slot ∂L/∂U.
    COEF_U = 3;

    // Workgroup sizes, read by the stage table (stages.rs) and by `@workgroup_size`. The
    // pixel stages' (stats, grad) is the strategy's `pixel_workgroup`, generated into their
    // source as `PIXEL_WG` (stages.rs `KernelInfo::source`).
    /// Pixels per stats invocation (at most 32: one bit each in stats.wgsl's `counted`).
    STATS_PPT = 32;
    /// Pixels per staged invocation: a staged tile (shaders/staged.wgsl) is
    /// `PIXEL_WG · STAGED_PPT` pixels.
    STAGED_PPT = 4;
    /// Floats of workgroup memory a staged sub-tile keeps its logits (and soft targets) in:
    /// calls of up to this many classes (half with soft labels) read each logit once per
    /// pass at any class count. 8 KiB, so that the staged kernels fit the 16,352 bytes of
    /// the most limited adapters (`Kernel::StatsStaged`'s workgroup bytes).
    STAGE_FLOATS = 2048;
    /// The most pixels of a staged sub-tile: 32 floats a class plane are a 128-byte line.
    STAGE_PIXELS_MAX = 32;
    /// Invocations per reduce_rows and reduce_tiles workgroup (one column each).
    REDUCE_WG = 64;
    /// Invocations of the one finalize_terms workgroup.
    FIN_WG = 64;
    /// Invocations per narrow workgroup (one output word each).
    NARROW_WG = 256;
}

/// The largest pixel-stage workgroup (`Strategy::pixel_workgroup`), which the stage table
/// declares and GPUs use.
pub const PIXEL_WG_MAX: u32 = 256;
/// The smallest: the workgroup tile sum folds a workgroup's values in groups of 16.
pub const PIXEL_WG_MIN: u32 = 32;

/// The most rows the coefficient table's uniform view (grad_pixel.wgsl `fin_coefs`, one
/// vec4 of `COEFS` an image and class) ever has: 64 KiB, the uniform binding limit of most
/// adapters, 27 images at 150 classes.
pub const COEF_ROWS_MAX: u32 = 4096;
const _: () = assert!(
    COEFS == 4,
    "fin_coefs reads a class's coefficients as one vec4"
);

/// Rows of `fin_coefs` on a device whose uniform bindings hold `max_uniform_bytes`
/// (`wgpu::Limits::max_uniform_buffer_binding_size`; every adapter allows 16 KiB, 1,024
/// rows). A constant of the pixel stages' source (`KernelInfo::source`): a uniform array
/// has a fixed length, and the binding must be at least that long even where unread.
pub fn coef_rows(max_uniform_bytes: u64) -> u32 {
    (max_uniform_bytes / 16).clamp(1, COEF_ROWS_MAX as u64) as u32
}

/// Declares the `Dims` header in Rust and its WGSL twin from one field list.
macro_rules! dims_struct {
    ($($(#[$doc:meta])* $field:ident: $ty:ident,)*) => {
        /// The uniform header of every dispatch (generated into WGSL as `struct Dims`).
        /// Images b of a dispatch are global images `image_offset + b`; the `*_shift` fields
        /// turn a global element index into an index within the bound range of that array
        /// (u32 arithmetic wraps, so a shift may stand for a negative one).
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Default)]
        pub struct Dims {
            $($(#[$doc])* pub $field: $ty,)*
        }

        const DIMS_FIELDS: &[(&str, &str)] = &[$((stringify!($field), stringify!($ty))),*];
    };
}

dims_struct! {
    /// Images in this dispatch.
    batch: u32,
    /// S, pixels per image.
    spatial: u32,
    /// Stats workgroups per image.
    tiles_per_image: u32,
    /// Floats per statistics row.
    row_width: u32,
    /// Terms in the spec.
    n_terms: u32,
    /// cross_entropy, focal and bce terms.
    n_pixel_terms: u32,
    /// Global index of this dispatch's first image.
    image_offset: u32,
    /// Statistic terms.
    n_stat_terms: u32,
    /// T of the region terms.
    temperature: f32,
    /// Images of the whole call (rows of the statistics and coefficient tables).
    total_batch: u32,
    /// Global logit element index → index in the bound range (wrapping add).
    logit_shift: u32,
    /// The same for labels (pixel or element index).
    label_shift: u32,
    /// The same for the gradient.
    grad_shift: u32,
    /// Values the narrow pass converts.
    narrow_count: u32,
    /// Where the narrow pass's first value sits in the bound output range.
    narrow_shift: u32,
    /// Partial rows per stats tile: 1 with the workgroup-memory reduction, one per subgroup
    /// or one per invocation with the others (`TileSum`).
    rows_per_tile: u32,
    /// 1: finalize first adds the stats stage's partial rows into the statistics rows
    /// itself (small calls: two dispatches fewer; ARCHITECTURE.md, "Small calls").
    fin_sums_partial: u32,
    /// `fin`: where the pixel-term scales start ([`FinLayout::scales`]).
    fin_scales: u32,
    /// `fin`: the report (the total loss, then term values).
    fin_report: u32,
    /// `fin`: elements of reduction-none terms.
    fin_elements: u32,
    /// `fin`: the statistics row summed over all images.
    fin_pooled: u32,
    /// `fin`: the upstream gradient the gradient pass scales by (finalize writes 1; the
    /// backward recording copies the caller's value over it).
    fin_upstream: u32,
    /// The spec's ignore_index as i32 bits, for I32 and I64 labels (whose negative values
    /// are ignored too).
    ignore_label: u32,
}

/// Byte stride of the per-dispatch `Dims` slots in one uniform buffer (a multiple of every
/// adapter's min_uniform_buffer_offset_alignment).
pub const DIMS_SLOT: u64 = 256;

/// Width of a statistics row for C classes.
pub fn row_width(classes: usize) -> usize {
    (PER_CLASS as usize) * classes + ROW_SCALARS as usize
}

/// Offsets (in floats) into the `fin` buffer: coefficients, pixel-term scales, the report,
/// elements, the pooled row. Computed here only; the shaders read them from `Dims`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinLayout {
    /// One scale per pixel term (λ over its normaliser), after the B·C·COEFS coefficients.
    pub scales: usize,
    /// Start of the report; the total loss is its first float.
    pub report: usize,
    /// Term values, spec order.
    pub values: usize,
    /// Elements of reduction-none terms, B·C per term.
    pub elements: usize,
    /// A statistics row summed over all images (finalize's batch-pooled statistics).
    pub pooled: usize,
    /// The upstream gradient (one float) the gradient pass scales by.
    pub upstream: usize,
    /// Floats in the buffer.
    pub len: usize,
}

impl FinLayout {
    /// The layout for B images, C classes and `terms` terms.
    pub fn new(batch: usize, classes: usize, terms: usize) -> Self {
        let bc = batch * classes;
        let scales = COEFS as usize * bc;
        let report = scales + MAX_PIXEL_TERMS as usize;
        let elements = report + 1 + MAX_TERMS as usize;
        let pooled = elements + terms * bc;
        FinLayout {
            scales,
            report,
            values: report + 1,
            elements,
            pooled,
            upstream: pooled + row_width(classes),
            len: pooled + row_width(classes) + 1,
        }
    }
}

/// The WGSL every stage starts with: each shared constant and the `Dims` struct.
pub fn wgsl_prelude() -> String {
    let mut s = String::from(
        "// Generated from src/gpu/layout.rs (the data layout shared with the host).\n",
    );
    for (name, value) in CONSTANTS {
        s += &format!("const {name}: u32 = {value}u;\n");
    }
    s += "struct Dims {\n";
    for (field, ty) in DIMS_FIELDS {
        s += &format!("    {field}: {ty},\n");
    }
    s + "}\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fin_layout_is_contiguous() {
        let l = FinLayout::new(3, 4, 2);
        assert_eq!(l.report, 4 * 12 + MAX_PIXEL_TERMS as usize);
        assert_eq!(l.pooled, l.elements + 2 * 12);
        assert_eq!(l.upstream, l.pooled + row_width(4));
        assert_eq!(l.len, l.upstream + 1);
    }

    #[test]
    fn dims_fields_are_words_and_fit_a_slot() {
        assert_eq!(std::mem::size_of::<Dims>(), 4 * DIMS_FIELDS.len());
        assert!(std::mem::size_of::<Dims>() as u64 <= DIMS_SLOT);
        assert!(DIMS_FIELDS.iter().all(|(_, t)| ["u32", "f32"].contains(t)));
    }

    #[test]
    fn constant_names_are_unique() {
        let mut names: Vec<_> = CONSTANTS.iter().map(|c| c.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CONSTANTS.len());
    }
}
