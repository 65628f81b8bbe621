//! The spec compiled for the kernels (the term records of `params`, the override masks, the
//! `Dims` header) and the call split for the device (bound ranges, chunks, 2D dispatches).
//! The layouts themselves are named in layout.rs.

use super::layout::*;
use super::strategy::Strategy;
use crate::input::Shape;
use crate::spec::{
    Activation, LossSpec, NamedTarget, Penalty, Reduction, RegionTarget, Term, WeightType,
};

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

/// The most classes a call may have to take its pixels four at a time. llvmpipe unrolls the
/// four pixels of a quad, so the pixel loop's code is four times the scalar loop's: at
/// C = 4 the stats stage's hot loop spans 21 KiB of x86 (6 KiB one pixel at a time), and
/// past about five classes it outgrows the CPU's 32 KiB instruction cache. Measured on
/// lavapipe, one thread, interleaved (BENCHMARKS.md, "Quads"): DiceCE with its gradient
/// −13 to −22 % at C = 2, −4 to −11 % at 4, even at 5, +5 to +22 % at 6 and 8, +21 % at 21.
/// For the same reason a spec whose per-pixel code is longer takes no quads (`quads`).
pub const QUAD_CLASSES: u32 = 4;

/// Whether a call's register-path pixel stages take their pixels four at a time, one vec4 a
/// class (pixels.wgsl `QUADS`): where the strategy asks for it (`Strategy::quad_pixels`)
/// and gives each invocation a run of consecutive pixels (`v.contiguous`), with NCHW f32
/// logits, class-index labels and at most [`QUAD_CLASSES`] classes, where every quad is
/// whole and on a 16-byte boundary of each bound range: pixels per image a multiple of 4,
/// and each chunk's logit and gradient shifts multiples of 4 (its u8 label shift too, u16
/// a multiple of 2, so a quad's labels are one word or two). Not with a tempered region
/// term: its longer per-pixel code (two softmaxes), four times over, measured 15–25 %
/// slower than one pixel at a time at four classes (BENCHMARKS.md, "Quads"). `slots` are
/// the chunks' `Dims` (`plan_chunks`, after the header).
pub fn quads(
    strategy: &Strategy,
    v: &super::stages::Variant,
    pixels: usize,
    slots: &[Dims],
) -> bool {
    let label_align = match v.label_kind {
        LABELS_SOFT => return false,
        LABELS_U8 => 4,
        LABELS_U16 => 2,
        _ => 1,
    };
    v.classes <= QUAD_CLASSES
        && !v.tempered
        && aligned_quads(strategy, v, pixels, slots)
        && slots
            .iter()
            .all(|d| d.label_shift.is_multiple_of(label_align))
}

/// Whether the chunked grad stage (`Variant::grad_chunks`) reads and writes four pixels a
/// vec4 (grad.wgsl `grad_chunk_quads`): wherever every quad of logits and gradient is whole
/// and aligned, at any class count and with any term. Its per-pixel code is short (a chunk
/// of 8 classes), so the four-times-longer loop that limits the other stages' quads stays
/// small; it reads labels pixel by pixel, so any label form goes.
pub fn chunk_quads(
    strategy: &Strategy,
    v: &super::stages::Variant,
    pixels: usize,
    slots: &[Dims],
) -> bool {
    v.grad_chunks && aligned_quads(strategy, v, pixels, slots)
}

/// What quads of logits and gradient need: runs of consecutive pixels per invocation,
/// NCHW f32 logits, pixels per image and every chunk's logit and gradient shifts multiples
/// of 4.
fn aligned_quads(
    strategy: &Strategy,
    v: &super::stages::Variant,
    pixels: usize,
    slots: &[Dims],
) -> bool {
    strategy.quad_pixels
        && v.contiguous
        && !v.nhwc
        && v.logit_kind == FLOAT_F32
        && pixels.is_multiple_of(4)
        && slots
            .iter()
            .all(|d| d.logit_shift.is_multiple_of(4) && d.grad_shift.is_multiple_of(4))
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

/// The statistic-term kinds of a spec as a bit mask (bit k: kind code k of layout.rs), an
/// override of the finalize pipeline so only the term rules the spec uses are compiled.
pub fn stat_kinds(spec: &LossSpec) -> u32 {
    spec.terms
        .iter()
        .map(|t| match t {
            Term::Dice { .. } => 1 << KIND_DICE,
            Term::Tversky { .. } => 1 << KIND_TVERSKY,
            Term::GeneralizedDice { .. } => 1 << KIND_GDL,
            Term::Region { .. } => 1 << KIND_REGION,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The coefficient slots (bit `COEF_P`, `COEF_Q`, `COEF_I`, `COEF_U`) that the spec's
/// statistic terms can make nonzero, as finalize.wgsl writes them: a Dice-family term its
/// ∂L/∂I and ∂L/∂P (∂L/∂Q with squared denominators), Tversky and generalized Dice ∂L/∂I
/// and ∂L/∂P, a region term ∂L/∂U. An override of the gradient's pipelines, which read no
/// other slot (grad_pixel.wgsl `COEFS_USED`).
pub fn coefs_used(spec: &LossSpec) -> u32 {
    let bit = |slot: u32| 1u32 << slot;
    spec.terms
        .iter()
        .map(|t| match t {
            Term::Dice { squared, .. } => bit(COEF_I) | bit(if *squared { COEF_Q } else { COEF_P }),
            Term::Tversky { .. } | Term::GeneralizedDice { .. } => bit(COEF_I) | bit(COEF_P),
            Term::Region { .. } => bit(COEF_U),
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The pixel-term kinds of a spec as a bit mask (bit k: kind code k), an override of the
/// stats and grad pipelines.
pub fn pixel_kinds(spec: &LossSpec) -> u32 {
    spec.terms
        .iter()
        .map(|t| match t {
            Term::CrossEntropy { .. } => 1 << KIND_CE,
            Term::Focal { .. } => 1 << KIND_FOCAL,
            Term::Bce { .. } => 1 << KIND_BCE,
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

/// Splits `groups` workgroups over a 2D dispatch (at most 65535 per dimension).
pub fn dispatch_2d(groups: usize) -> (u32, u32) {
    let x = groups.clamp(1, 65535);
    (x as u32, groups.div_ceil(x).max(1) as u32)
}

fn flag(v: bool) -> f32 {
    if v {
        1.0
    } else {
        0.0
    }
}

fn reduction_code(r: Reduction) -> f32 {
    (match r {
        Reduction::Mean => REDUCTION_MEAN,
        Reduction::Sum => REDUCTION_SUM,
        Reduction::None => REDUCTION_NONE,
    }) as f32
}

/// A term's record (kind, options; the shared fields are filled by `pack_params`) and its
/// per-class vector, if any. The shader reads the same fields by the same names
/// (layout.rs), each term's in its rule in finalize.wgsl or the pixel stages. Long, but a
/// flat list of field assignments, one arm per term: split, the record format would scatter.
fn term_record(term: &Term) -> ([f32; RECORD as usize], Option<Vec<f64>>) {
    let mut rec = [0.0f32; RECORD as usize];
    let mut set = |field: u32, v: f32| rec[field as usize] = v;
    let vector = match term {
        Term::CrossEntropy {
            class_weights,
            label_smoothing,
            reduction,
            ..
        } => {
            set(REC_KIND, KIND_CE as f32);
            set(PIXEL_OPTION, *label_smoothing as f32);
            set(CE_REDUCTION, reduction_code(*reduction));
            class_weights.clone()
        }
        Term::Focal { gamma, alpha, .. } => {
            set(REC_KIND, KIND_FOCAL as f32);
            set(PIXEL_OPTION, *gamma as f32);
            alpha.clone()
        }
        Term::Bce { pos_weight, .. } => {
            set(REC_KIND, KIND_BCE as f32);
            pos_weight.clone()
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
            set(REC_KIND, KIND_DICE as f32);
            set(DICE_BACKGROUND, flag(*include_background));
            set(DICE_SQUARED, flag(*squared));
            set(DICE_JACCARD, flag(*jaccard));
            set(DICE_LOG, flag(*log));
            set(DICE_BATCH, flag(*batch));
            set(DICE_SMOOTH_NR, *smooth_nr as f32);
            set(DICE_SMOOTH_DR, *smooth_dr as f32);
            set(DICE_SKIP_EMPTY, flag(*skip_empty));
            set(DICE_REDUCTION, reduction_code(*reduction));
            class_weights.clone()
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
            set(REC_KIND, KIND_TVERSKY as f32);
            set(TVERSKY_ALPHA, *alpha as f32);
            set(TVERSKY_BETA, *beta as f32);
            set(TVERSKY_GAMMA, *gamma as f32);
            set(TVERSKY_BACKGROUND, flag(*include_background));
            set(TVERSKY_BATCH, flag(*batch));
            set(TVERSKY_SMOOTH_NR, *smooth_nr as f32);
            set(TVERSKY_SMOOTH_DR, *smooth_dr as f32);
            None
        }
        Term::GeneralizedDice {
            w_type,
            include_background,
            batch,
            smooth_nr,
            smooth_dr,
            ..
        } => {
            set(REC_KIND, KIND_GDL as f32);
            let weighting = match w_type {
                WeightType::Square => GDL_WEIGHT_SQUARE,
                WeightType::Simple => GDL_WEIGHT_SIMPLE,
                WeightType::Uniform => GDL_WEIGHT_UNIFORM,
            };
            set(GDL_WEIGHTING, weighting as f32);
            set(GDL_BACKGROUND, flag(*include_background));
            set(GDL_BATCH, flag(*batch));
            set(GDL_SMOOTH_NR, *smooth_nr as f32);
            set(GDL_SMOOTH_DR, *smooth_dr as f32);
            None
        }
        Term::Region {
            penalty, target, ..
        } => {
            set(REC_KIND, KIND_REGION as f32);
            let penalty = match penalty {
                Penalty::L1 => PENALTY_L1,
                Penalty::Kl => PENALTY_KL,
                Penalty::L2 => PENALTY_L2,
                Penalty::LogSum => PENALTY_LOG_SUM,
            };
            set(REGION_PENALTY, penalty as f32);
            let (code, prior) = match target {
                RegionTarget::Named(NamedTarget::GroundTruth) => (TARGET_GROUND_TRUTH, None),
                RegionTarget::Named(NamedTarget::Uniform) => (TARGET_UNIFORM, None),
                RegionTarget::Prior(v) => (TARGET_PRIOR, Some(v.clone())),
            };
            set(REGION_TARGET, code as f32);
            prior
        }
    };
    (rec, vector)
}

/// Packs the spec's terms into the `params` array: pixel terms in slots
/// 0..MAX_PIXEL_TERMS, statistic terms after them, per-class vectors after all records.
pub fn pack_params(spec: &LossSpec, shape: &Shape) -> Vec<f32> {
    let record = RECORD as usize;
    let slots = (MAX_PIXEL_TERMS + MAX_TERMS) as usize;
    let mut params = vec![0.0f32; slots * record];
    let (mut pix, mut stat) = (0usize, MAX_PIXEL_TERMS as usize);
    for (r, term) in spec.terms.iter().enumerate() {
        let next = if term.is_pixel_term() {
            &mut pix
        } else {
            &mut stat
        };
        let slot = *next;
        *next += 1;
        let (mut rec, vector) = term_record(term);
        rec[REC_WEIGHT as usize] = term.weight() as f32;
        rec[REC_POSITION as usize] = r as f32;
        rec[REC_VECTOR as usize] = match vector {
            Some(v) => {
                let at = params.len() as f32;
                params.extend(v.iter().take(shape.classes).map(|x| *x as f32));
                at
            }
            None => -1.0,
        };
        params[slot * record..(slot + 1) * record].copy_from_slice(&rec);
    }
    params
}

/// The uniform header for a call over the whole batch (chunks adjust image_offset, batch
/// and the shifts), with `fin`'s offsets and the strategy's stats tiles of
/// `rows_per_tile` partial rows (`Strategy::rows_per_tile`).
pub fn dims(
    spec: &LossSpec,
    shape: &Shape,
    fin: &FinLayout,
    strategy: &Strategy,
    rows_per_tile: usize,
) -> Dims {
    let s = shape.pixels();
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    Dims {
        batch: shape.batch as u32,
        spatial: s as u32,
        tiles_per_image: s.div_ceil(strategy.stats_tile()) as u32,
        row_width: row_width(shape.classes) as u32,
        n_terms: spec.terms.len() as u32,
        n_pixel_terms: n_pix as u32,
        n_stat_terms: (spec.terms.len() - n_pix) as u32,
        temperature: spec.temperature() as f32,
        total_batch: shape.batch as u32,
        rows_per_tile: rows_per_tile as u32,
        fin_scales: fin.scales as u32,
        fin_report: fin.report as u32,
        fin_elements: fin.elements as u32,
        fin_pooled: fin.pooled as u32,
        fin_upstream: fin.upstream as u32,
        ignore_label: ignore_label(spec.ignore_index),
        ..Default::default()
    }
}

/// The ignore_index as the i32 bits I32/I64 labels compare with (−1 when it is outside
/// i32: negative labels are ignored anyway, and `check_request` refuses a positive one).
pub fn ignore_label(ignore_index: i64) -> u32 {
    i32::try_from(ignore_index).unwrap_or(-1) as u32
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

    /// Every coefficient slot the f64 finalize makes nonzero is one `coefs_used` lets the
    /// gradient read, for every statistic term and its options (a slot left out would be
    /// read as 0: a wrong gradient). And each term's own slots do turn up.
    #[test]
    fn coefs_used_covers_every_slot_finalize_writes() {
        use crate::input::{Labels, Shape};
        use crate::testing::{random_labels, Rng};
        let mut rng = Rng::new(77);
        let shape = Shape::new(2, 5, &[6, 7]);
        let z: Vec<f64> = (0..shape.len()).map(|_| rng.symmetric(3.0)).collect();
        let y = random_labels(&mut rng, &shape, 0.1);
        for (json, want) in [
            (r#"{"kind":"cross_entropy"}"#, 0),
            (r#"{"kind":"dice"}"#, 0b0101),
            (r#"{"kind":"dice","squared":true}"#, 0b0110),
            (r#"{"kind":"dice","jaccard":true,"log":true}"#, 0b0101),
            (r#"{"kind":"tversky","alpha":0.3,"beta":0.7}"#, 0b0101),
            (r#"{"kind":"generalized_dice"}"#, 0b0101),
            (
                r#"{"kind":"region","penalty":"l1","temperature":10}"#,
                0b1000,
            ),
            (r#"{"kind":"region","penalty":"kl"}"#, 0b1000),
        ] {
            let spec = LossSpec::from_json(&format!(r#"{{"terms":[{json}]}}"#)).unwrap();
            assert_eq!(coefs_used(&spec), want, "{json}");
            let (st, _) = crate::reference::statistics(&spec, &shape, &z, Labels::index(&y));
            let fin = crate::reference::finalize(&spec, &st);
            let written = fin.coef.iter().fold(0u32, |m, k| {
                (0..4).fold(m, |m, slot| m | (((k[slot] != 0.0) as u32) << slot))
            });
            assert_eq!(written, want, "{json}: slots finalize writes");
        }
    }

    #[test]
    fn quads_only_where_every_quad_is_whole_aligned_and_short() {
        use super::super::stages::Variant;
        let strategy = super::super::strategy::cpu_for_tests();
        let v = Variant {
            classes: 4,
            label_kind: LABELS_U8,
            logit_kind: FLOAT_F32,
            contiguous: true,
            ..Variant::default()
        };
        let aligned = Dims {
            logit_shift: 8,
            grad_shift: 0u32.wrapping_sub(4096),
            label_shift: 4,
            ..Dims::default()
        };
        assert!(quads(&strategy, &v, 96, &[aligned, aligned]));
        // Each condition alone turns them off.
        let off = Strategy {
            quad_pixels: false,
            ..strategy
        };
        assert!(!quads(&off, &v, 96, &[aligned]));
        assert!(!quads(&strategy, &v, 98, &[aligned]));
        for other in [
            Variant {
                contiguous: false,
                ..v
            },
            Variant { nhwc: true, ..v },
            Variant {
                logit_kind: FLOAT_F16,
                ..v
            },
            Variant {
                label_kind: LABELS_SOFT,
                ..v
            },
            Variant {
                classes: QUAD_CLASSES + 1,
                ..v
            },
            Variant {
                tempered: true,
                ..v
            },
        ] {
            assert!(!quads(&strategy, &other, 96, &[aligned]), "{other:?}");
        }
        for shifted in [
            Dims {
                logit_shift: 9,
                ..aligned
            },
            Dims {
                grad_shift: 2,
                ..aligned
            },
            Dims {
                label_shift: 6,
                ..aligned
            },
        ] {
            assert!(
                !quads(&strategy, &v, 96, &[aligned, shifted]),
                "{shifted:?}"
            );
        }
        // Class vectors are fine (read once an invocation).
        let weighted = Variant {
            pixel_weighted: 1,
            ..v
        };
        assert!(quads(&strategy, &weighted, 96, &[aligned]));
        // u16 labels need two-label alignment, 32-bit ones none.
        let u16 = Variant {
            label_kind: LABELS_U16,
            ..v
        };
        let even = Dims {
            label_shift: 6,
            ..aligned
        };
        assert!(quads(&strategy, &u16, 96, &[even]));
        assert!(!quads(
            &strategy,
            &u16,
            96,
            &[Dims {
                label_shift: 7,
                ..aligned
            }]
        ));
        let i32s = Variant {
            label_kind: LABELS_I32,
            ..v
        };
        assert!(quads(
            &strategy,
            &i32s,
            96,
            &[Dims {
                label_shift: 7,
                ..aligned
            }]
        ));
    }

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
}
