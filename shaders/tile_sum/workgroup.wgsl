// The stats stage's workgroup sum in workgroup memory alone, for adapters without subgroup
// operations: 3 barriers a call, one partial row per tile. CPU port: none needed (a sum;
// the oracle is src/reference/stats.rs).

// The reduction folds WG values in two steps: WG / FOLD runs of FOLD, then the runs' sums
// (WG = 256: 16 and 16; CPU adapters' 32: 2 runs of 16). WG is a multiple of FOLD
// (`Strategy::pixel_workgroup` is a power of two from 32).
const FOLD: u32 = 16u;
const RUNS: u32 = WG / FOLD;

var<workgroup> red_a: array<vec4<f32>, WG>;
var<workgroup> red_b: array<vec4<f32>, WG>;
var<workgroup> red_c: array<vec4<f32>, WG>;

// Adds red_*[first + k·stride] for k < n into red_*[first], in a fixed order.
fn gather_sums(first: u32, n: u32, stride: u32) {
    var sa = red_a[first];
    var sb = red_b[first];
    var sc = red_c[first];
    for (var k = 1u; k < n; k++) {
        sa += red_a[first + k * stride];
        sb += red_b[first + k * stride];
        sc += red_c[first + k * stride];
    }
    red_a[first] = sa;
    red_b[first] = sb;
    red_c[first] = sc;
}

// Sums three vec4 over the workgroup in a fixed order; invocation 0 gets the totals and
// writes them.
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) -> Sums3 {
    workgroupBarrier();
    red_a[lid] = a;
    red_b[lid] = b;
    red_c[lid] = c;
    workgroupBarrier();
    if lid < RUNS {
        gather_sums(lid * FOLD, FOLD, 1u);
    }
    workgroupBarrier();
    var s = Sums3(false, vec4(0.0), vec4(0.0), vec4(0.0));
    if lid == 0u {
        gather_sums(0u, RUNS, FOLD);
        s = Sums3(true, red_a[0], red_b[0], red_c[0]);
    }
    return s;
}

// The workgroup writes one row per tile (dims.rows_per_tile = 1).
fn sub_row() -> u32 {
    return 0u;
}

fn clear_spare_rows(tile_row: u32) {}

@compute @workgroup_size(PIXEL_WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    stats_tile(wid, nwg, lid);
}
