// Optional stage 4: writes a gradient computed in f32 (a scratch range) as f16 or bf16, two
// values per word, into the caller's buffer. One invocation per output word, so no two
// invocations share a word; halves outside the range keep the caller's data.

@group(0) @binding(2) var<uniform> dims: Dims;
// The f32 gradient the grad stage wrote into scratch.
@group(0) @binding(7) var<storage, read> grad: array<f32>;
@group(0) @binding(9) var<storage, read_write> out16: array<u32>;

// The output format: FLOAT_F16 or FLOAT_BF16.
override GRAD_KIND: u32 = FLOAT_F16;

fn to_bits16(v: f32) -> u32 {
    if GRAD_KIND == FLOAT_F16 {
        return pack2x16float(vec2(v, 0.0)) & 0xFFFFu;
    }
    // bf16: round to nearest even.
    let b = bitcast<u32>(v);
    return (b + 0x7FFFu + ((b >> 16u) & 1u)) >> 16u;
}

@compute @workgroup_size(NARROW_WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Output elements k + narrow_shift (k in 0..narrow_count) of the bound range.
    let first_word = dims.narrow_shift >> 1u;
    let w = first_word + flat_group(wid, nwg) * NARROW_WG + lid;
    let last = dims.narrow_shift + dims.narrow_count - 1u;
    if w > (last >> 1u) {
        return;
    }
    var word = out16[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if e >= dims.narrow_shift && e <= last {
            let v = to_bits16(grad[e - dims.narrow_shift]);
            word = (word & ~(0xFFFFu << (16u * h))) | (v << (16u * h));
        }
    }
    out16[w] = word;
}
