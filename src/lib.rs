//! segloss placeholder
pub mod error;
pub mod input;
pub mod output;
pub mod reference;
pub mod spec;
#[doc(hidden)]
pub mod testing;
pub mod gpu;
