// Stage 2: adds the partial rows in a fixed order (reduce_rows, reduce_tiles), then one
// workgroup turns the statistics into every term's value and the gradient coefficients
// (finalize_terms). It reads kilobytes. CPU port: src/reference/finalize.rs.
//
// `fin` layout (offsets also in src/gpu/plan.rs): coefficients [∂L/∂P, ∂L/∂Q, ∂L/∂I, ∂L/∂U]
// per (image, class); one scale per pixel term; then the report: total, the term values,
// elements (terms·B·C); then a statistics row summed over all images. The proportions û, τ and the decomposition are reporting only: the
// host derives them from the statistic rows it reads back (src/reference/finalize.rs
// `proportions`), so no device pass spends time on them.

// The header is bound as a storage buffer here, not a uniform one as in the pixel stages:
// lavapipe (Mesa 22) inlines uniform values that loop bounds depend on (dims.batch,
// dims.n_terms, ...) and, for shaders that grow when their loops unroll, recompiles them at
// every dispatch. That cost ~10 ms a call for B = 8; the loops here are short anyway.
@group(0) @binding(2) var<storage, read> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> fin: array<f32>;

// Needed by common.wgsl's label helpers, never read here.
@group(0) @binding(0) var<storage, read> logits: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;

// The statistic-term kinds of the spec, bit k for kind code k: the rules of absent kinds
// are compiled out (SIMD CPUs run every branch under a mask; most of the ~20 ms the four
// rules once cost on lavapipe turned out to be the per-dispatch recompilation above).
override STAT_KINDS: u32 = 0xFFu;

fn has_kind(kind: u32) -> bool {
    return (STAT_KINDS & (1u << kind)) != 0u;
}

// Term values in the report (plan.rs MAX_TERMS).
const MAX_TERMS: u32 = 16u;
const EPS: f32 = 1e-10;
const FLOOR: f32 = 1e-7;

// With a partial row per subgroup (dims.rows_per_tile > 1), adds each tile's rows into its
// first row, before reduce_tiles adds the tiles. Two passes, not one loop over every row:
// llvmpipe ends an invocation's loops after 65 535 iterations in all (a 4200² image has
// 2154 tiles of 32 rows there).
@compute @workgroup_size(64)
fn reduce_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * 64u;
    if j >= dims.batch * dims.tiles_per_image * dims.row_width {
        return;
    }
    let first = (j / dims.row_width) * dims.rows_per_tile * dims.row_width + j % dims.row_width;
    var s = 0.0;
    for (var r = 0u; r < dims.rows_per_tile; r++) {
        s += partial[first + r * dims.row_width];
    }
    partial[first] = s;
}

@compute @workgroup_size(64)
fn reduce_tiles(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * 64u;
    if j >= dims.batch * dims.row_width {
        return;
    }
    let b = j / dims.row_width;
    let col = j % dims.row_width;
    // Each tile's rows were added into its first row by reduce_rows (or it has one row).
    let stride = dims.rows_per_tile * dims.row_width;
    var s = 0.0;
    for (var t = 0u; t < dims.tiles_per_image; t++) {
        s += partial[(b * dims.tiles_per_image + t) * stride + col];
    }
    stats[j] = s;
}

// finalize_terms runs as one workgroup of FIN_WG invocations that split each term's classes
// (or, for generalized Dice, its groups) between them. Why not one invocation: llvmpipe ends
// an invocation's loops after 65 535 iterations in all, which one invocation doing every
// term reached at about B·C = 2 000 (16 images of 150 classes gave a wrong loss); GPUs get
// 64-way parallelism for free. Each invocation writes the coefficients of its own classes
// (or groups), and the term values are summed over the workgroup in a fixed order.
const FIN_WG: u32 = 64u;

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
// first, so a batch-pooled statistic is one read (plan.rs `FinLayout::pooled`).
fn pooled_row() -> u32 {
    return 4u * dims.batch * C + MAX_PIXEL_TERMS + 1u + MAX_TERMS + dims.n_terms * dims.batch * C;
}

// Statistic k (0 P, 1 Q, 2 I, 3 G, 4 H, 5 U) of class c over the group b0..b1: one image, or
// all of them.
fn pooled(b0: u32, b1: u32, c: u32, k: u32) -> f32 {
    if b1 - b0 == 1u {
        return stat(b0, c * PER_CLASS + k);
    }
    return fin[pooled_row() + c * PER_CLASS + k];
}

fn valid_in(b0: u32, b1: u32) -> f32 {
    if b1 - b0 == 1u {
        return stat(b0, C * PER_CLASS);
    }
    return fin[pooled_row() + C * PER_CLASS];
}

fn add_coef(b0: u32, b1: u32, c: u32, slot: u32, v: f32) {
    for (var b = b0; b < b1; b++) {
        fin[(b * C + c) * 4u + slot] += v;
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
    let c0 = select(1u, 0u, record(slot, 4u) != 0.0);
    let squared = record(slot, 5u) != 0.0;
    let jaccard = record(slot, 6u) != 0.0;
    let use_log = record(slot, 7u) != 0.0;
    let batch = record(slot, 8u) != 0.0;
    let snr = record(slot, 9u);
    let sdr = record(slot, 10u);
    let skip_empty = record(slot, 11u) != 0.0;
    let reduction = u32(record(slot, 12u));
    let groups = select(dims.batch, 1u, batch);
    var norm = 1.0;
    if reduction == 0u {
        norm = f32(groups * (C - c0));
    }
    var total = 0.0;
    for (var c = c0 + lid; c < C; c += FIN_WG) {
        let w = class_param(slot, c);
        for (var g = 0u; g < groups; g++) {
            let b0 = group_start(g, batch);
            let b1 = group_end(g, batch);
            let gs = pooled(b0, b1, c, 3u);
            if valid_in(b0, b1) == 0.0 || (skip_empty && gs == 0.0) {
                continue;
            }
            let i = pooled(b0, b1, c, 2u);
            var pp = pooled(b0, b1, c, 0u);
            var gg = gs;
            if squared {
                pp = pooled(b0, b1, c, 1u);
                gg = pooled(b0, b1, c, 4u);
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
            if reduction == 2u {
                fin[elem_off + r * dims.batch * C + g * C + c] = w * f;
            }
            let k = lambda * w * df_dr / norm;
            add_coef(b0, b1, c, 2u, k * dr_di);
            add_coef(b0, b1, c, select(0u, 1u, squared), k * dr_dp);
        }
    }
    return total / norm;
}

fn tversky_term(lid: u32, slot: u32, lambda: f32) -> f32 {
    let alpha = record(slot, 4u);
    let beta = record(slot, 5u);
    let gamma = record(slot, 6u);
    let c0 = select(1u, 0u, record(slot, 7u) != 0.0);
    let batch = record(slot, 8u) != 0.0;
    let snr = record(slot, 9u);
    let sdr = record(slot, 10u);
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
            let p = pooled(b0, b1, c, 0u);
            let i = pooled(b0, b1, c, 2u);
            let gs = pooled(b0, b1, c, 3u);
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
            add_coef(b0, b1, c, 2u, k * dti_di);
            add_coef(b0, b1, c, 0u, k * dti_dp);
        }
    }
    return total / norm;
}

fn gdl_weight(w_type: u32, gs: f32) -> f32 {
    if w_type == 2u {
        return 1.0;
    }
    if gs == 0.0 {
        return -1.0; // infinite: replaced below by the largest finite weight
    }
    return select(1.0 / (gs * gs), 1.0 / gs, w_type == 1u);
}

// This invocation's share of a generalized Dice term: its groups (the classes of a group
// are tied together by the class weights).
fn gdl_term(lid: u32, slot: u32, lambda: f32) -> f32 {
    let w_type = u32(record(slot, 4u));
    let c0 = select(1u, 0u, record(slot, 5u) != 0.0);
    let batch = record(slot, 6u) != 0.0;
    let snr = record(slot, 9u);
    let sdr = record(slot, 10u);
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
            max_w = max(max_w, gdl_weight(w_type, pooled(b0, b1, c, 3u)));
        }
        var num = snr;
        var den_raw = sdr;
        for (var c = c0; c < C; c++) {
            var w = gdl_weight(w_type, pooled(b0, b1, c, 3u));
            w = select(w, max_w, w < 0.0);
            num += 2.0 * w * pooled(b0, b1, c, 2u);
            den_raw += w * (pooled(b0, b1, c, 0u) + pooled(b0, b1, c, 3u));
        }
        let clamped = den_raw < FLOOR;
        let den = max(den_raw, FLOOR);
        total += 1.0 - num / den;
        for (var c = c0; c < C; c++) {
            var w = gdl_weight(w_type, pooled(b0, b1, c, 3u));
            w = select(w, max_w, w < 0.0);
            add_coef(b0, b1, c, 2u, lambda * (-2.0 * w / den) / norm);
            if !clamped {
                add_coef(b0, b1, c, 0u, lambda * (num * w / (den * den)) / norm);
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
    let penalty = u32(record(slot, 4u)); // 0 l1, 1 kl, 2 l2, 3 log_sum
    let tgt = u32(record(slot, 5u));     // 0 ground truth, 1 uniform, 2 prior
    var norm = f32(dims.batch * C);
    if penalty == 1u {
        norm = f32(dims.batch);
    }
    var total = 0.0;
    for (var c = lid; c < C; c += FIN_WG) {
        for (var b = 0u; b < dims.batch; b++) {
            let n = valid_in(b, b + 1u);
            if n == 0.0 {
                continue;
            }
            let us = pooled(b, b + 1u, c, 5u);
            let gs = pooled(b, b + 1u, c, 3u);
            let u = (us + EPS) / (n + EPS);
            var tau = (gs + EPS) / (n + EPS);
            var one_minus_tau = (n - gs + EPS) / (n + EPS);
            if tgt == 1u {
                tau = select(1.0 / f32(C), 0.5, SIGMOID);
                one_minus_tau = 1.0 - tau;
            } else if tgt == 2u {
                tau = class_param(slot, c);
                one_minus_tau = 1.0 - tau;
            }
            var f: f32;
            var df: f32;
            if penalty == 0u {
                f = abs(u - tau);
                df = sign(u - tau);
            } else if penalty == 2u {
                f = (u - tau) * (u - tau);
                df = 2.0 * (u - tau);
            } else if penalty == 3u {
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
            add_coef(b, b + 1u, c, 3u, lambda * df / (n + EPS) / norm);
        }
    }
    return total / norm;
}

@compute @workgroup_size(64)
fn finalize_terms(@builtin(local_invocation_index) lid: u32) {
    let bc = dims.batch * C;
    let report = 4u * bc + MAX_PIXEL_TERMS;
    let values_off = report + 1u;
    let elem_off = report + 1u + MAX_TERMS;
    for (var k = lid; k < 4u * bc + MAX_PIXEL_TERMS; k += FIN_WG) {
        fin[k] = 0.0;
    }
    for (var k = lid; k < dims.n_terms * bc; k += FIN_WG) {
        fin[elem_off + k] = 0.0;
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
            loss += stat(b, C * PER_CLASS + 4u + t);
            n += stat(b, C * PER_CLASS + 8u + t);
        }
        loss = workgroup_total(lid, loss);
        n = workgroup_total(lid, n);
        if lid == 0u {
            let lambda = record(t, 1u);
            let mean = !(u32(record(t, 0u)) == KIND_CE && record(t, 5u) != 0.0);
            let w = select(1.0, n, mean);
            var value = 0.0;
            if w > 0.0 {
                value = loss / w;
                fin[4u * bc + t] = lambda / w;
            }
            fin[values_off + u32(record(t, 2u))] = value;
            total += lambda * value;
        }
    }
    for (var j = 0u; j < dims.n_stat_terms; j++) {
        let slot = MAX_PIXEL_TERMS + j;
        let kind = u32(record(slot, 0u));
        let lambda = record(slot, 1u);
        let r = u32(record(slot, 2u));
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
