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
// invocation first reads every logit of each of its pixels once for the softmax pieces (an
// online max and sum), then takes the classes CHUNK at a time, each chunk's coefficients
// read once for all its pixels: one pass over the chunks adds each pixel's sums (unless CE
// alone has them in closed form), another writes the gradient. Three reads of a logit and
// one write, and every class loop that touches an array is CHUNK long, which Mesa unrolls:
// in the register path's loops over 150 classes, which it does not unroll, every access to
// an invocation array was a gather or scatter lane by lane on lavapipe (BENCHMARKS.md,
// "The stats stage's class block").
override GRAD_CHUNKS: bool = false;
const CHUNK: u32 = 8u;

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

// The logits of classes c0..c0+CHUNK of the quad of pixels i0..i0+4 of global image b
// (classes past C repeat C − 1).
fn chunk_quad_logits(b: u32, c0: u32, i0: u32) -> array<vec4<f32>, CHUNK> {
    var z: array<vec4<f32>, CHUNK>;
    for (var k = 0u; k < CHUNK; k++) {
        z[k] = quad_logits(b, min(c0 + k, C - 1u), i0);
    }
    return z;
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

// Class c's logit zc adds its share to the GradSums `sums` of pixel i of global image b
// (label y, pieces sm, log Σe), with its coefficients k; `real`: c is not a repeat past C.
fn chunk_sums_add(cs: ptr<function, Consts>, sums: ptr<function, GradSums>, k: vec4<f32>, b: u32, c: u32, i: u32, y: u32, zc: f32, sm: vec4<f32>, log_se: f32, real: bool) {
    var s = 0.0;
    if TEMPERED {
        s = exp(dims.temperature * zc - sm.z) / sm.w;
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
            s = exp(dims.temperature * zc - sm.z) / sm.w;
        }
        dz = class_dz(cs, k, c, zc, gc, exp(zc - sm.x), s, sm.xy, log_se, sums);
    }
    return select(0.0, dz * (*cs).up, y != IGNORE);
}

// The first GradSums of a pixel with label y: Σh in closed form for CE alone, else zeros.
fn first_sums(cs: ptr<function, Consts>, y: u32) -> GradSums {
    var sums = GradSums(0.0, 0.0, vec4(0.0));
    if ce_closed_form() {
        sums.h = ce_h_sum(cs, y);
    }
    return sums;
}

// Whether the chunked path has a pass for the sums (not in sigmoid mode nor for CE alone).
fn chunk_sums_pass() -> bool {
    return !SIGMOID && !ce_closed_form();
}

// The gradient of an invocation's pixels (from base, PPT of them) of global image b, class
// chunk by class chunk (`GRAD_CHUNKS`; with QUADS, `grad_chunk_quads`).
fn grad_chunks(cs: ptr<function, Consts>, b: u32, base: u32, lid: u32) {
    if QUADS {
        grad_chunk_quads(cs, b, base, lid);
        return;
    }
    var px: ChunkPixels;
    for (var j = 0u; j < PPT; j++) {
        let i = pixel_of(base, j, lid, WG, PPT);
        if i >= dims.spatial {
            break;
        }
        px.n = j + 1u;
        let y = pixel_label(b, i);
        px.labels[j] = y;
        var sm = vec4(0.0, 1.0, 0.0, 1.0);
        var unused = vec2(0u, IGNORE);   // the stats pass reports bad input
        if !SIGMOID {
            sm = vec4(online_pieces(b, i, 1.0, 0u, vec2(-3.4e38, 0.0), &unused), sm.zw);
            if TEMPERED {
                sm = vec4(sm.xy, online_pieces(b, i, dims.temperature, 0u, vec2(-3.4e38, 0.0), &unused));
            }
        }
        px.pieces[j] = sm;
        px.sums[j] = first_sums(cs, y);
    }
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
    var px: ChunkPixels;
    for (var q = 0u; q < PPT; q += 4u) {
        let i0 = pixel_of(base, q, lid, WG, PPT);
        if i0 >= dims.spatial {
            break;
        }
        px.n = q + 4u;
        // The online max and sum of the quad's four pixels side by side.
        var m = vec4(-3.4e38);
        var se = vec4(0.0);
        var mt = vec4(-3.4e38);
        var st = vec4(0.0);
        if !SIGMOID {
            for (var c = 0u; c < C; c++) {
                let z = quad_logits(b, c, i0);
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
        }
        for (var p = 0u; p < 4u; p++) {
            let y = pixel_label(b, i0 + p);
            px.labels[q + p] = y;
            px.pieces[q + p] = select(vec4(m[p], se[p], mt[p], st[p]), vec4(0.0, 1.0, 0.0, 1.0), SIGMOID);
            px.sums[q + p] = first_sums(cs, y);
        }
    }
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
