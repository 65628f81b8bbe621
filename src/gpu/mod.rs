//! The host layer: device, pipelines, pooled buffers and the recorded passes.

pub mod context;
mod engine;
pub mod plan;
pub mod pool;

pub use engine::{
    shader_sources, BufferRegion, DeviceBatch, GpuContext, GradTarget, HostBatch, HostLogits,
    Options, Recorded, TileSum,
};
