// ∂L/∂z of one pixel, every class, from its logits, targets and softmax pieces, the
// coefficient table and the pixel-term scales. Two stages link it: the grad stage
// (grad.wgsl), and the stats stage's one-pass form for specs of pixel terms only, which
// writes the gradient in the same pass that sums the loss (stats.wgsl calls `load_consts`,
// `pixel_grad` and `zero_grad`; the stats stage alone links stats_no_grad.wgsl's empty
// stand-ins instead). ARCHITECTURE.md, "One pass for pixel terms".
// CPU port: src/reference/grad.rs.

@group(0) @binding(6) var<storage, read> fin: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad: array<f32>;
// The same range as `grad`, four values an element: a quad's stores (pixels.wgsl, QUADS).
@group(0) @binding(12) var<storage, read_write> grad4: array<vec4<f32>>;
// The start of `fin` again as a uniform binding: the coefficient table, one vec4 a class
// and image (COEFS is 4), COEF_ROWS of them (generated from the device's uniform binding
// limit, stages.rs `KernelInfo::source`). Read instead of `fin` with UNIFORM_COEFS.
@group(0) @binding(14) var<uniform> fin_coefs: array<vec4<f32>, COEF_ROWS>;

// Whether the spec has statistic terms. Without them every coefficient is 0 (finalize
// writes none), so none is read and their sums compile out: the gradient is the pixel
// terms' alone.
override STAT_TERMS: bool = true;
// Bit k: the spec has a term whose coefficients go to slot k (COEF_P, COEF_Q, COEF_I,
// COEF_U; plan.rs `coefs_used`). Finalize writes no other slot, so the others read as 0
// without a read: on lavapipe each read is a lane-by-lane sequence, and past the register
// block the chunked grad stage reads a class's coefficients for every quad of pixels.
override COEFS_USED: u32 = 15u;
// The coefficients are read through `fin_coefs` (set by the host where the table fits it:
// B·C ≤ COEF_ROWS, `Strategy::uniform_coefs`). llvmpipe reads a storage buffer lane by lane,
// a mask test, bounds check and load per active lane, and a uniform buffer with the row's
// indices clamped to the binding and a plain load a lane, no branch; the index is the same
// in every lane here (image and class), but llvmpipe cannot prove it inside the pixel loops
// (BENCHMARKS.md, "Uniform coefficients").
override UNIFORM_COEFS: bool = false;

// Whether coefficient slot `slot` can be nonzero.
fn coef_used(slot: u32) -> bool {
    return STAT_TERMS && (COEFS_USED & (1u << slot)) != 0u;
}

// Coefficient slot `slot` of table row `row` (image b, class c: b·C + c).
fn coef_at(row: u32, slot: u32) -> f32 {
    if !coef_used(slot) {
        return 0.0;
    }
    if UNIFORM_COEFS {
        return fin_coefs[row][slot];
    }
    return fin[row * COEFS + slot];
}

// What an invocation reads once for all its pixels: the first BLOCK classes' coefficients
// and, per pixel term, its kind, ε or γ, scale and class-vector offset (−1: none).
struct Consts {
    kc: array<vec4<f32>, BLOCK_PAD>,
    kinds: vec4<u32>,
    opt: vec4<f32>,
    scales: vec4<f32>,
    offs: vec4<f32>,
    // Per pixel term, Σ_c w_c of its class vector (C without one): `add_weight_sums`.
    wsum: vec4<f32>,
    // The upstream gradient (fin, Dims::fin_upstream) every value is scaled by.
    up: f32,
}

// Whether every pixel term is cross-entropy on class-index labels: then a pixel's Σ_k h_k
// is −((1 − ε)·w_y + ε/C·Σ_k w_k), known from its label alone (`ce_h_sum`).
fn h_closed_form() -> bool {
    return !SIGMOID && (PIXEL_KINDS & (1u << KIND_FOCAL)) == 0u && LABEL_KIND != LABELS_SOFT;
}

// `h_closed_form` and no statistic terms: then `pixel_grad` runs one class loop instead of
// two (on GPUs, one read fewer of each class past the register block).
fn ce_closed_form() -> bool {
    return h_closed_form() && !STAT_TERMS;
}

// Class c's coefficients (∂L/∂P, ∂L/∂Q, ∂L/∂I, ∂L/∂U) of image b.
fn coef(b: u32, c: u32) -> vec4<f32> {
    let row = b * C + c;
    return vec4(coef_at(row, COEF_P), coef_at(row, COEF_Q), coef_at(row, COEF_I), coef_at(row, COEF_U));
}

// Everything image b's pixels share, read before any branch (`b` is uniform over a
// workgroup in both stages that link this file).
fn load_consts(b: u32) -> Consts {
    var cs: Consts;
    if STAT_TERMS {
        for (var c = 0u; c < min(C, BLOCK); c++) {
            cs.kc[c] = coef(b, c);
        }
    }
    for (var t = 0u; t < N_PIX; t++) {
        cs.kinds[t] = u32(record(t, REC_KIND));
        cs.opt[t] = record(t, PIXEL_OPTION);
        cs.scales[t] = fin[dims.fin_scales + t];
        cs.offs[t] = record(t, REC_VECTOR);
    }
    if ce_closed_form() {
        add_weight_sums(&cs);
    }
    cs.up = fin[dims.fin_upstream];
    return cs;
}

// Per pixel term, Σ_c w_c of its class vector into `wsum`, for `ce_h_sum`: by
// `load_consts` for CE alone, by the chunked grad stage's online sums (grad.wgsl) for CE
// beside statistic terms. Nothing else reads it, and with class weights it is C reads an
// invocation.
fn add_weight_sums(cs: ptr<function, Consts>) {
    for (var t = 0u; t < N_PIX; t++) {
        for (var c = 0u; c < C; c++) {
            (*cs).wsum[t] += term_weight(t, (*cs).offs[t], c);
        }
    }
}

// Class c's coefficients, from the invocation's copy for the first BLOCK classes.
fn coef_of(k: ptr<function, Consts>, b: u32, c: u32) -> vec4<f32> {
    if !STAT_TERMS {
        return vec4(0.0);
    }
    if in_block(c) {
        return (*k).kc[c];
    }
    return coef(b, c);
}

// a_c = ∂L/∂p_c of the statistic terms; without tempering, s = p and the region
// coefficient joins a.
fn stat_a(k: vec4<f32>, p: f32, g: f32) -> f32 {
    return k.x + 2.0 * p * k.y + g * k.z + select(k.w, 0.0, TEMPERED);
}

// Whether the gradient is added to the target's values (a backward recording's choice).
// An override, not a `Dims` field: llvmpipe runs both sides of a branch on a value it
// cannot prove uniform (a uniform buffer's is not), each per-lane access behind its mask
// test, so the untaken side cost the grad stage 15 % of its executed instructions
// (BENCHMARKS.md, "Instruction counts").
override ACCUMULATE: bool = false;

// Writes one gradient value, or adds it to the target's (ACCUMULATE).
fn store_grad(e: u32, v: f32) {
    if ACCUMULATE {
        grad[e] += v;
    } else {
        grad[e] = v;
    }
}

// Class c's gradient value v at pixel i of global image b: stored (`store_grad`), or with
// QUADS put in the pixel's block `out`, which the caller stores with its quad's.
fn put_grad(b: u32, c: u32, i: u32, v: f32, out: ptr<function, Block>) {
    if QUADS {
        (*out)[c] = v;
    } else {
        store_grad(elem(b, c, i) + dims.grad_shift, v);
    }
}

// Stores (or adds, ACCUMULATE) the gradient of the quad of pixels i0..i0+4 of global image
// b, one vec4 a class.
fn store_quad_grad(b: u32, i0: u32, dz: ptr<function, Quad>) {
    for (var c = 0u; c < min(C, BLOCK); c++) {
        store_class_quad(b, c, i0, (*dz)[c]);
    }
}

// Stores (or adds, ACCUMULATE) class c's gradient v of the quad of pixels i0..i0+4 of
// global image b.
fn store_class_quad(b: u32, c: u32, i0: u32, v: vec4<f32>) {
    let e = (elem(b, c, i0) + dims.grad_shift) >> 2u;
    if ACCUMULATE {
        grad4[e] += v;
    } else {
        grad4[e] = v;
    }
}

// The focal weight on ([c = k] − p_k) of one class with target mass αg (twin: src/reference/mod.rs `focal_h`).
fn focal_h(p: f32, one_minus_p: f32, log_p: f32, alpha_g: f32, gamma: f32) -> f32 {
    let qg = safe_pow(one_minus_p, gamma);
    var first = 0.0;
    if one_minus_p > 0.0 && gamma > 0.0 {
        first = gamma * p * log_p * qg / one_minus_p;
    }
    return alpha_g * (first - qg);
}

// A softmax pixel term's h_c, its weight on ([c = k] − p_k) in ∂/∂z_k, so that the term's
// gradient is scale·(h_c − p_c·Σ_k h_k): CE −w_c·((1 − ε)·g_c + ε/C); focal `focal_h`.
// Twin: src/reference/grad.rs `pixel_h`. `e`, `se`: exp(z_c − max) and Σe; `opt`: ε or γ.
fn pixel_h(ce: bool, opt: f32, w: f32, gc: f32, p: f32, e: f32, se: f32, log_p: f32) -> f32 {
    if ce {
        return -w * ((1.0 - opt) * gc + opt / f32(C));
    }
    if gc == 0.0 {
        return 0.0;
    }
    let one_minus_p = over(max(se - e, 0.0), se);
    return focal_h(p, one_minus_p, log_p, w * gc, opt);
}

// Zeros for every class of an ignored pixel.
fn zero_grad(b: u32, i: u32, cs: ptr<function, Consts>, out: ptr<function, Block>) {
    for (var c = 0u; c < C; c++) {
        put_grad(b, c, i, 0.0, out);
    }
}

// The sums over a pixel's classes that every class's gradient needs: Σ_k a_k p_k and
// Σ_k u_k s_k (statistic terms) and, per pixel term, Σ_k h_k.
struct GradSums {
    ap: f32,
    us: f32,
    h: vec4<f32>,
}

// Class c's share of a pixel's GradSums, from its coefficients k (`coef_of`), logit zc,
// target gc, e = exp(zc − max), tempered probability s (0 untempered), softmax pieces sm
// and log Σe. The register path adds every class of a pixel in order; the staged path
// (staged_grad.wgsl) adds a share of the classes per invocation and merges the shares; the
// chunked path (grad.wgsl `GRAD_CHUNKS`) adds them chunk by chunk.
fn grad_sums_of(cs: ptr<function, Consts>, k: vec4<f32>, c: u32, zc: f32, gc: f32, e: f32, s: f32, sm: vec2<f32>, log_se: f32) -> GradSums {
    let p = over(e, sm.y);
    var out = GradSums(0.0, 0.0, vec4(0.0));
    if STAT_TERMS {
        out.ap = stat_a(k, p, gc) * p;
        if TEMPERED {
            out.us = k.w * s;
        }
    }
    for (var t = 0u; t < N_PIX; t++) {
        let w = term_weight(t, (*cs).offs[t], c);
        out.h[t] = pixel_h(is_ce((*cs).kinds[t]), (*cs).opt[t], w, gc, p, e, sm.y, zc - sm.x - log_se);
    }
    return out;
}

// Σ_k h_k of CE pixel terms on class-index labels (`h_closed_form`) for label y:
// −((1 − ε)·w_y + ε/C·Σ_k w_k) per pixel term. (An ignored pixel's y is IGNORE; its values
// are discarded by the caller.)
fn ce_h_sum(cs: ptr<function, Consts>, y: u32) -> vec4<f32> {
    let yc = min(y, C - 1u);
    var h = vec4(0.0);
    for (var t = 0u; t < N_PIX; t++) {
        let eps = (*cs).opt[t];
        h[t] = -((1.0 - eps) * term_weight(t, (*cs).offs[t], yc) + eps / f32(C) * (*cs).wsum[t]);
    }
    return h;
}

// ∂L/∂z_c of a softmax pixel (before the upstream factor) from its class's coefficients k,
// logit zc, target gc, e = exp(zc − max) and tempered probability s, and the pixel's pieces
// and GradSums.
fn class_dz(cs: ptr<function, Consts>, k: vec4<f32>, c: u32, zc: f32, gc: f32, e: f32, s: f32, sm: vec2<f32>, log_se: f32, sums: GradSums) -> f32 {
    let p = over(e, sm.y);
    var dz = 0.0;
    if STAT_TERMS {
        dz = p * (stat_a(k, p, gc) - sums.ap);
        if TEMPERED {
            dz += dims.temperature * s * (k.w - sums.us);
        }
    }
    for (var t = 0u; t < N_PIX; t++) {
        let w = term_weight(t, (*cs).offs[t], c);
        let h = pixel_h(is_ce((*cs).kinds[t]), (*cs).opt[t], w, gc, p, e, sm.y, zc - sm.x - log_se);
        dz += (*cs).scales[t] * (h - p * sums.h[t]);
    }
    return dz;
}

// ∂L/∂z_c of a sigmoid-mode class (before the upstream factor) from its coefficients k:
// classes are independent.
fn sigmoid_dz(cs: ptr<function, Consts>, k: vec4<f32>, c: u32, zc: f32, gc: f32) -> f32 {
    let temp = dims.temperature;
    let p = sigmoid(zc);
    var dz = stat_a(k, p, gc) * p * sigmoid(-zc);
    if TEMPERED {
        dz += temp * k.w * sigmoid(temp * zc) * sigmoid(-temp * zc);
    }
    for (var t = 0u; t < N_PIX; t++) {
        let pw = term_weight(t, (*cs).offs[t], c);
        dz += (*cs).scales[t] * (p * (1.0 - gc + pw * gc) - pw * gc);
    }
    return dz;
}

// ∂L/∂z of every class of pixel i of global image b, whose label is y (kept: `keep`; an
// ignored pixel may run the same code and write zeros), first logits and targets z and g,
// softmax pieces sm (max, Σe) with the first exponentials in ez, and tempered ones smt, et
// (unused in sigmoid mode); written by `put_grad` (`out`: the pixel's block of a quad).
fn pixel_grad(cs: ptr<function, Consts>, b: u32, i: u32, y: u32, keep: bool, z: ptr<function, Block>, g: ptr<function, Block>, ez: ptr<function, Block>, et: ptr<function, Block>, sm: vec2<f32>, smt: vec2<f32>, out: ptr<function, Block>) {
    let temp = dims.temperature;
    if SIGMOID {
        for (var c = 0u; c < C; c++) {
            let dz = sigmoid_dz(cs, coef_of(cs, b, c), c, z_of(z, b, c, i), g_of(g, b, c, i, y));
            put_grad(b, c, i, select(0.0, dz * (*cs).up, keep), out);
        }
        return;
    }

    let log_se = log(sm.y);
    // First class loop: the sums every class's gradient needs (none with the closed form).
    var sums = GradSums(0.0, 0.0, vec4(0.0));
    var first_loop = C;
    if ce_closed_form() {
        sums.h = ce_h_sum(cs, y);
        first_loop = 0u;
    }
    for (var c = 0u; c < first_loop; c++) {
        let zc = z_of(z, b, c, i);
        var s = 0.0;
        if TEMPERED {
            s = over(exp_of(et, c, zc, temp, smt.x), smt.y);
        }
        let add = grad_sums_of(cs, coef_of(cs, b, c), c, zc, g_of(g, b, c, i, y), exp_of(ez, c, zc, 1.0, sm.x), s, sm, log_se);
        sums.ap += add.ap;
        sums.us += add.us;
        sums.h += add.h;
    }
    // Second class loop: write ∂L/∂z_c.
    for (var c = 0u; c < C; c++) {
        let zc = z_of(z, b, c, i);
        var s = 0.0;
        if TEMPERED {
            s = over(exp_of(et, c, zc, temp, smt.x), smt.y);
        }
        let dz = class_dz(cs, coef_of(cs, b, c), c, zc, g_of(g, b, c, i, y), exp_of(ez, c, zc, 1.0, sm.x), s, sm, log_se, sums);
        put_grad(b, c, i, select(0.0, dz * (*cs).up, keep), out);
    }
}
