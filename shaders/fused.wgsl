// Small calls in one dispatch (ARCHITECTURE.md, "Small calls"): one workgroup of FIN_WG
// invocations runs the three stages one after another, with a storage barrier between them,
// instead of three dispatches. On lavapipe each dispatch costs a fixed ~0.05 ms whatever it
// does, which at 1×2×64×64 is most of the call.
//
// The module links the stages' own files (stats.wgsl with tile_sum/invocation.wgsl,
// finalize.wgsl, grad_pixel.wgsl with grad.wgsl); each binding is declared once (the host
// keeps the first declaration of a binding number and gives it the access of the table's
// row: `fin` and `partial` read-write, `dims` read-only storage as in finalize.wgsl).
// The phases compute exactly what the stages' dispatches do, tile by tile and group by
// group, in the same order, so the results are the same bits as the three-dispatch path
// (tests/gpu/small_calls.rs checks that):
// - statistics: FIN_WG / PIXEL_WG stats tiles at a time, each by PIXEL_WG invocations with
//   their own partial rows (the invocation tile sum, which has no barrier: the host takes
//   this path only with `TileSum::Invocation`);
// - finalize: all FIN_WG invocations, which first add the partial rows themselves
//   (`Dims::fin_sums_partial` is set for every fused call);
// - gradient: FIN_WG / PIXEL_WG gradient groups at a time.
// The statistics phase does not write the gradient (STATS_WRITES_GRAD is false in this
// module): its coefficients do not exist yet.

// Stats tiles (or gradient groups) one workgroup of the stages' size runs at a time.
const LANES: u32 = FIN_WG / PIXEL_WG;

@compute @workgroup_size(FIN_WG)
fn fused_main(@builtin(local_invocation_index) lid: u32) {
    let lane = lid / PIXEL_WG;
    let own = lid % PIXEL_WG;
    own_row = own;
    let tiles = dims.batch * dims.tiles_per_image;
    for (var t0 = 0u; t0 < tiles; t0 += LANES) {
        stats_tile(vec3(t0 + lane, 0u, 0u), vec3(tiles, 1u, 1u), own);
    }
    // The partial rows (and the bad-input counters) before finalize reads them.
    storageBarrier();
    finalize_all(lid);
    // The coefficients and scales before the gradient reads them.
    storageBarrier();
    let per_image = (dims.spatial + PIXEL_WG * GRAD_PPT - 1u) / (PIXEL_WG * GRAD_PPT);
    let groups = dims.batch * per_image;
    for (var g0 = 0u; g0 < groups; g0 += LANES) {
        if g0 + lane < groups {
            grad_group(g0 + lane, own);
        }
    }
}
