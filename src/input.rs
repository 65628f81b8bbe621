//! Inputs as the kernels see them: a shape, f32 logits in NCHW order and labels that are
//! either class indices (ignored pixels marked with [`IGNORE`]) or per-class soft values.

use crate::error::{Error, Result};

/// The label value that marks an ignored pixel after conversion.
pub const IGNORE: u32 = u32::MAX;

/// Memory layout of logits (and of soft labels and the gradient, which follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// (B, C, *spatial), PyTorch's default.
    #[default]
    Nchw,
    /// (B, *spatial, C), channels last.
    Nhwc,
}

/// Precision of logits on the device. 16-bit values are widened in the shader; every sum
/// is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogitFormat {
    /// 32-bit floats.
    #[default]
    F32,
    /// IEEE half precision (read with WGSL's unpack2x16float: no shader-f16 needed).
    F16,
    /// bfloat16, stored as 16-bit patterns.
    Bf16,
}

/// Precision of the gradient written to the device.
pub type GradFormat = LogitFormat;

impl LogitFormat {
    /// Values per 32-bit word.
    pub fn per_word(self) -> u64 {
        match self {
            LogitFormat::F32 => 1,
            LogitFormat::F16 | LogitFormat::Bf16 => 2,
        }
    }

    /// The shader's code for the format.
    pub fn code(self) -> u32 {
        match self {
            LogitFormat::F32 => 0,
            LogitFormat::F16 => 1,
            LogitFormat::Bf16 => 2,
        }
    }
}

/// How labels are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelFormat {
    /// One u32 class index per pixel, `u32::MAX` ignored.
    U32,
    /// u8 class indices packed 4 per word (little-endian), 255 ignored; C ≤ 255.
    U8,
    /// u16 class indices packed 2 per word, 65535 ignored; C ≤ 65535.
    U16,
    /// f32 per logit, the logits' shape and layout (soft labels, sigmoid masks).
    Soft,
}

impl LabelFormat {
    /// Values per 32-bit word.
    pub fn per_word(self) -> u64 {
        match self {
            LabelFormat::U8 => 4,
            LabelFormat::U16 => 2,
            LabelFormat::U32 | LabelFormat::Soft => 1,
        }
    }

    /// The shader's code for the format.
    pub fn code(self) -> u32 {
        match self {
            LabelFormat::U32 => 0,
            LabelFormat::U8 => 1,
            LabelFormat::Soft => 2,
            LabelFormat::U16 => 3,
        }
    }

    /// The most compact format for index labels of `classes` classes.
    pub fn compact(classes: usize) -> Self {
        if classes < 255 {
            LabelFormat::U8
        } else if classes < 65535 {
            LabelFormat::U16
        } else {
            LabelFormat::U32
        }
    }

    /// The 32-bit words the device reads for host labels (borrowed when the labels already
    /// are those words: u32 indices and f32 soft labels).
    pub fn encode<'a>(self, labels: &Labels<'a>) -> std::borrow::Cow<'a, [u32]> {
        use std::borrow::Cow;
        match (*labels, self) {
            (Labels::Index(y), LabelFormat::U32) => Cow::Borrowed(y),
            (Labels::Soft(g), _) => Cow::Borrowed(bytemuck::cast_slice(g)),
            (labels, format) => Cow::Owned(format.pack(&labels)),
        }
    }

    fn pack(self, labels: &Labels<'_>) -> Vec<u32> {
        match (labels, self) {
            (Labels::Index(y), LabelFormat::U8) => y
                .chunks(4)
                .map(|c| {
                    c.iter().enumerate().fold(0u32, |w, (k, &v)| {
                        w | ((if v == IGNORE { 255 } else { v }) << (8 * k))
                    })
                })
                .collect(),
            (Labels::Index(y), LabelFormat::U16) => y
                .chunks(2)
                .map(|c| {
                    c.iter().enumerate().fold(0u32, |w, (k, &v)| {
                        w | ((if v == IGNORE { 0xFFFF } else { v }) << (16 * k))
                    })
                })
                .collect(),
            (Labels::Index(y), _) => y.to_vec(),
            (Labels::Soft(g), _) => g.iter().map(|v| v.to_bits()).collect(),
        }
    }
}

/// Reorders (B, *spatial, C) data to (B, C, *spatial), or back with `to_nchw = false`.
pub fn permute<T: Copy + Default>(data: &[T], shape: &Shape, to_nchw: bool) -> Vec<T> {
    let (b_n, c_n, s) = (shape.batch, shape.classes, shape.pixels());
    let mut out = vec![T::default(); data.len()];
    for b in 0..b_n {
        for c in 0..c_n {
            for i in 0..s {
                let (nchw, nhwc) = ((b * c_n + c) * s + i, (b * s + i) * c_n + c);
                if to_nchw {
                    out[nchw] = data[nhwc];
                } else {
                    out[nhwc] = data[nchw];
                }
            }
        }
    }
    out
}

/// B images of C classes over any number of spatial dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Images in the batch (B).
    pub batch: usize,
    /// Classes or channels (C).
    pub classes: usize,
    /// Spatial extents (H, W or D, H, W, or one dimension).
    pub spatial: Vec<usize>,
}

impl Shape {
    /// A shape from B, C and the spatial extents.
    pub fn new(batch: usize, classes: usize, spatial: &[usize]) -> Self {
        Shape {
            batch,
            classes,
            spatial: spatial.to_vec(),
        }
    }

    /// Spatial positions per image (S).
    pub fn pixels(&self) -> usize {
        self.spatial.iter().product()
    }

    /// Number of logits (B·C·S).
    pub fn len(&self) -> usize {
        self.batch * self.classes * self.pixels()
    }

    /// True when the shape holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that no dimension is zero and that counts fit the kernels' 32-bit indexing.
    pub fn check(&self) -> Result<()> {
        if self.batch == 0
            || self.classes == 0
            || self.spatial.is_empty()
            || self.spatial.contains(&0)
        {
            return Err(Error::Input(format!(
                "shape B={} C={} spatial={:?} has a zero-sized or missing dimension",
                self.batch, self.classes, self.spatial
            )));
        }
        if self.len() > u32::MAX as usize {
            return Err(Error::Input(format!(
                "{} logits exceed the 2^32 elements one call can index",
                self.len()
            )));
        }
        Ok(())
    }
}

/// Labels, as the kernels consume them.
#[derive(Debug, Clone, Copy)]
pub enum Labels<'a> {
    /// One class index per pixel (B·S values), [`IGNORE`] for ignored pixels.
    Index(&'a [u32]),
    /// One value per logit (B·C·S, NCHW): probability vectors in softmax mode, 0..1 masks
    /// in sigmoid mode.
    Soft(&'a [f32]),
}

impl Labels<'_> {
    /// Checks the label count against the shape and every value against the class count.
    pub fn check(&self, shape: &Shape) -> Result<()> {
        match self {
            Labels::Index(y) => {
                let want = shape.batch * shape.pixels();
                if y.len() != want {
                    return Err(Error::Input(format!(
                        "labels hold {} values, expected B·S = {want}",
                        y.len()
                    )));
                }
                if let Some((i, v)) = y
                    .iter()
                    .enumerate()
                    .find(|(_, v)| **v != IGNORE && **v as usize >= shape.classes)
                {
                    return Err(Error::Input(format!(
                        "label {v} at flat position {i} is not a class index (C = {})",
                        shape.classes
                    )));
                }
            }
            Labels::Soft(g) => {
                if g.len() != shape.len() {
                    return Err(Error::Input(format!(
                        "soft labels hold {} values, expected the logits' B·C·S = {}",
                        g.len(),
                        shape.len()
                    )));
                }
                if let Some((i, v)) = g
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !v.is_finite() || **v < 0.0 || **v > 1.0)
                {
                    return Err(Error::Input(format!(
                        "soft label {v} at flat position {i} is outside [0, 1]"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Converts integer class labels of any type to the kernels' u32 form: `ignore_index`
/// becomes [`IGNORE`]; any other value outside 0..C is an error naming its position.
pub fn convert_labels<T: Copy + Into<i64>>(
    values: &[T],
    ignore_index: i64,
    classes: usize,
) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let v: i64 = (*v).into();
        if v == ignore_index {
            out.push(IGNORE);
        } else if v < 0 || v >= classes as i64 {
            return Err(Error::Input(format!(
                "label {v} at flat position {i} is neither a class index in 0..{classes} nor ignore_index {ignore_index}"
            )));
        } else {
            out.push(v as u32);
        }
    }
    Ok(out)
}

/// Checks that the logits fit the shape and are finite (a NaN or infinite logit would make
/// every output NaN; it is reported with its position instead).
pub fn check_logits(logits: &[f32], shape: &Shape) -> Result<()> {
    shape.check()?;
    if logits.len() != shape.len() {
        return Err(Error::Input(format!(
            "logits hold {} values, expected B·C·S = {}",
            logits.len(),
            shape.len()
        )));
    }
    if let Some((i, v)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::Input(format!(
            "logit {v} at flat position {i} is not finite"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_rejects_labels() {
        assert_eq!(
            convert_labels(&[0i64, 2, -100, 1], -100, 3).unwrap(),
            vec![0, 2, IGNORE, 1]
        );
        assert_eq!(
            convert_labels(&[255u8, 1], 255, 2).unwrap(),
            vec![IGNORE, 1]
        );
        let e = convert_labels(&[0i32, 3], -100, 3).unwrap_err().to_string();
        assert!(e.contains("label 3 at flat position 1"), "{e}");
        let e = convert_labels(&[-1i64], 255, 3).unwrap_err().to_string();
        assert!(e.contains("label -1"), "{e}");
    }

    #[test]
    fn rejects_bad_shapes_and_logits() {
        assert!(Shape::new(0, 2, &[3]).check().is_err());
        assert!(Shape::new(1, 2, &[]).check().is_err());
        let s = Shape::new(1, 2, &[2]);
        assert!(check_logits(&[0.0; 3], &s).is_err());
        let e = check_logits(&[0.0, 1.0, f32::NAN, 0.0], &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 2"), "{e}");
        assert!(Labels::Index(&[0, 2]).check(&s).is_err());
        assert!(Labels::Soft(&[0.5, 0.5, 1.5, 0.0]).check(&s).is_err());
    }
}
