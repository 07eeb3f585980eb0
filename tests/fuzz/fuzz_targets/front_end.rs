//! Fuzzes the whole front end: lexing, parsing with recovery, checking (with an in-memory data
//! probe so that semantic analysis reaches model and train blocks), the cost report, every
//! `emit` stage and the rendering of diagnostics. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        curv_driver::fuzzing::exercise_front_end(text);
    }
});
