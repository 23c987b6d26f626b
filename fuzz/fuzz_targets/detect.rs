//! Protocol detection must classify any byte prefix without panicking, and a prefix it already decided
//! on must stay decided when more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_detect::{Detection, detect};

fuzz_target!(|data: &[u8]| {
    let full = detect(data);
    for cut in 0..data.len() {
        if let Detection::Known(protocol) = detect(&data[..cut]) {
            assert_eq!(full, Detection::Known(protocol), "decided at {cut} bytes, changed later");
            break;
        }
    }
});
