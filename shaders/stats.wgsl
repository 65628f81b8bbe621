// Stage 1: one pass over logits and labels. A workgroup covers a tile of TILE pixels of one
// image and writes one row of partial sums: per class (P, Q, I, G, H, U), then the valid
// count, the plain CE and (loss, normaliser) per pixel term. No float atomics: the order
// of every sum is fixed, so the results are bitwise reproducible.
// CPU port: src/reference/stats.rs.

@group(0) @binding(0) var<storage, read> logits: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<uniform> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;
@group(0) @binding(8) var<storage, read_write> loss_map: array<f32>;
// Bad input found on the device: [non-finite logits, first such element, invalid labels,
// first such label position] (the host sets the firsts to 0xFFFFFFFF before each call).
@group(0) @binding(10) var<storage, read_write> check: array<atomic<u32>, 4>;

// Counts and locates non-finite logits and invalid labels of one pixel; true when clean.
fn check_pixel(b: u32, i: u32, y: u32) -> bool {
    var clean = true;
    for (var c = 0u; c < C; c++) {
        if !finite(logit(b, c, i)) {
            atomicAdd(&check[0], 1u);
            atomicMin(&check[1], elem(b, c, i));
            clean = false;
        }
        if LABEL_KIND == 2u {
            let g = target_of(b, c, i, y);
            if !finite(g) || g < 0.0 || g > 1.0 {
                atomicAdd(&check[2], 1u);
                atomicMin(&check[3], elem(b, c, i));
                clean = false;
            }
        }
    }
    if LABEL_KIND != 2u && y != IGNORE && y >= C {
        atomicAdd(&check[2], 1u);
        atomicMin(&check[3], b * dims.spatial + i);
        clean = false;
    }
    return clean;
}

const WG: u32 = 256u;
// Pixels per invocation: the per-pixel softmax pieces stay in registers (a const-sized
// array indexed by unrolled loops) while the class loop reuses them.
const PPT: u32 = 16u;
const TILE: u32 = WG * PPT;
// The reduction folds WG values in two steps of FOLD (FOLD² = WG).
const FOLD: u32 = 16u;

var<workgroup> red_a: array<vec4<f32>, WG>;
var<workgroup> red_b: array<vec4<f32>, WG>;
var<workgroup> red_c: array<vec4<f32>, WG>;

// Sums three vec4 over the workgroup in a fixed order; the totals land in red_*[0].
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) {
    workgroupBarrier();
    red_a[lid] = a;
    red_b[lid] = b;
    red_c[lid] = c;
    workgroupBarrier();
    if lid < FOLD {
        var sa = vec4(0.0);
        var sb = vec4(0.0);
        var sc = vec4(0.0);
        for (var k = 0u; k < FOLD; k++) {
            sa += red_a[lid * FOLD + k];
            sb += red_b[lid * FOLD + k];
            sc += red_c[lid * FOLD + k];
        }
        red_a[lid * FOLD] = sa;
        red_b[lid * FOLD] = sb;
        red_c[lid * FOLD] = sc;
    }
    workgroupBarrier();
    if lid == 0u {
        var sa = vec4(0.0);
        var sb = vec4(0.0);
        var sc = vec4(0.0);
        for (var k = 0u; k < FOLD; k++) {
            sa += red_a[k * FOLD];
            sb += red_b[k * FOLD];
            sc += red_c[k * FOLD];
        }
        red_a[0] = sa;
        red_b[0] = sb;
        red_c[0] = sc;
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = flat_group(wid, nwg);
    if tile >= dims.batch * dims.tiles_per_image {
        return;
    }
    // b is the global image: rows of every dispatch of a call land in one partial buffer.
    let b = dims.image_offset + tile / dims.tiles_per_image;
    let base = (tile % dims.tiles_per_image) * TILE;
    let row = (b * dims.tiles_per_image + tile % dims.tiles_per_image) * dims.row_width;
    let n_maps = dims.total_batch * dims.spatial;

    var pix: array<u32, PPT>;
    var y: array<u32, PPT>;
    var ok: array<bool, PPT>;
    var sm: array<vec2<f32>, PPT>;   // (max, Σexp) of softmax(z)
    var smt: array<vec2<f32>, PPT>;  // the same for softmax(T·z)
    var counts = vec4(0.0);          // valid pixels, plain CE
    var losses = vec4(0.0);          // per pixel term
    var norms = vec4(0.0);           // per pixel term

    for (var k = 0u; k < PPT; k++) {
        let i = base + k * WG + lid;
        pix[k] = i;
        ok[k] = false;
        if i >= dims.spatial {
            continue;
        }
        var yk = 0u;
        if LABEL_KIND != 2u {
            yk = class_label(b, i);
        }
        y[k] = yk;
        if !check_pixel(b, i, yk) {
            // Reported by the host as an error; the pixel is left out of every sum.
            yk = IGNORE;
            y[k] = IGNORE;
        }
        if yk == IGNORE {
            for (var t = 0u; t < N_PIX; t++) {
                if record(t, 5u) == 2.0 {
                    loss_map[t * n_maps + b * dims.spatial + i] = 0.0;
                }
            }
            continue;
        }
        ok[k] = true;
        counts.x += 1.0;
        if SIGMOID {
            for (var t = 0u; t < N_PIX; t++) {
                // bce: Σ_c pw_c·y_c·softplus(−z_c) + (1 − y_c)·softplus(z_c)
                var l = 0.0;
                for (var c = 0u; c < C; c++) {
                    let z = logit(b, c, i);
                    let g = target_of(b, c, i, yk);
                    l += class_param(t, c) * g * softplus(-z) + (1.0 - g) * softplus(z);
                }
                losses[t] += l;
                norms[t] += f32(C);
            }
            continue;
        }
        let p = softmax_pieces(b, i, 1.0);
        sm[k] = p;
        if TEMPERED {
            smt[k] = softmax_pieces(b, i, dims.temperature);
        }
        let lse = p.x + log(p.y);
        // The decomposition's plain CE: −Σ_c g_c log p_c.
        var plain = 0.0;
        if LABEL_KIND == 2u {
            for (var c = 0u; c < C; c++) {
                plain += target_of(b, c, i, yk) * (lse - logit(b, c, i));
            }
        } else {
            plain = lse - logit(b, yk, i);
        }
        counts.y += plain;
        for (var t = 0u; t < N_PIX; t++) {
            let kind = u32(record(t, 0u));
            var l = 0.0;
            var n = 1.0;
            if kind == KIND_CE {
                let eps = record(t, 4u);
                var smoothing = 0.0;
                if eps > 0.0 {
                    for (var c = 0u; c < C; c++) {
                        smoothing += class_param(t, c) * (lse - logit(b, c, i));
                    }
                    smoothing *= eps / f32(C);
                }
                if LABEL_KIND == 2u {
                    for (var c = 0u; c < C; c++) {
                        l += class_param(t, c) * target_of(b, c, i, yk) * (lse - logit(b, c, i));
                    }
                    l = (1.0 - eps) * l + smoothing;
                } else {
                    n = class_param(t, yk);
                    l = (1.0 - eps) * n * plain + smoothing;
                }
                if record(t, 5u) == 2.0 {
                    loss_map[t * n_maps + b * dims.spatial + i] = l;
                }
            } else {
                // focal: Σ_c α_c g_c (1 − p_c)^γ (−log p_c), 1 − p_c = Σ_{k≠c} e_k / Σe
                let gamma = record(t, 4u);
                for (var c = 0u; c < C; c++) {
                    let g = target_of(b, c, i, yk);
                    if g != 0.0 {
                        let z = logit(b, c, i);
                        let e = exp(z - p.x);
                        let q = max(p.y - e, 0.0) / p.y;
                        l += class_param(t, c) * g * safe_pow(q, gamma) * (lse - z);
                    }
                }
            }
            losses[t] += l;
            norms[t] += n;
        }
    }

    for (var c = 0u; c < C; c++) {
        var acc_a = vec4(0.0);
        var acc_b = vec4(0.0);
        for (var k = 0u; k < PPT; k++) {
            if ok[k] {
                let i = pix[k];
                let z = logit(b, c, i);
                let g = target_of(b, c, i, y[k]);
                var p: f32;
                var s: f32;
                if SIGMOID {
                    p = sigmoid(z);
                    s = select(p, sigmoid(dims.temperature * z), TEMPERED);
                } else {
                    p = exp(z - sm[k].x) / sm[k].y;
                    s = p;
                    if TEMPERED {
                        s = exp(dims.temperature * z - smt[k].x) / smt[k].y;
                    }
                }
                acc_a += vec4(p, p * p, p * g, g);
                acc_b += vec4(g * g, s, 0.0, 0.0);
            }
        }
        reduce3(lid, acc_a, acc_b, vec4(0.0));
        if lid == 0u {
            let o = row + c * PER_CLASS;
            let ra = red_a[0];
            let rb = red_b[0];
            partial[o] = ra.x;
            partial[o + 1u] = ra.y;
            partial[o + 2u] = ra.z;
            partial[o + 3u] = ra.w;
            partial[o + 4u] = rb.x;
            partial[o + 5u] = rb.y;
            partial[o + 6u] = 0.0;
            partial[o + 7u] = 0.0;
        }
    }
    reduce3(lid, counts, losses, norms);
    if lid == 0u {
        let o = row + C * PER_CLASS;
        for (var k = 0u; k < 4u; k++) {
            partial[o + k] = red_a[0][k];
            partial[o + 4u + k] = red_b[0][k];
            partial[o + 8u + k] = red_c[0][k];
        }
    }
}
