//! Replays each fuzz target's seed corpus (the front end's with every UI case; the data readers'
//! and the checkpoint reading's with truncations of each seed) through the same entry point the
//! fuzzer uses, so the stable test suite covers them without a nightly toolchain.

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

/// Every file of one fuzz target's seed corpus, in name order.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let directory = repository_root().join("tests/fuzz/seeds").join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap()))
        .collect()
}

/// Replays a reader's seeds, and truncations of each (every `stride` bytes), through the fuzz
/// target's entry point: none may panic or find probing and loading disagreeing. Returns the
/// names of the seeds that were valid data.
fn replay(target: &str, exercise: fn(&[u8]) -> Result<bool, String>, stride: usize) -> Vec<String> {
    let mut valid = Vec::new();
    let corpus = seeds(target);
    assert!(corpus.len() >= 5, "the {target} seed corpus is missing");
    for (name, bytes) in corpus {
        match exercise(&bytes) {
            Ok(true) => valid.push(name.clone()),
            Ok(false) => {}
            Err(problem) => panic!("{target} seed {name}: {problem}"),
        }
        for cut in (0..bytes.len()).step_by(stride) {
            if let Err(problem) = exercise(&bytes[..cut]) {
                panic!("{target} seed {name} cut at {cut}: {problem}");
            }
        }
    }
    valid
}

#[test]
fn the_csv_seeds_replay_through_the_csv_reader() {
    let valid = replay("csv", curv_driver::fuzzing::exercise_csv, 3);
    for name in
        ["digits_label.csv", "digits_nolabel.csv", "digits_quoted.csv", "quotes_inside.csv", "escaped_quotes.csv"]
    {
        assert!(valid.iter().any(|seed| seed == name), "{name} should be a valid table: {valid:?}");
    }
    for name in ["ragged.csv", "blank_middle.csv", "unterminated_quote.csv"] {
        assert!(!valid.iter().any(|seed| seed == name), "{name} should be refused");
    }
}

#[test]
fn the_npy_seeds_replay_through_the_npy_reader() {
    let valid = replay("npy", curv_driver::fuzzing::exercise_npy, 5);
    for name in ["digits_x_f4.npy", "digits_x_f8.npy", "digits_x_u1.npy", "digits_y_i4.npy", "digits_y_i8.npy"] {
        assert!(valid.iter().any(|seed| seed == name), "{name} should be a valid array: {valid:?}");
    }
    assert!(!valid.iter().any(|seed| seed == "huge_claim.npy"), "10^12 elements in a small file");
}

#[test]
fn the_idx_seeds_replay_through_the_idx_reader() {
    let valid = replay("idx", curv_driver::fuzzing::exercise_idx, 3);
    assert_eq!(valid, ["digits.idx", "small.idx"]);
}

#[test]
fn the_png_seeds_replay_through_the_png_reader() {
    let valid = replay("png", curv_driver::fuzzing::exercise_png, 7);
    for name in ["camera_64.png", "gray8.png", "rgb8.png", "rgba16.png", "gray_alpha8.png"] {
        assert!(valid.iter().any(|seed| seed == name), "{name} should be a valid image: {valid:?}");
    }
    assert!(!valid.iter().any(|seed| seed == "huge_claim.png" || seed == "palette.png"), "{valid:?}");
}

#[test]
fn the_safetensors_seeds_replay_through_init_and_resume() {
    let corpus = seeds("safetensors");
    assert!(corpus.len() >= 5, "the safetensors seed corpus is missing");
    for (name, bytes) in corpus {
        let read = curv_driver::fuzzing::exercise_checkpoint(&bytes);
        // The files curv wrote read as `--init` files in both precisions at least.
        if name.starts_with("final_") || name.starts_with("checkpoint_") {
            assert!(read >= 2, "{name}: {read} of 4 reads succeeded");
        }
        if name.starts_with("huge_") || name.starts_with("truncated") {
            assert_eq!(read, 0, "{name}");
        }
        for cut in (0..bytes.len()).step_by(bytes.len() / 64 + 1) {
            curv_driver::fuzzing::exercise_checkpoint(&bytes[..cut]);
        }
    }
}
