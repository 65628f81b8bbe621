// Shared by every stage: override constants, the uniform header, label and logit decoding,
// indexing and the numerically careful scalar helpers. Each stage file is appended to this.

// Classes (channels) per pixel; a pipeline-overridable constant so loops over classes have
// a bound the driver knows.
override C: u32 = 2u;
// 0: u32 class indices, 1: u8 class indices (4 per word), 2: f32 soft labels,
// 3: u16 class indices (2 per word).
override LABEL_KIND: u32 = 0u;
// false: softmax over classes; true: independent sigmoid per channel.
override SIGMOID: bool = false;
// Whether a region term needs s = softmax(T·z) with T ≠ 1 (otherwise s = p, no extra work).
override TEMPERED: bool = false;
// false: (B, C, *spatial); true: channels last, (B, *spatial, C). Read in place.
override NHWC: bool = false;
// Pixel terms (cross_entropy, focal, bce) of the spec: a constant so their loops unroll.
override N_PIX: u32 = 0u;
// The pixel-term kinds of the spec, bit k for kind code k (0 CE, 1 focal, 2 BCE), so the
// code of absent kinds is compiled out: SIMD CPUs run both sides of a branch.
override PIXEL_KINDS: u32 = 7u;
// Bit t: pixel term t has a per-class vector (CE class weights, focal α, BCE pos_weight).
// Without one its weight is the constant 1 and no read of it is compiled.
override PIXEL_WEIGHTED: u32 = 15u;
// Bit t: pixel term t writes a per-pixel loss map (cross-entropy with reduction "none").
override PIXEL_MAPS: u32 = 15u;
// Which pixels an invocation of the stats and grad stages takes. false (GPUs): pixel k of
// an invocation is base + k·WG + lid, so neighbouring invocations read neighbouring
// pixels (coalesced). true (CPU adapters): base + lid·PPT + k, a run of consecutive pixels
// per invocation. lavapipe runs 8 invocations in lock step but reads memory one lane at a
// time; a run per lane is a sequential stream per lane, where the GPU order makes each SIMD
// row hop 1 KiB per pixel step through every class plane (stats 25 → 17 ms on loads alone
// at 8×4×256×256).
override CONTIGUOUS: bool = false;

// Pixel k (k < ppt) of invocation lid in a tile of wg·ppt pixels starting at base.
fn pixel_of(base: u32, k: u32, lid: u32, wg: u32, ppt: u32) -> u32 {
    if CONTIGUOUS {
        return base + lid * ppt + k;
    }
    return base + k * wg + lid;
}

// 0: f32 logits, 1: f16, 2: bf16 (16-bit values two per word, widened here; the sums stay f32).
override LOGIT_KIND: u32 = 0u;

const IGNORE: u32 = 0xFFFFFFFFu;
const KIND_CE: u32 = 0u;
const KIND_FOCAL: u32 = 1u;
const KIND_BCE: u32 = 2u;
const KIND_DICE: u32 = 3u;
const KIND_TVERSKY: u32 = 4u;
const KIND_GDL: u32 = 5u;
const KIND_REGION: u32 = 6u;
// Floats per term record in `params` (see src/gpu/plan.rs).
const RECORD: u32 = 16u;
// Pixel-term records sit in slots 0..4, statistic-term records after them.
const MAX_PIXEL_TERMS: u32 = 4u;
// Floats per class in a statistics row: P, Q, I, G, H, U and two spare.
const PER_CLASS: u32 = 8u;

// One dispatch's view (plan.rs `Dims`). Images b of a dispatch are global images
// image_offset + b; the *_shift fields turn a global element index into an index within the
// bound range of that array (u32 arithmetic wraps, so a shift may stand for a negative one).
struct Dims {
    batch: u32,
    spatial: u32,
    tiles_per_image: u32,
    row_width: u32,
    n_terms: u32,
    n_pixel_terms: u32,
    image_offset: u32,
    n_stat_terms: u32,
    temperature: f32,
    total_batch: u32,
    logit_shift: u32,
    label_shift: u32,
    grad_shift: u32,
    narrow_count: u32,
    narrow_shift: u32,
    rows_per_tile: u32,
}

// A flat workgroup index from a 2D dispatch (one dimension holds at most 65535 groups).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The global element index of class c at pixel i of global image b, in the input layout.
fn elem(b: u32, c: u32, i: u32) -> u32 {
    if NHWC {
        return (b * dims.spatial + i) * C + c;
    }
    return (b * C + c) * dims.spatial + i;
}

// One logit, widened to f32.
fn logit(b: u32, c: u32, i: u32) -> f32 {
    let e = elem(b, c, i) + dims.logit_shift;
    if LOGIT_KIND == 0u {
        return bitcast<f32>(logits[e]);
    }
    let w = logits[e >> 1u];
    let h = select(w & 0xFFFFu, w >> 16u, (e & 1u) == 1u);
    if LOGIT_KIND == 1u {
        return unpack2x16float(h).x;
    }
    return bitcast<f32>(h << 16u);
}

// The class index of pixel i of global image b, or IGNORE.
fn class_label(b: u32, i: u32) -> u32 {
    let idx = b * dims.spatial + i + dims.label_shift;
    if LABEL_KIND == 1u {
        let v = (labels[idx >> 2u] >> ((idx & 3u) * 8u)) & 0xFFu;
        return select(v, IGNORE, v == 255u);
    }
    if LABEL_KIND == 3u {
        let v = (labels[idx >> 1u] >> ((idx & 1u) * 16u)) & 0xFFFFu;
        return select(v, IGNORE, v == 0xFFFFu);
    }
    return labels[idx];
}

// The target g of class c at pixel i of global image b (`y` is class_label's result).
fn target_of(b: u32, c: u32, i: u32, y: u32) -> f32 {
    if LABEL_KIND == 2u {
        return bitcast<f32>(labels[elem(b, c, i) + dims.label_shift]);
    }
    return select(0.0, 1.0, y == c);
}

// Whether a softmax pixel term of this kind is CE (else focal); a constant when the spec
// has only one of the two.
fn is_ce(kind: u32) -> bool {
    if (PIXEL_KINDS & (1u << KIND_FOCAL)) == 0u {
        return true;
    }
    if (PIXEL_KINDS & (1u << KIND_CE)) == 0u {
        return false;
    }
    return kind == KIND_CE;
}

fn param(i: u32) -> f32 {
    return params[i];
}

fn record(slot: u32, field: u32) -> f32 {
    return params[slot * RECORD + field];
}

// A per-class vector of a term (class weights, α, pos_weight, prior), 1 when absent.
fn class_param(slot: u32, c: u32) -> f32 {
    let off = record(slot, 3u);
    if off < 0.0 {
        return 1.0;
    }
    return params[u32(off) + c];
}

// Class c's weight in pixel term t from the term's hoisted vector offset (1 when absent).
fn term_weight(t: u32, off: f32, c: u32) -> f32 {
    if (PIXEL_WEIGHTED & (1u << t)) == 0u || off < 0.0 {
        return 1.0;
    }
    return params[u32(off) + c];
}

// log(1 + x) for x ≥ 0, accurate for small x (WGSL has no log1p).
fn log1p_pos(x: f32) -> f32 {
    let u = 1.0 + x;
    if u == 1.0 {
        return x;
    }
    return log(u) * x / (u - 1.0);
}

// softplus(x) = log(1 + eˣ) without overflow.
fn softplus(x: f32) -> f32 {
    return max(x, 0.0) + log1p_pos(exp(-abs(x)));
}

// σ(x) without overflow for any sign.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    let s = 1.0 / (1.0 + e);
    return select(e * s, s, x >= 0.0);
}

// Finite (neither NaN nor ±∞), from the bits: WGSL has no isnan.
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// xʸ with 0⁰ = 1 and 0ʸ = 0 (WGSL's pow leaves both undefined).
fn safe_pow(x: f32, y: f32) -> f32 {
    if y == 0.0 {
        return 1.0;
    }
    if x <= 0.0 {
        return 0.0;
    }
    return pow(x, y);
}

// The focal weight on ([c = k] − p_k) of one class with target mass αg (see reference/mod.rs).
fn focal_h(p: f32, one_minus_p: f32, log_p: f32, alpha_g: f32, gamma: f32) -> f32 {
    let qg = safe_pow(one_minus_p, gamma);
    var first = 0.0;
    if one_minus_p > 0.0 && gamma > 0.0 {
        first = gamma * p * log_p * qg / one_minus_p;
    }
    return alpha_g * (first - qg);
}

// Classes whose logits (and soft targets) a pixel keeps in registers once read, so each is
// read from memory once per pass when C ≤ BLOCK; classes past BLOCK are read again where
// used. Reads are the cost that matters on CPU Vulkan (lavapipe loads lane by lane) and they
// cost bandwidth or L1 traffic on GPUs.
const BLOCK: u32 = 8u;
alias Block = array<f32, BLOCK>;

// The first min(C, BLOCK) logits of pixel i of global image b.
fn load_logits(b: u32, i: u32) -> Block {
    var z: Block;
    for (var c = 0u; c < min(C, BLOCK); c++) {
        z[c] = logit(b, c, i);
    }
    return z;
}

// The first min(C, BLOCK) soft targets of a pixel (zeros for class-index labels).
fn load_targets(b: u32, i: u32) -> Block {
    var g: Block;
    if LABEL_KIND == 2u {
        for (var c = 0u; c < min(C, BLOCK); c++) {
            g[c] = bitcast<f32>(labels[elem(b, c, i) + dims.label_shift]);
        }
    }
    return g;
}

// Logit c of the pixel whose first logits are in z.
fn z_of(z: ptr<function, Block>, b: u32, c: u32, i: u32) -> f32 {
    if c < BLOCK {
        return (*z)[c];
    }
    return logit(b, c, i);
}

// Target c of the pixel whose first soft targets are in g (y: its class index).
fn g_of(g: ptr<function, Block>, b: u32, c: u32, i: u32, y: u32) -> f32 {
    if LABEL_KIND == 2u && c < BLOCK {
        return (*g)[c];
    }
    return target_of(b, c, i, y);
}

// Max and Σ exp(t·z − max) over the classes of one pixel: the pieces of a (tempered)
// softmax. The exponentials of the first BLOCK classes are kept in e, so callers do not
// compute them again.
fn pieces(z: ptr<function, Block>, e: ptr<function, Block>, b: u32, i: u32, t: f32) -> vec2<f32> {
    var m = -3.4e38;
    for (var c = 0u; c < C; c++) {
        m = max(m, t * z_of(z, b, c, i));
    }
    var se = 0.0;
    for (var c = 0u; c < C; c++) {
        let ec = exp(t * z_of(z, b, c, i) - m);
        if c < BLOCK {
            (*e)[c] = ec;
        }
        se += ec;
    }
    return vec2(m, se);
}

// exp(t·z_c − max) of class c, from e (filled by `pieces` with the same t) when it holds it.
fn exp_of(e: ptr<function, Block>, z: ptr<function, Block>, b: u32, c: u32, i: u32, t: f32, m: f32) -> f32 {
    if c < BLOCK {
        return (*e)[c];
    }
    return exp(t * z_of(z, b, c, i) - m);
}
