//! What a context keeps between calls, beside its buffer pool: shader modules, pipelines
//! (keyed by [`PipelineKey`], their layouts made from the stage table), bind groups, and
//! the idle workspaces (workspace.rs).

use super::context::GpuContext;
use super::pool::{BufferKey, Pool};
use super::stages::{Kernel, PipelineKey};
use super::workspace::{Workspace, WorkspaceKey};
use std::collections::HashMap;
use std::sync::Arc;

/// Bind groups kept before the cache starts over.
const BIND_GROUPS: usize = 512;

/// One bound range: binding number, buffer, byte offset, byte size.
pub(super) type Bound<'a> = (u32, &'a wgpu::Buffer, u64, u64);

type BindKey = (PipelineKey, Vec<(u32, wgpu::Buffer, u64, u64)>);

/// A context's caches, behind its lock.
#[derive(Default)]
pub(super) struct Caches {
    /// By module name, class block and pixel workgroup (the constants its source is made
    /// with: `KernelInfo::source`), and whether naga clamps its array indices.
    modules: HashMap<(&'static str, u32, u32, bool), wgpu::ShaderModule>,
    layouts: HashMap<Kernel, wgpu::BindGroupLayout>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
    pub(super) pool: Pool<BufferKey, wgpu::Buffer>,
    pub(super) workspaces: Vec<(WorkspaceKey, Arc<Workspace>)>,
}

impl Caches {
    /// Forgets every bind group (they reference buffers about to go back to the pool).
    pub(super) fn clear_bind_groups(&mut self) {
        self.bind_groups.clear();
    }
}

impl GpuContext {
    /// The bind-group layout of a kernel, from its row of the stage table.
    fn layout(&self, caches: &mut Caches, kernel: Kernel) -> wgpu::BindGroupLayout {
        caches
            .layouts
            .entry(kernel)
            .or_insert_with(|| {
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(kernel.info().module),
                        entries: &kernel.info().layout_entries(),
                    })
            })
            .clone()
    }

    /// The pipeline of `key`, compiled on first use.
    pub(super) fn pipeline(&self, caches: &mut Caches, key: PipelineKey) -> wgpu::ComputePipeline {
        if let Some(p) = caches.pipelines.get(&key) {
            return p.clone();
        }
        let info = key.kernel.info();
        let module = caches
            .modules
            .entry((info.module, key.block, key.pixel_wg, key.index_checks))
            .or_insert_with(|| {
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(info.module),
                    source: wgpu::ShaderSource::Wgsl(
                        info.source(key.block, key.pixel_wg, self.coef_rows())
                            .into(),
                    ),
                };
                if key.index_checks {
                    return self.device.create_shader_module(desc);
                }
                // SAFETY: only index clamps are dropped, and only where the strategy says
                // so (`Strategy::index_checks`: lavapipe, whose robustBufferAccess2 bounds
                // every buffer access in the driver, so naga's buffer checks are off there
                // already). Every variable index into an invocation or workgroup array in
                // the WGSL is bounded by its loop or an `in_block` test, and
                // tests/gpu/index_checks.rs compares every output bit of calls compiled
                // with and without the clamps.
                unsafe {
                    self.device.create_shader_module_trusted(
                        desc,
                        wgpu::ShaderRuntimeChecks {
                            bounds_checks: false,
                            ..wgpu::ShaderRuntimeChecks::checked()
                        },
                    )
                }
            })
            .clone();
        let bind_layout = self.layout(caches, key.kernel);
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(info.module),
                bind_group_layouts: &[Some(&bind_layout)],
                immediate_size: 0,
            });
        let constants = key.constants();
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(info.entry),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(info.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        caches.pipelines.insert(key, p.clone());
        p
    }

    /// A bind group of `key`'s kernel over `entries` (one per binding of its table row).
    pub(super) fn bind_group(
        &self,
        caches: &mut Caches,
        key: PipelineKey,
        entries: Vec<Bound<'_>>,
    ) -> wgpu::BindGroup {
        let cache_key: BindKey = (
            key,
            entries
                .iter()
                .map(|(b, buf, o, s)| (*b, (*buf).clone(), *o, *s))
                .collect(),
        );
        if let Some(bg) = caches.bind_groups.get(&cache_key) {
            return bg.clone();
        }
        if caches.bind_groups.len() >= BIND_GROUPS {
            caches.bind_groups.clear();
        }
        let layout = self.layout(caches, key.kernel);
        let wgpu_entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: *offset,
                    size: std::num::NonZeroU64::new(*size),
                }),
            })
            .collect();
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("segloss"),
            layout: &layout,
            entries: &wgpu_entries,
        });
        caches.bind_groups.insert(cache_key, bg.clone());
        bg
    }
}
