//! Fuzzes the NumPy `.npy` reader: a header claiming more data than the file holds (10^12 elements) must be refused before allocating, and probing and loading must agree.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = curv_driver::fuzzing::exercise_npy(data) {
        panic!("{problem}");
    }
});
