// The stats stage's workgroup sum with subgroup operations: each subgroup sums in registers,
// one lane per subgroup writes to workgroup memory, one invocation adds the subgroups' sums.
// 3 barriers a call and 1/subgroup-size of the workgroup-memory traffic; correct for any
// subgroup size from 4 to 128 (WG is a multiple of each). The host uses this file only where
// the adapter has subgroups (naga takes subgroup operations under its SUBGROUP capability,
// without WGSL's `enable subgroups;`, which it does not parse yet). The order of every sum is fixed by the hardware's
// subgroup layout, so results stay bitwise reproducible on one adapter.

// At most this many subgroups in a workgroup (subgroups of at least 4 invocations).
const MAX_SUBGROUPS: u32 = WG / 4u;

var<workgroup> red_a: array<vec4<f32>, MAX_SUBGROUPS>;
var<workgroup> red_b: array<vec4<f32>, MAX_SUBGROUPS>;
var<workgroup> red_c: array<vec4<f32>, MAX_SUBGROUPS>;

// This invocation's subgroup, its lane in it and the number of subgroups (set by `main`).
var<private> subgroup: vec3<u32>;

// Sums three vec4 over the workgroup; the totals land in red_*[0].
fn reduce3(lid: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) {
    let sa = subgroupAdd(a);
    let sb = subgroupAdd(b);
    let sc = subgroupAdd(c);
    // Readers of the previous call's totals are done before they are overwritten.
    workgroupBarrier();
    if subgroup.y == 0u {
        red_a[subgroup.x] = sa;
        red_b[subgroup.x] = sb;
        red_c[subgroup.x] = sc;
    }
    workgroupBarrier();
    if lid == 0u {
        gather_sums(0u, subgroup.z, 1u);
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
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
