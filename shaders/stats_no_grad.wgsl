// The stats stage alone: empty stand-ins for what the one-pass form links from
// grad_pixel.wgsl (stats.wgsl calls them for every pixel; here they compile to nothing, and
// the module binds no gradient).

struct Consts {
    unused: u32,
}

fn load_consts(b: u32) -> Consts {
    return Consts(0u);
}

fn zero_grad(b: u32, i: u32, cs: ptr<function, Consts>, out: ptr<function, Block>) {}

fn pixel_grad(cs: ptr<function, Consts>, b: u32, i: u32, y: u32, keep: bool, z: ptr<function, Block>, g: ptr<function, Block>, ez: ptr<function, Block>, et: ptr<function, Block>, sm: vec2<f32>, smt: vec2<f32>, out: ptr<function, Block>) {}

fn store_quad_grad(b: u32, i0: u32, dz: ptr<function, Quad>) {}
