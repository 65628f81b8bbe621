// Stage 3: recomputes p from the logits (cheaper than storing it) and writes ∂L/∂z for
// every class (grad_pixel.wgsl) from the coefficient table and the pixel-term scales. An
// invocation covers PPT pixels of one image: the image's coefficients, the class weights
// (pixels.wgsl `class_weights`) and the per-term constants, read once, serve all of them
// (lavapipe reads memory lane by lane, ~20 cycles a value, so reading them per pixel cost
// more than the pixel's own logits).
// CPU port: src/reference/grad.rs.

@group(0) @binding(0) var<storage, read> logits: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<uniform> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
// The logits' range again, four values an element: the quads' reads (pixels.wgsl, QUADS).
@group(0) @binding(11) var<storage, read> logits4: array<vec4<f32>>;
// Each pixel's softmax pieces from the stats stage (STORED_PIECES, pixels.wgsl).
@group(0) @binding(13) var<storage, read> softmax_pieces: array<vec4<f32>>;

const WG: u32 = PIXEL_WG;
// Pixels per invocation, set by the host (plan::grad_pixels_per_invocation): 8 on GPUs,
// 32 on CPU adapters, where longer runs of consecutive pixels per invocation read faster
// (grad 23 → 19 ms at 8×4×256×256 on lavapipe) and there are no idle SMs to fill. Which
// pixels: `pixel_of`.
override PPT: u32 = 8u;
// The most pixels an invocation takes (`PPT`'s largest value).
const MAX_PPT: u32 = 32u;
// The length of the chunked path's per-pixel arrays: one more than MAX_PPT, so that no
// pixel loop's trip count equals it. Mesa unrolls any loop of up to 32 iterations that
// indexes an array exactly as long as its trip count (with index clamps off: strategy.rs
// `Strategy::index_checks`), which here would copy the whole per-pixel body 32 times
// (a pipeline's compile time several times longer, for no gain measured).
const PIXEL_SLOTS: u32 = MAX_PPT + 1u;

// Chunked classes (set by the host with more classes than BLOCK on CPU adapters:
// strategy.rs `grad_chunks`): no class of a pixel is kept in invocation memory. An
// invocation first reads every logit of its pixels once, four pixels at a time, for the
// sums every class's gradient needs (`chunk_online`, `OnlineSums`), with the softmax
// pieces the stats stage stored (STORED_PIECES, pixels.wgsl) or else an online max and
// sum that the sums rescale with; then it takes the classes CHUNK at a time, each chunk's
// coefficients read once for all its pixels, and writes the gradient. Two reads of a logit
// and one write (one read for CE alone with stored pieces; with a focal term, whose sums
// take a pass of their own, two with stored pieces and three without), and every class
// loop that touches an array is CHUNK long, which Mesa unrolls: in the register path's
// loops over 150 classes, which it does not unroll, every access to an invocation array
// was a gather or scatter lane by lane on lavapipe (BENCHMARKS.md, "The stats stage's
// class block").
override GRAD_CHUNKS: bool = false;

@compute @workgroup_size(PIXEL_WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // A workgroup covers WG·PPT pixels of one image, so the image and everything read from it
    // below are uniform over the workgroup, read before any branch.
    let group = flat_group(wid, nwg);
    let tile = WG * PPT;
    let per_image = (dims.spatial + tile - 1u) / tile;
    let b = dims.image_offset + min(group / per_image, dims.batch - 1u);
    let base = (group % per_image) * tile;
    load_class_weights();
    var cs = load_consts(b);
    if group >= dims.batch * per_image {
        return;
    }
    if GRAD_CHUNKS {
        if online_sums() && h_closed_form() {
            add_weight_sums(&cs);
        }
        grad_chunks(&cs, b, base, lid);
        return;
    }
    if QUADS {
        for (var j = 0u; j < PPT; j += 4u) {
            let i0 = pixel_of(base, j, lid, WG, PPT);
            if i0 >= dims.spatial {
                break;
            }
            let ys = quad_labels(b, i0);
            var zq = load_quad(b, i0);
            var dq: Quad;
            for (var k = 0u; k < 4u; k++) {
                var z = quad_pixel(&zq, k);
                var dz: Block;
                grad_of_pixel(&cs, b, i0 + k, ys[k], &z, &dz);
                set_quad_pixel(&dq, k, &dz);
            }
            store_quad_grad(b, i0, &dq);
        }
        return;
    }
    for (var j = 0u; j < PPT; j++) {
        let i = pixel_of(base, j, lid, WG, PPT);
        if i >= dims.spatial {
            break;
        }
        let y = pixel_label(b, i);
        var z = load_logits(b, i);
        var unused: Block;
        grad_of_pixel(&cs, b, i, y, &z, &unused);
    }
}

// The gradient of pixel i of global image b, whose label is y (IGNORE: zeros) and first
// logits z (`put_grad`'s `out`: its block of a quad).
fn grad_of_pixel(cs: ptr<function, Consts>, b: u32, i: u32, y: u32, z: ptr<function, Block>, out: ptr<function, Block>) {
    // An ignored pixel runs the same code (its targets are all 0) and writes zeros: one
    // store per class either way, no branch with stores of its own.
    var g = load_targets(b, i);
    var ez: Block;   // exp(z − max), computed once per class
    var et: Block;   // exp(T·z − max_T)
    var sm = vec2(0.0, 1.0);
    var smt = vec2(0.0, 1.0);
    var past_bad = vec2(0u, IGNORE);   // the stats pass reports bad input
    if !SIGMOID {
        sm = pieces(z, &ez, b, i, 1.0, &past_bad);
        if TEMPERED {
            smt = pieces(z, &et, b, i, dims.temperature, &past_bad);
        }
    }
    pixel_grad(cs, b, i, y, y != IGNORE, z, &g, &ez, &et, sm, smt, out);
}

// The coefficients of classes c0..c0+CHUNK of image b (classes past C repeat C − 1).
fn chunk_coefs(b: u32, c0: u32) -> array<vec4<f32>, CHUNK> {
    var k: array<vec4<f32>, CHUNK>;
    if STAT_TERMS {
        for (var j = 0u; j < CHUNK; j++) {
            k[j] = coef(b, min(c0 + j, C - 1u));
        }
    }
    return k;
}

// Class c's logit zc adds its share to the GradSums `sums` of pixel i of global image b
// (label y, pieces sm, log Σe), with its coefficients k; `real`: c is not a repeat past C.
fn chunk_sums_add(cs: ptr<function, Consts>, sums: ptr<function, GradSums>, k: vec4<f32>, b: u32, c: u32, i: u32, y: u32, zc: f32, sm: vec4<f32>, log_se: f32, real: bool) {
    var s = 0.0;
    if TEMPERED {
        s = over(exp(dims.temperature * zc - sm.z), sm.w);
    }
    let add = grad_sums_of(cs, k, c, zc, target_of(b, c, i, y), exp(zc - sm.x), s, sm.xy, log_se);
    (*sums).ap = select((*sums).ap, (*sums).ap + add.ap, real);
    (*sums).us = select((*sums).us, (*sums).us + add.us, real);
    (*sums).h = select((*sums).h, (*sums).h + add.h, real);
}

// ∂L/∂z_c (with the upstream factor; 0 for an ignored pixel) of pixel i of global image b
// (label y, pieces sm, log Σe, GradSums sums) from its logit zc and class coefficients k.
fn chunk_dz(cs: ptr<function, Consts>, k: vec4<f32>, b: u32, c: u32, i: u32, y: u32, zc: f32, sm: vec4<f32>, log_se: f32, sums: GradSums) -> f32 {
    let gc = target_of(b, c, i, y);
    var dz: f32;
    if SIGMOID {
        dz = sigmoid_dz(cs, k, c, zc, gc);
    } else {
        var s = 0.0;
        if TEMPERED {
            s = over(exp(dims.temperature * zc - sm.z), sm.w);
        }
        dz = class_dz(cs, k, c, zc, gc, exp(zc - sm.x), s, sm.xy, log_se, sums);
    }
    return select(0.0, dz * (*cs).up, y != IGNORE);
}

// Whether the online pass sums a pixel's GradSums as it goes (`OnlineSums`): every softmax
// spec without focal terms, whose sums are then linear in the classes' exponentials. A
// focal term's h_c is not (it takes log p_c, which needs the final Σe), so with one the
// chunks are summed in a pass of their own after the softmax (`chunk_sums_add`); CE alone
// on class-index labels needs neither (`ce_closed_form`).
fn online_sums() -> bool {
    return !SIGMOID && (PIXEL_KINDS & (1u << KIND_FOCAL)) == 0u && !ce_closed_form();
}

// Whether the chunked path has a pass for the sums after the softmax (focal terms).
fn chunk_sums_pass() -> bool {
    return !SIGMOID && !ce_closed_form() && !online_sums();
}

// What the online pass sums besides each pixel's max and Σe, four pixels side by side.
// With e_c = exp(z_c − max), a pixel's GradSums are
//   Σ a·p = Σ_c (∂L/∂P + ∂L/∂U [untempered] + g_c·∂L/∂I)·e_c / Σe + 2·Σ_c ∂L/∂Q·e_c² / Σe²,
//   Σ u·s = Σ_c ∂L/∂U·e_T,c / Σe_T,
// and, on soft labels, Σ h = Σ_c h_c (CE's h_c takes no logit), so the sums over e and e²
// are rescaled with Σe when the max grows (by r and r²; with STORED_PIECES the max is
// known and nothing is rescaled) and divided once at the end: the
// pass over the chunks that summed them after the softmax, a third read of every logit,
// is gone (BENCHMARKS.md, "Online sums"). On class-index labels the g_c·∂L/∂I part is the
// label class's alone, added after the last class (`online_label_class`), so a class's
// ∂L/∂I is not read per class and pixel.
struct OnlineSums {
    m: vec4<f32>,
    se: vec4<f32>,
    // The tempered max and Σe (T·z).
    mt: vec4<f32>,
    st: vec4<f32>,
    a: vec4<f32>,
    q: vec4<f32>,
    u: vec4<f32>,
    // Per pixel term (soft labels only).
    h: array<vec4<f32>, 4>,
}

// Adds class c (logits z, targets g of four pixels) to the online sums `o`.
fn online_add(cs: ptr<function, Consts>, o: ptr<function, OnlineSums>, b: u32, c: u32, z: vec4<f32>, g: vec4<f32>) {
    if STORED_PIECES {
        // The maxima and sums are the stats stage's: nothing to rescale.
        var et = vec4(0.0);
        if TEMPERED {
            et = exp(dims.temperature * z - (*o).mt);
        }
        online_sums_add(cs, o, b, c, g, exp(z - (*o).m), et);
        return;
    }
    let m = max((*o).m, z);
    let r = exp((*o).m - m);
    let e = exp(z - m);
    (*o).m = m;
    (*o).se = (*o).se * r + e;
    var rt = vec4(1.0);
    var et = vec4(0.0);
    if TEMPERED {
        let v = dims.temperature * z;
        let mt = max((*o).mt, v);
        rt = exp((*o).mt - mt);
        et = exp(v - mt);
        (*o).mt = mt;
        (*o).st = (*o).st * rt + et;
    }
    if !online_sums() {
        return;
    }
    (*o).a *= r;
    if coef_used(COEF_Q) {
        (*o).q *= r * r;
    }
    if TEMPERED && coef_used(COEF_U) {
        (*o).u *= rt;
    }
    online_sums_add(cs, o, b, c, g, e, et);
}

// Adds class c's share (exponentials e, tempered et, targets g of four pixels) to the
// GradSums parts of `o`.
fn online_sums_add(cs: ptr<function, Consts>, o: ptr<function, OnlineSums>, b: u32, c: u32, g: vec4<f32>, e: vec4<f32>, et: vec4<f32>) {
    if !online_sums() {
        return;
    }
    if STAT_TERMS {
        let k = b * C + c;
        var a = coef_at(k, COEF_P);
        if TEMPERED {
            if coef_used(COEF_U) {
                (*o).u += coef_at(k, COEF_U) * et;
            }
        } else {
            a += coef_at(k, COEF_U);
        }
        var ag = vec4(a);
        if LABEL_KIND == LABELS_SOFT && coef_used(COEF_I) {
            ag += g * coef_at(k, COEF_I);
        }
        (*o).a += ag * e;
        if coef_used(COEF_Q) {
            (*o).q += coef_at(k, COEF_Q) * e * e;
        }
    }
    if !h_closed_form() {
        for (var t = 0u; t < N_PIX; t++) {
            let w = term_weight(t, (*cs).offs[t], c);
            for (var p = 0u; p < 4u; p++) {
                (*o).h[t][p] += pixel_h(true, (*cs).opt[t], w, g[p], 0.0, 0.0, 1.0, 0.0);
            }
        }
    }
}

// The label class's g·∂L/∂I share of Σ a·p on class-index labels (g = 1 there, 0
// elsewhere), for the four pixels at `at` with labels ys (`live`: in the image), once the
// maxima are final: one read of the label's logit a pixel instead of ∂L/∂I per class.
fn online_label_class(o: ptr<function, OnlineSums>, b: u32, at: vec4<u32>, ys: vec4<u32>, live: vec4<bool>) {
    if !online_sums() || !coef_used(COEF_I) || LABEL_KIND == LABELS_SOFT {
        return;
    }
    for (var p = 0u; p < 4u; p++) {
        if live[p] && ys[p] < C {
            let zy = logit(b, ys[p], at[p]);
            (*o).a[p] += coef_at(b * C + ys[p], COEF_I) * exp(zy - (*o).m[p]);
        }
    }
}

// Pixel p's softmax pieces (max, Σe, tempered max, tempered Σe) from the online sums.
fn online_pieces_of(o: ptr<function, OnlineSums>, p: u32) -> vec4<f32> {
    if SIGMOID {
        return vec4(0.0, 1.0, 0.0, 1.0);
    }
    return vec4((*o).m[p], (*o).se[p], (*o).mt[p], (*o).st[p]);
}

// Pixel p's GradSums (label y): Σh in closed form where `h_closed_form`, the rest from the
// online sums (`online_sums`); zeros where the sums pass adds them up (focal terms).
fn online_grad_sums(cs: ptr<function, Consts>, o: ptr<function, OnlineSums>, p: u32, y: u32) -> GradSums {
    var sums = GradSums(0.0, 0.0, vec4(0.0));
    if h_closed_form() {
        sums.h = ce_h_sum(cs, y);
    }
    if online_sums() {
        let se = (*o).se[p];
        sums.ap = (*o).a[p] / se;
        if coef_used(COEF_Q) {
            sums.ap += 2.0 * (*o).q[p] / (se * se);
        }
        if TEMPERED {
            sums.us = (*o).u[p] / (*o).st[p];
        }
        if !h_closed_form() {
            for (var t = 0u; t < N_PIX; t++) {
                sums.h[t] = (*o).h[t][p];
            }
        }
    }
    return sums;
}

// What the chunked path keeps of each of an invocation's pixels between its passes.
struct ChunkPixels {
    labels: array<u32, PIXEL_SLOTS>,
    // (max, Σe, tempered max, tempered Σe)
    pieces: array<vec4<f32>, PIXEL_SLOTS>,
    sums: array<GradSums, PIXEL_SLOTS>,
    // Pixels the invocation has (fewer than PPT at the end of an image).
    n: u32,
}

// The chunked path's first pass: every logit of the invocation's pixels read once, four
// pixels at a time (one vec4 a class with QUADS, else a read per pixel), for each pixel's
// softmax pieces (unless STORED_PIECES brings them) and, with `online_sums`, its GradSums;
// with stored pieces and nothing to sum, no logit is read here. PPT is a multiple of 4.
fn chunk_online(cs: ptr<function, Consts>, b: u32, base: u32, lid: u32) -> ChunkPixels {
    var px: ChunkPixels;
    for (var q = 0u; q < PPT; q += 4u) {
        let i0 = pixel_of(base, q, lid, WG, PPT);
        if i0 >= dims.spatial {
            break;
        }
        // The quad's pixels: past the image's end (no QUADS there) a pixel reads nothing and
        // its values are never used.
        var at = vec4(i0);
        var live = vec4(true);
        var ys = vec4(IGNORE);
        for (var p = 0u; p < 4u; p++) {
            at[p] = pixel_of(base, q + p, lid, WG, PPT);
            live[p] = at[p] < dims.spatial;
            if live[p] {
                ys[p] = pixel_label(b, at[p]);
                px.n = q + p + 1u;
            }
        }
        var o = OnlineSums(vec4(-3.4e38), vec4(0.0), vec4(-3.4e38), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), array<vec4<f32>, 4>());
        if STORED_PIECES {
            // Only valid pixels' pieces were written: the rest (ignored, past the image, a bad
            // label the call reports) take harmless stand-ins.
            for (var p = 0u; p < 4u; p++) {
                var sm = vec4(0.0, 1.0, 0.0, 1.0);
                if live[p] && ys[p] < C {
                    sm = softmax_pieces[b * dims.spatial + at[p]];
                }
                o.m[p] = sm.x;
                o.se[p] = sm.y;
                o.mt[p] = sm.z;
                o.st[p] = sm.w;
            }
        }
        // With stored pieces the class pass only sums (nothing to sum: no pass).
        if !SIGMOID && (online_sums() || !STORED_PIECES) {
            for (var c = 0u; c < C; c++) {
                var z = vec4(0.0);
                var g = vec4(0.0);
                if QUADS {
                    z = quad_logits(b, c, i0);
                }
                for (var p = 0u; p < 4u; p++) {
                    if live[p] {
                        if !QUADS {
                            z[p] = logit(b, c, at[p]);
                        }
                        if online_sums() && LABEL_KIND == LABELS_SOFT {
                            g[p] = target_of(b, c, at[p], ys[p]);
                        }
                    }
                }
                online_add(cs, &o, b, c, z, g);
            }
            online_label_class(&o, b, at, ys, live);
        }
        for (var p = 0u; p < 4u; p++) {
            px.labels[q + p] = ys[p];
            px.pieces[q + p] = online_pieces_of(&o, p);
            px.sums[q + p] = online_grad_sums(cs, &o, p, ys[p]);
        }
    }
    return px;
}

// The gradient of an invocation's pixels (from base, PPT of them) of global image b, class
// chunk by class chunk (`GRAD_CHUNKS`; with QUADS, `grad_chunk_quads`).
fn grad_chunks(cs: ptr<function, Consts>, b: u32, base: u32, lid: u32) {
    if QUADS {
        grad_chunk_quads(cs, b, base, lid);
        return;
    }
    var px = chunk_online(cs, b, base, lid);
    if chunk_sums_pass() {
        for (var c0 = 0u; c0 < C; c0 += CHUNK) {
            let kc = chunk_coefs(b, c0);
            for (var j = 0u; j < px.n; j++) {
                let i = pixel_of(base, j, lid, WG, PPT);
                var sums = px.sums[j];
                let sm = px.pieces[j];
                let log_se = log(sm.y);
                for (var k = 0u; k < CHUNK; k++) {
                    let c = min(c0 + k, C - 1u);
                    chunk_sums_add(cs, &sums, kc[k], b, c, i, px.labels[j], logit(b, c, i), sm, log_se, c0 + k < C);
                }
                px.sums[j] = sums;
            }
        }
    }
    for (var c0 = 0u; c0 < C; c0 += CHUNK) {
        let kc = chunk_coefs(b, c0);
        for (var j = 0u; j < px.n; j++) {
            let i = pixel_of(base, j, lid, WG, PPT);
            let y = px.labels[j];
            let sm = px.pieces[j];
            let log_se = log(sm.y);
            let sums = px.sums[j];
            for (var k = 0u; k < CHUNK; k++) {
                let c = c0 + k;
                if c < C {
                    let dz = chunk_dz(cs, kc[k], b, c, i, y, logit(b, c, i), sm, log_se, sums);
                    store_grad(elem(b, c, i) + dims.grad_shift, dz);
                }
            }
        }
    }
}

// `grad_chunks` four pixels at a time (QUADS: the host checked every quad is whole and
// aligned, plan.rs `chunk_quads`): each class of a quad read as one vec4 in every pass and
// its gradient written as one. The per-pixel code is the same; only the accesses, which
// are lane-by-lane sequences on lavapipe whatever their width, are shared by four pixels.
fn grad_chunk_quads(cs: ptr<function, Consts>, b: u32, base: u32, lid: u32) {
    var px = chunk_online(cs, b, base, lid);
    if chunk_sums_pass() {
        for (var c0 = 0u; c0 < C; c0 += CHUNK) {
            let kc = chunk_coefs(b, c0);
            for (var q = 0u; q < px.n; q += 4u) {
                let i0 = pixel_of(base, q, lid, WG, PPT);
                let z = chunk_quad_logits(b, c0, i0);
                for (var p = 0u; p < 4u; p++) {
                    var sums = px.sums[q + p];
                    let y = px.labels[q + p];
                    let sm = px.pieces[q + p];
                    let log_se = log(sm.y);
                    for (var k = 0u; k < CHUNK; k++) {
                        chunk_sums_add(cs, &sums, kc[k], b, min(c0 + k, C - 1u), i0 + p, y, z[k][p], sm, log_se, c0 + k < C);
                    }
                    px.sums[q + p] = sums;
                }
            }
        }
    }
    for (var c0 = 0u; c0 < C; c0 += CHUNK) {
        let kc = chunk_coefs(b, c0);
        for (var q = 0u; q < px.n; q += 4u) {
            let i0 = pixel_of(base, q, lid, WG, PPT);
            let z = chunk_quad_logits(b, c0, i0);
            var dz: array<vec4<f32>, CHUNK>;
            for (var p = 0u; p < 4u; p++) {
                let y = px.labels[q + p];
                let sm = px.pieces[q + p];
                let sums = px.sums[q + p];
                let log_se = log(sm.y);
                for (var k = 0u; k < CHUNK; k++) {
                    dz[k][p] = chunk_dz(cs, kc[k], b, min(c0 + k, C - 1u), i0 + p, y, z[k][p], sm, log_se, sums);
                }
            }
            for (var k = 0u; k < CHUNK; k++) {
                if c0 + k < C {
                    store_class_quad(b, c0 + k, i0, dz[k]);
                }
            }
        }
    }
}
