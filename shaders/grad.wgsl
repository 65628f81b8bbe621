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
    if !SIGMOID {
        sm = pieces(z, &ez, b, i, 1.0);
        if TEMPERED {
            smt = pieces(z, &et, b, i, dims.temperature);
        }
    }
    pixel_grad(cs, b, i, y, y != IGNORE, z, &g, &ez, &et, sm, smt, out);
}
