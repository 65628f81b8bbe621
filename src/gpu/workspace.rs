//! A call's small device buffers (uniform slots, term table, partial and final statistics,
//! coefficients, loss maps, status, read-back staging): a workspace per shape and spec
//! structure, taken from the pool, held by the [`Recorded`] handle while its results are
//! alive and reused by the next call of that structure.

use super::cache::Caches;
use super::context::GpuContext;
use super::layout::{row_width, FinLayout, DIMS_SLOT};
use super::pool::BufferKey;
#[allow(unused_imports)] // for the docs
use super::readback::Recorded;
use std::sync::Arc;

/// How many idle workspaces stay cached.
const WORKSPACES: usize = 8;

/// Byte offset, in the status buffer `check`, of the sequence number of the last recording
/// that ran (after the four counters the stats pass writes).
pub(super) const SEQ_AT: u64 = 16;

/// The small per-call buffers (uniforms, term table, statistics, coefficients, read-back),
/// reused by every call of one shape and spec structure.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct WorkspaceKey {
    pub(super) total_batch: usize,
    pub(super) classes: usize,
    pub(super) spatial: usize,
    pub(super) terms: usize,
    pub(super) params_len: usize,
    pub(super) dims_slots: usize,
    pub(super) scratch: u64,
    pub(super) map: u64,
    /// Bytes of `pieces` (0: the call stores none, a 16-byte stand-in).
    pub(super) pieces: u64,
    /// Partial rows per stats tile (`Strategy::rows_per_tile`).
    pub(super) rows_per_tile: usize,
    /// Pixels per stats tile (`Strategy::stats_tile`).
    pub(super) stats_tile: usize,
}

pub(super) struct Workspace {
    pub(super) dims: wgpu::Buffer,
    pub(super) params: wgpu::Buffer,
    pub(super) partial: wgpu::Buffer,
    pub(super) stats: wgpu::Buffer,
    pub(super) fin: wgpu::Buffer,
    pub(super) map: wgpu::Buffer,
    /// Each pixel's softmax pieces, from the stats stage to the chunked grad stage
    /// (`Binding::Pieces`).
    pub(super) pieces: wgpu::Buffer,
    pub(super) check: wgpu::Buffer,
    /// The sequence number of the recording that holds this workspace, copied into `check`
    /// by the recording's last command.
    pub(super) seq: wgpu::Buffer,
    pub(super) scratch: Option<wgpu::Buffer>,
    /// What the pixel stages' vec4 views (`Binding::Logits4`, `Binding::Grad4`) bind when a
    /// call takes no quads: 16 bytes each, never read or written, two buffers because one
    /// is bound read-only and the other read-write in the same dispatch.
    pub(super) quad_stand_ins: [wgpu::Buffer; 2],
    pub(super) staging: wgpu::Buffer,
    pub(super) keys: Vec<(BufferKey, wgpu::Buffer)>,
    pub(super) sizes: Sizes,
    pub(super) fin_layout: FinLayout,
    /// Bytes of `fin`'s uniform view (`Binding::FinCoefs`): the device's
    /// `layout::coef_rows`, one vec4 a row. `fin` is at least this long.
    pub(super) coef_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    pub(super) params: u64,
    pub(super) partial: u64,
    pub(super) stats: u64,
    pub(super) fin: u64,
    pub(super) map: u64,
    pub(super) pieces: u64,
}

impl GpuContext {
    /// A workspace for `key` that no live [`Recorded`] holds.
    pub(super) fn workspace(&self, inner: &mut Caches, key: &WorkspaceKey) -> Arc<Workspace> {
        if let Some(pos) = inner
            .workspaces
            .iter()
            .position(|(k, w)| k == key && Arc::strong_count(w) == 1)
        {
            let w = inner.workspaces.remove(pos);
            let ws = w.1.clone();
            inner.workspaces.push(w); // most recently used last
            return ws;
        }
        while inner.workspaces.len() >= WORKSPACES {
            let Some(pos) = inner
                .workspaces
                .iter()
                .position(|(_, w)| Arc::strong_count(w) == 1)
            else {
                break;
            };
            let (_, old) = inner.workspaces.remove(pos);
            if let Ok(old) = Arc::try_unwrap(old) {
                inner.clear_bind_groups(); // they reference the released buffers
                for (k, b) in old.keys {
                    inner.pool.release(k, b);
                }
            }
        }
        let fin_layout = FinLayout::new(key.total_batch, key.classes, key.terms);
        let width = row_width(key.classes) as u64;
        let tiles = key.spatial.div_ceil(key.stats_tile) as u64;
        let sizes = Sizes {
            params: 4 * key.params_len as u64,
            partial: 4 * key.total_batch as u64 * tiles * key.rows_per_tile as u64 * width,
            stats: 4 * key.total_batch as u64 * width,
            fin: 4 * fin_layout.len as u64,
            map: key.map.max(4),
            pieces: key.pieces.max(16),
        };
        use wgpu::BufferUsages as U;
        let mut keys = vec![];
        let mut make = |size: u64, usage: U| {
            let k = BufferKey::new(size, usage.bits());
            let b = inner.pool.acquire(&k, |k| self.create_buffer(k));
            keys.push((k, b.clone()));
            b
        };
        let out = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        // Storage too: finalize reads it as a storage buffer (see finalize.wgsl).
        let dims = make(
            DIMS_SLOT * key.dims_slots as u64,
            U::UNIFORM | U::STORAGE | U::COPY_DST,
        );
        let params = make(sizes.params, U::STORAGE | U::COPY_DST);
        let partial = make(sizes.partial, U::STORAGE | U::COPY_DST);
        let stats = make(sizes.stats, out);
        // Bound as a uniform too (`Binding::FinCoefs`), at the length the kernels declare
        // whatever the table holds.
        let coef_bytes = 16 * self.coef_rows() as u64;
        let fin = make(sizes.fin.max(coef_bytes), out | U::UNIFORM);
        let map = make(sizes.map, out);
        let pieces = make(sizes.pieces, U::STORAGE | U::COPY_DST);
        let check = make(SEQ_AT + 16, out);
        let seq = make(16, U::COPY_SRC | U::COPY_DST);
        let scratch = (key.scratch > 0).then(|| make(key.scratch, U::STORAGE));
        let quad_stand_ins = [make(16, U::STORAGE), make(16, U::STORAGE)];
        let staging = make(
            sizes.fin + sizes.stats + sizes.map + SEQ_AT + 16,
            U::MAP_READ | U::COPY_DST,
        );
        let ws = Arc::new(Workspace {
            dims,
            params,
            partial,
            stats,
            fin,
            map,
            pieces,
            check,
            seq,
            scratch,
            quad_stand_ins,
            staging,
            keys,
            sizes,
            fin_layout,
            coef_bytes,
        });
        inner.workspaces.push((key.clone(), ws.clone()));
        ws
    }
}
