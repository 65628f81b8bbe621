// The stats stage's sum with subgroup operations: each subgroup sums in registers and its
// first lane writes a partial row of its own (dims.rows_per_tile = WG / the adapter's
// smallest subgroup size; sum_tiles.wgsl adds the rows). No workgroup memory and no barrier:
// on lavapipe every barrier suspends and resumes each SIMD row of the workgroup, and the
// three barriers of each of the three workgroup sums a tile cost more than a third of the
// pass. Correct for any subgroup size from 4 to 128 that divides WG (`Strategy::validate`
// refuses a workgroup smaller than the adapter's largest subgroup). The host
// uses this file only where the adapter has subgroups (naga takes subgroup operations under
// its SUBGROUP capability, without WGSL's `enable subgroups;`, which it does not parse yet).
// The order of every sum is fixed by the hardware's subgroup layout, so results stay
// bitwise reproducible on one adapter.

// This invocation's subgroup, its lane in it and the number of subgroups (set by `main`).
var<private> subgroup: vec3<u32>;

// Sums three vec4 over the subgroup; its first lane writes the totals.
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) -> Sums3 {
    return Sums3(subgroup.y == 0u, subgroupAdd(a), subgroupAdd(b), subgroupAdd(c));
}

// Each subgroup writes row `subgroup id` of its tile's rows_per_tile rows.
fn sub_row() -> u32 {
    return subgroup.x;
}

// Zeroes the tile's rows that no subgroup writes (where the subgroups are wider than the
// smallest size the host planned rows for).
fn clear_spare_rows(tile_row: u32) {
    if subgroup.x == 0u && subgroup.y == 0u {
        for (var r = subgroup.z; r < dims.rows_per_tile; r++) {
            for (var k = 0u; k < dims.row_width; k++) {
                partial[(tile_row + r) * dims.row_width + k] = 0.0;
            }
        }
    }
}

@compute @workgroup_size(PIXEL_WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(num_subgroups) count: u32,
) {
    subgroup = vec3(id, lane, count);
    stats_tile(wid, nwg, lid);
}
