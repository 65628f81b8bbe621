//! Results back to the host: the [`Recorded`] handle of a recording, the status check
//! (the recording ran; no bad input), and the decoding of the statistics rows and the
//! report (layouts: layout.rs).

use super::context::GpuContext;
use super::layout::{row_width, PER_CLASS, ROW_LOSS, ROW_NORM, ROW_PLAIN_CE, ROW_VALID};
use super::workspace::{Workspace, SEQ_AT};
use crate::error::{Error, Result};
use crate::output::{LossOutput, Statistics, TermValue};
use crate::spec::{LossSpec, Reduction as SpecReduction, Term};
use std::sync::Arc;

/// The statistics row's columns as indices (layout.rs).
const PER: usize = PER_CLASS as usize;
const VALID: usize = ROW_VALID as usize;
const PLAIN_CE: usize = ROW_PLAIN_CE as usize;
const LOSS: usize = ROW_LOSS as usize;
const NORM: usize = ROW_NORM as usize;

/// What a recording's statistics pass found wrong with its inputs
/// ([`Recorded::read_status_async`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputStatus {
    /// Non-finite (NaN or infinite) logits.
    pub non_finite_logits: u64,
    /// Flat element position of the first, when any.
    pub first_non_finite: Option<u64>,
    /// Labels that are neither a class index below C nor ignored (or soft labels outside
    /// [0, 1]).
    pub invalid_labels: u64,
    /// Flat position of the first, when any.
    pub first_invalid_label: Option<u64>,
}

impl InputStatus {
    /// Whether the inputs were clean.
    pub fn is_clean(&self) -> bool {
        self.non_finite_logits == 0 && self.invalid_labels == 0
    }
}

/// The device-resident results of a recorded call; they stay valid while this handle lives.
pub struct Recorded {
    pub(super) ws: Arc<Workspace>,
    /// This recording's sequence number (see `check_status`).
    pub(super) seq: u32,
    pub(super) spec: LossSpec,
    pub(super) total_batch: usize,
    pub(super) classes: usize,
    pub(super) spatial: usize,
    /// How its kernels ran (its backward runs the same way).
    pub(super) strategy: super::strategy::Strategy,
    /// A forward recording's reserved backward (backward.rs); `None` for the others.
    pub(super) backward: Option<super::backward::BackwardSlots>,
    /// Whether the stats pass summed each class (false: `record_loss` of a spec of pixel
    /// terms only, whose rows hold no class columns).
    pub(super) class_sums: bool,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("total_batch", &self.total_batch)
            .field("classes", &self.classes)
            .finish()
    }
}

/// Statistics as the device's rows (the inverse of the read-back in [`Recorded::read`]).
pub(super) fn stats_to_rows(
    st: &Statistics,
    spec: &LossSpec,
    total: usize,
    c_n: usize,
) -> Result<Vec<f32>> {
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    if st.batch != total
        || st.classes != c_n
        || st.per_class.len() != total * c_n
        || st.pixel_sums.len() != total * n_pix
    {
        return Err(Error::Input(format!(
            "statistics for B={} C={} do not fit this call (global batch {total}, C = {c_n}, {n_pix} pixel terms)",
            st.batch, st.classes
        )));
    }
    let width = row_width(c_n);
    let mut rows = vec![0.0f32; total * width];
    for b in 0..total {
        for c in 0..c_n {
            for (j, v) in st.per_class[b * c_n + c].iter().enumerate() {
                rows[b * width + c * PER + j] = *v as f32;
            }
        }
        let o = b * width + PER * c_n;
        rows[o + VALID] = st.valid[b] as f32;
        rows[o + PLAIN_CE] = st.plain_ce[b] as f32;
        for t in 0..n_pix {
            rows[o + LOSS + t] = st.pixel_sums[b * n_pix + t][0] as f32;
            rows[o + NORM + t] = st.pixel_sums[b * n_pix + t][1] as f32;
        }
    }
    Ok(rows)
}

impl Recorded {
    /// The buffer and byte offset of the total loss (one f32), for a caller that keeps it on
    /// the device.
    pub fn loss_location(&self) -> (&wgpu::Buffer, u64) {
        (&self.ws.fin, 4 * self.ws.fin_layout.report as u64)
    }

    /// The buffer of the statistics rows (per image: 8 floats per class, then 12 scalars).
    /// After a recording that left the class sums out ([`GpuContext::record_loss`]) the
    /// class columns hold nothing meaningful; the scalars are valid.
    pub fn statistics_buffer(&self) -> &wgpu::Buffer {
        &self.ws.stats
    }

    /// Copies the results to the host, waiting for the device: loss, terms, proportions,
    /// decomposition, elements and statistics (not the gradient, which lives in the
    /// caller's buffer). Submit the recording encoder first.
    pub fn read(&self, ctx: &GpuContext) -> Result<LossOutput> {
        let words = self.copy_and_map(ctx)?;
        Ok(self.decode(&words))
    }

    /// Only the statistics (the two-phase API's phase 1 result). An error for a recording
    /// that left the class sums out ([`GpuContext::record_loss`]).
    pub fn statistics(&self, ctx: &GpuContext) -> Result<Statistics> {
        self.check_class_sums()?;
        let words = self.copy_and_map(ctx)?;
        let words: &[f32] = bytemuck::cast_slice(&words);
        Ok(self.decode_statistics(
            &words[(self.ws.sizes.fin / 4) as usize - self.ws.fin_layout.report..],
        ))
    }

    /// Asynchronous read-back of the total loss: the copy is submitted now; the future
    /// resolves once the device has finished (drive it with `device.poll`, or let another
    /// thread poll).
    pub fn read_loss_async(
        &self,
        ctx: &GpuContext,
    ) -> impl std::future::Future<Output = Result<f32>> + Send + 'static {
        let ws = self.ws.clone();
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss loss"),
            });
        let off = 4 * ws.fin_layout.report as u64;
        enc.copy_buffer_to_buffer(&ws.fin, off, &ws.staging, 0, 4);
        // The status words after it, checked as `read` checks them.
        enc.copy_buffer_to_buffer(&ws.check, 0, &ws.staging, 8, SEQ_AT + 4);
        ctx.queue.submit([enc.finish()]);
        let seq = self.seq;
        let len = 8 + SEQ_AT + 8;
        let (tx, rx) = futures::channel::oneshot::channel();
        ws.staging
            .slice(0..len)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r.map_err(|e| Error::Gpu(format!("mapping the loss: {e}"))));
            });
        async move {
            rx.await
                .map_err(|_| Error::Gpu("the loss read-back was dropped by the device".into()))??;
            let words: Vec<u32> = {
                let view = ws
                    .staging
                    .slice(0..len)
                    .get_mapped_range()
                    .map_err(|e| Error::Gpu(format!("{e:?}")))?;
                bytemuck::pod_collect_to_vec(&view)
            };
            ws.staging.unmap();
            check_status(seq, &words[2..])?;
            Ok(f32::from_bits(words[0]))
        }
    }

    /// The buffer and byte offset of the recording's input status: four u32 (non-finite
    /// logits, flat position of the first or `u32::MAX`, invalid labels, position of the
    /// first), written by the statistics pass. A caller may copy them lazily, or read them
    /// with [`Recorded::read_status_async`].
    pub fn status_location(&self) -> (&wgpu::Buffer, u64) {
        (&self.ws.check, 0)
    }

    /// Asynchronous read of the input status (the counters of
    /// [`Recorded::status_location`]): resolves once the device has run the recording
    /// (drive it with `device.poll`). Unlike [`Recorded::read`], bad input is a value here,
    /// not an error; reading a recording that was never submitted is an error.
    pub fn read_status_async(
        &self,
        ctx: &GpuContext,
    ) -> impl std::future::Future<Output = Result<InputStatus>> + Send + 'static {
        let ws = self.ws.clone();
        let seq = self.seq;
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("segloss status"),
            size: SEQ_AT + 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss status"),
            });
        enc.copy_buffer_to_buffer(&ws.check, 0, &staging, 0, SEQ_AT + 4);
        ctx.queue.submit([enc.finish()]);
        let (tx, rx) = futures::channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r.map_err(|e| Error::Gpu(format!("mapping the status: {e}"))));
        });
        async move {
            rx.await.map_err(|_| {
                Error::Gpu("the status read-back was dropped by the device".into())
            })??;
            let w: Vec<u32> = {
                let view = staging
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| Error::Gpu(format!("{e:?}")))?;
                bytemuck::pod_collect_to_vec(&view)
            };
            check_status(seq, &[0, 0, 0, 0, w[(SEQ_AT / 4) as usize]])?;
            let first = |v: u32| (v != u32::MAX).then_some(v as u64);
            Ok(InputStatus {
                non_finite_logits: w[0] as u64,
                first_non_finite: first(w[1]),
                invalid_labels: w[2] as u64,
                first_invalid_label: first(w[3]),
            })
        }
    }

    /// An error where the recording left the class sums out.
    fn check_class_sums(&self) -> Result<()> {
        if self.class_sums {
            return Ok(());
        }
        Err(Error::Input(
            "this recording left the per-class statistics out (record_loss, or a call without \
             proportions): record with proportions to read them"
                .into(),
        ))
    }

    fn copy_and_map(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        let ws = &self.ws;
        let report_off = 4 * ws.fin_layout.report as u64;
        let report_len = ws.sizes.fin - report_off;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss read"),
            });
        enc.copy_buffer_to_buffer(&ws.fin, report_off, &ws.staging, 0, report_len);
        enc.copy_buffer_to_buffer(&ws.stats, 0, &ws.staging, report_len, ws.sizes.stats);
        let check_at = report_len + ws.sizes.stats + ws.sizes.map;
        enc.copy_buffer_to_buffer(
            &ws.map,
            0,
            &ws.staging,
            report_len + ws.sizes.stats,
            ws.sizes.map,
        );
        enc.copy_buffer_to_buffer(&ws.check, 0, &ws.staging, check_at, SEQ_AT + 4);
        ctx.queue.submit([enc.finish()]);
        let words = map_read(&ctx.device, &ws.staging, check_at + SEQ_AT + 4)?;
        check_status(self.seq, &words[(check_at / 4) as usize..])?;
        Ok(words)
    }

    fn decode_statistics(&self, stats_w: &[f32]) -> Statistics {
        let (b_n, c_n) = (self.total_batch, self.classes);
        let n_pix = self.spec.terms.iter().filter(|t| t.is_pixel_term()).count();
        let width = row_width(c_n);
        let scalars = |b: usize| b * width + PER * c_n;
        Statistics {
            batch: b_n,
            classes: c_n,
            per_class: (0..b_n * c_n)
                .map(|k| {
                    let o = (k / c_n) * width + (k % c_n) * PER;
                    std::array::from_fn(|j| stats_w[o + j] as f64)
                })
                .collect(),
            valid: (0..b_n)
                .map(|b| stats_w[scalars(b) + VALID] as f64)
                .collect(),
            plain_ce: (0..b_n)
                .map(|b| stats_w[scalars(b) + PLAIN_CE] as f64)
                .collect(),
            pixel_sums: (0..b_n * n_pix)
                .map(|k| {
                    let o = scalars(k / n_pix) + k % n_pix;
                    [stats_w[o + LOSS] as f64, stats_w[o + NORM] as f64]
                })
                .collect(),
        }
    }

    fn decode(&self, bytes: &[u32]) -> LossOutput {
        let words: &[f32] = bytemuck::cast_slice(bytes);
        let ws = &self.ws;
        let fl = ws.fin_layout;
        let (b_n, c_n, s) = (self.total_batch, self.classes, self.spatial);
        let report_len = (ws.sizes.fin / 4) as usize - fl.report;
        let (report, rest) = words.split_at(report_len);
        let (stats_w, map_w) = rest.split_at((ws.sizes.stats / 4) as usize);
        let at = |abs: usize| report[abs - fl.report] as f64;
        let spec = &self.spec;
        let terms: Vec<TermValue> = spec
            .terms
            .iter()
            .enumerate()
            .map(|(r, t)| TermValue {
                kind: t.kind().into(),
                weight: t.weight(),
                value: at(fl.values + r),
            })
            .collect();
        let mut pix_slot = 0;
        let mut elements = vec![];
        for (r, t) in spec.terms.iter().enumerate() {
            let e = match t {
                Term::CrossEntropy {
                    reduction: SpecReduction::None,
                    ..
                } => Some(
                    map_w[pix_slot * b_n * s..(pix_slot + 1) * b_n * s]
                        .iter()
                        .map(|v| *v as f64)
                        .collect(),
                ),
                Term::Dice {
                    reduction: SpecReduction::None,
                    batch,
                    ..
                } => {
                    let groups = if *batch { 1 } else { b_n };
                    Some(
                        (0..groups * c_n)
                            .map(|k| at(fl.elements + r * b_n * c_n + k))
                            .collect(),
                    )
                }
                _ => None,
            };
            if t.is_pixel_term() {
                pix_slot += 1;
            }
            elements.push(e);
        }
        let statistics = self.decode_statistics(stats_w);
        let rows = |v: &[f64]| v.chunks(c_n.max(1)).map(|r| r.to_vec()).collect();
        let (predicted, target, decomposition) = if self.class_sums {
            let (p, t, d) = crate::reference::proportions(spec, &statistics);
            (rows(&p), rows(&t), d)
        } else {
            (vec![], vec![], vec![])
        };
        LossOutput {
            loss: at(fl.report),
            terms,
            predicted_proportions: predicted,
            target_proportions: target,
            valid_pixels: statistics.valid.iter().map(|v| *v as u64).collect(),
            decomposition,
            elements: if elements.iter().any(Option::is_some) {
                elements
            } else {
                vec![]
            },
            gradient: None,
            statistics: self.class_sums.then_some(statistics),
        }
    }
}

/// The status words of the call: the recording ran (its sequence number arrived, so
/// nothing read is stale), and the stats pass found no bad input.
fn check_status(seq: u32, check: &[u32]) -> Result<()> {
    let ran = check[(SEQ_AT / 4) as usize];
    if ran != seq {
        return Err(Error::Input(format!(
            "this recording has not run: submit the encoder it was recorded into (queue.submit) \
             before reading its results (recording {}, the device last ran recording {ran} \
             on this workspace)",
            seq
        )));
    }
    if check[0] > 0 {
        return Err(Error::Input(format!(
            "the logits hold {} non-finite values (NaN or infinite); the first at flat position {}",
            check[0], check[1]
        )));
    }
    if check[2] > 0 {
        return Err(Error::Input(format!(
            "the labels hold {} invalid values (a class index ≥ C that is not ignore_index, or a soft label outside [0, 1]); the first at flat position {}",
            check[2], check[3]
        )));
    }
    Ok(())
}

/// Maps `len` bytes of a MAP_READ buffer, waits for the device, copies them out.
pub(super) fn map_read(device: &wgpu::Device, buffer: &wgpu::Buffer, len: u64) -> Result<Vec<u32>> {
    let slice = buffer.slice(0..len);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
    rx.recv()
        .map_err(|_| Error::Gpu("the read-back never completed".into()))?
        .map_err(|e| Error::Gpu(format!("mapping the read-back buffer: {e}")))?;
    let out = {
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("mapped range: {e:?}")))?;
        view.chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    };
    buffer.unmap();
    Ok(out)
}

/// Copies `len` bytes of a COPY_SRC buffer from byte `offset` to the host through a
/// temporary staging buffer, waiting for the device.
pub(super) fn read_buffer(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> Result<Vec<u32>> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("segloss gradient read"),
        size: len,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("segloss gradient read"),
    });
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
    queue.submit([enc.finish()]);
    map_read(device, &staging, len)
}
