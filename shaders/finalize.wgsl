// Stage 2b: one workgroup turns the statistics into every term's value and the gradient
// coefficients. It reads kilobytes. Each statistic term's rule is a function named like its
// CPU twin in src/reference/finalize.rs (`dice_term`, `tversky_term`, `gdl_term`,
// `region_term`).
//
// `fin` layout (offsets computed on the host, src/gpu/layout.rs `FinLayout`, and passed in
// Dims): COEFS coefficients per (image, class); one scale per pixel term; then the report:
// total, the term values, elements (terms·B·C); then a statistics row summed over all
// images. The proportions û, τ and the decomposition are reporting only: the host derives
// them from the statistic rows it reads back (src/reference/finalize.rs `proportions`), so
// no device pass spends time on them.

// The header is bound as a storage buffer here, not a uniform one as in the pixel stages:
// lavapipe (Mesa 22) inlines uniform values that loop bounds depend on (dims.batch,
// dims.n_terms, ...) and, for shaders that grow when their loops unroll, recompiles them at
// every dispatch. That cost ~10 ms a call for B = 8; the loops here are short anyway.
@group(0) @binding(2) var<storage, read> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(4) var<storage, read> partial: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> fin: array<f32>;

// The statistic-term kinds of the spec, bit k for kind code k: the rules of absent kinds
// are compiled out (SIMD CPUs run every branch under a mask; most of the ~20 ms the four
// rules once cost on lavapipe turned out to be the per-dispatch recompilation above).
override STAT_KINDS: u32 = 0xFFu;

fn has_kind(kind: u32) -> bool {
    return (STAT_KINDS & (1u << kind)) != 0u;
}

// src/reference/finalize.rs PROPORTION_EPS and DENOMINATOR_FLOOR.
const EPS: f32 = 1e-10;
const FLOOR: f32 = 1e-7;

// finalize_terms runs as one workgroup of FIN_WG invocations that split each term's classes
// (or, for generalized Dice, its groups) between them. Why not one invocation: llvmpipe ends
// an invocation's loops after 65 535 iterations in all, which one invocation doing every
// term reached at about B·C = 2 000 (16 images of 150 classes gave a wrong loss); GPUs get
// 64-way parallelism for free. Each invocation writes the coefficients of its own classes
// (or groups), and the term values are summed over the workgroup in a fixed order.

var<workgroup> part: array<f32, FIN_WG>;

// The sum of every invocation's v, in invocation order (the result is for invocation 0).
fn workgroup_total(lid: u32, v: f32) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    var s = 0.0;
    if lid == 0u {
        for (var k = 0u; k < FIN_WG; k++) {
            s += part[k];
        }
    }
    workgroupBarrier();
    return s;
}

fn stat(b: u32, col: u32) -> f32 {
    return stats[b * dims.row_width + col];
}

// Start of the pooled row in `fin`: column sums of the statistics over all images, written
// first, so a batch-pooled statistic is one read.
fn pooled_row() -> u32 {
    return dims.fin_pooled;
}

// Statistic k (STAT_P … STAT_U) of class c over the group b0..b1: one image, or all of them.
fn pooled(b0: u32, b1: u32, c: u32, k: u32) -> f32 {
    if b1 - b0 == 1u {
        return stat(b0, c * PER_CLASS + k);
    }
    return fin[pooled_row() + c * PER_CLASS + k];
}

fn valid_in(b0: u32, b1: u32) -> f32 {
    if b1 - b0 == 1u {
        return stat(b0, C * PER_CLASS + ROW_VALID);
    }
    return fin[pooled_row() + C * PER_CLASS + ROW_VALID];
}

fn add_coef(b0: u32, b1: u32, c: u32, slot: u32, v: f32) {
    for (var b = b0; b < b1; b++) {
        fin[(b * C + c) * COEFS + slot] += v;
    }
}

fn group_start(g: u32, pooled_batch: bool) -> u32 {
    return select(g, 0u, pooled_batch);
}

fn group_end(g: u32, pooled_batch: bool) -> u32 {
    return select(g + 1u, dims.batch, pooled_batch);
}

// This invocation's share of a Dice-family term (its classes c0 + lid, c0 + lid + FIN_WG, …).
fn dice_term(lid: u32, slot: u32, lambda: f32, r: u32, elem_off: u32) -> f32 {
    let c0 = select(1u, 0u, record(slot, DICE_BACKGROUND) != 0.0);
    let squared = record(slot, DICE_SQUARED) != 0.0;
    let jaccard = record(slot, DICE_JACCARD) != 0.0;
    let use_log = record(slot, DICE_LOG) != 0.0;
    let batch = record(slot, DICE_BATCH) != 0.0;
    let snr = record(slot, DICE_SMOOTH_NR);
    let sdr = record(slot, DICE_SMOOTH_DR);
    let skip_empty = record(slot, DICE_SKIP_EMPTY) != 0.0;
    let reduction = u32(record(slot, DICE_REDUCTION));
    let groups = select(dims.batch, 1u, batch);
    var norm = 1.0;
    if reduction == REDUCTION_MEAN {
        norm = f32(groups * (C - c0));
    }
    var total = 0.0;
    for (var c = c0 + lid; c < C; c += FIN_WG) {
        let w = class_param(slot, c);
        for (var g = 0u; g < groups; g++) {
            let b0 = group_start(g, batch);
            let b1 = group_end(g, batch);
            let gs = pooled(b0, b1, c, STAT_G);
            if valid_in(b0, b1) == 0.0 || (skip_empty && gs == 0.0) {
                continue;
            }
            let i = pooled(b0, b1, c, STAT_I);
            var pp = pooled(b0, b1, c, STAT_P);
            var gg = gs;
            if squared {
                pp = pooled(b0, b1, c, STAT_Q);
                gg = pooled(b0, b1, c, STAT_H);
            }
            let num = 2.0 * i + snr;
            var den_raw = pp + gg + sdr;
            if jaccard {
                den_raw = 2.0 * (pp + gg - i) + sdr;
            }
            let clamped = den_raw < FLOOR;
            let den = max(den_raw, FLOOR);
            let ratio = num / den;
            var f = 1.0 - ratio;
            var df_dr = -1.0;
            if use_log {
                f = -log(max(ratio, FLOOR));
                df_dr = select(0.0, -1.0 / ratio, ratio > FLOOR);
            }
            var dr_di = 2.0 / den;
            var dr_dp = 0.0;
            if !clamped {
                if jaccard {
                    dr_di += 2.0 * ratio / den;
                    dr_dp = -2.0 * ratio / den;
                } else {
                    dr_dp = -ratio / den;
                }
            }
            total += w * f;
            if reduction == REDUCTION_NONE {
                fin[elem_off + r * dims.batch * C + g * C + c] = w * f;
            }
            let k = lambda * w * df_dr / norm;
            add_coef(b0, b1, c, COEF_I, k * dr_di);
            add_coef(b0, b1, c, select(COEF_P, COEF_Q, squared), k * dr_dp);
        }
    }
    return total / norm;
}

fn tversky_term(lid: u32, slot: u32, lambda: f32) -> f32 {
    let alpha = record(slot, TVERSKY_ALPHA);
    let beta = record(slot, TVERSKY_BETA);
    let gamma = record(slot, TVERSKY_GAMMA);
    let c0 = select(1u, 0u, record(slot, TVERSKY_BACKGROUND) != 0.0);
    let batch = record(slot, TVERSKY_BATCH) != 0.0;
    let snr = record(slot, TVERSKY_SMOOTH_NR);
    let sdr = record(slot, TVERSKY_SMOOTH_DR);
    let groups = select(dims.batch, 1u, batch);
    let norm = f32(groups * (C - c0));
    var total = 0.0;
    for (var c = c0 + lid; c < C; c += FIN_WG) {
        for (var g = 0u; g < groups; g++) {
            let b0 = group_start(g, batch);
            let b1 = group_end(g, batch);
            if valid_in(b0, b1) == 0.0 {
                continue;
            }
            let p = pooled(b0, b1, c, STAT_P);
            let i = pooled(b0, b1, c, STAT_I);
            let gs = pooled(b0, b1, c, STAT_G);
            let den_raw = i + alpha * (p - i) + beta * (gs - i) + sdr;
            let clamped = den_raw < FLOOR;
            let den = max(den_raw, FLOOR);
            let ti = (i + snr) / den;
            var f = 1.0 - ti;
            var df = -1.0;
            if gamma != 1.0 {
                let x = max(1.0 - ti, 0.0);
                f = safe_pow(x, gamma);
                df = select(0.0, -gamma * safe_pow(x, gamma - 1.0), x > 0.0);
            }
            var dti_di = 1.0 / den;
            var dti_dp = 0.0;
            if !clamped {
                dti_di = (1.0 - ti * (1.0 - alpha - beta)) / den;
                dti_dp = -ti * alpha / den;
            }
            total += f;
            let k = lambda * df / norm;
            add_coef(b0, b1, c, COEF_I, k * dti_di);
            add_coef(b0, b1, c, COEF_P, k * dti_dp);
        }
    }
    return total / norm;
}

fn gdl_weight(w_type: u32, gs: f32) -> f32 {
    if w_type == GDL_WEIGHT_UNIFORM {
        return 1.0;
    }
    if gs == 0.0 {
        return -1.0; // infinite: replaced below by the largest finite weight
    }
    return select(1.0 / (gs * gs), 1.0 / gs, w_type == GDL_WEIGHT_SIMPLE);
}

// This invocation's share of a generalized Dice term: its groups (the classes of a group
// are tied together by the class weights).
fn gdl_term(lid: u32, slot: u32, lambda: f32) -> f32 {
    let w_type = u32(record(slot, GDL_WEIGHTING));
    let c0 = select(1u, 0u, record(slot, GDL_BACKGROUND) != 0.0);
    let batch = record(slot, GDL_BATCH) != 0.0;
    let snr = record(slot, GDL_SMOOTH_NR);
    let sdr = record(slot, GDL_SMOOTH_DR);
    let groups = select(dims.batch, 1u, batch);
    let norm = f32(groups);
    var total = 0.0;
    for (var g = lid; g < groups; g += FIN_WG) {
        let b0 = group_start(g, batch);
        let b1 = group_end(g, batch);
        if valid_in(b0, b1) == 0.0 {
            continue;
        }
        var max_w = 0.0;
        for (var c = c0; c < C; c++) {
            max_w = max(max_w, gdl_weight(w_type, pooled(b0, b1, c, STAT_G)));
        }
        var num = snr;
        var den_raw = sdr;
        for (var c = c0; c < C; c++) {
            var w = gdl_weight(w_type, pooled(b0, b1, c, STAT_G));
            w = select(w, max_w, w < 0.0);
            num += 2.0 * w * pooled(b0, b1, c, STAT_I);
            den_raw += w * (pooled(b0, b1, c, STAT_P) + pooled(b0, b1, c, STAT_G));
        }
        let clamped = den_raw < FLOOR;
        let den = max(den_raw, FLOOR);
        total += 1.0 - num / den;
        for (var c = c0; c < C; c++) {
            var w = gdl_weight(w_type, pooled(b0, b1, c, STAT_G));
            w = select(w, max_w, w < 0.0);
            add_coef(b0, b1, c, COEF_I, lambda * (-2.0 * w / den) / norm);
            if !clamped {
                add_coef(b0, b1, c, COEF_P, lambda * (num * w / (den * den)) / norm);
            }
        }
    }
    return total / norm;
}

// x·log(x/y) with 0·log 0 = 0.
fn xlogy(x: f32, y: f32) -> f32 {
    if x == 0.0 {
        return 0.0;
    }
    return x * log(x / y);
}

fn region_term(lid: u32, slot: u32, lambda: f32) -> f32 {
    let penalty = u32(record(slot, REGION_PENALTY));
    let tgt = u32(record(slot, REGION_TARGET));
    var norm = f32(dims.batch * C);
    if penalty == PENALTY_KL {
        norm = f32(dims.batch);
    }
    var total = 0.0;
    for (var c = lid; c < C; c += FIN_WG) {
        for (var b = 0u; b < dims.batch; b++) {
            let n = valid_in(b, b + 1u);
            if n == 0.0 {
                continue;
            }
            let us = pooled(b, b + 1u, c, STAT_U);
            let gs = pooled(b, b + 1u, c, STAT_G);
            let u = (us + EPS) / (n + EPS);
            var tau = (gs + EPS) / (n + EPS);
            var one_minus_tau = (n - gs + EPS) / (n + EPS);
            if tgt == TARGET_UNIFORM {
                tau = select(1.0 / f32(C), 0.5, SIGMOID);
                one_minus_tau = 1.0 - tau;
            } else if tgt == TARGET_PRIOR {
                tau = class_param(slot, c);
                one_minus_tau = 1.0 - tau;
            }
            var f: f32;
            var df: f32;
            if penalty == PENALTY_L1 {
                f = abs(u - tau);
                df = sign(u - tau);
            } else if penalty == PENALTY_L2 {
                f = (u - tau) * (u - tau);
                df = 2.0 * (u - tau);
            } else if penalty == PENALTY_LOG_SUM {
                f = log(u + tau + EPS);
                df = 1.0 / (u + tau + EPS);
            } else {
                f = xlogy(tau, u);
                df = -tau / u;
                if SIGMOID {
                    let one_minus_u = (n - us + EPS) / (n + EPS);
                    f += xlogy(one_minus_tau, one_minus_u);
                    df += one_minus_tau / one_minus_u;
                }
            }
            total += f;
            add_coef(b, b + 1u, c, COEF_U, lambda * df / (n + EPS) / norm);
        }
    }
    return total / norm;
}

@compute @workgroup_size(FIN_WG)
fn finalize_terms(@builtin(local_invocation_index) lid: u32) {
    let bc = dims.batch * C;
    let report = dims.fin_report;
    let values_off = report + 1u;
    let elem_off = dims.fin_elements;
    // Coefficients and pixel-term scales start at zero: the terms add to them.
    for (var k = lid; k < dims.fin_scales + MAX_PIXEL_TERMS; k += FIN_WG) {
        fin[k] = 0.0;
    }
    for (var k = lid; k < dims.n_terms * bc; k += FIN_WG) {
        fin[elem_off + k] = 0.0;
    }
    // The gradient's upstream scale: 1 unless a backward recording copies the caller's in.
    if lid == 0u {
        fin[dims.fin_upstream] = 1.0;
    }
    // Small calls (dims.fin_sums_partial = 1): the stats stage's partial rows added here into
    // one statistics row per image, in sum_tiles.wgsl's order (a tile's rows, then the
    // tiles), so the bits are those of the two dispatches this replaces.
    if dims.fin_sums_partial != 0u {
        for (var j = lid; j < dims.batch * dims.row_width; j += FIN_WG) {
            let col = j % dims.row_width;
            let first_tile = (j / dims.row_width) * dims.tiles_per_image;
            var s = 0.0;
            for (var t = 0u; t < dims.tiles_per_image; t++) {
                let first = (first_tile + t) * dims.rows_per_tile * dims.row_width + col;
                var in_tile = 0.0;
                for (var r = 0u; r < dims.rows_per_tile; r++) {
                    in_tile += partial[first + r * dims.row_width];
                }
                s += in_tile;
            }
            stats[j] = s;
        }
        // (`dims` is read-only storage, so the condition is uniform and the barrier may
        // sit here.)
        storageBarrier();
    }
    // The pooled row, column by column.
    for (var col = lid; col < dims.row_width; col += FIN_WG) {
        var s = 0.0;
        for (var b = 0u; b < dims.batch; b++) {
            s += stat(b, col);
        }
        fin[pooled_row() + col] = s;
    }
    storageBarrier();
    var total = 0.0;
    for (var t = 0u; t < dims.n_pixel_terms; t++) {
        var loss = 0.0;
        var n = 0.0;
        for (var b = lid; b < dims.batch; b += FIN_WG) {
            loss += stat(b, C * PER_CLASS + ROW_LOSS + t);
            n += stat(b, C * PER_CLASS + ROW_NORM + t);
        }
        loss = workgroup_total(lid, loss);
        n = workgroup_total(lid, n);
        if lid == 0u {
            let lambda = record(t, REC_WEIGHT);
            let mean = !(u32(record(t, REC_KIND)) == KIND_CE && u32(record(t, CE_REDUCTION)) != REDUCTION_MEAN);
            let w = select(1.0, n, mean);
            var value = 0.0;
            if w > 0.0 {
                value = loss / w;
                fin[dims.fin_scales + t] = lambda / w;
            }
            fin[values_off + u32(record(t, REC_POSITION))] = value;
            total += lambda * value;
        }
    }
    for (var j = 0u; j < dims.n_stat_terms; j++) {
        let slot = MAX_PIXEL_TERMS + j;
        let kind = u32(record(slot, REC_KIND));
        let lambda = record(slot, REC_WEIGHT);
        let r = u32(record(slot, REC_POSITION));
        var value = 0.0;
        if has_kind(KIND_DICE) && kind == KIND_DICE {
            value = dice_term(lid, slot, lambda, r, elem_off);
        }
        if has_kind(KIND_TVERSKY) && kind == KIND_TVERSKY {
            value = tversky_term(lid, slot, lambda);
        }
        if has_kind(KIND_GDL) && kind == KIND_GDL {
            value = gdl_term(lid, slot, lambda);
        }
        if has_kind(KIND_REGION) && kind == KIND_REGION {
            value = region_term(lid, slot, lambda);
        }
        value = workgroup_total(lid, value);
        // The next term adds to coefficients this one wrote.
        storageBarrier();
        if lid == 0u {
            fin[values_off + r] = value;
            total += lambda * value;
        }
    }
    if lid == 0u {
        fin[report] = total;
    }
}
