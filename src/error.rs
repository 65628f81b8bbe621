//! The one error type of the crate.

use std::fmt;

/// Everything that can go wrong in segloss. Every variant carries a message that names the
/// problem (the field, the shape, the first offending position) so a caller can fix it.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The loss specification is invalid; the message names the field.
    Spec(String),
    /// Shapes, dtypes or label values of the inputs do not fit the specification.
    Input(String),
    /// No GPU adapter could be opened (the message says how to get one).
    NoAdapter(String),
    /// The GPU reported an error (validation, out of memory, device lost).
    Gpu(String),
    /// Reading or writing a file failed (the operating system's error).
    Io(String),
    /// A file was read but its contents are not what was expected (a malformed `.npy`
    /// header, an unsupported dtype); the message names the file and the reason.
    Format(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spec(m) => write!(f, "invalid spec: {m}"),
            Error::Input(m) => write!(f, "invalid input: {m}"),
            Error::NoAdapter(m) => write!(f, "no GPU adapter: {m}"),
            Error::Gpu(m) => write!(f, "GPU error: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::Format(m) => write!(f, "unreadable file: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for `Result<T, segloss::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
