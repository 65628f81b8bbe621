//! The GPU tests, one test binary: every kernel against the f64 reference on random shapes
//! and data (every output element, after poisoning), every input form, the backend API's
//! misuse errors and the reliability checks. One binary rather than one per file: on
//! lavapipe these tests are llvmpipe compiling pipelines, one at a time per test, and in
//! one binary the test threads stay busy from the first test to the last instead of idling
//! at the end of each file's slowest test (ARCHITECTURE.md, "CI time"). Tolerances and the
//! shared device: common/mod.rs.

#[path = "../common/mod.rs"]
mod common;

mod backend_misuse;
mod class_chunks;
mod forward_backward;
mod index_checks;
mod inputs;
mod one_pass;
mod quads;
mod region_family;
mod reliability;
mod small_calls;
mod staged;
mod terms;
mod uniform_coefs;
