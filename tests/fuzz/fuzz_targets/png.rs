//! Fuzzes the PNG reader: dimensions the file cannot hold are refused before decoding, and no damaged image panics.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = curv_driver::fuzzing::exercise_png(data) {
        panic!("{problem}");
    }
});
