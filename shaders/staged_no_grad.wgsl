// The staged stats stage alone: an empty stand-in for the one-pass form's gradient
// (staged_grad.wgsl), so the module binds no gradient.

fn stage_grad(b: u32, at: u32, lid: u32, cs: ptr<function, Consts>) {}
