// The gradient of a staged sub-tile (staged.wgsl, ARCHITECTURE.md "Staged classes"): the
// staged form of grad_pixel.wgsl's `pixel_grad`, linked by the one-pass stats stage and by
// the staged grad stage (`grad_main`, below). Per pixel the sums every class's gradient
// needs (R invocations a pixel, merged in order), then every element's ∂L/∂z in memory
// order. CPU port: src/reference/grad.rs.

// Writes ∂L/∂z of every element of the sub-tile at pixel `at` of global image b, whose
// pieces and labels `stage_pieces` has left in workgroup memory.
fn stage_grad(b: u32, at: u32, lid: u32, cs: ptr<function, Consts>) {
    let temp = dims.temperature;
    if !SIGMOID {
        let p = lid % STAGE_PIXELS;
        let y = px_label[p];
        let pieces = px_pieces[p];
        let log_se = log(pieces.y);
        var sums = GradSums(0.0, 0.0, vec4(0.0));
        if y != IGNORE && (STAT_TERMS || !ce_closed_form()) {
            for (var c = lid / STAGE_PIXELS; c < opaque(C); c += WG / STAGE_PIXELS) {
                let zc = staged_logit(c, p);
                var s = 0.0;
                if TEMPERED {
                    s = over(exp(temp * zc - pieces.z), pieces.w);
                }
                let add = grad_sums_of(cs, coef_of(cs, b, c), c, zc, staged_target(c, p, y), exp(zc - pieces.x), s, pieces.xy, log_se);
                sums.ap += add.ap;
                sums.us += add.us;
                sums.h += add.h;
            }
        }
        var h = vec4(0.0);
        var apus = vec4(0.0);
        if ce_closed_form() {
            h = ce_h_sum(cs, y);
        } else if STAT_TERMS && N_PIX <= 2u {
            // One merge for both: Σh of up to two pixel terms beside Σ a·p and Σ u·s.
            let both = pixel_total(lid, vec4(sums.h.xy, sums.ap, sums.us));
            h = vec4(both.xy, 0.0, 0.0);
            apus = vec4(both.zw, 0.0, 0.0);
        } else {
            h = pixel_total(lid, sums.h);
        }
        if STAT_TERMS && N_PIX > 2u {
            apus = pixel_total(lid, vec4(sums.ap, sums.us, 0.0, 0.0));
        }
        if lid < STAGE_PIXELS {
            px_h[p] = h;
            px_grad[p] = vec4(apus.xy, log_se, 0.0);
        }
        workgroupBarrier();
    }
    let n = STAGE_PIXELS * C;
    for (var e = lid; e < opaque(n); e += WG) {
        let cp = staged_class_pixel(e);
        let c = cp.x;
        let p = cp.y;
        let i = at + p;
        if i >= dims.spatial {
            continue;
        }
        let y = px_label[p];
        let zc = staged_logit(c, p);
        let gc = staged_target(c, p, y);
        var dz = 0.0;
        if SIGMOID {
            dz = sigmoid_dz(cs, coef_of(cs, b, c), c, zc, gc);
        } else {
            let pieces = px_pieces[p];
            let pg = px_grad[p];
            var s = 0.0;
            if TEMPERED {
                s = over(exp(temp * zc - pieces.z), pieces.w);
            }
            dz = class_dz(cs, coef_of(cs, b, c), c, zc, gc, exp(zc - pieces.x), s, pieces.xy, pg.z, GradSums(pg.x, pg.y, px_h[p]));
        }
        store_grad(elem(b, c, i) + dims.grad_shift, select(0.0, dz * (*cs).up, y != IGNORE));
    }
}

// Stage 3 for staged calls: grad.wgsl's pass over a tile of STAGED_TILE pixels, a sub-tile
// at a time (the logits read once: ARCHITECTURE.md, "Staged classes").
@compute @workgroup_size(PIXEL_WG)
fn grad_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    let per_image = (dims.spatial + STAGED_TILE - 1u) / STAGED_TILE;
    let b = dims.image_offset + min(group / per_image, dims.batch - 1u);
    let base = (group % per_image) * STAGED_TILE;
    load_class_weights();
    var cs = load_consts(b);
    if group >= dims.batch * per_image {
        return;
    }
    for (var at = base; at < min(base + STAGED_TILE, dims.spatial); at += STAGE_PIXELS) {
        stage(b, at, lid);
        stage_pieces(b, at, lid, false);
        stage_grad(b, at, lid, &cs);
    }
}
