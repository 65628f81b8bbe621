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
    /// One i32 class index per pixel (burn's and PyTorch's integer tensors): negative
    /// values and `ignore_index` (which must then fit i32) are ignored.
    I32,
    /// One i64 class index per pixel, little-endian (the range's byte offset a multiple of
    /// 8): negative values and `ignore_index` are ignored.
    I64,
}

impl LabelFormat {
    /// Values per 32-bit word.
    pub fn per_word(self) -> u64 {
        match self {
            LabelFormat::U8 => 4,
            LabelFormat::U16 => 2,
            LabelFormat::U32 | LabelFormat::Soft | LabelFormat::I32 | LabelFormat::I64 => 1,
        }
    }

    /// 32-bit words per value (2 for I64, else 1; packed formats hold several per word).
    pub fn words_per_value(self) -> u64 {
        if self == LabelFormat::I64 {
            2
        } else {
            1
        }
    }

    /// Bytes that `values` labels of this format occupy (whole words).
    pub fn bytes(self, values: u64) -> u64 {
        values.div_ceil(self.per_word()) * 4 * self.words_per_value()
    }

    /// The shader's code for the format.
    pub fn code(self) -> u32 {
        match self {
            LabelFormat::U32 => 0,
            LabelFormat::U8 => 1,
            LabelFormat::Soft => 2,
            LabelFormat::U16 => 3,
            LabelFormat::I32 => 4,
            LabelFormat::I64 => 5,
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

    /// Refuses a format that cannot hold `classes` class indices beside its ignore marker
    /// (u8: C ≤ 255, u16: C ≤ 65535). Every path that stores index labels asks this.
    pub fn check_classes(self, classes: usize) -> Result<()> {
        let max = match self {
            LabelFormat::U8 => 255,
            LabelFormat::U16 => 65535,
            LabelFormat::U32 | LabelFormat::Soft | LabelFormat::I32 | LabelFormat::I64 => {
                return Ok(())
            }
        };
        if classes > max {
            return Err(Error::Input(format!(
                "{self:?} labels hold at most {max} classes (the value {max} marks ignored pixels), C = {classes}: use U16 or U32 label storage"
            )));
        }
        Ok(())
    }

    /// The 32-bit words the device reads for host labels (borrowed when the labels already
    /// are those words: u32 indices with nothing to remap, and f32 soft labels). Index
    /// labels are decoded with `ignore_index` and checked against `classes`.
    pub fn encode<'a>(
        self,
        labels: &Labels<'a>,
        ignore_index: i64,
        classes: usize,
    ) -> Result<std::borrow::Cow<'a, [u32]>> {
        use std::borrow::Cow;
        let y = match *labels {
            Labels::Soft(g) => return Ok(Cow::Borrowed(bytemuck::cast_slice(g))),
            Labels::Index(y) => y.to_kernel_form(ignore_index, classes)?,
        };
        let pack = |per_word: usize, bits: u32, ignored: u32| -> Vec<u32> {
            y.chunks(per_word)
                .map(|c| {
                    c.iter().enumerate().fold(0u32, |w, (k, &v)| {
                        w | ((if v == IGNORE { ignored } else { v }) << (bits * k as u32))
                    })
                })
                .collect()
        };
        Ok(match self {
            LabelFormat::U32 | LabelFormat::Soft | LabelFormat::I32 => y, // IGNORE is −1 as i32
            LabelFormat::I64 => Cow::Owned(
                y.iter()
                    .flat_map(|&v| [v, if v == IGNORE { u32::MAX } else { 0 }])
                    .collect(),
            ),
            LabelFormat::U8 => Cow::Owned(pack(4, 8, 255)),
            LabelFormat::U16 => Cow::Owned(pack(2, 16, 0xFFFF)),
        })
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

/// Labels as the caller holds them.
#[derive(Debug, Clone, Copy)]
pub enum Labels<'a> {
    /// One class index per pixel (B·S values, the pixel order of the logits' layout without
    /// the class axis), of any integer type. A pixel is ignored when its value equals the
    /// spec's `ignore_index` (and, for `u32` labels, when it is [`IGNORE`]). Build it with
    /// [`Labels::index`] from any integer slice.
    Index(IndexLabels<'a>),
    /// One value per logit (B·C·S), in the logits' layout (NCHW or NHWC, as the call's
    /// [`Layout`] says): probability vectors in softmax mode, 0..1 masks in sigmoid mode.
    Soft(&'a [f32]),
}

/// Class-index labels of any integer type, read in place (no conversion by the caller).
#[derive(Debug, Clone, Copy)]
pub enum IndexLabels<'a> {
    /// u8 values (a common on-disk format).
    U8(&'a [u8]),
    /// u16 values.
    U16(&'a [u16]),
    /// u32 values ([`IGNORE`] marks an ignored pixel whatever `ignore_index` is).
    U32(&'a [u32]),
    /// u64 values.
    U64(&'a [u64]),
    /// i8 values.
    I8(&'a [i8]),
    /// i16 values.
    I16(&'a [i16]),
    /// i32 values (burn's and many frameworks' integer tensors).
    I32(&'a [i32]),
    /// i64 values (PyTorch's `long` targets, −100 ignored by default).
    I64(&'a [i64]),
}

/// An integer type [`Labels::index`] takes.
pub trait LabelInt: Copy {
    /// Wraps a slice of this type.
    fn wrap(values: &[Self]) -> IndexLabels<'_>;
}

macro_rules! label_int {
    ($($t:ty => $v:ident),*) => {$(
        impl LabelInt for $t {
            fn wrap(values: &[Self]) -> IndexLabels<'_> {
                IndexLabels::$v(values)
            }
        }
    )*};
}
label_int!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32, i64 => I64);

/// Calls `$f` on the slice inside an [`IndexLabels`], whatever its type.
macro_rules! with_slice {
    ($labels:expr, $y:ident => $f:expr) => {
        match $labels {
            IndexLabels::U8($y) => $f,
            IndexLabels::U16($y) => $f,
            IndexLabels::U32($y) => $f,
            IndexLabels::U64($y) => $f,
            IndexLabels::I8($y) => $f,
            IndexLabels::I16($y) => $f,
            IndexLabels::I32($y) => $f,
            IndexLabels::I64($y) => $f,
        }
    };
}

impl<'a> IndexLabels<'a> {
    /// Number of labels.
    pub fn len(&self) -> usize {
        with_slice!(self, y => y.len())
    }

    /// True when there is no label.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw value at `i`, widened (u64 values above i64::MAX saturate: they are no class
    /// index either way).
    fn raw(&self, i: usize) -> i64 {
        match self {
            IndexLabels::U8(y) => i64::from(y[i]),
            IndexLabels::U16(y) => i64::from(y[i]),
            IndexLabels::U32(y) if y[i] == IGNORE => IGNORE_RAW,
            IndexLabels::U32(y) => i64::from(y[i]),
            IndexLabels::U64(y) => i64::try_from(y[i]).unwrap_or(i64::MAX),
            IndexLabels::I8(y) => i64::from(y[i]),
            IndexLabels::I16(y) => i64::from(y[i]),
            IndexLabels::I32(y) => i64::from(y[i]),
            IndexLabels::I64(y) => y[i],
        }
    }

    /// The class at `i`: `None` for an ignored pixel (`ignore_index`, or [`IGNORE`] in u32
    /// labels), `Some(Err(value))` for a value that is no class index. The one rule every
    /// path (GPU upload, reference, command line) decodes labels by.
    pub fn class_at(
        &self,
        i: usize,
        ignore_index: i64,
        classes: usize,
    ) -> Option<std::result::Result<u32, i64>> {
        let v = self.raw(i);
        if v == ignore_index || v == IGNORE_RAW {
            None
        } else if v < 0 || v >= classes as i64 {
            Some(Err(v))
        } else {
            Some(Ok(v as u32))
        }
    }

    /// The kernels' form: u32 class indices, [`IGNORE`] for ignored pixels; borrowed when
    /// the labels already are that (u32 labels holding no `ignore_index`). Invalid values
    /// are an error naming the first.
    pub fn to_kernel_form(
        &self,
        ignore_index: i64,
        classes: usize,
    ) -> Result<std::borrow::Cow<'a, [u32]>> {
        if let IndexLabels::U32(y) = *self {
            let clean = y
                .iter()
                .all(|&v| v == IGNORE || ((v as usize) < classes && v as i64 != ignore_index));
            if clean {
                return Ok(std::borrow::Cow::Borrowed(y));
            }
        }
        let mut out = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            match self.class_at(i, ignore_index, classes) {
                None => out.push(IGNORE),
                Some(Ok(c)) => out.push(c),
                Some(Err(v)) => return Err(bad_label(v, i, ignore_index, classes)),
            }
        }
        Ok(std::borrow::Cow::Owned(out))
    }
}

/// Marks [`IGNORE`] in widened u32 labels (no i64 label value of a real class reaches it).
const IGNORE_RAW: i64 = i64::MIN;

fn bad_label(v: i64, i: usize, ignore_index: i64, classes: usize) -> Error {
    Error::Input(format!(
        "label {v} at flat position {i} is neither a class index in 0..{classes} nor ignore_index {ignore_index}"
    ))
}

impl<'a> Labels<'a> {
    /// Index labels from a slice of any integer type (`&[u8]`, `&Vec<i64>`, …).
    pub fn index<T: LabelInt>(values: &'a [T]) -> Self {
        Labels::Index(T::wrap(values))
    }

    /// The same labels in the kernels' form (u32 indices with [`IGNORE`], f32 soft labels),
    /// checked against the shape and `ignore_index`; `owned` keeps a converted copy alive.
    pub fn resolve<'b>(
        &self,
        shape: &Shape,
        ignore_index: i64,
        owned: &'b mut Vec<u32>,
    ) -> Result<Labels<'b>>
    where
        'a: 'b,
    {
        self.check(shape, ignore_index)?;
        Ok(match self {
            Labels::Soft(g) => Labels::Soft(g),
            Labels::Index(y) => match y.to_kernel_form(ignore_index, shape.classes)? {
                std::borrow::Cow::Borrowed(v) => Labels::Index(IndexLabels::U32(v)),
                std::borrow::Cow::Owned(v) => {
                    *owned = v;
                    Labels::Index(IndexLabels::U32(owned))
                }
            },
        })
    }

    /// Checks the label count against the shape and every value against the class count
    /// and `ignore_index`.
    pub fn check(&self, shape: &Shape, ignore_index: i64) -> Result<()> {
        match self {
            Labels::Index(y) => {
                let want = shape.batch * shape.pixels();
                if y.len() != want {
                    return Err(Error::Input(format!(
                        "labels hold {} values, expected B·S = {want}",
                        y.len()
                    )));
                }
                for i in 0..y.len() {
                    if let Some(Err(v)) = y.class_at(i, ignore_index, shape.classes) {
                        return Err(bad_label(v, i, ignore_index, shape.classes));
                    }
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

    /// u32 kernel-form indices (after [`Labels::resolve`]); `None` for soft labels.
    pub fn kernel_indices(&self) -> Option<&'a [u32]> {
        match self {
            Labels::Index(IndexLabels::U32(y)) => Some(y),
            _ => None,
        }
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
        assert!(Labels::index(&[0u32, 2]).check(&s, -100).is_err());
        assert!(Labels::Soft(&[0.5, 0.5, 1.5, 0.0]).check(&s, -100).is_err());
    }

    #[test]
    fn index_labels_of_every_integer_type_decode_alike() {
        let s = Shape::new(1, 3, &[4]);
        let want = [0, IGNORE, 2, 1];
        let forms: [Labels; 5] = [
            Labels::index(&[0u8, 255, 2, 1]),
            Labels::index(&[0u16, 255, 2, 1]),
            Labels::index(&[0u32, 255, 2, 1]),
            Labels::index(&[0i32, 255, 2, 1]),
            Labels::index(&[0i64, 255, 2, 1]),
        ];
        for l in forms {
            let mut owned = vec![];
            let r = l.resolve(&s, 255, &mut owned).unwrap();
            assert_eq!(r.kernel_indices().unwrap(), &want[..], "{l:?}");
        }
        // u32::MAX stays the ignore marker of u32 labels; −100 ignored by default.
        let mut owned = vec![];
        let r = Labels::index(&[0u32, IGNORE, 2, 1])
            .resolve(&s, -100, &mut owned)
            .unwrap();
        assert_eq!(r.kernel_indices().unwrap(), &want[..]);
        let r = Labels::index(&[0i64, -100, 2, 1])
            .resolve(&s, -100, &mut owned)
            .unwrap();
        assert_eq!(r.kernel_indices().unwrap(), &want[..]);
        // 255 without ignore_index 255 is no class of C = 3.
        let e = Labels::index(&[0u8, 255, 2, 1])
            .check(&s, -100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 255 at flat position 1"), "{e}");
        let e = Labels::index(&[0i64, -1, 2, 1])
            .check(&s, -100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label -1"), "{e}");
    }

    #[test]
    fn packed_formats_refuse_too_many_classes() {
        assert!(LabelFormat::U8.check_classes(255).is_ok());
        let e = LabelFormat::U8.check_classes(256).unwrap_err().to_string();
        assert!(e.contains("at most 255 classes"), "{e}");
        assert!(LabelFormat::U16.check_classes(65536).is_err());
        assert!(LabelFormat::U32.check_classes(1 << 20).is_ok());
    }
}
