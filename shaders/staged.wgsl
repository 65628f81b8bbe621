// The pixel stages for calls with more classes than an invocation's register block holds:
// every class of a sub-tile of SP pixels is staged in workgroup memory, so each logit (and
// soft target) is read from device memory once per pass at any C up to STAGE_FLOATS (half
// that with soft labels). ARCHITECTURE.md, "Staged classes".
//
// A sub-tile goes through the workgroup in phases, each between barriers:
// 1. `stage`: the workgroup copies SP pixels × C classes in memory order (coalesced on
//    GPUs: runs of SP pixels a class plane, or whole pixels channels-last) and the labels.
// 2. `stage_pieces`: R = WG / SP invocations a pixel, each over classes r, r + R, …, find
//    its softmax max and Σe (online) and check its values; the R shares are merged
//    pairwise in a fixed tree (log2 R steps).
// 3. the pixel sums (losses here; the gradient's sums in staged_grad.wgsl), the same way.
// 4. `stage_class_sums`: each class's sums over the tile are kept by one invocation
//    (classes lid, lid + WG, …), pixel by pixel in order; no reduction across invocations.
// 5. the one-pass form's gradient (staged_grad.wgsl), element by element in memory order.
// Every sum has a fixed order, so results are bitwise reproducible (not bitwise equal to
// the register path's: its sums run in another order).
//
// The module also links stats.wgsl (bindings, the pixel terms' rules, BadInput) whose
// register-path body `stats_tile` is never called here; this file gives it the tile sum it
// names (a row per tile, like tile_sum/workgroup.wgsl). CPU port: src/reference/stats.rs
// and grad.rs (the same math; only the order of the sums differs).

// Pixels per staged tile (a workgroup's): WG · STAGED_PPT, so that the tiles' partial rows
// (8C + 12 floats a tile) stay a few per cent of the logits read, and small images still
// have a workgroup per SM.
const STAGED_TILE: u32 = WG * STAGED_PPT;
// Pixels per sub-tile, set by the host (`Strategy::stage_pixels`): a power of two, at most
// min(WG, STAGE_PIXELS_MAX), with SP·C floats (2·SP·C with soft labels) ≤ STAGE_FLOATS.
override STAGE_PIXELS: u32 = 1u;
const SP_MAX: u32 = STAGE_PIXELS_MAX;
// Classes an invocation keeps the sums of: classes lid, lid + WG, … < C ≤ STAGE_FLOATS.
const CLASSES_PER_INVOCATION: u32 = (STAGE_FLOATS + WG - 1u) / WG;

// `n` as a value the compiler cannot fold (every bound here is at most 2,048 < 256 ×
// row_width): loops with constant trip counts are unrolled by llvmpipe, and these loops'
// bodies between barriers compiled several times slower unrolled (cold shader cache: up to
// 11 s a pipeline at 150 classes).
fn opaque(n: u32) -> u32 {
    return min(n, dims.row_width << 8u);
}

// The sub-tile: logits as [class][pixel], then (soft labels) the targets the same way.
var<workgroup> staged: array<f32, STAGE_FLOATS>;
// One vec4 (and one flag) an invocation: the shares being merged.
var<workgroup> shares: array<vec4<f32>, WG>;
var<workgroup> share_flags: array<u32, WG>;
// Per pixel of the sub-tile: softmax pieces (max, Σe, tempered max, tempered Σe), the
// gradient's sums (Σ a·p, Σ u·s, log Σe, unused) and Σ h per pixel term, and the label
// (IGNORE for a pixel past the image or left out).
var<workgroup> px_pieces: array<vec4<f32>, SP_MAX>;
var<workgroup> px_grad: array<vec4<f32>, SP_MAX>;
var<workgroup> px_h: array<vec4<f32>, SP_MAX>;
var<workgroup> px_label: array<u32, SP_MAX>;

// Bad input among this invocation's staged values (published once, by the stats stage).
var<private> staged_bad: BadInput;

// (class, pixel) of element e of a sub-tile, in memory order.
fn staged_class_pixel(e: u32) -> vec2<u32> {
    if NHWC {
        return vec2(e % C, e / C);
    }
    return vec2(e / STAGE_PIXELS, e % STAGE_PIXELS);
}

// Logit of class c at pixel p of the sub-tile.
fn staged_logit(c: u32, p: u32) -> f32 {
    return staged[c * STAGE_PIXELS + p];
}

// Target of class c at pixel p of the sub-tile, whose label is y.
fn staged_target(c: u32, p: u32, y: u32) -> f32 {
    if LABEL_KIND == LABELS_SOFT {
        return staged[(C + c) * STAGE_PIXELS + p];
    }
    return select(0.0, 1.0, y == c);
}

// Copies pixels [at, at + SP) of global image b: logits (0 past the image), soft targets
// after them, labels (IGNORE past the image; 0 for soft labels).
fn stage(b: u32, at: u32, lid: u32) {
    // The previous sub-tile's readers are done.
    workgroupBarrier();
    let n = STAGE_PIXELS * C;
    for (var e = lid; e < opaque(n); e += WG) {
        let cp = staged_class_pixel(e);
        let i = at + cp.y;
        var v = 0.0;
        var t = 0.0;
        if i < dims.spatial {
            v = logit(b, cp.x, i);
            if LABEL_KIND == LABELS_SOFT {
                t = target_of(b, cp.x, i, 0u);
            }
        }
        staged[cp.x * STAGE_PIXELS + cp.y] = v;
        if LABEL_KIND == LABELS_SOFT {
            staged[n + cp.x * STAGE_PIXELS + cp.y] = t;
        }
    }
    if lid < STAGE_PIXELS {
        var y = IGNORE;
        if at + lid < dims.spatial {
            y = pixel_label(b, at + lid);
        }
        px_label[lid] = y;
    }
    workgroupBarrier();
}

// Softmax pieces (max, Σ exp(v − max)) with one more value v.
fn add_piece(a: vec2<f32>, v: f32) -> vec2<f32> {
    if v > a.x {
        return vec2(v, a.y * exp(a.x - v) + 1.0);
    }
    return vec2(a.x, a.y + exp(v - a.x));
}

// Two pixels' shares of softmax pieces merged.
fn merge_pieces(a: vec2<f32>, o: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, o.x);
    return vec2(m, a.y * exp(a.x - m) + o.y * exp(o.x - m));
}

// The softmax pieces of every pixel of the sub-tile (at pixel `at` of image b) into
// px_pieces; a pixel with a non-finite logit, a soft target outside [0, 1] or a label ≥ C
// gets the label IGNORE (with `check`, the stats stage's, also counted and located in
// staged_bad, as stats.wgsl's `check_pixel` does). The grad stage (no `check`) leaves such
// a pixel out too and writes zeros for it; the stats pass of the call reports the input.
fn stage_pieces(b: u32, at: u32, lid: u32, check: bool) {
    let p = lid % STAGE_PIXELS;
    let i = at + p;
    var sm = vec2(-3.4e38, 0.0);
    var smt = vec2(-3.4e38, 0.0);
    var flagged = 0u;
    if i < dims.spatial {
        for (var c = lid / STAGE_PIXELS; c < opaque(C); c += WG / STAGE_PIXELS) {
            let z = staged_logit(c, p);
            if !finite(z) {
                flagged = 1u;
                if check {
                    staged_bad.logits += 1u;
                    staged_bad.first_logit = min(staged_bad.first_logit, elem(b, c, i));
                }
            }
            if LABEL_KIND == LABELS_SOFT {
                let t = staged_target(c, p, 0u);
                if !finite(t) || t < 0.0 || t > 1.0 {
                    flagged = 1u;
                    if check {
                        staged_bad.labels += 1u;
                        staged_bad.first_label = min(staged_bad.first_label, elem(b, c, i));
                    }
                }
            }
            if !SIGMOID {
                sm = add_piece(sm, z);
                if TEMPERED {
                    smt = add_piece(smt, dims.temperature * z);
                }
            }
        }
    }
    shares[lid] = vec4(sm, smt);
    share_flags[lid] = flagged;
    // The R shares of each pixel merged pairwise, log2(R) steps (`pixel_total`).
    for (var half = WG / STAGE_PIXELS / 2u; half > 0u; half = opaque(half / 2u)) {
        workgroupBarrier();
        if lid < half * STAGE_PIXELS {
            let o = shares[lid + half * STAGE_PIXELS];
            let a = shares[lid];
            shares[lid] = vec4(merge_pieces(a.xy, o.xy), merge_pieces(a.zw, o.zw));
            share_flags[lid] |= share_flags[lid + half * STAGE_PIXELS];
        }
    }
    workgroupBarrier();
    if lid < STAGE_PIXELS {
        let all = shares[lid];
        var any = share_flags[lid];
        var y = px_label[lid];
        if LABEL_KIND != LABELS_SOFT && y != IGNORE && y >= C {
            any = 1u;
            if check {
                staged_bad.labels += 1u;
                staged_bad.first_label = min(staged_bad.first_label, b * dims.spatial + i);
            }
        }
        if any != 0u {
            y = IGNORE;
        }
        px_label[lid] = y;
        px_pieces[lid] = all;
    }
    workgroupBarrier();
}

// Sum of each pixel's R shares `v` for the pixel's first invocation (lid < SP); others get
// zeros. Pairwise, log2(R) steps of one add and a barrier (a fixed order: reproducible),
// rather than R − 1 adds by one invocation a pixel while the rest of the workgroup waits:
// R is 32 at 150 classes in GPUs' workgroups of 256.
fn pixel_total(lid: u32, v: vec4<f32>) -> vec4<f32> {
    workgroupBarrier();
    shares[lid] = v;
    for (var half = WG / STAGE_PIXELS / 2u; half > 0u; half = opaque(half / 2u)) {
        workgroupBarrier();
        if lid < half * STAGE_PIXELS {
            shares[lid] += shares[lid + half * STAGE_PIXELS];
        }
    }
    workgroupBarrier();
    var s = vec4(0.0);
    if lid < STAGE_PIXELS {
        s = shares[lid];
    }
    return s;
}

// The tile sum stats.wgsl names: the first SP invocations hold a tile's pixel totals (the
// others zeros), summed in order by invocation 0, which writes them.
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) -> Sums3 {
    var out = Sums3(lid == 0u, vec4(0.0), vec4(0.0), vec4(0.0));
    for (var k = 0u; k < 3u; k++) {
        workgroupBarrier();
        shares[lid] = select(select(c, b, k == 1u), a, k == 0u);
        workgroupBarrier();
        if lid == 0u {
            var s = vec4(0.0);
            for (var j = 0u; j < opaque(STAGE_PIXELS); j++) {
                s += shares[j];
            }
            if k == 0u {
                out.a = s;
            } else if k == 1u {
                out.b = s;
            } else {
                out.c = s;
            }
        }
    }
    return out;
}

// One row per tile (dims.rows_per_tile = 1).
fn sub_row() -> u32 {
    return 0u;
}

fn clear_spare_rows(tile_row: u32) {}

// A tile's class sums, kept by their invocation: classes lid + j·WG.
struct StagedSums {
    a: array<vec4<f32>, CLASSES_PER_INVOCATION>,
    b: array<vec2<f32>, CLASSES_PER_INVOCATION>,
}

// Adds the sub-tile's kept pixels to this invocation's classes, pixel by pixel in order.
fn stage_class_sums(lid: u32, sums: ptr<function, StagedSums>) {
    for (var j = 0u; j < opaque(CLASSES_PER_INVOCATION); j++) {
        let c = lid + j * WG;
        if c >= C {
            break;
        }
        for (var p = 0u; p < opaque(STAGE_PIXELS); p++) {
            let y = px_label[p];
            if y == IGNORE {
                continue;
            }
            let pieces = px_pieces[p];
            let ps = probs(staged_logit(c, p), pieces.xy, pieces.zw);
            let g = staged_target(c, p, y);
            (*sums).a[j] += vec4(ps.x, ps.x * ps.x, ps.x * g, g);
            if !hu_implied() {
                (*sums).b[j] += vec2(g * g, ps.y);
            }
        }
    }
}

// The labels-only form (NORMS_ONLY) of a staged tile: the valid count and the pixel terms'
// normalisers, an invocation per pixel.
fn staged_norms(b: u32, base: u32, lid: u32, row: u32, kinds: vec4<u32>, offs: vec4<f32>) {
    var counts = vec4(0.0);
    var norms = vec4(0.0);
    for (var k = lid; k < STAGED_TILE; k += WG) {
        let i = base + k;
        if i >= dims.spatial {
            break;
        }
        let y = pixel_label(b, i);
        if y != IGNORE && y < C {
            counts.x += 1.0;
            for (var t = 0u; t < N_PIX; t++) {
                norms[t] += pixel_norm(kinds[t], t, offs[t], y);
            }
        }
    }
    // Every invocation holds totals here: fold them into the first SP's order.
    let s = reduce_all(lid, counts, norms);
    if lid == 0u {
        write_scalars(row, s[0], vec4(0.0), s[1]);
    }
}

// The workgroup's sum of two vec4 (every invocation's), in order, for invocation 0.
fn reduce_all(lid: u32, a: vec4<f32>, b: vec4<f32>) -> array<vec4<f32>, 2> {
    var out: array<vec4<f32>, 2>;
    for (var k = 0u; k < 2u; k++) {
        workgroupBarrier();
        shares[lid] = select(b, a, k == 0u);
        workgroupBarrier();
        if lid == 0u {
            var s = vec4(0.0);
            for (var j = 0u; j < opaque(WG); j++) {
                s += shares[j];
            }
            out[k] = s;
        }
    }
    return out;
}

// A tile row's scalars: (valid, plain CE), losses and normalisers per pixel term.
fn write_scalars(row: u32, counts: vec4<f32>, losses: vec4<f32>, norms: vec4<f32>) {
    let o = row + C * PER_CLASS;
    for (var k = 0u; k < 4u; k++) {
        partial[o + ROW_VALID + k] = counts[k];
        partial[o + ROW_LOSS + k] = losses[k];
        partial[o + ROW_NORM + k] = norms[k];
    }
}

// The stats stage on a staged tile: per sub-tile the pixels' losses and the classes'
// sums, the one-pass form's gradient (`stage_grad`: staged_grad.wgsl, or nothing), then
// the tile's row.
@compute @workgroup_size(PIXEL_WG)
fn stats_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let terms = pixel_terms();
    let kinds = terms.kinds;
    let opt = terms.opt;
    let offs = terms.offs;
    let tile = flat_group(wid, nwg);
    if tile >= dims.batch * dims.tiles_per_image {
        return;
    }
    let b = dims.image_offset + tile / dims.tiles_per_image;
    let base = (tile % dims.tiles_per_image) * STAGED_TILE;
    let row = (b * dims.tiles_per_image + tile % dims.tiles_per_image) * dims.row_width;
    if NORMS_ONLY {
        staged_norms(b, base, lid, row, kinds, offs);
        return;
    }
    var cs = load_consts(b);
    staged_bad = BadInput(0u, IGNORE, 0u, IGNORE);
    let n_maps = dims.total_batch * dims.spatial;
    // Held by the first SP invocations (a pixel each), over the tile's sub-tiles.
    var counts = vec4(0.0);
    var losses = vec4(0.0);
    var norms = vec4(0.0);
    var sums: StagedSums;
    for (var at = base; at < min(base + STAGED_TILE, dims.spatial); at += STAGE_PIXELS) {
        stage(b, at, lid);
        stage_pieces(b, at, lid, true);
        // This invocation's share of its pixel's losses and plain CE.
        let p = lid % STAGE_PIXELS;
        let y = px_label[p];
        var l = vec4(0.0);
        var plain = 0.0;
        if y != IGNORE {
            let pieces = px_pieces[p];
            let lse = pieces.x + log(pieces.y);
            for (var c = lid / STAGE_PIXELS; c < opaque(C); c += WG / STAGE_PIXELS) {
                let zc = staged_logit(c, p);
                let gc = staged_target(c, p, y);
                if SIGMOID {
                    for (var t = 0u; t < N_PIX; t++) {
                        l[t] += bce_class(term_weight(t, offs[t], c), gc, zc);
                    }
                    continue;
                }
                plain += gc * (lse - zc);
                for (var t = 0u; t < N_PIX; t++) {
                    let w = term_weight(t, offs[t], c);
                    if is_ce(kinds[t]) {
                        l[t] += ce_class(opt[t], w, gc, zc, lse);
                    } else if gc != 0.0 {
                        l[t] += focal_class(w, gc, zc, exp(zc - pieces.x), pieces.y, opt[t], lse);
                    }
                }
            }
        }
        // One merge for both where a slot is free (up to three pixel terms).
        if N_PIX < 4u {
            l[3] = plain;
        }
        l = pixel_total(lid, l);
        if N_PIX < 4u {
            plain = l[3];
            l[3] = 0.0;
        } else {
            plain = pixel_total(lid, vec4(plain, 0.0, 0.0, 0.0)).x;
        }
        let i = at + p;
        if lid < STAGE_PIXELS && i < dims.spatial {
            for (var t = 0u; t < N_PIX; t++) {
                if has_map(t) {
                    loss_map[t * n_maps + b * dims.spatial + i] = select(l[t], 0.0, y == IGNORE);
                }
            }
            if y != IGNORE {
                counts += vec4(1.0, plain, 0.0, 0.0);
                losses += l;
                for (var t = 0u; t < N_PIX; t++) {
                    norms[t] += pixel_norm(kinds[t], t, offs[t], y);
                }
            }
        }
        if CLASS_SUMS {
            stage_class_sums(lid, &sums);
        }
        stage_grad(b, at, lid, &cs);
    }
    publish(staged_bad);
    if CLASS_SUMS {
        for (var j = 0u; j < opaque(CLASSES_PER_INVOCATION); j++) {
            let c = lid + j * WG;
            if c < C {
                var hu = sums.b[j];
                if hu_implied() {
                    hu = sums.a[j].wx;
                }
                write_class(row + c * PER_CLASS, sums.a[j], hu);
            }
        }
    }
    let s = reduce3(lid, counts, losses, norms);
    if s.writer {
        write_scalars(row, s.a, s.b, s.c);
    }
}
