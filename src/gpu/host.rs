//! The convenient host API: host arrays in, [`LossOutput`] out. It checks the inputs on the
//! host (so bad input names its first bad element), uploads them into pooled buffers,
//! records the passes through the backend API and reads the results back.

use super::batch::{BufferRegion, DeviceBatch, GradTarget, HostBatch, HostLogits, Options};
use super::context::GpuContext;
use super::pool::BufferKey;
use super::readback::map_read;
use super::record::Request;
use crate::error::{Error, Result};
use crate::input::{LabelFormat, Labels, LogitFormat, Shape};
use crate::output::LossOutput;
use crate::spec::LossSpec;

/// The pooled buffers of a host call and their keys (returned to the pool after): inputs,
/// the gradient, and the staging buffer the gradient is read back through.
struct Uploads {
    keys: [BufferKey; 4],
    logits: wgpu::Buffer,
    labels: wgpu::Buffer,
    grad: wgpu::Buffer,
    staging: wgpu::Buffer,
    grad_bytes: u64,
}

/// The label storage of a host batch: soft labels as f32, index labels as asked or in the
/// most compact format that holds C classes.
fn label_format(batch: &HostBatch<'_>) -> Result<LabelFormat> {
    let f = match (batch.labels, batch.label_format) {
        (Labels::Soft(_), _) => LabelFormat::Soft,
        (Labels::Index(_), None) => LabelFormat::compact(batch.shape.classes),
        (Labels::Index(_), Some(LabelFormat::Soft)) => {
            return Err(Error::Input(
                "index labels cannot be stored as soft labels".into(),
            ))
        }
        (Labels::Index(_), Some(f)) => f,
    };
    f.check_classes(batch.shape.classes)?;
    Ok(f)
}

/// The gradient words read back, widened to f32.
fn widen_gradient(words: &[u32], format: LogitFormat, n: usize) -> Vec<f32> {
    match format {
        LogitFormat::F32 => bytemuck::cast_slice::<u32, f32>(words)[..n].to_vec(),
        LogitFormat::F16 => bytemuck::cast_slice::<u32, u16>(words)[..n]
            .iter()
            .map(|b| half::f16::from_bits(*b).to_f32())
            .collect(),
        LogitFormat::Bf16 => bytemuck::cast_slice::<u32, u16>(words)[..n]
            .iter()
            .map(|b| half::bf16::from_bits(*b).to_f32())
            .collect(),
    }
}

impl GpuContext {
    /// Loss (and gradient) of `spec` on f32 NCHW logits.
    pub fn evaluate(
        &self,
        spec: &LossSpec,
        shape: &Shape,
        logits: &[f32],
        labels: Labels<'_>,
        opts: Options,
    ) -> Result<LossOutput> {
        self.evaluate_host(spec, &HostBatch::new(shape, logits, labels), opts)
    }

    /// Loss (and gradient) of `spec` on host data in any layout and precision.
    pub fn evaluate_host(
        &self,
        spec: &LossSpec,
        batch: &HostBatch<'_>,
        opts: Options,
    ) -> Result<LossOutput> {
        self.check_device()?;
        if opts.statistics && !opts.proportions && spec.pixel_terms_only() {
            return Err(Error::Input(
                "Options: statistics need the per-class sums that proportions: false leaves out"
                    .into(),
            ));
        }
        let shape = batch.shape;
        if batch.logits.len() != shape.len() {
            shape.check()?;
            return Err(Error::Input(format!(
                "logits hold {} values, expected B·C·S = {}",
                batch.logits.len(),
                shape.len()
            )));
        }
        // Checked as f32; only 16-bit logits need a widened copy.
        let widened;
        let checked: &[f32] = match batch.logits {
            HostLogits::F32(v) => v,
            other => {
                widened = other.to_f32();
                &widened
            }
        };
        spec.check_inputs(shape, checked, &batch.labels)?;
        let label_format = label_format(batch)?;
        let label_words = label_format.encode(&batch.labels, spec.ignore_index, shape.classes)?;
        let up = self.acquire_uploads(batch, &label_words, opts.gradient)?;
        let labels = (label_format, &label_words[..]);
        let result = self.scoped(|| self.run_host(spec, batch, labels, &up, opts));
        let mut caches = self.lock()?;
        let [lk, yk, gk, sk] = up.keys;
        caches.pool.release(lk, up.logits);
        caches.pool.release(yk, up.labels);
        caches.pool.release(gk, up.grad);
        caches.pool.release(sk, up.staging);
        result
    }

    /// Pooled buffers for a host call's logits, labels and gradient (the read-back staging
    /// buffer full size only when the gradient is wanted).
    fn acquire_uploads(
        &self,
        batch: &HostBatch<'_>,
        label_words: &[u32],
        gradient: bool,
    ) -> Result<Uploads> {
        use wgpu::BufferUsages as U;
        let logit_bytes = batch.logits.bytes().len() as u64;
        let n = batch.shape.len() as u64;
        let grad_bytes = (n * 4 / batch.grad_format.per_word()).div_ceil(4) * 4;
        let input = (U::STORAGE | U::COPY_DST).bits();
        let keys = [
            BufferKey::new(logit_bytes, input),
            BufferKey::new(4 * label_words.len() as u64, input),
            BufferKey::new(grad_bytes, (U::STORAGE | U::COPY_SRC | U::COPY_DST).bits()),
            BufferKey::new(
                if gradient { grad_bytes } else { 4 },
                (U::MAP_READ | U::COPY_DST).bits(),
            ),
        ];
        let mut caches = self.lock()?;
        let mut get = |k: &BufferKey| caches.pool.acquire(k, |k| self.create_buffer(k));
        Ok(Uploads {
            logits: get(&keys[0]),
            labels: get(&keys[1]),
            grad: get(&keys[2]),
            staging: get(&keys[3]),
            keys,
            grad_bytes,
        })
    }

    /// Uploads, records, submits and reads back one host call.
    fn run_host(
        &self,
        spec: &LossSpec,
        batch: &HostBatch<'_>,
        (label_format, label_words): (LabelFormat, &[u32]),
        up: &Uploads,
        opts: Options,
    ) -> Result<LossOutput> {
        let shape = batch.shape;
        self.queue
            .write_buffer(&up.logits, 0, &batch.logits.bytes());
        self.queue
            .write_buffer(&up.labels, 0, bytemuck::cast_slice(label_words));
        if opts.poison {
            let poison = vec![0xFFu8; up.grad_bytes as usize];
            self.queue.write_buffer(&up.grad, 0, &poison);
        }
        let region = |buffer| BufferRegion { buffer, offset: 0 };
        let device_batch = DeviceBatch {
            layout: batch.layout,
            logits: region(&up.logits),
            logit_format: batch.logits.format(),
            labels: region(&up.labels),
            ..DeviceBatch::new(shape, &up.logits, &up.labels, label_format)
        };
        let grad = opts.gradient.then_some(GradTarget {
            region: region(&up.grad),
            format: batch.grad_format,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss"),
            });
        let req = Request {
            poison: opts.poison,
            strategy: opts.strategy.unwrap_or(self.strategy),
            proportions: opts.proportions,
            ..Request::full(self, spec, &device_batch, grad)
        };
        let rec = self.record_request(&mut enc, req, None)?;
        // The gradient's read-back copy goes into the same submission, so the one wait of
        // `read` covers it too.
        if opts.gradient {
            enc.copy_buffer_to_buffer(&up.grad, 0, &up.staging, 0, up.grad_bytes);
        }
        self.queue.submit([enc.finish()]);
        let mut out = rec.read(self)?;
        if opts.gradient {
            let words = map_read(&self.device, &up.staging, up.grad_bytes)?;
            out.gradient = Some(widen_gradient(&words, batch.grad_format, shape.len()));
        }
        if !opts.statistics {
            out.statistics = None;
        }
        Ok(out)
    }
}
