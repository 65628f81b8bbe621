// What the pixel stages (stats, grad) share: how logits and labels are stored and read,
// which pixels an invocation takes, and the softmax pieces. The stage declares `logits`,
// `labels`, `dims` and `params`; CPU twin of the decoding: src/input.rs.

// How labels are stored: a LABELS_* code (prelude).
override LABEL_KIND: u32 = LABELS_U32;
// The class index of an ignored pixel (u8 255 and u16 65535 decode to it).
const IGNORE: u32 = 0xFFFFFFFFu;
// Whether a region term needs s = softmax(T·z) with T ≠ 1 (otherwise s = p, no extra work).
override TEMPERED: bool = false;
// false: (B, C, *spatial); true: channels last, (B, *spatial, C). Read in place.
override NHWC: bool = false;
// Pixel terms (cross_entropy, focal, bce) of the spec: a constant so their loops unroll.
override N_PIX: u32 = 0u;
// The pixel-term kinds of the spec, bit k for kind code k (KIND_CE, KIND_FOCAL, KIND_BCE), so the
// code of absent kinds is compiled out: SIMD CPUs run both sides of a branch.
override PIXEL_KINDS: u32 = 7u;
// Bit t: pixel term t has a per-class vector (CE class weights, focal α, BCE pos_weight).
// Without one its weight is the constant 1 and no read of it is compiled.
override PIXEL_WEIGHTED: u32 = 15u;
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

// Quads (CPU adapters only): an invocation's run of consecutive pixels is read four pixels
// at a time, one vec4 of each class's logits (`load_quad`, through the stage's `logits4`,
// the logits' buffer bound a second time as vec4), and the gradient is written the same way
// (grad_pixel.wgsl `store_quad_grad`). Mesa 25's lavapipe turns every storage access whose
// address differs between lanes into about 13 instructions a lane (mask test, base and size
// reloads, bounds check, the access), the same for a vec4 as for a scalar but for a bounds
// check per component: a quad reads a class of four pixels for little more than one. The
// per-pixel code is unchanged; `quad_pixel` hands it one pixel's block of the quad. The
// host sets QUADS only where every quad is whole and aligned (src/gpu/plan.rs `quads`):
// CONTIGUOUS, NCHW f32 logits, class-index labels, pixels per image and every bound
// range's shift multiples of 4; and only for short pixel code: C ≤ QUAD_CLASSES, no
// tempered term (llvmpipe unrolls a quad's four pixels, and longer code, four times over,
// outgrows the instruction cache and runs slower than one pixel at a time).
override QUADS: bool = false;
alias Quad = array<vec4<f32>, BLOCK_PAD>;

// Stored pieces (CPU adapters past the stats block, where the grad stage takes its classes
// in chunks: grad.wgsl `GRAD_CHUNKS`): the stats stage writes each valid pixel's softmax
// pieces (max, Σe, tempered max, tempered Σe; one vec4, 16 bytes a pixel against 4·C of
// logits) to the stages' `softmax_pieces`, and the grad stage reads them instead of
// finding them with an online max and sum: its first pass over the classes then takes one
// exponential a class and no rescaling, and a spec that needs no sums there (CE alone,
// focal terms) skips that pass (BENCHMARKS.md, "Stored pieces"). Off where the statistics
// come from the caller (no stats pass ran), in the one-pass form (no grad stage) and where
// the buffer would pass the binding limit (src/gpu/record.rs `pieces_bytes`).
override STORED_PIECES: bool = false;

// The logits of pixels i0..i0+4 (a quad) of global image b, one vec4 a class.
fn load_quad(b: u32, i0: u32) -> Quad {
    var z: Quad;
    for (var c = 0u; c < min(C, BLOCK); c++) {
        z[c] = quad_logits(b, c, i0);
    }
    return z;
}

// Class c's logits of the quad of pixels i0..i0+4 of global image b.
fn quad_logits(b: u32, c: u32, i0: u32) -> vec4<f32> {
    return logits4[(elem(b, c, i0) + dims.logit_shift) >> 2u];
}

// Pixel k (0..4) of a quad as a pixel's block.
fn quad_pixel(q: ptr<function, Quad>, k: u32) -> Block {
    var z: Block;
    for (var c = 0u; c < min(C, BLOCK); c++) {
        z[c] = (*q)[c][k];
    }
    return z;
}

// Puts a pixel's block in place k of a quad.
fn set_quad_pixel(q: ptr<function, Quad>, k: u32, z: ptr<function, Block>) {
    for (var c = 0u; c < min(C, BLOCK); c++) {
        (*q)[c][k] = (*z)[c];
    }
}

// Classes taken together where a pixel's classes past its block are read again (grad.wgsl
// `GRAD_CHUNKS`, the stats stage's class sums past its block): few enough that Mesa
// unrolls their loops, so the chunk's arrays are indexed by constants.
const CHUNK: u32 = 8u;

// The logits of classes c0..c0+CHUNK of the quad of pixels i0..i0+4 of global image b
// (classes past C repeat C − 1).
fn chunk_quad_logits(b: u32, c0: u32, i0: u32) -> array<vec4<f32>, CHUNK> {
    var z: array<vec4<f32>, CHUNK>;
    for (var k = 0u; k < CHUNK; k++) {
        z[k] = quad_logits(b, min(c0 + k, C - 1u), i0);
    }
    return z;
}

// The class indices (or IGNORE) of a quad's four pixels: one word of u8 labels, two of u16
// (the host aligns their bound ranges for quads), else four reads.
fn quad_labels(b: u32, i0: u32) -> vec4<u32> {
    let idx = b * dims.spatial + i0 + dims.label_shift;
    if LABEL_KIND == LABELS_U8 {
        let v = (vec4(labels[idx >> 2u]) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xFFu);
        return select(v, vec4(IGNORE), v == vec4(255u));
    }
    if LABEL_KIND == LABELS_U16 {
        let lo = labels[idx >> 1u];
        let hi = labels[(idx >> 1u) + 1u];
        let v = vec4(lo & 0xFFFFu, lo >> 16u, hi & 0xFFFFu, hi >> 16u);
        return select(v, vec4(IGNORE), v == vec4(0xFFFFu));
    }
    return vec4(class_label(b, i0), class_label(b, i0 + 1u), class_label(b, i0 + 2u), class_label(b, i0 + 3u));
}

// How logits are stored: a FLOAT_* code (16-bit values two per word, widened here; the sums
// stay f32).
override LOGIT_KIND: u32 = FLOAT_F32;

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
    if LOGIT_KIND == FLOAT_F32 {
        return bitcast<f32>(logits[e]);
    }
    let w = logits[e >> 1u];
    let h = select(w & 0xFFFFu, w >> 16u, (e & 1u) == 1u);
    if LOGIT_KIND == FLOAT_F16 {
        return unpack2x16float(h).x;
    }
    return bitcast<f32>(h << 16u);
}

// The class index of pixel i of global image b, or IGNORE.
fn class_label(b: u32, i: u32) -> u32 {
    let idx = b * dims.spatial + i + dims.label_shift;
    if LABEL_KIND == LABELS_U8 {
        let v = (labels[idx >> 2u] >> ((idx & 3u) * 8u)) & 0xFFu;
        return select(v, IGNORE, v == 255u);
    }
    if LABEL_KIND == LABELS_U16 {
        let v = (labels[idx >> 1u] >> ((idx & 1u) * 16u)) & 0xFFFFu;
        return select(v, IGNORE, v == 0xFFFFu);
    }
    if LABEL_KIND == LABELS_I32 {
        let v = labels[idx];
        return signed_label(v, select(0u, 0xFFFFFFFFu, v >= 0x80000000u));
    }
    if LABEL_KIND == LABELS_I64 {
        // Word indices: label_shift counts words for I64 (src/gpu/record.rs plan_chunks).
        let w = (b * dims.spatial + i) * 2u + dims.label_shift;
        return signed_label(labels[w], labels[w + 1u]);
    }
    return labels[idx];
}

// What the pixel loops take as pixel i's label: its class index (or IGNORE), or 0 with soft
// labels, whose targets are read per class.
fn pixel_label(b: u32, i: u32) -> u32 {
    if LABEL_KIND == LABELS_SOFT {
        return 0u;
    }
    return class_label(b, i);
}

// A signed class index as its low word and high word (an i32's sign extension): negative
// values and ignore_index are ignored; a value past i32 is returned as a class ≥ C, which
// the stats pass counts as a bad label. Twin: `LabelFormat::encode` in src/input.rs.
fn signed_label(lo: u32, hi: u32) -> u32 {
    if hi >= 0x80000000u {
        return IGNORE;
    }
    if hi != 0u || lo >= 0x80000000u {
        return 0xFFFFFFFEu;
    }
    return select(lo, IGNORE, lo == dims.ignore_label);
}

// The target g of class c at pixel i of global image b (`y` is class_label's result).
fn target_of(b: u32, c: u32, i: u32, y: u32) -> f32 {
    if LABEL_KIND == LABELS_SOFT {
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

// Each pixel term's class-vector entry (class weights, focal α, pos_weight) for the first
// BLOCK classes, read from `params` once an invocation (`load_class_weights`, which every
// pixel entry point calls once before any `term_weight`: the stats stages through
// `pixel_terms`, the gradient stages directly). Read per pixel and class, each entry was a
// per-lane sequence on lavapipe, and a weighted CE's grad pass took twice the time
// (BENCHMARKS.md, "Quads").
var<private> class_weights: array<vec4<f32>, BLOCK_PAD>;

fn load_class_weights() {
    if PIXEL_WEIGHTED == 0u {
        return;
    }
    for (var c = 0u; c < min(C, BLOCK); c++) {
        for (var t = 0u; t < N_PIX; t++) {
            let off = record(t, REC_VECTOR);
            if off >= 0.0 {
                class_weights[c][t] = params[u32(off) + c];
            }
        }
    }
}

// Class c's weight in pixel term t from the term's hoisted vector offset (1 when absent).
fn term_weight(t: u32, off: f32, c: u32) -> f32 {
    if (PIXEL_WEIGHTED & (1u << t)) == 0u || off < 0.0 {
        return 1.0;
    }
    if in_block(c) {
        return class_weights[c][t];
    }
    return params[u32(off) + c];
}

// BLOCK (generated before this file, src/gpu/strategy.rs `Strategy::class_block`): the
// classes whose logits (and soft targets, exponentials, coefficients) an invocation keeps
// once read, so each is read from memory once per pass when C ≤ BLOCK; classes past BLOCK
// are read again where used (three times a pass: ARCHITECTURE.md, "The byte floor"), unless
// the call is staged (staged.wgsl, which GPUs use past the block). BLOCK is C itself up to
// 32 classes, else the smallest power of two ≥ C, up to the strategy's cap (256 on CPU
// adapters, where invocation memory is the CPU's cache and lavapipe loads storage buffers
// lane by lane, and compile time grows steeply past 256; 8 on GPUs, where larger arrays
// would spill from registers). Arrays exactly C long let Mesa unroll every class loop of up
// to 32 iterations whatever its body (src/gpu/strategy.rs `Strategy::index_checks`).
// Past 32 an invocation's class arrays hold BLOCK_PAD = BLOCK + 1 elements, the last
// unused: at BLOCK = 256 on lavapipe each array is 8 KiB (8 lanes of f32), so arrays of
// exactly BLOCK laid one after another put the same class of each in the same L1 set, and a
// 64-byte shift of the stack frame (no other change) made one-pass CE at 1×150×96×96 15 %
// slower; padded, it measured as before (BENCHMARKS.md, "Instruction counts").
const BLOCK_PAD: u32 = BLOCK + u32(BLOCK > 32u);
alias Block = array<f32, BLOCK_PAD>;

// Whether class c (< C) is in the block, so its values are in the invocation's arrays.
// With C ≤ BLOCK a constant true, so that no class access compiles a fallback: in a class
// loop that stays a loop (Mesa unrolls up to 32 iterations, and fewer for long bodies)
// `c < BLOCK` is unknown, and SIMD CPUs run both sides, the fallback's exponential and
// masked lane-by-lane loads included.
fn in_block(c: u32) -> bool {
    return C <= BLOCK || c < BLOCK;
}

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
    if LABEL_KIND == LABELS_SOFT {
        for (var c = 0u; c < min(C, BLOCK); c++) {
            g[c] = bitcast<f32>(labels[elem(b, c, i) + dims.label_shift]);
        }
    }
    return g;
}

// Logit c of the pixel whose first logits are in z.
fn z_of(z: ptr<function, Block>, b: u32, c: u32, i: u32) -> f32 {
    if in_block(c) {
        return (*z)[c];
    }
    return logit(b, c, i);
}

// The logit of class y (< C) of the pixel whose first logits are in z. Up to 32 classes it
// is picked by a select per class, not by indexing z with y: a register array indexed by a
// value that differs between lanes leaves registers on SIMD CPUs (lavapipe: stats −4.8 %
// executed instructions at C = 4, −2.1 % at 21; BENCHMARKS.md, "Instruction counts").
// Past 32 the selects would outnumber what they save.
fn z_label(z: ptr<function, Block>, b: u32, y: u32, i: u32) -> f32 {
    if C > BLOCK || C > 32u {
        return z_of(z, b, y, i);
    }
    var v = 0.0;
    for (var c = 0u; c < C; c++) {
        v = select(v, (*z)[c], c == y);
    }
    return v;
}

// Target c of the pixel whose first soft targets are in g (y: its class index).
fn g_of(g: ptr<function, Block>, b: u32, c: u32, i: u32, y: u32) -> f32 {
    if LABEL_KIND == LABELS_SOFT && in_block(c) {
        return (*g)[c];
    }
    return target_of(b, c, i, y);
}

// Max and Σ exp(t·z − max) over the classes of one pixel: the pieces of a (tempered)
// softmax. The exponentials of the first BLOCK classes are kept in e, so callers do not
// compute them again. Classes past the block (C > BLOCK) are read from memory once here,
// first: an online max and sum (the sum rescaled whenever the max grows), which the
// block's then extend (`block_pieces`). Their non-finite values are counted into
// `past_bad` (count, first element) as they are read, so the stats stage's input check
// need not read them again.
fn pieces(z: ptr<function, Block>, e: ptr<function, Block>, b: u32, i: u32, t: f32, past_bad: ptr<function, vec2<u32>>) -> vec2<f32> {
    var past = vec2(-3.4e38, 0.0);
    if C > BLOCK {
        past = online_pieces(b, i, t, BLOCK, past, past_bad);
    }
    return block_pieces(z, e, t, past);
}

// A pixel's softmax pieces (max, Σ exp(t·z − max)) from its first BLOCK classes (the block
// z; their exponentials kept in e) and `past`, the pieces of its classes past the block
// (unused when C ≤ BLOCK).
fn block_pieces(z: ptr<function, Block>, e: ptr<function, Block>, t: f32, past: vec2<f32>) -> vec2<f32> {
    var m = -3.4e38;
    if C > BLOCK {
        m = past.x;
    }
    for (var c = 0u; c < min(C, BLOCK); c++) {
        m = max(m, t * (*z)[c]);
    }
    var se = 0.0;
    if C > BLOCK {
        se = past.y * exp(past.x - m);
    }
    for (var c = 0u; c < min(C, BLOCK); c++) {
        let ec = exp(t * (*z)[c] - m);
        (*e)[c] = ec;
        se += ec;
    }
    return vec2(m, se);
}

// The softmax pieces `sm` (max, Σ exp(t·z − max)) of pixel i of global image b extended by
// its classes from `first` on, read from memory once each: an online max and sum (the sum
// rescaled whenever the max grows). Their non-finite values are counted into `past_bad`
// (count, first element).
fn online_pieces(b: u32, i: u32, t: f32, first: u32, sm: vec2<f32>, past_bad: ptr<function, vec2<u32>>) -> vec2<f32> {
    var m = sm.x;
    var se = sm.y;
    for (var c = first; c < C; c++) {
        let zc = logit(b, c, i);
        if !finite(zc) {
            (*past_bad).x += 1u;
            (*past_bad).y = min((*past_bad).y, elem(b, c, i));
        }
        let v = t * zc;
        if v > m {
            se *= exp(m - v);
            m = v;
        }
        se += exp(v - m);
    }
    return vec2(m, se);
}

// exp(t·z_c − max) of class c, whose logit the caller holds (zc), from e (filled by
// `pieces` with the same t) when it holds it: past the block, no second read of the logit.
fn exp_of(e: ptr<function, Block>, c: u32, zc: f32, t: f32, m: f32) -> f32 {
    if in_block(c) {
        return (*e)[c];
    }
    return exp(t * zc - m);
}
