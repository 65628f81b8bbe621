//! The .npy reader on arbitrary bytes: an error or an array, never a panic, and an array's
//! value count always matches its shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use segloss::npy::{parse, NpyData};

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = parse(data) {
        let n: usize = a.shape.iter().product();
        let len = match &a.data {
            NpyData::Float(v) => v.len(),
            NpyData::Half(v) => v.len(),
            NpyData::Int(v) => v.len(),
        };
        assert_eq!(n, len);
    }
});
