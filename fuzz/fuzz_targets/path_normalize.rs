//! Path normalization takes any request path without panicking, and what it returns is already normal:
//! normalizing it again changes nothing (so no second decoding can turn an authorized path into
//! another).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let path = format!("/{path}");
    if let Ok(normal) = weft_authz::path::normalize(&path) {
        let again = weft_authz::path::normalize(&normal).expect("a normalized path normalizes");
        assert_eq!(again, normal);
    }
});
