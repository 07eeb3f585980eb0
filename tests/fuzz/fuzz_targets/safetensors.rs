//! Fuzzes the safetensors reading of `--init` and `--resume` (every tensor with its checksums; a
//! whole checkpoint of the digits MLP), in both precisions. Any panic, abort or allocation far
//! beyond the file's size is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    curv_driver::fuzzing::exercise_checkpoint(data);
});
