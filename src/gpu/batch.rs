//! The inputs of a call: host batches for the convenient API, device batches (buffer
//! regions) and gradient targets for the backend API, and the host API's options.

use super::strategy::Strategy;
use crate::input::{GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape};

/// What to compute beyond the loss (host API). `Options::default()` asks for the loss, its
/// terms, the proportions and the decomposition.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Run the gradient pass and return ∂loss/∂logits.
    pub gradient: bool,
    /// Return the raw per-(image, class) statistics.
    pub statistics: bool,
    /// Fill every output buffer with NaN before the run, so an element a kernel fails to
    /// write shows up (for tests).
    pub poison: bool,
    /// How the kernels run (`None`: the context's [`crate::GpuContext::strategy`], chosen
    /// from the adapter); tests and benchmarks pick others.
    pub strategy: Option<Strategy>,
    /// Return the predicted and target proportions and the decomposition (default true).
    /// For a spec of pixel terms only (cross-entropy, focal, BCE) `false` leaves out the
    /// per-class sums they come from, which nothing else needs (see
    /// [`crate::GpuContext::record_loss`]), and those fields come back empty; asking for
    /// `statistics` too is then an error. A spec with a statistic term computes (and
    /// returns) them anyway.
    pub proportions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gradient: false,
            statistics: false,
            poison: false,
            strategy: None,
            proportions: true,
        }
    }
}

/// Host inputs in any layout and precision (the convenient API's general form).
#[derive(Debug, Clone, Copy)]
pub struct HostBatch<'a> {
    /// The shape.
    pub shape: &'a Shape,
    /// Layout of logits, soft labels and the gradient.
    pub layout: Layout,
    /// Logits.
    pub logits: HostLogits<'a>,
    /// Labels.
    pub labels: Labels<'a>,
    /// Label storage on the device (index labels; `None`: the most compact that fits).
    pub label_format: Option<LabelFormat>,
    /// Precision of the gradient on the device (returned widened to f32).
    pub grad_format: GradFormat,
}

impl<'a> HostBatch<'a> {
    /// f32 NCHW logits with their labels, the most compact label storage and an f32
    /// gradient; change fields with struct update syntax for other layouts and formats.
    pub fn new(shape: &'a Shape, logits: &'a [f32], labels: Labels<'a>) -> Self {
        HostBatch {
            shape,
            layout: Layout::Nchw,
            logits: HostLogits::F32(logits),
            labels,
            label_format: None,
            grad_format: GradFormat::F32,
        }
    }
}

/// Host logits.
#[derive(Debug, Clone, Copy)]
pub enum HostLogits<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half values.
    F16(&'a [half::f16]),
    /// bfloat16 values.
    Bf16(&'a [half::bf16]),
}

impl HostLogits<'_> {
    /// The format on the device.
    pub fn format(&self) -> LogitFormat {
        match self {
            HostLogits::F32(_) => LogitFormat::F32,
            HostLogits::F16(_) => LogitFormat::F16,
            HostLogits::Bf16(_) => LogitFormat::Bf16,
        }
    }

    /// Values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostLogits::F32(v) => v.to_vec(),
            HostLogits::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostLogits::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            HostLogits::F32(v) => v.len(),
            HostLogits::F16(v) => v.len(),
            HostLogits::Bf16(v) => v.len(),
        }
    }

    /// The bytes as the device reads them (16-bit values two per word, padded to a word).
    /// f32 logits are uploaded as they are: no copy on the hot path.
    pub(crate) fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut b: Vec<u8> = match self {
            HostLogits::F32(v) => return std::borrow::Cow::Borrowed(bytemuck::cast_slice(v)),
            HostLogits::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            HostLogits::Bf16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        };
        b.resize(b.len().div_ceil(4) * 4, 0);
        std::borrow::Cow::Owned(b)
    }
}

/// A range of a device buffer: the buffer and a byte offset (a multiple of 4).
#[derive(Debug, Clone, Copy)]
pub struct BufferRegion<'a> {
    /// The buffer (STORAGE usage).
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of the array's first element.
    pub offset: u64,
}

/// Device-resident inputs of the backend API.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatch<'a> {
    /// The shape of this call's images.
    pub shape: &'a Shape,
    /// Layout of logits, soft labels and the gradient.
    pub layout: Layout,
    /// Logits.
    pub logits: BufferRegion<'a>,
    /// Precision of the logits.
    pub logit_format: LogitFormat,
    /// Labels.
    pub labels: BufferRegion<'a>,
    /// How the labels are stored.
    pub label_format: LabelFormat,
    /// Data parallelism: these images are images `image_offset..image_offset + B` of a
    /// global batch of `total_batch` (0: this call is the whole batch). Statistics of
    /// shards then add up to the statistics of the whole batch.
    pub image_offset: usize,
    /// Images of the global batch (0: `shape.batch`).
    pub total_batch: usize,
}

impl<'a> DeviceBatch<'a> {
    /// The common case: f32 NCHW logits and labels each at offset 0 of their buffers, this
    /// call being the whole batch. Adjust fields with struct update syntax for the rest.
    pub fn new(
        shape: &'a Shape,
        logits: &'a wgpu::Buffer,
        labels: &'a wgpu::Buffer,
        label_format: LabelFormat,
    ) -> Self {
        DeviceBatch {
            shape,
            layout: Layout::Nchw,
            logits: BufferRegion {
                buffer: logits,
                offset: 0,
            },
            logit_format: LogitFormat::F32,
            labels: BufferRegion {
                buffer: labels,
                offset: 0,
            },
            label_format,
            image_offset: 0,
            total_batch: 0,
        }
    }
}

/// Where the backend API writes the gradient.
#[derive(Debug, Clone, Copy)]
pub struct GradTarget<'a> {
    /// The caller's buffer range (STORAGE usage), the logits' shape and layout.
    pub region: BufferRegion<'a>,
    /// f32, or a 16-bit format (offset then a multiple of 4 bytes).
    pub format: GradFormat,
}

impl<'a> GradTarget<'a> {
    /// The common case: an f32 gradient written from the start of `buffer`.
    pub fn f32(buffer: &'a wgpu::Buffer) -> Self {
        GradTarget {
            region: BufferRegion { buffer, offset: 0 },
            format: GradFormat::F32,
        }
    }
}
