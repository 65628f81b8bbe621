// The stats stage's workgroup sum in workgroup memory alone, for adapters without subgroup
// operations: 4 barriers a call. CPU port: none needed (a sum; the oracle is
// src/reference/stats.rs).

// The reduction folds WG values in two steps of FOLD (FOLD² = WG).
const FOLD: u32 = 16u;

var<workgroup> red_a: array<vec4<f32>, WG>;
var<workgroup> red_b: array<vec4<f32>, WG>;
var<workgroup> red_c: array<vec4<f32>, WG>;

// Sums three vec4 over the workgroup in a fixed order; the totals land in red_*[0].
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) {
    workgroupBarrier();
    red_a[lid] = a;
    red_b[lid] = b;
    red_c[lid] = c;
    workgroupBarrier();
    if lid < FOLD {
        gather_sums(lid * FOLD, FOLD, 1u);
    }
    workgroupBarrier();
    if lid == 0u {
        gather_sums(0u, FOLD, FOLD);
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    stats_tile(wid, nwg, lid);
}
