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
        var sa = vec4(0.0);
        var sb = vec4(0.0);
        var sc = vec4(0.0);
        for (var k = 0u; k < FOLD; k++) {
            sa += red_a[lid * FOLD + k];
            sb += red_b[lid * FOLD + k];
            sc += red_c[lid * FOLD + k];
        }
        red_a[lid * FOLD] = sa;
        red_b[lid * FOLD] = sb;
        red_c[lid * FOLD] = sc;
    }
    workgroupBarrier();
    if lid == 0u {
        var sa = vec4(0.0);
        var sb = vec4(0.0);
        var sc = vec4(0.0);
        for (var k = 0u; k < FOLD; k++) {
            sa += red_a[k * FOLD];
            sb += red_b[k * FOLD];
            sc += red_c[k * FOLD];
        }
        red_a[0] = sa;
        red_b[0] = sb;
        red_c[0] = sc;
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
