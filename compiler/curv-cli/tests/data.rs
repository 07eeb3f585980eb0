//! Bad data is an error before step 1, the same on every backend: a class label outside the
//! classes of the loss or an `embedding` id outside the table's rows stops `curv run` (interpreter
//! and MLIR backends alike) with E0403, naming the file, the line or index, and the column, before
//! anything trains.

use std::path::Path;

mod common;
use common::{curv, repository_root, scratch, text, write_npy};

const MLP: &str = "use std.optimizers.adam\n\n{DATA}\n\n\
    model mlp(x: f32[B, D]) -> f32[B, 10] {\n    param w1: f32[D, 16] = glorot_uniform\n    \
    param b1: f32[16] = zeros\n    param w2: f32[16, 10] = glorot_uniform\n    param b2: f32[10] = zeros\n    \
    return tanh(x @ w1 + b1) @ w2 + b2\n}\n\n\
    train fit {\n    loss cross_entropy(mlp(d.x), d.y)\n    optimizer adam\n    batch 8\n    steps 40\n    \
    log loss every 1\n}\n";

/// Runs `program` with each backend and returns their outputs, checking that each stopped with
/// exit code 1 before step 1 (no step was logged).
fn run_every_backend(program: &Path) -> Vec<String> {
    let mut messages = Vec::new();
    for backend in ["interp", "mlir"] {
        let output = curv(&["run", program.to_str().unwrap(), "--backend", backend]);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert_eq!(output.status.code(), Some(1), "{backend}: {stdout}\n{stderr}");
        assert!(!stdout.contains("step "), "{backend} trained before stopping: {stdout}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        messages.push(stderr.lines().find(|line| line.starts_with("error")).unwrap_or_default().to_string());
    }
    assert_eq!(messages[0], messages[1], "the backends disagree");
    messages
}

#[test]
fn a_label_outside_the_classes_stops_every_backend_before_step_1_with_its_line_and_column() {
    let directory = scratch("data", "csv_label");
    let digits = std::fs::read_to_string(repository_root().join("examples/data/digits.csv")).unwrap();
    let mut lines: Vec<String> = digits.lines().take(41).map(str::to_string).collect();
    // Line 19 of the file (the header is line 1) gets label 12; its cells are quoted, and the
    // header's label name too, as RFC 4180 allows.
    lines[0] = lines[0].replace("label", "\"label\"");
    let row: Vec<&str> = lines[18].split(',').collect();
    let quoted: Vec<String> = row[..row.len() - 1].iter().map(|cell| format!("\"{cell}\"")).collect();
    lines[18] = format!("{},\"12\"", quoted.join(","));
    std::fs::write(directory.join("bad.csv"), lines.join("\n") + "\n").unwrap();
    let program = directory.join("bad.curv");
    std::fs::write(&program, MLP.replace("{DATA}", "data d = csv(\"bad.csv\", label = \"label\", scale = 0.0625)"))
        .unwrap();
    let messages = run_every_backend(&program);
    let expected = format!(
        "error: [E0403] {}: line 19, column 'label': label 12 is outside 0..10 (the 10 classes of the loss)",
        directory.join("bad.csv").display()
    );
    assert_eq!(messages[0], expected);
}

#[test]
fn npy_and_idx_labels_outside_the_classes_name_their_index() {
    let directory = scratch("data", "npy_idx_label");
    let features: Vec<u8> = (0..32 * 4).flat_map(|index| (index as f32 / 64.0).to_le_bytes()).collect();
    let mut labels: Vec<i32> = (0..32).map(|index| index % 10).collect();
    labels[21] = -1;
    let label_bytes: Vec<u8> = labels.iter().flat_map(|label| i64::from(*label).to_le_bytes()).collect();
    write_npy(&directory.join("x.npy"), "<f4", &[32, 4], &features);
    write_npy(&directory.join("y.npy"), "<i8", &[32], &label_bytes);
    let program = directory.join("npy.curv");
    std::fs::write(&program, MLP.replace("{DATA}", "data d = npy(x = \"x.npy\", y = \"y.npy\")")).unwrap();
    let messages = run_every_backend(&program);
    let expected = format!(
        "error: [E0403] {}: index [21] of field `y`: label -1 is outside 0..10 (the 10 classes of the loss)",
        directory.join("y.npy").display()
    );
    assert_eq!(messages[0], expected);

    let mut images = vec![0, 0, 8, 3];
    for size in [32u32, 2, 2] {
        images.extend_from_slice(&size.to_be_bytes());
    }
    images.extend((0..32 * 4).map(|index| index as u8));
    let mut label_file = vec![0, 0, 8, 1];
    label_file.extend_from_slice(&32u32.to_be_bytes());
    label_file.extend((0..32).map(|index| if index == 30 { 10 } else { index % 10 }));
    std::fs::write(directory.join("images.idx"), images).unwrap();
    std::fs::write(directory.join("labels.idx"), label_file).unwrap();
    let program = directory.join("idx.curv");
    std::fs::write(&program, MLP.replace("{DATA}", "data d = idx(images = \"images.idx\", labels = \"labels.idx\")"))
        .unwrap();
    let messages = run_every_backend(&program);
    let expected = format!(
        "error: [E0403] {}: label index [30]: label 10 is outside 0..10 (the 10 classes of the loss)",
        directory.join("labels.idx").display()
    );
    assert_eq!(messages[0], expected);
}

#[test]
fn an_embedding_id_outside_the_table_stops_every_backend_before_step_1() {
    let directory = scratch("data", "embedding_id");
    let targets: Vec<u8> = (0..24 * 4).flat_map(|index| ((index % 7) as f32 / 7.0).to_le_bytes()).collect();
    let mut ids: Vec<i32> = (0..24 * 3).map(|index| index % 5).collect();
    ids[3 * 9 + 2] = 5;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    write_npy(&directory.join("x.npy"), "<f4", &[24, 4], &targets);
    write_npy(&directory.join("y.npy"), "<i4", &[24, 3], &id_bytes);
    let program = directory.join("embedding.curv");
    std::fs::write(
        &program,
        "use std.optimizers.adam\n\ndata d = npy(x = \"x.npy\", y = \"y.npy\")\n\n\
         model bag(ids: i32[B, 3]) -> f32[B, 4] {\n    param table: f32[5, 4] = glorot_uniform\n    \
         return sum(embedding(table, ids), axis = 1)\n}\n\n\
         train fit {\n    loss mse(bag(d.y), d.x)\n    optimizer adam\n    batch 8\n    steps 20\n    \
         log loss every 1\n}\n",
    )
    .unwrap();
    let check = curv(&["check", program.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    let messages = run_every_backend(&program);
    let expected = format!(
        "error: [E0403] {}: index [9, 2] of field `y`: embedding id 5 is outside 0..5 (the 5 rows of the embedding table `table`)",
        directory.join("y.npy").display()
    );
    assert_eq!(messages[0], expected);
}
