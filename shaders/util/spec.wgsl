// The spec as every loss stage sees it: the class count, the activation and the term
// records in `params` (fields named in the generated prelude, src/gpu/layout.rs). The stage
// declares `params`.

// Classes (channels) per pixel; a pipeline-overridable constant so loops over classes have
// a bound the driver knows.
override C: u32 = 2u;
// false: softmax over classes; true: independent sigmoid per channel.
override SIGMOID: bool = false;

fn record(slot: u32, field: u32) -> f32 {
    return params[slot * RECORD + field];
}

// A per-class vector of a term (class weights, α, pos_weight, prior), 1 when absent.
fn class_param(slot: u32, c: u32) -> f32 {
    let off = record(slot, REC_VECTOR);
    if off < 0.0 {
        return 1.0;
    }
    return params[u32(off) + c];
}
