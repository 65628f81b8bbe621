// Stage 1: one pass over logits and labels. A workgroup covers a tile of TILE pixels of one
// image and writes rows of partial sums: per class (P, Q, I, G, H, U), then the valid
// count, the plain CE and (loss, normaliser) per pixel term (columns named STAT_* and ROW_*
// in the prelude). The sum of a tile's invocations, `reduce3`, is a strategy per hardware
// path (src/gpu/strategy.rs `TileSum`): tile_sum/subgroup.wgsl (a row per subgroup) where
// the adapter has subgroup operations, tile_sum/workgroup.wgsl (a row per tile) on other
// GPUs, tile_sum/invocation.wgsl (a row per invocation, no barrier) on CPU adapters. No
// float atomics: the order of every sum is fixed, so the results are bitwise reproducible.
// Two more forms for specs of pixel terms only (ARCHITECTURE.md, "One pass for pixel
// terms"): NORMS_ONLY, a pass over the labels alone that sums the normalisers, and the
// module that links grad_pixel.wgsl instead of stats_no_grad.wgsl, which also writes each
// pixel's gradient (scaled by what finalize made of those normalisers) as it goes.
// CPU port: src/reference/stats.rs.

@group(0) @binding(0) var<storage, read> logits: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<uniform> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
// The logits' range again, four values an element: the quads' reads (pixels.wgsl, QUADS).
@group(0) @binding(11) var<storage, read> logits4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;
@group(0) @binding(8) var<storage, read_write> loss_map: array<f32>;
// Bad input found on the device: [non-finite logits, first such element, invalid labels,
// first such label position] (the host sets the firsts to 0xFFFFFFFF before each call).
@group(0) @binding(10) var<storage, read_write> check: array<atomic<u32>, 4>;
// Each pixel's softmax pieces for the chunked grad stage (STORED_PIECES, pixels.wgsl).
@group(0) @binding(13) var<storage, read_write> softmax_pieces: array<vec4<f32>>;

// Bad input among one invocation's pixels: counts and first flat positions of non-finite
// logits and of invalid labels. Kept in registers and published with atomics once per
// invocation (`publish`): an atomic in the pixel loop is a lane-by-lane loop per pixel on
// lavapipe even when no lane has bad input.
struct BadInput {
    logits: u32,
    first_logit: u32,
    labels: u32,
    first_label: u32,
}

// Counts and locates non-finite logits and invalid labels of one pixel; true when clean.
// With a softmax, the logits past the block were counted by `pieces` as it read them
// (`past`: count, first element).
fn check_pixel(b: u32, i: u32, y: u32, z: ptr<function, Block>, g: ptr<function, Block>, bad: ptr<function, BadInput>, past: vec2<u32>) -> bool {
    var clean = true;
    for (var c = 0u; c < select(min(C, BLOCK), C, SIGMOID); c++) {
        if !finite(z_of(z, b, c, i)) {
            (*bad).logits += 1u;
            (*bad).first_logit = min((*bad).first_logit, elem(b, c, i));
            clean = false;
        }
    }
    if past.x > 0u {
        (*bad).logits += past.x;
        (*bad).first_logit = min((*bad).first_logit, past.y);
        clean = false;
    }
    for (var c = 0u; c < C; c++) {
        if LABEL_KIND == LABELS_SOFT {
            let t = g_of(g, b, c, i, y);
            if !finite(t) || t < 0.0 || t > 1.0 {
                (*bad).labels += 1u;
                (*bad).first_label = min((*bad).first_label, elem(b, c, i));
                clean = false;
            }
        }
    }
    if LABEL_KIND != LABELS_SOFT && y != IGNORE && y >= C {
        (*bad).labels += 1u;
        (*bad).first_label = min((*bad).first_label, b * dims.spatial + i);
        clean = false;
    }
    return clean;
}

// Adds an invocation's bad-input counts to `check` and lowers its first positions.
fn publish(bad: BadInput) {
    if bad.logits > 0u {
        atomicAdd(&check[0], bad.logits);
        atomicMin(&check[1], bad.first_logit);
    }
    if bad.labels > 0u {
        atomicAdd(&check[2], bad.labels);
        atomicMin(&check[3], bad.first_label);
    }
}

// The labels-only pass: only the valid count and the pixel terms' normalisers are summed
// (they depend on the labels alone); logits are not read and the class columns of the rows
// are not written (finalize reads nothing else of them for a spec of pixel terms only).
override NORMS_ONLY: bool = false;

// Whether the class columns of the rows (P, Q, I, G, H, U of each class) are summed and
// written. Off only for a spec of pixel terms only whose caller does not want the
// proportions (`GpuContext::record_loss`): the tile sums and finalize still add those
// columns (whatever the buffer held) into the statistics rows and the pooled row, but no
// term of such a spec reads them, and the host neither decodes nor returns them. At 150
// classes their sums were about a quarter of one-pass CE's time on lavapipe.
override CLASS_SUMS: bool = true;

// Bit t: pixel term t writes a per-pixel loss map (cross-entropy with reduction "none").
override PIXEL_MAPS: u32 = 15u;

// Whether pixel term t writes a loss map (a constant: the writes compile out otherwise).
fn has_map(t: u32) -> bool {
    return (PIXEL_MAPS & (1u << t)) != 0u;
}

const WG: u32 = PIXEL_WG;
// Pixels per invocation (at most 32: one bit each in `counted`); more pixels per workgroup
// means fewer workgroup reductions.
const PPT: u32 = STATS_PPT;
const TILE: u32 = WG * PPT;
// Whether the classes past the first block (C > BLOCK) are read four pixels a vec4, one
// read of a class serving four pixels, in the softmax's online pass (`past_quad_pieces`)
// and in the class sums (`past_sums`). Set by the host where every quad is whole and
// aligned: plan.rs `chunk_quads`, the chunked grad stage's quads.
override PAST_QUADS: bool = false;
// Per-class sums of one invocation for a block of classes: (P, Q, I, G) and (H, U).
struct ClassSums {
    a: array<vec4<f32>, BLOCK_PAD>,
    b: array<vec2<f32>, BLOCK_PAD>,
}

// Adds one pixel's class c (local index k in the block) to the sums. With class-index
// labels and no tempering the second pair is implied (H = Σg² = G, as g ∈ {0, 1}; U = P)
// and `class_hu` reads it from the first four: one read-modify-write of class memory
// fewer a class and pixel, the same bits.
fn accumulate(sums: ptr<function, ClassSums>, k: u32, p: f32, s: f32, g: f32) {
    if !CLASS_SUMS {
        return;
    }
    (*sums).a[k] += vec4(p, p * p, p * g, g);
    if !hu_implied() {
        (*sums).b[k] += vec2(g * g, s);
    }
}

// Whether (H, U) follow from (P, Q, I, G): class-index labels, untempered.
fn hu_implied() -> bool {
    return LABEL_KIND != LABELS_SOFT && !TEMPERED;
}

// (H, U) of local class k.
fn class_hu(sums: ptr<function, ClassSums>, k: u32) -> vec2<f32> {
    if hu_implied() {
        return (*sums).a[k].wx;
    }
    return (*sums).b[k];
}

// Three vec4 summed by the reduction strategy's `reduce3`, and whether this invocation
// holds the totals and writes them.
struct Sums3 {
    writer: bool,
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
}

// Sums classes c0..c0+n, two classes per reduction, and writes them to the row.
fn flush(lid: u32, row: u32, c0: u32, n: u32, sums: ptr<function, ClassSums>) {
    // A bound the compiler cannot fold (row_width > C always): with the constant bound
    // llvmpipe unrolled the loop, copying the workgroup strategy's barriers, and compiled
    // that stats pipeline in 62 s instead of 26 s (Mesa 25, cold cache, C = 4).
    let n_rt = min(n, dims.row_width);
    for (var k = 0u; k < n_rt; k += 2u) {
        let k1 = min(k + 1u, BLOCK - 1u);
        let s = reduce3(lid, (*sums).a[k], vec4(class_hu(sums, k), class_hu(sums, k1)), (*sums).a[k1]);
        if s.writer {
            let o = row + (c0 + k) * PER_CLASS;
            write_class(o, s.a, s.b.xy);
            if k + 1u < n {
                write_class(o + PER_CLASS, s.c, s.b.zw);
            }
        }
    }
}

// One class's sums (P, Q, I, G), (H, U) into a row, with the two spare floats zeroed.
fn write_class(o: u32, pqig: vec4<f32>, hu: vec2<f32>) {
    partial[o + STAT_P] = pqig.x;
    partial[o + STAT_Q] = pqig.y;
    partial[o + STAT_I] = pqig.z;
    partial[o + STAT_G] = pqig.w;
    partial[o + STAT_H] = hu.x;
    partial[o + STAT_U] = hu.y;
    partial[o + 6u] = 0.0;
    partial[o + 7u] = 0.0;
}

// p and s (the region term's tempered probability) of class c from its logit.
fn probs(z: f32, sm: vec2<f32>, smt: vec2<f32>) -> vec2<f32> {
    if SIGMOID {
        let p = sigmoid(z);
        return vec2(p, select(p, sigmoid(dims.temperature * z), TEMPERED));
    }
    let p = over(exp(z - sm.x), sm.y);
    return vec2(p, select(p, over(exp(dims.temperature * z - smt.x), smt.y), TEMPERED));
}

// The pixel terms' rules, each beside its f64 twin of the same name in
// src/reference/stats.rs. A pixel's logits and targets come as its register blocks (z, g)
// and its softmax pieces; `t` is the term's slot, `off` its class vector (term_weight).

// The normaliser a valid pixel adds to pixel term t (of kind `kind`, class vector `off`):
// BCE C (a mean over channels), CE w_y with index labels, else 1. The labels alone decide
// it, which is what lets the one-pass form know it before reading a logit.
fn pixel_norm(kind: u32, t: u32, off: f32, y: u32) -> f32 {
    if SIGMOID {
        return f32(C);
    }
    if LABEL_KIND != LABELS_SOFT && is_ce(kind) {
        return term_weight(t, off, y);
    }
    return 1.0;
}

// Cross-entropy of one pixel: with class weights w and smoothing ε,
// (1 − ε)·w_y·(−log p_y) + ε/C·Σ_c w_c·(−log p_c), normalised (`pixel_norm`) by w_y (index
// labels) or 1 (soft labels, where the first part is Σ_c w_c g_c (−log p_c)). `plain` is
// −log p_y. (The f64 twin returns the normaliser with the loss.)
fn ce_pixel(t: u32, eps: f32, off: f32, z: ptr<function, Block>, g: ptr<function, Block>, b: u32, i: u32, y: u32, lse: f32, plain: f32) -> f32 {
    var smoothing = 0.0;
    if eps > 0.0 {
        for (var c = 0u; c < C; c++) {
            smoothing += term_weight(t, off, c) * (lse - z_of(z, b, c, i));
        }
        smoothing *= eps / f32(C);
    }
    if LABEL_KIND == LABELS_SOFT {
        var l = 0.0;
        for (var c = 0u; c < C; c++) {
            l += term_weight(t, off, c) * g_of(g, b, c, i, y) * (lse - z_of(z, b, c, i));
        }
        return (1.0 - eps) * l + smoothing;
    }
    return (1.0 - eps) * term_weight(t, off, y) * plain + smoothing;
}

// Focal loss of one pixel: Σ_c α_c g_c (1 − p_c)^γ (−log p_c), with 1 − p_c = Σ_{k≠c} e_k / Σe
// (no cancellation as p_c → 1). `sm`: (max, Σe); `ez`: the first classes' exponentials.
fn focal_pixel(t: u32, gamma: f32, off: f32, z: ptr<function, Block>, g: ptr<function, Block>, ez: ptr<function, Block>, b: u32, i: u32, y: u32, sm: vec2<f32>, lse: f32) -> f32 {
    var l = 0.0;
    for (var c = 0u; c < C; c++) {
        let gc = g_of(g, b, c, i, y);
        if gc != 0.0 {
            let zc = z_of(z, b, c, i);
            l += focal_class(term_weight(t, off, c), gc, zc, exp_of(ez, c, zc, 1.0, sm.x), sm.y, gamma, lse);
        }
    }
    return l;
}

// One class's share of the focal loss: w·g·(1 − p)^γ·(−log p), with e = exp(z − max) and
// Σe of the pixel.
fn focal_class(w: f32, gc: f32, zc: f32, e: f32, se: f32, gamma: f32, lse: f32) -> f32 {
    let q = over(max(se - e, 0.0), se);
    return w * gc * safe_pow(q, gamma) * (lse - zc);
}

// One class's share of cross-entropy with smoothing ε, w_c·(−log p_c)·((1 − ε)·g_c + ε/C)
// (ce_pixel's sum split by class, for the staged path's shares of a pixel's classes).
fn ce_class(eps: f32, w: f32, gc: f32, zc: f32, lse: f32) -> f32 {
    return w * (lse - zc) * ((1.0 - eps) * gc + eps / f32(C));
}

// One channel's share of binary cross-entropy: pw·g·softplus(−z) + (1 − g)·softplus(z).
fn bce_class(pw: f32, gc: f32, zc: f32) -> f32 {
    return pw * gc * softplus(-zc) + (1.0 - gc) * softplus(zc);
}

// Binary cross-entropy of one pixel (sigmoid mode), summed over channels:
// Σ_c pw_c·g_c·softplus(−z_c) + (1 − g_c)·softplus(z_c).
fn bce_pixel(t: u32, off: f32, z: ptr<function, Block>, g: ptr<function, Block>, b: u32, i: u32, y: u32) -> f32 {
    var l = 0.0;
    for (var c = 0u; c < C; c++) {
        l += bce_class(term_weight(t, off, c), g_of(g, b, c, i, y), z_of(z, b, c, i));
    }
    return l;
}

// What the stats stages read once per invocation of each pixel term: its kind, its ε
// (cross-entropy's smoothing) or γ (focal), and its class vector's offset (−1: none).
struct PixelTerms {
    kinds: vec4<u32>,
    opt: vec4<f32>,
    offs: vec4<f32>,
}

fn pixel_terms() -> PixelTerms {
    load_class_weights();
    var p = PixelTerms(vec4<u32>(0u), vec4(0.0), vec4(-1.0));
    for (var t = 0u; t < N_PIX; t++) {
        p.kinds[t] = u32(record(t, REC_KIND));
        p.opt[t] = record(t, PIXEL_OPTION);
        p.offs[t] = record(t, REC_VECTOR);
    }
    return p;
}

// What an invocation sums over its pixels beside its class sums and bad input (separate:
// naga 30 cannot write a pointer to a struct member passed to a function into SPIR-V).
struct Totals {
    // Bit k: pixel k was counted; the class blocks past the first (C > BLOCK) read those
    // pixels again. (A bit mask, not arrays indexed by k: those would live in scratch memory.)
    counted: u32,
    counts: vec4<f32>,          // valid pixels, plain CE (ROW_VALID, ROW_PLAIN_CE)
    losses: vec4<f32>,          // per pixel term
    norms: vec4<f32>,           // per pixel term
    // C > BLOCK: pixel k's softmax pieces (max, Σe, and the tempered pair), so the later
    // class blocks read only their own logits (not all C again: C²/4 reads a pixel at
    // C = 150, and more loop iterations than llvmpipe allows an invocation). One element
    // more than the pixel loops' trip count, so that Mesa does not copy their bodies PPT
    // times (grad.wgsl `PIXEL_SLOTS`).
    softmax_of: array<vec4<f32>, PPT + 1u>,
}

// A pixel's softmax pieces over its classes past the block (max, Σe, tempered max,
// tempered Σe) and its non-finite values there (count, first element), when the caller
// read them four pixels at a time (PAST_QUADS: `past_quad_pieces`).
struct PastPixel {
    pieces: vec4<f32>,
    bad: vec2<u32>,
}

// The classes past the block of four pixels (from i0 of global image b), one vec4 a
// class: each pixel's online max and sum (and tempered ones; the sums rescaled whenever
// the max grows) and non-finite count, which `block_pieces` then extends with the block.
// One read of a class serves four pixels, where the one-pixel path (`pieces`) reads each.
// Five slots for four pixels: an array exactly as long as the caller's pixel loop would
// make Mesa copy that loop's whole body four times (grad.wgsl `PIXEL_SLOTS`).
fn past_quad_pieces(b: u32, i0: u32) -> array<PastPixel, 5> {
    var m = vec4(-3.4e38);
    var se = vec4(0.0);
    var mt = vec4(-3.4e38);
    var st = vec4(0.0);
    var n_bad = vec4(0u);
    var first_bad = vec4(IGNORE);
    for (var c = BLOCK; c < C; c++) {
        let z = quad_logits(b, c, i0);
        let bad = (bitcast<vec4<u32>>(z) & vec4(0x7f800000u)) == vec4(0x7f800000u);
        n_bad += select(vec4(0u), vec4(1u), bad);
        first_bad = min(first_bad, select(vec4(IGNORE), elem(b, c, i0) + vec4(0u, 1u, 2u, 3u), bad));
        let m_new = max(m, z);
        se = se * exp(m - m_new) + exp(z - m_new);
        m = m_new;
        if TEMPERED {
            let v = dims.temperature * z;
            let mt_new = max(mt, v);
            st = st * exp(mt - mt_new) + exp(v - mt_new);
            mt = mt_new;
        }
    }
    var out: array<PastPixel, 5>;
    for (var p = 0u; p < 4u; p++) {
        out[p] = PastPixel(vec4(m[p], se[p], mt[p], st[p]), vec2(n_bad[p], first_bad[p]));
    }
    return out;
}

// Adds pixel k (flat position i of global image b, label y, first logits z unless
// NORMS_ONLY) of an invocation to its totals, class sums and bad input, writes its loss
// maps and, in the one-pass form, its gradient (`put_grad`; `dz`: its block of a quad).
fn stats_pixel(acc: ptr<function, Totals>, sums: ptr<function, ClassSums>, bad: ptr<function, BadInput>, terms: PixelTerms, cs: ptr<function, Consts>, k: u32, b: u32, i: u32, y: u32, z: ptr<function, Block>, dz: ptr<function, Block>, past: PastPixel) {
    let kinds = terms.kinds;
    let opt = terms.opt;
    let offs = terms.offs;
    var yk = y;
    if NORMS_ONLY {
        // A bad label (≥ C) is left out here as in the full pass, which reports it.
        if yk != IGNORE && yk < C {
            (*acc).counts.x += 1.0;
            for (var t = 0u; t < N_PIX; t++) {
                (*acc).norms[t] += pixel_norm(kinds[t], t, offs[t], yk);
            }
        }
        return;
    }
    let n_maps = dims.total_batch * dims.spatial;
    var g = load_targets(b, i);
    var ez: Block;   // exp(z − max), computed once per class
    var et: Block;   // exp(T·z − max_T)
    // The softmax pieces come first: past the block they are what reads the logits that
    // the input check needs (an ignored or bad pixel's are discarded).
    var past_bad = vec2(0u, IGNORE);
    var p = vec2(0.0, 1.0);
    if !SIGMOID {
        if PAST_QUADS {
            p = block_pieces(z, &ez, 1.0, past.pieces.xy);
            past_bad = past.bad;
        } else {
            p = pieces(z, &ez, b, i, 1.0, &past_bad);
        }
    }
    if !check_pixel(b, i, yk, z, &g, bad, past_bad) {
        // Reported by the host as an error; the pixel is left out of every sum.
        yk = IGNORE;
    }
    if yk == IGNORE {
        for (var t = 0u; t < N_PIX; t++) {
            if has_map(t) {
                loss_map[t * n_maps + b * dims.spatial + i] = 0.0;
            }
        }
        zero_grad(b, i, cs, dz);
        return;
    }
    (*acc).counted |= 1u << k;
    (*acc).counts.x += 1.0;
    for (var t = 0u; t < N_PIX; t++) {
        (*acc).norms[t] += pixel_norm(kinds[t], t, offs[t], yk);
    }
    if SIGMOID {
        for (var t = 0u; t < N_PIX; t++) {
            (*acc).losses[t] += bce_pixel(t, offs[t], z, &g, b, i, yk);
        }
        for (var c = 0u; c < min(C, BLOCK); c++) {
            let ps = probs((*z)[c], vec2(0.0), vec2(0.0));
            accumulate(sums, c, ps.x, ps.y, g_of(&g, b, c, i, yk));
        }
        pixel_grad(cs, b, i, yk, true, z, &g, &ez, &et, vec2(0.0, 1.0), vec2(0.0, 1.0), dz);
        return;
    }
    var pt = vec2(0.0, 1.0);
    if TEMPERED {
        if PAST_QUADS {
            pt = block_pieces(z, &et, dims.temperature, past.pieces.zw);
        } else {
            var counted_already = vec2(0u, IGNORE);
            pt = pieces(z, &et, b, i, dims.temperature, &counted_already);
        }
    }
    if C > BLOCK {
        (*acc).softmax_of[k] = vec4(p, pt);
        if STORED_PIECES {
            softmax_pieces[b * dims.spatial + i] = vec4(p, pt);
        }
    }
    let lse = p.x + log(p.y);
    // The decomposition's plain CE: −Σ_c g_c log p_c.
    var plain = 0.0;
    if LABEL_KIND == LABELS_SOFT {
        for (var c = 0u; c < C; c++) {
            plain += g_of(&g, b, c, i, yk) * (lse - z_of(z, b, c, i));
        }
    } else {
        plain = lse - z_label(z, b, yk, i);
    }
    (*acc).counts.y += plain;
    for (var t = 0u; t < N_PIX; t++) {
        var l: f32;
        if is_ce(kinds[t]) {
            l = ce_pixel(t, opt[t], offs[t], z, &g, b, i, yk, lse, plain);
            if has_map(t) {
                loss_map[t * n_maps + b * dims.spatial + i] = l;
            }
        } else {
            l = focal_pixel(t, opt[t], offs[t], z, &g, &ez, b, i, yk, p, lse);
        }
        (*acc).losses[t] += l;
    }
    for (var c = 0u; c < min(C, BLOCK); c++) {
        let pc = over(ez[c], p.y);
        let sc = select(pc, over(et[c], pt.y), TEMPERED);
        accumulate(sums, c, pc, sc, g_of(&g, b, c, i, yk));
    }
    pixel_grad(cs, b, i, yk, true, z, &g, &ez, &et, p, pt, dz);
}

// Adds classes c0..c0+CHUNK of an invocation's pixel k (flat position i of global image b),
// whose logits are component p of z, to the chunk's sums `more`. A constant trip count, so
// the loop unrolls and `more` is indexed by constants: in a loop that stays a loop, every
// access to an invocation array is a lane-by-lane gather or scatter on lavapipe. The
// classes of the last chunk past C repeat class C − 1 and are not written.
fn past_sums(more: ptr<function, ClassSums>, acc: ptr<function, Totals>, b: u32, c0: u32, k: u32, i: u32, z: ptr<function, array<vec4<f32>, CHUNK>>, p: u32) {
    let yk = pixel_label(b, i);
    let sm = (*acc).softmax_of[k];
    for (var c = 0u; c < CHUNK; c++) {
        let cc = min(c0 + c, C - 1u);
        let ps = probs((*z)[c][p], sm.xy, sm.zw);
        accumulate(more, c, ps.x, ps.y, target_of(b, cc, i, yk));
    }
}

// The body of the entry point `main`, which the reduction strategy's file declares (it
// needs builtins of its own).
fn stats_tile(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    // Per pixel term, read once before any branch: kind, ε or γ, class vector.
    let terms = pixel_terms();
    let tile = flat_group(wid, nwg);
    if tile >= dims.batch * dims.tiles_per_image {
        return;
    }
    // b is the global image: rows of every dispatch of a call land in one partial buffer.
    let b = dims.image_offset + tile / dims.tiles_per_image;
    let base = (tile % dims.tiles_per_image) * TILE;
    // The tile's first partial row, and the row this invocation's sums go to.
    let tile_row = (b * dims.tiles_per_image + tile % dims.tiles_per_image) * dims.rows_per_tile;
    let row = (tile_row + sub_row()) * dims.row_width;
    let first = min(C, BLOCK);
    // The one-pass form's gradient constants (nothing in the stats stage alone).
    var cs = load_consts(b);

    var acc: Totals;
    var sums: ClassSums;             // the first block of classes
    var bad = BadInput(0u, IGNORE, 0u, IGNORE);
    // What `stats_pixel` reads when PAST_QUADS is off (nothing).
    let no_past = PastPixel(vec4(0.0), vec2(0u, IGNORE));
    if QUADS {
        for (var q = 0u; q < PPT; q += 4u) {
            let i0 = pixel_of(base, q, lid, WG, PPT);
            if i0 >= dims.spatial {
                break;
            }
            let ys = quad_labels(b, i0);
            var zq: Quad;
            if !NORMS_ONLY {
                zq = load_quad(b, i0);
            }
            var dq: Quad;
            for (var k = 0u; k < 4u; k++) {
                var z = quad_pixel(&zq, k);
                var dz: Block;
                stats_pixel(&acc, &sums, &bad, terms, &cs, q + k, b, i0 + k, ys[k], &z, &dz, no_past);
                set_quad_pixel(&dq, k, &dz);
            }
            store_quad_grad(b, i0, &dq);
        }
    } else if PAST_QUADS && !NORMS_ONLY && !SIGMOID {
        // Every quad is whole: its classes past the block first, one vec4 a class.
        for (var q = 0u; q < PPT; q += 4u) {
            let i0 = pixel_of(base, q, lid, WG, PPT);
            if i0 >= dims.spatial {
                break;
            }
            var past = past_quad_pieces(b, i0);
            for (var k = 0u; k < 4u; k++) {
                let yk = pixel_label(b, i0 + k);
                var z = load_logits(b, i0 + k);
                var unused: Block;
                stats_pixel(&acc, &sums, &bad, terms, &cs, q + k, b, i0 + k, yk, &z, &unused, past[k]);
            }
        }
    } else {
        for (var k = 0u; k < PPT; k++) {
            let i = pixel_of(base, k, lid, WG, PPT);
            if i >= dims.spatial {
                continue;
            }
            let yk = pixel_label(b, i);
            var z: Block;
            if !NORMS_ONLY {
                z = load_logits(b, i);
            }
            var unused: Block;
            stats_pixel(&acc, &sums, &bad, terms, &cs, k, b, i, yk, &z, &unused, no_past);
        }
    }
    publish(bad);
    if !NORMS_ONLY && CLASS_SUMS {
        flush(lid, row, 0u, first, &sums);
    }

    // Classes past the first block (C > BLOCK): read their logits, CHUNK classes at a
    // time. The bound is opaque to the compiler for the same reason as flush's.
    var c_rt = min(C, dims.row_width);
    if NORMS_ONLY || !CLASS_SUMS || C <= BLOCK {
        c_rt = 0u;
    }
    for (var c0 = BLOCK; c0 < c_rt; c0 += CHUNK) {
        var more: ClassSums;
        if PAST_QUADS {
            for (var q = 0u; q < PPT; q += 4u) {
                if ((acc.counted >> q) & 15u) == 0u {
                    continue;
                }
                let i0 = pixel_of(base, q, lid, WG, PPT);
                var z = chunk_quad_logits(b, c0, i0);
                for (var p = 0u; p < 4u; p++) {
                    if (acc.counted & (1u << (q + p))) != 0u {
                        past_sums(&more, &acc, b, c0, q + p, i0 + p, &z, p);
                    }
                }
            }
        } else {
            for (var k = 0u; k < PPT; k++) {
                if (acc.counted & (1u << k)) != 0u {
                    let i = pixel_of(base, k, lid, WG, PPT);
                    var z: array<vec4<f32>, CHUNK>;
                    for (var c = 0u; c < CHUNK; c++) {
                        z[c].x = logit(b, min(c0 + c, C - 1u), i);
                    }
                    past_sums(&more, &acc, b, c0, k, i, &z, 0u);
                }
            }
        }
        flush(lid, row, c0, min(c_rt - c0, CHUNK), &more);
    }

    let s = reduce3(lid, acc.counts, acc.losses, acc.norms);
    if s.writer {
        let o = row + C * PER_CLASS;
        for (var k = 0u; k < 4u; k++) {
            partial[o + ROW_VALID + k] = s.a[k];
            partial[o + ROW_LOSS + k] = s.b[k];
            partial[o + ROW_NORM + k] = s.c[k];
        }
    }
    clear_spare_rows(tile_row);
}
