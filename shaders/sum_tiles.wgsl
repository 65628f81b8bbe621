// Stage 2a: adds the stats stage's partial rows in a fixed order, into one statistics row
// per image. CPU port: none needed (a sum; the oracle is src/reference/stats.rs).

// The header is bound as a storage buffer, not a uniform one as in the pixel stages (see
// finalize.wgsl: lavapipe recompiles shaders whose loop bounds are uniform values).
@group(0) @binding(2) var<storage, read> dims: Dims;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

// With a partial row per subgroup (dims.rows_per_tile > 1), adds each tile's rows into its
// first row, before sum_tiles adds the tiles. Two passes, not one loop over every row:
// llvmpipe ends an invocation's loops after 65 535 iterations in all (a 4200² image has
// 2154 tiles of 32 rows there).
@compute @workgroup_size(REDUCE_WG)
fn sum_tile_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * REDUCE_WG;
    if j >= dims.batch * dims.tiles_per_image * dims.row_width {
        return;
    }
    let first = (j / dims.row_width) * dims.rows_per_tile * dims.row_width + j % dims.row_width;
    var s = 0.0;
    for (var r = 0u; r < dims.rows_per_tile; r++) {
        s += partial[first + r * dims.row_width];
    }
    partial[first] = s;
}

@compute @workgroup_size(REDUCE_WG)
fn sum_tiles(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * REDUCE_WG;
    if j >= dims.batch * dims.row_width {
        return;
    }
    let b = j / dims.row_width;
    let col = j % dims.row_width;
    // Each tile's rows were added into its first row by sum_tile_rows (or it has one row).
    let stride = dims.rows_per_tile * dims.row_width;
    var s = 0.0;
    for (var t = 0u; t < dims.tiles_per_image; t++) {
        s += partial[(b * dims.tiles_per_image + t) * stride + col];
    }
    stats[j] = s;
}
