//! The host layer: devices, the stage table, pipelines, pooled buffers and the recorded
//! passes. ARCHITECTURE.md walks through it; in call order:
//!
//! - [`context`]: opening a device; [`GpuContext`], the device with its caches.
//! - [`strategy`]: how the kernels run on an adapter, a value chosen once per context.
//! - [`batch`]: the inputs of a call (host batches, device regions, gradient targets).
//! - [`stages`]: the stage table (sources, entry points, workgroup sizes, bindings,
//!   overrides) that pipelines, layouts and bind groups are made from.
//! - [`layout`]: the data layout shared with the WGSL (generated into it).
//! - [`plan`]: the spec compiled into records and masks; chunks and bound ranges.
//! - record.rs: checks, chunk plans and one encoding function per stage.
//! - readback.rs, host.rs: results back to the host; the convenient host API.
//! - cache.rs, workspace.rs, [`pool`]: what a context keeps between calls.

mod backward;
pub mod batch;
mod cache;
pub mod context;
mod host;
pub mod layout;
pub mod plan;
pub mod pool;
mod readback;
mod record;
pub mod stages;
pub mod strategy;
mod workspace;

pub use batch::{BufferRegion, DeviceBatch, GradTarget, HostBatch, HostLogits, Options};
pub use context::GpuContext;
pub use readback::{InputStatus, Recorded};
pub use stages::shader_sources;
pub use strategy::{Strategy, TileSum};
