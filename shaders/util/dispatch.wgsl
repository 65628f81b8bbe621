// Indexing shared by the stages that dispatch one workgroup per tile of work.

// A flat workgroup index from a 2D dispatch (one dimension holds at most 65535 groups; the
// host splits larger dispatches with plan::dispatch_2d).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
