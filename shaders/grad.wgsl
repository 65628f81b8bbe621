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

fn pixel_scale(t: u32) -> f32 {
    return fin[4u * dims.total_batch * C + t];
}

// A per-class weight of a pixel term from its hoisted vector offset (1 when absent).
fn term_weight(off: f32, c: u32) -> f32 {
    if off < 0.0 {
        return 1.0;
    }
    return params[u32(off) + c];
}

// a_c = ∂L/∂p_c of the statistic terms; without tempering, s = p and the region
// coefficient joins a.
fn stat_a(k: vec4<f32>, p: f32, g: f32) -> f32 {
    return k.x + 2.0 * p * k.y + g * k.z + select(k.w, 0.0, TEMPERED);
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = flat_group(wid, nwg) * 256u + lid;
    if j >= dims.batch * dims.spatial {
        return;
    }
    let b = dims.image_offset + j / dims.spatial;
    let i = j % dims.spatial;
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
    let temp = dims.temperature;
    // Per pixel term, read once: kind, ε or γ, scale, offset of the class vector (−1: none).
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

    if SIGMOID {
        for (var c = 0u; c < C; c++) {
            let z = logit(b, c, i);
            let g = target_of(b, c, i, y);
            let p = sigmoid(z);
            let k = coef(b, c);
            var dz = stat_a(k, p, g) * p * sigmoid(-z);
            if TEMPERED {
                dz += temp * k.w * sigmoid(temp * z) * sigmoid(-temp * z);
            }
            for (var t = 0u; t < N_PIX; t++) {
                let pw = term_weight(offs[t], c);
                dz += scales[t] * (p * (1.0 - g + pw * g) - pw * g);
            }
            grad[elem(b, c, i) + dims.grad_shift] = dz;
        }
        return;
    }

    let sm = softmax_pieces(b, i, 1.0);
    let log_se = log(sm.y);
    var smt = vec2(0.0, 1.0);
    if TEMPERED {
        smt = softmax_pieces(b, i, temp);
    }
    // First class loop: the sums every class's gradient needs.
    var ap = 0.0;               // Σ_k a_k p_k
    var us = 0.0;               // Σ_k u_k s_k
    var pixel_sum = vec4(0.0);  // per pixel term: Σ_k w_k t_k (CE) or Σ_k h_k (focal)
    for (var c = 0u; c < C; c++) {
        let z = logit(b, c, i);
        let g = target_of(b, c, i, y);
        let e = exp(z - sm.x);
        let p = e / sm.y;
        let k = coef(b, c);
        ap += stat_a(k, p, g) * p;
        if TEMPERED {
            us += k.w * exp(temp * z - smt.x) / smt.y;
        }
        for (var t = 0u; t < N_PIX; t++) {
            if kinds[t] == KIND_CE {
                let eps = opt[t];
                pixel_sum[t] += term_weight(offs[t], c) * ((1.0 - eps) * g + eps / f32(C));
            } else if g != 0.0 {
                let q = max(sm.y - e, 0.0) / sm.y;
                pixel_sum[t] += focal_h(p, q, z - sm.x - log_se, term_weight(offs[t], c) * g, opt[t]);
            }
        }
    }
    // Second class loop: write ∂L/∂z_c.
    for (var c = 0u; c < C; c++) {
        let z = logit(b, c, i);
        let g = target_of(b, c, i, y);
        let e = exp(z - sm.x);
        let p = e / sm.y;
        let k = coef(b, c);
        var dz = p * (stat_a(k, p, g) - ap);
        if TEMPERED {
            let s = exp(temp * z - smt.x) / smt.y;
            dz += temp * s * (k.w - us);
        }
        for (var t = 0u; t < N_PIX; t++) {
            var h = 0.0;
            if kinds[t] == KIND_CE {
                let eps = opt[t];
                h = -term_weight(offs[t], c) * ((1.0 - eps) * g + eps / f32(C));
            } else if g != 0.0 {
                let q = max(sm.y - e, 0.0) / sm.y;
                h = focal_h(p, q, z - sm.x - log_se, term_weight(offs[t], c) * g, opt[t]);
            }
            // CE: p_c·Σ w t − w_c t_c; focal: h_c − p_c·Σ h.
            var ps = -p * pixel_sum[t];
            if kinds[t] == KIND_CE {
                ps = -ps;
            }
            dz += scales[t] * (h + ps);
        }
        grad[elem(b, c, i) + dims.grad_shift] = dz;
    }
}
