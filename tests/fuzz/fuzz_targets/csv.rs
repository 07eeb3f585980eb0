//! Fuzzes the CSV reader (RFC 4180 parsing under curv's validation): probing for the checker and loading for a run must agree, and no input may panic, hang or allocate far beyond its size. The first byte picks the label option.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = curv_driver::fuzzing::exercise_csv(data) {
        panic!("{problem}");
    }
});
