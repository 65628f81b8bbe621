//! The spec compiled for the kernels: the term records of `params` and the layout of the
//! buffers the stages share. Shader side: the constants at the top of `shaders/common.wgsl`.

use crate::input::Shape;
use crate::spec::{
    Activation, LossSpec, NamedTarget, Penalty, Reduction, RegionTarget, Term, WeightType,
    MAX_PIXEL_TERMS, MAX_TERMS,
};
use bytemuck::{Pod, Zeroable};

/// Floats per term record.
pub const RECORD: usize = 16;
/// Floats per class in a statistics row (P, Q, I, G, H, U, two spare).
pub const PER_CLASS: usize = 8;
/// Scalars after the classes in a statistics row: (valid, plain CE, ·, ·), losses, normalisers.
pub const ROW_SCALARS: usize = 12;
/// Pixels per stats workgroup (WG · PPT in stats.wgsl).
pub const STATS_TILE: usize = 8192;
/// Invocations per stats workgroup (WG in stats.wgsl).
pub const STATS_WG: usize = 256;
/// Invocations per grad workgroup (WG in grad.wgsl; a workgroup covers pixels of one image).
pub const GRAD_WG: usize = 256;

/// Pixels per grad invocation (the `PPT` override of grad.wgsl): 32 where invocations take
/// runs of consecutive pixels (CPU adapters), else 8.
pub fn grad_pixels_per_invocation(contiguous: bool) -> usize {
    if contiguous {
        32
    } else {
        8
    }
}

/// The uniform header of every dispatch (`Dims` in common.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Default)]
pub struct Dims {
    /// Images in this dispatch.
    pub batch: u32,
    /// S, pixels per image.
    pub spatial: u32,
    /// Stats workgroups per image.
    pub tiles_per_image: u32,
    /// Floats per statistics row.
    pub row_width: u32,
    /// Terms in the spec.
    pub n_terms: u32,
    /// cross_entropy, focal and bce terms.
    pub n_pixel_terms: u32,
    /// Global index of this dispatch's first image.
    pub image_offset: u32,
    /// Statistic terms.
    pub n_stat_terms: u32,
    /// T of the region terms.
    pub temperature: f32,
    /// Images of the whole call (rows of the statistics and coefficient tables).
    pub total_batch: u32,
    /// Global logit element index → index in the bound range (wrapping add).
    pub logit_shift: u32,
    /// The same for labels (pixel or element index).
    pub label_shift: u32,
    /// The same for the gradient.
    pub grad_shift: u32,
    /// Values the narrow pass converts.
    pub narrow_count: u32,
    /// Where the narrow pass's first value sits in the bound output range.
    pub narrow_shift: u32,
    /// Partial rows per stats tile: 1 with the workgroup-memory reduction, one per subgroup
    /// or one per invocation with the others (`engine::TileSum`).
    pub rows_per_tile: u32,
}

/// Byte stride of the per-dispatch `Dims` slots in one uniform buffer (a multiple of every
/// adapter's min_uniform_buffer_offset_alignment).
pub const DIMS_SLOT: u64 = 256;

/// A bound range of a buffer: offset and size in bytes, and the shift that turns an array's
/// element index into an index within the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset of the binding (a multiple of the alignment).
    pub offset: u64,
    /// Byte size of the binding.
    pub size: u64,
    /// Added (wrapping) to an element index of the array to index the binding.
    pub shift: u32,
}

/// The binding that covers elements `first..first + count` of an array starting at byte
/// `base` (a multiple of 4) with `per_word` elements per 32-bit word, its offset aligned
/// down to `align` bytes.
pub fn region(base: u64, first: u64, count: u64, per_word: u64, align: u64) -> Region {
    let first_word = base / 4 + first / per_word;
    let aligned_word = first_word * 4 / align * align / 4;
    let end_word = base / 4 + (first + count).div_ceil(per_word);
    let into = (first_word - aligned_word) * per_word + first % per_word;
    Region {
        offset: aligned_word * 4,
        size: (end_word - aligned_word).max(1) * 4,
        shift: into.wrapping_sub(first) as u32,
    }
}

/// Splits B images into runs whose largest bound array fits `max_binding` bytes (with room
/// for the alignment slack). `bytes_per_image` is the largest array's bytes per image.
pub fn chunks(
    batch: usize,
    bytes_per_image: u64,
    max_binding: u64,
    align: u64,
) -> Result<Vec<(usize, usize)>, String> {
    let room = max_binding.saturating_sub(align + 8);
    if bytes_per_image > room {
        return Err(format!(
            "one image needs {bytes_per_image} bytes in one binding, more than this adapter's max_storage_buffer_binding_size ({max_binding}) allows: pass 16-bit logits (half the bytes), use an adapter with a larger limit (`segloss info` lists each adapter's), or evaluate on the CPU reference (`Segloss::cpu`, `--device cpu`)"
        ));
    }
    let per = ((room / bytes_per_image.max(1)) as usize).clamp(1, batch.max(1));
    Ok((0..batch)
        .step_by(per)
        .map(|b| (b, per.min(batch - b)))
        .collect())
}

/// Offsets into the `fin` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinLayout {
    /// Start of the report; the total loss is its first float.
    pub report: usize,
    /// Term values, spec order.
    pub values: usize,
    /// Elements of reduction-none terms, B·C per term.
    pub elements: usize,
    /// A statistics row summed over all images (finalize's batch-pooled statistics).
    pub pooled: usize,
    /// Floats in the buffer.
    pub len: usize,
}

impl FinLayout {
    /// The layout for B images, C classes and `terms` terms (as finalize.wgsl computes it).
    pub fn new(batch: usize, classes: usize, terms: usize) -> Self {
        let bc = batch * classes;
        let report = 4 * bc + MAX_PIXEL_TERMS;
        let elements = report + 1 + MAX_TERMS;
        let pooled = elements + terms * bc;
        FinLayout {
            report,
            values: report + 1,
            elements,
            pooled,
            len: pooled + row_width(classes),
        }
    }
}

/// The statistic-term kinds of a spec as a bit mask (bit k: kind code k of common.wgsl), an
/// override of the finalize pipeline so only the term rules the spec uses are compiled.
pub fn stat_kinds(spec: &LossSpec) -> u32 {
    spec.terms
        .iter()
        .map(|t| match t {
            Term::Dice { .. } => 1 << 3,
            Term::Tversky { .. } => 1 << 4,
            Term::GeneralizedDice { .. } => 1 << 5,
            Term::Region { .. } => 1 << 6,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The pixel-term kinds of a spec as a bit mask (0 CE, 1 focal, 2 BCE), an override of the
/// stats and grad pipelines.
pub fn pixel_kinds(spec: &LossSpec) -> u32 {
    spec.terms
        .iter()
        .map(|t| match t {
            Term::CrossEntropy { .. } => 1,
            Term::Focal { .. } => 2,
            Term::Bce { .. } => 4,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// Bit t set where the spec's t-th pixel term has a per-class vector (CE class weights,
/// focal α, BCE pos_weight): the `PIXEL_WEIGHTED` override, so unweighted terms compile no
/// reads of one.
pub fn pixel_weighted(spec: &LossSpec) -> u32 {
    pixel_term_bits(spec, |t| match t {
        Term::CrossEntropy { class_weights, .. } => class_weights.is_some(),
        Term::Focal { alpha, .. } => alpha.is_some(),
        Term::Bce { pos_weight, .. } => pos_weight.is_some(),
        _ => false,
    })
}

/// Bit t set where the spec's t-th pixel term writes a per-pixel loss map (cross-entropy with
/// reduction "none"): the `PIXEL_MAPS` override.
pub fn pixel_maps(spec: &LossSpec) -> u32 {
    pixel_term_bits(spec, |t| {
        matches!(
            t,
            Term::CrossEntropy {
                reduction: Reduction::None,
                ..
            }
        )
    })
}

fn pixel_term_bits(spec: &LossSpec, has: impl Fn(&Term) -> bool) -> u32 {
    spec.terms
        .iter()
        .filter(|t| t.is_pixel_term())
        .enumerate()
        .filter(|(_, t)| has(t))
        .fold(0, |bits, (k, _)| bits | 1 << k)
}

/// Width of a statistics row for C classes.
pub fn row_width(classes: usize) -> usize {
    PER_CLASS * classes + ROW_SCALARS
}

/// Splits `groups` workgroups over a 2D dispatch (at most 65535 per dimension).
pub fn dispatch_2d(groups: usize) -> (u32, u32) {
    let x = groups.clamp(1, 65535);
    (x as u32, groups.div_ceil(x).max(1) as u32)
}

fn b(v: bool) -> f32 {
    if v {
        1.0
    } else {
        0.0
    }
}

fn reduction_code(r: Reduction) -> f32 {
    match r {
        Reduction::Mean => 0.0,
        Reduction::Sum => 1.0,
        Reduction::None => 2.0,
    }
}

/// Packs the spec's terms into the `params` array: pixel terms in slots 0..4, statistic
/// terms from slot 4, per-class vectors after all records. Field 2 of each record is the
/// term's position in the spec, where its value is reported.
pub fn pack_params(spec: &LossSpec, shape: &Shape) -> Vec<f32> {
    let c_n = shape.classes;
    let mut params = vec![0.0f32; (MAX_PIXEL_TERMS + MAX_TERMS) * RECORD];
    let (mut pix, mut stat) = (0usize, MAX_PIXEL_TERMS);
    for (r, term) in spec.terms.iter().enumerate() {
        let slot = if term.is_pixel_term() {
            pix += 1;
            pix - 1
        } else {
            stat += 1;
            stat - 1
        };
        let mut rec = [0.0f32; RECORD];
        rec[1] = term.weight() as f32;
        rec[2] = r as f32;
        rec[3] = -1.0;
        let mut vector: Option<Vec<f64>> = None;
        match term {
            Term::CrossEntropy {
                class_weights,
                label_smoothing,
                reduction,
                ..
            } => {
                rec[0] = 0.0;
                rec[4] = *label_smoothing as f32;
                rec[5] = reduction_code(*reduction);
                vector = class_weights.clone();
            }
            Term::Focal { gamma, alpha, .. } => {
                rec[0] = 1.0;
                rec[4] = *gamma as f32;
                vector = alpha.clone();
            }
            Term::Bce { pos_weight, .. } => {
                rec[0] = 2.0;
                vector = pos_weight.clone();
            }
            Term::Dice {
                include_background,
                squared,
                jaccard,
                log,
                batch,
                smooth_nr,
                smooth_dr,
                skip_empty,
                class_weights,
                reduction,
                ..
            } => {
                rec[0] = 3.0;
                rec[4] = b(*include_background);
                rec[5] = b(*squared);
                rec[6] = b(*jaccard);
                rec[7] = b(*log);
                rec[8] = b(*batch);
                rec[9] = *smooth_nr as f32;
                rec[10] = *smooth_dr as f32;
                rec[11] = b(*skip_empty);
                rec[12] = reduction_code(*reduction);
                vector = class_weights.clone();
            }
            Term::Tversky {
                alpha,
                beta,
                gamma,
                include_background,
                batch,
                smooth_nr,
                smooth_dr,
                ..
            } => {
                rec[0] = 4.0;
                rec[4] = *alpha as f32;
                rec[5] = *beta as f32;
                rec[6] = *gamma as f32;
                rec[7] = b(*include_background);
                rec[8] = b(*batch);
                rec[9] = *smooth_nr as f32;
                rec[10] = *smooth_dr as f32;
            }
            Term::GeneralizedDice {
                w_type,
                include_background,
                batch,
                smooth_nr,
                smooth_dr,
                ..
            } => {
                rec[0] = 5.0;
                rec[4] = match w_type {
                    WeightType::Square => 0.0,
                    WeightType::Simple => 1.0,
                    WeightType::Uniform => 2.0,
                };
                rec[5] = b(*include_background);
                rec[6] = b(*batch);
                rec[9] = *smooth_nr as f32;
                rec[10] = *smooth_dr as f32;
            }
            Term::Region {
                penalty, target, ..
            } => {
                rec[0] = 6.0;
                rec[4] = match penalty {
                    Penalty::L1 => 0.0,
                    Penalty::Kl => 1.0,
                    Penalty::L2 => 2.0,
                    Penalty::LogSum => 3.0,
                };
                rec[5] = match target {
                    RegionTarget::Named(NamedTarget::GroundTruth) => 0.0,
                    RegionTarget::Named(NamedTarget::Uniform) => 1.0,
                    RegionTarget::Prior(v) => {
                        vector = Some(v.clone());
                        2.0
                    }
                };
            }
        }
        if let Some(v) = vector {
            rec[3] = params.len() as f32;
            params.extend(v.iter().take(c_n).map(|x| *x as f32));
        }
        params[slot * RECORD..(slot + 1) * RECORD].copy_from_slice(&rec);
    }
    params
}

/// The uniform header for a call over the whole batch (chunks adjust image_offset, batch
/// and the shifts).
pub fn dims(spec: &LossSpec, shape: &Shape) -> Dims {
    let s = shape.pixels();
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    Dims {
        batch: shape.batch as u32,
        spatial: s as u32,
        tiles_per_image: s.div_ceil(STATS_TILE) as u32,
        row_width: row_width(shape.classes) as u32,
        n_terms: spec.terms.len() as u32,
        n_pixel_terms: n_pix as u32,
        n_stat_terms: (spec.terms.len() - n_pix) as u32,
        temperature: spec.temperature() as f32,
        total_batch: shape.batch as u32,
        rows_per_tile: 1,
        ..Default::default()
    }
}

/// Whether any term needs a per-pixel loss map (cross-entropy with reduction none).
pub fn wants_loss_map(spec: &LossSpec) -> bool {
    pixel_maps(spec) != 0
}

/// Whether the activation is sigmoid.
pub fn sigmoid(spec: &LossSpec) -> bool {
    spec.activation == Activation::Sigmoid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_align_down_and_shift_back() {
        // f32 array at byte 0, elements 100..200, 256-byte alignment: binding from byte 256.
        let r = region(0, 100, 100, 1, 256);
        assert_eq!((r.offset, r.size), (256, 544));
        assert_eq!(100u32.wrapping_add(r.shift), 36); // element 100 is word 36 of the binding
                                                      // u8 labels packed 4 per word at byte 1024, pixels 7..15.
        let r = region(1024, 7, 8, 4, 256);
        assert_eq!(r.offset, 1024);
        assert_eq!(7u32.wrapping_add(r.shift), 7);
        assert_eq!(r.size, 16);
        // f16 logits: element 513 → word 256 + 0, half 1, binding at byte 1024.
        let r = region(0, 513, 10, 2, 256);
        assert_eq!(r.offset, 1024);
        let idx = 513u32.wrapping_add(r.shift);
        assert_eq!((idx >> 1, idx & 1), (0, 1));
        assert_eq!(r.size, 4 * ((523u64).div_ceil(2) - 256));
    }

    #[test]
    fn chunks_cover_the_batch_within_the_limit() {
        assert_eq!(chunks(3, 100, 1 << 20, 256).unwrap(), vec![(0, 3)]);
        let c = chunks(5, 64 << 20, 128 << 20, 256).unwrap();
        assert_eq!(c, vec![(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]);
        let c = chunks(7, 30 << 20, 128 << 20, 256).unwrap();
        assert_eq!(c, vec![(0, 4), (4, 3)]);
        assert!(chunks(1, 200 << 20, 128 << 20, 256)
            .unwrap_err()
            .contains("max_storage_buffer_binding_size"));
    }

    #[test]
    fn fin_layout_is_contiguous() {
        let l = FinLayout::new(3, 4, 2);
        assert_eq!(l.report, 4 * 12 + MAX_PIXEL_TERMS);
        assert_eq!(l.pooled, l.elements + 2 * 12);
        assert_eq!(l.len, l.pooled + row_width(4));
    }
}
