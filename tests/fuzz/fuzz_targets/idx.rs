//! Fuzzes the MNIST IDX reader (a pair of files: the first two bytes give the image file's length): dimensions that do not match the file's size are refused before allocating.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = curv_driver::fuzzing::exercise_idx(data) {
        panic!("{problem}");
    }
});
