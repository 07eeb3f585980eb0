//! Replays the fuzz target's seed corpus (and every UI case) through the same entry point the
//! fuzzer uses, so the stable test suite covers it without a nightly toolchain.

use curv_tests::{curv_files, repository_root};

#[test]
fn the_seed_corpus_and_ui_cases_run_through_the_whole_front_end() {
    let root = repository_root();
    let mut files = curv_files(&root.join("tests/fuzz/seeds/front_end"));
    let seeds = files.len();
    files.extend(curv_files(&root.join("tests/ui")));
    assert!(seeds >= 10, "the seed corpus is missing");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        curv_driver::fuzzing::exercise_front_end(&text);
        // Truncations of the input exercise error recovery at every kind of token boundary.
        for cut in (0..text.len()).step_by(7).filter(|cut| text.is_char_boundary(*cut)) {
            curv_driver::fuzzing::exercise_front_end(&text[..cut]);
        }
    }
}
