// The stats stage's sum without subgroups or barriers, for CPU adapters (lavapipe) whose
// device was opened without SUBGROUP: every invocation writes a partial row of its own
// (dims.rows_per_tile = WG; sum_tiles.wgsl adds a tile's rows in a fixed order). llvmpipe
// compiles each workgroup barrier as a coroutine suspend point, and the workgroup-memory
// strategy's barriers inside the class loops took its JIT 26-62 s for one pipeline (Mesa
// 25, cold cache) against under 3 s here; on a CPU the extra partial rows cost little. GPUs
// without subgroups keep tile_sum/workgroup.wgsl (a row per tile).

// This invocation's index in the workgroup (set by `main`).
var<private> own_row: u32;

// Nothing to combine: the invocation writes its own sums.
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) -> Sums3 {
    return Sums3(true, a, b, c);
}

// Row `lid` of the tile's WG rows.
fn sub_row() -> u32 {
    return own_row;
}

// Every invocation of a tile that runs writes its row.
fn clear_spare_rows(tile_row: u32) {}

@compute @workgroup_size(PIXEL_WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    own_row = lid;
    stats_tile(wid, nwg, lid);
}
