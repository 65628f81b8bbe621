// Stage 3: one invocation per pixel recomputes p from the logits (cheaper than storing it)
// and writes ∂L/∂z for every class from the coefficient table and the pixel-term scales.
// CPU port: src/reference/grad.rs.

@group(0) @binding(0) var<storage, read> logits: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<uniform> dims: Dims;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(6) var<storage, read> fin: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad: array<f32>;

fn coef(b: u32, c: u32) -> vec4<f32> {
    let o = (b * C + c) * 4u;
    return vec4(fin[o], fin[o + 1u], fin[o + 2u], fin[o + 3u]);
}

// Class c's coefficients, from the workgroup's copy for the first BLOCK classes.
fn coef_of(kc: ptr<function, array<vec4<f32>, BLOCK>>, b: u32, c: u32) -> vec4<f32> {
    if c < BLOCK {
        return (*kc)[c];
    }
    return coef(b, c);
}

fn pixel_scale(t: u32) -> f32 {
    return fin[4u * dims.total_batch * C + t];
}

// a_c = ∂L/∂p_c of the statistic terms; without tempering, s = p and the region
// coefficient joins a.
fn stat_a(k: vec4<f32>, p: f32, g: f32) -> f32 {
    return k.x + 2.0 * p * k.y + g * k.z + select(k.w, 0.0, TEMPERED);
}

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // A workgroup covers WG pixels of one image, so the image and everything read from it
    // below are uniform over the workgroup, read before any branch: one scalar load per
    // SIMD row on CPU Vulkan, a broadcast on GPUs, instead of a load per pixel.
    let group = flat_group(wid, nwg);
    let per_image = (dims.spatial + WG - 1u) / WG;
    let b = dims.image_offset + min(group / per_image, dims.batch - 1u);
    let i = (group % per_image) * WG + lid;
    let temp = dims.temperature;
    var kc: array<vec4<f32>, BLOCK>;
    for (var c = 0u; c < min(C, BLOCK); c++) {
        kc[c] = coef(b, c);
    }
    // Per pixel term: kind, ε or γ, scale, offset of the class vector (−1: none).
    var kinds = vec4<u32>(0u);
    var opt = vec4(0.0);
    var scales = vec4(0.0);
    var offs = vec4(-1.0);
    for (var t = 0u; t < N_PIX; t++) {
        kinds[t] = u32(record(t, 0u));
        opt[t] = record(t, 4u);
        scales[t] = pixel_scale(t);
        offs[t] = record(t, 3u);
    }
    if group >= dims.batch * per_image || i >= dims.spatial {
        return;
    }
    var y = 0u;
    if LABEL_KIND != 2u {
        y = class_label(b, i);
    }
    if y == IGNORE {
        for (var c = 0u; c < C; c++) {
            grad[elem(b, c, i) + dims.grad_shift] = 0.0;
        }
        return;
    }
    var z = load_logits(b, i);
    var g = load_targets(b, i);

    if SIGMOID {
        for (var c = 0u; c < C; c++) {
            let zc = z_of(&z, b, c, i);
            let gc = g_of(&g, b, c, i, y);
            let p = sigmoid(zc);
            let k = coef_of(&kc, b, c);
            var dz = stat_a(k, p, gc) * p * sigmoid(-zc);
            if TEMPERED {
                dz += temp * k.w * sigmoid(temp * zc) * sigmoid(-temp * zc);
            }
            for (var t = 0u; t < N_PIX; t++) {
                let pw = term_weight(offs[t], c);
                dz += scales[t] * (p * (1.0 - gc + pw * gc) - pw * gc);
            }
            grad[elem(b, c, i) + dims.grad_shift] = dz;
        }
        return;
    }

    var ez: Block;   // exp(z − max), computed once per class
    var et: Block;   // exp(T·z − max_T)
    let sm = pieces(&z, &ez, b, i, 1.0);
    let log_se = log(sm.y);
    var smt = vec2(0.0, 1.0);
    if TEMPERED {
        smt = pieces(&z, &et, b, i, temp);
    }
    // First class loop: the sums every class's gradient needs.
    var ap = 0.0;               // Σ_k a_k p_k
    var us = 0.0;               // Σ_k u_k s_k
    var pixel_sum = vec4(0.0);  // per pixel term: Σ_k w_k t_k (CE) or Σ_k h_k (focal)
    for (var c = 0u; c < C; c++) {
        let zc = z_of(&z, b, c, i);
        let gc = g_of(&g, b, c, i, y);
        let e = exp_of(&ez, &z, b, c, i, 1.0, sm.x);
        let p = e / sm.y;
        let k = coef_of(&kc, b, c);
        ap += stat_a(k, p, gc) * p;
        if TEMPERED {
            us += k.w * exp_of(&et, &z, b, c, i, temp, smt.x) / smt.y;
        }
        for (var t = 0u; t < N_PIX; t++) {
            if is_ce(kinds[t]) {
                let eps = opt[t];
                pixel_sum[t] += term_weight(offs[t], c) * ((1.0 - eps) * gc + eps / f32(C));
            } else if gc != 0.0 {
                let q = max(sm.y - e, 0.0) / sm.y;
                pixel_sum[t] += focal_h(p, q, zc - sm.x - log_se, term_weight(offs[t], c) * gc, opt[t]);
            }
        }
    }
    // Second class loop: write ∂L/∂z_c.
    for (var c = 0u; c < C; c++) {
        let zc = z_of(&z, b, c, i);
        let gc = g_of(&g, b, c, i, y);
        let e = exp_of(&ez, &z, b, c, i, 1.0, sm.x);
        let p = e / sm.y;
        let k = coef_of(&kc, b, c);
        var dz = p * (stat_a(k, p, gc) - ap);
        if TEMPERED {
            let s = exp_of(&et, &z, b, c, i, temp, smt.x) / smt.y;
            dz += temp * s * (k.w - us);
        }
        for (var t = 0u; t < N_PIX; t++) {
            var h = 0.0;
            if is_ce(kinds[t]) {
                let eps = opt[t];
                h = -term_weight(offs[t], c) * ((1.0 - eps) * gc + eps / f32(C));
            } else if gc != 0.0 {
                let q = max(sm.y - e, 0.0) / sm.y;
                h = focal_h(p, q, zc - sm.x - log_se, term_weight(offs[t], c) * gc, opt[t]);
            }
            // CE: p_c·Σ w t − w_c t_c; focal: h_c − p_c·Σ h.
            var ps = -p * pixel_sum[t];
            if is_ce(kinds[t]) {
                ps = -ps;
            }
            dz += scales[t] * (h + ps);
        }
        grad[elem(b, c, i) + dims.grad_shift] = dz;
    }
}
