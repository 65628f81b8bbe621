//! Reading and writing NumPy `.npy` files (format versions 1 to 3), for the command line.
//! Written here rather than taken from a crate so every malformed file gets an error that
//! says what is wrong with it, and so any integer dtype converts in one place (the format
//! is a text header and raw little- or big-endian values).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape, C order.
    pub shape: Vec<usize>,
    /// The values.
    pub data: NpyData,
}

/// The values of an array, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// float32, or float64 converted once to float32.
    Float(Vec<f32>),
    /// float16, as stored.
    Half(Vec<half::f16>),
    /// Any integer or bool dtype, widened to i64.
    Int(Vec<i64>),
}

impl NpyData {
    /// Floating-point values widened (or kept) as f32; integers converted as numbers.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            NpyData::Float(v) => v.clone(),
            NpyData::Half(v) => v.iter().map(|x| x.to_f32()).collect(),
            NpyData::Int(v) => v.iter().map(|x| *x as f32).collect(),
        }
    }
}

/// The value of a `'key': value` entry of the header dictionary.
fn header_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let pat = format!("'{key}':");
    let start = header
        .find(&pat)
        .ok_or_else(|| Error::Format(format!("npy header has no '{key}' entry")))?
        + pat.len();
    Ok(header[start..].trim_start())
}

/// Parses the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    let (header, data_start) = split_header(bytes)?;
    let descr = header_descr(header)?;
    if header_value(header, "fortran_order")?.starts_with("True") {
        return Err(Error::Format("Fortran-ordered arrays are not supported: save a C-ordered array (np.ascontiguousarray)".into()));
    }
    let shape = header_shape(header)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Format("the .npy shape overflows".into()))?;
    let data = decode(descr, count, &bytes[data_start..])?;
    Ok(NpyArray { shape, data })
}

/// The header text of a `.npy` file (after the magic bytes, version and length) and the
/// offset where its data starts.
fn split_header(bytes: &[u8]) -> Result<(&str, usize)> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::Format("not a .npy file (bad magic bytes)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(Error::Format("truncated .npy header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(Error::Format(format!(
                "unsupported .npy format version {v}"
            )))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| Error::Format("truncated .npy header".into()))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| Error::Format("the .npy header is not text".into()))?;
    Ok((header, end))
}

/// The dtype string of the header's `'descr'` entry, without its quotes.
fn header_descr(header: &str) -> Result<&str> {
    header_value(header, "descr")?
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| Error::Format("unreadable dtype in .npy header".into()))
}

/// The dimensions of the header's `'shape'` tuple.
fn header_shape(header: &str) -> Result<Vec<usize>> {
    let shape_text = header_value(header, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| Error::Format("unreadable shape in .npy header".into()))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| Error::Format(format!("bad dimension '{s}' in .npy shape")))
        })
        .collect()
}

/// The `count` values of dtype `descr` at the start of `body`. `descr` is a byte order
/// ('<', '>', '|' or '='), a kind letter and a width in bytes.
fn decode(descr: &str, count: usize, body: &[u8]) -> Result<NpyData> {
    let unsupported = || {
        Error::Format(format!(
            "unsupported dtype '{descr}' (float32, float16, float64 or an integer type)"
        ))
    };
    if descr.len() < 3 || !descr.is_ascii() {
        return Err(unsupported());
    }
    let (order, kind) = descr.split_at(1);
    let big = order == ">";
    if !matches!(order, "<" | ">" | "|" | "=") {
        return Err(unsupported());
    }
    let width: usize = kind[1..].parse().map_err(|_| unsupported())?;
    let need = count
        .checked_mul(width)
        .ok_or_else(|| Error::Format("the .npy shape overflows".into()))?;
    if body.len() < need {
        return Err(Error::Format(format!(
            "truncated .npy data: {} bytes for {count} values of {width} bytes",
            body.len()
        )));
    }
    let word = |k: usize| -> u64 {
        let b = &body[k * width..(k + 1) * width];
        let mut v = 0u64;
        for i in 0..width {
            let byte = if big { b[i] } else { b[width - 1 - i] };
            v = (v << 8) | byte as u64;
        }
        v
    };
    let data = match (kind.as_bytes()[0], width) {
        (b'f', 4) => NpyData::Float((0..count).map(|k| f32::from_bits(word(k) as u32)).collect()),
        // float64 (numpy's default) is converted once: every sum in the kernels is f32.
        (b'f', 8) => NpyData::Float((0..count).map(|k| f64::from_bits(word(k)) as f32).collect()),
        (b'f', 2) => NpyData::Half(
            (0..count)
                .map(|k| half::f16::from_bits(word(k) as u16))
                .collect(),
        ),
        (b'i', 1 | 2 | 4 | 8) => {
            let bits = 64 - 8 * width as u32;
            NpyData::Int(
                (0..count)
                    .map(|k| ((word(k) << bits) as i64) >> bits)
                    .collect(),
            )
        }
        (b'u', 1 | 2 | 4) | (b'b', 1) => NpyData::Int((0..count).map(|k| word(k) as i64).collect()),
        (b'u', 8) => NpyData::Int(
            (0..count)
                .map(|k| {
                    i64::try_from(word(k)).map_err(|_| {
                        Error::Input(format!(
                            "label {} at flat position {k} is out of range",
                            word(k)
                        ))
                    })
                })
                .collect::<Result<_>>()?,
        ),
        _ => return Err(unsupported()),
    };
    Ok(data)
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    parse(&bytes).map_err(|e| match e {
        Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
        Error::Input(m) => Error::Input(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// The bytes of a float32 `.npy` file (format 1.0).
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so the data starts on a 64-byte boundary, newline last.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(bytemuck::cast_slice::<f32, u8>(data));
    out
}

/// Writes a float32 `.npy` file atomically: to a temporary file beside it, then renamed, so
/// a failure never leaves a partial or stale file at `path`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_f32(shape, data))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io(format!("{}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
        let header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn round_trips_f32() {
        let a = parse(&encode_f32(&[2, 3], &[1.0, -2.5, 3.0, 0.0, 1e-8, 7.0])).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::Float(vec![1.0, -2.5, 3.0, 0.0, 1e-8, 7.0]));
        // The data starts on a 64-byte boundary: 5 floats leave 20 bytes past it.
        assert_eq!(encode_f32(&[5], &[0.0; 5]).len() % 64, 20);
    }

    #[test]
    fn reads_integer_dtypes_and_f16() {
        let a = parse(&npy(
            "<i8",
            "(3,)",
            &[0xff; 8]
                .iter()
                .chain(&2i64.to_le_bytes())
                .chain(&(-100i64).to_le_bytes())
                .cloned()
                .collect::<Vec<u8>>(),
        ))
        .unwrap();
        assert_eq!(a.data, NpyData::Int(vec![-1, 2, -100]));
        let a = parse(&npy("|u1", "(2, 1)", &[255, 3])).unwrap();
        assert_eq!((a.shape, a.data), (vec![2, 1], NpyData::Int(vec![255, 3])));
        let a = parse(&npy(">i2", "(1,)", &[0x01, 0x02])).unwrap();
        assert_eq!(a.data, NpyData::Int(vec![258]));
        // 1.0, −2.0, 65504, 2⁻²⁴ (smallest subnormal) in f16.
        let a = parse(&npy(
            "<f2",
            "(4,)",
            &[0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00],
        ))
        .unwrap();
        let NpyData::Half(h) = a.data else {
            panic!("not f16")
        };
        let widened: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        assert_eq!(widened, vec![1.0, -2.0, 65504.0, 2f32.powi(-24)]);
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(parse(b"hello").is_err());
        assert!(parse(b"\x93NUMPY\x01\x00\xff\xff{")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse(&npy("<f4", "(3,)", &[0; 8]))
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse(&npy("<c8", "(1,)", &[0; 8]))
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        assert!(parse(&npy("<f4", "(a,)", &[0; 4])).is_err());
        // Found by the fuzzer: an empty or non-ASCII dtype.
        assert!(parse(&npy("", "(4,)", &[0; 4]))
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        assert!(parse(&npy("<é4", "(1,)", &[0; 4])).is_err());
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }\n";
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend((header.len() as u16).to_le_bytes());
        f.extend(header.as_bytes());
        f.extend([0u8; 4]);
        assert!(parse(&f).unwrap_err().to_string().contains("Fortran"));
        // A malformed file is a format error, never an "I/O error".
        for bad in [
            &b"hello"[..],
            &npy("<c8", "(1,)", &[0; 8]),
            &npy("<f4", "(3,)", &[0; 8]),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, Error::Format(_)), "{e}");
            assert!(!e.to_string().contains("I/O"), "{e}");
        }
    }

    #[test]
    fn reads_float64_as_f32() {
        let vals = [1.5f64, -2.25, 1e-3];
        let body: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = parse(&npy("<f8", "(3,)", &body)).unwrap();
        assert_eq!(a.data, NpyData::Float(vec![1.5, -2.25, 1e-3f64 as f32]));
        let body: Vec<u8> = vals.iter().flat_map(|v| v.to_be_bytes()).collect();
        let a = parse(&npy(">f8", "(3,)", &body)).unwrap();
        assert_eq!(a.data, NpyData::Float(vec![1.5, -2.25, 1e-3f64 as f32]));
    }
}
