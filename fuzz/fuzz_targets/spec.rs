//! The spec parser on arbitrary text: an error or a valid spec, never a panic; a parsed spec
//! validates for any class count without panicking and survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use segloss::LossSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = LossSpec::from_json(text) {
        for c in [1, 2, 3, 7] {
            let _ = spec.validate(Some(c));
        }
        let again = serde_json::to_string(&spec).expect("a parsed spec serialises");
        assert_eq!(LossSpec::from_json(&again).expect("a serialised spec parses"), spec);
    }
});
