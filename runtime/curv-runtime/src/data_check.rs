//! The integer data a program indexes with, checked before step 1: class labels against the classes
//! of the loss (`one_hot`, which `cross_entropy` lowers to) and `embedding` ids against the rows of
//! the table. A value out of range is an error with code E0403 that names the file, the line or
//! index, and the column, the same for every backend (the run's data, checked once when it is
//! loaded) and for the library's train step (each batch, before it runs).

use crate::dataset::Dataset;
use curv_data::FieldData;
use curv_ir::{DataInfo, Dim, Function, Op, TrainProgram};
use std::path::Path;

/// The code of an integer data value outside the range the program implies.
pub const INDEX_OUT_OF_RANGE: &str = "E0403";

/// What an integer data field indexes, and how many values it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexBound {
    /// The data set, as the program names it (`digits`).
    pub source: String,
    /// The field (`y`).
    pub field: String,
    /// The values must lie in `0..bound`.
    pub bound: usize,
    /// What the values index, for messages: `label` or `embedding id`.
    pub kind: &'static str,
    /// Where the bound comes from, for messages: `the 10 classes of the loss`.
    pub origin: String,
}

impl IndexBound {
    /// The sentence for a value outside the bound: `label 12 is outside 0..10 (the 10 classes ...)`.
    pub fn describe(&self, value: i32) -> String {
        format!("{} {value} is outside 0..{} ({})", self.kind, self.bound, self.origin)
    }
}

/// The data field an integer value comes from, through the operations that move integers without
/// changing them.
fn data_field(function: &Function, value: usize) -> Option<(String, String)> {
    let mut current = value;
    loop {
        let inst = function.insts.get(current)?;
        match &inst.op {
            Op::Data { source, field } => return Some((source.clone(), field.clone())),
            Op::Reshape | Op::Transpose { .. } | Op::Slice { .. } | Op::Broadcast { .. } | Op::Cast => {
                current = inst.args.first()?.0 as usize;
            }
            _ => return None,
        }
    }
}

/// The name of the parameter a value reads directly, if it does.
fn parameter_of(function: &Function, train: &TrainProgram, value: usize) -> Option<String> {
    match function.insts.get(value).map(|inst| &inst.op) {
        Some(Op::Param { index }) => train.params.get(*index).map(|param| param.name.clone()),
        _ => None,
    }
}

/// Every bound a function puts on the integer data it reads: `one_hot`'s classes on labels and a
/// gathered table's rows on `embedding` ids. A field read twice appears once per use.
pub fn index_bounds(train: &TrainProgram, function: &Function) -> Vec<IndexBound> {
    let mut bounds = Vec::new();
    for inst in &function.insts {
        let (argument, bound, kind, origin) = match &inst.op {
            Op::OneHot { classes } => {
                let Some(argument) = inst.args.first() else { continue };
                let origin = format!("the {classes} classes of the loss");
                (argument.0 as usize, *classes, "label", origin)
            }
            Op::Gather => {
                let (Some(table), Some(ids)) = (inst.args.first(), inst.args.get(1)) else { continue };
                let Some(Dim::Known(rows)) =
                    function.insts.get(table.0 as usize).and_then(|table| table.ty.shape.first())
                else {
                    continue;
                };
                let origin = match parameter_of(function, train, table.0 as usize) {
                    Some(name) => format!("the {rows} rows of the embedding table `{name}`"),
                    None => format!("the {rows} rows of the embedding table"),
                };
                (ids.0 as usize, *rows, "embedding id", origin)
            }
            _ => continue,
        };
        let Some((source, field)) = data_field(function, argument) else { continue };
        let bound = IndexBound { source, field, bound: usize::try_from(bound).unwrap_or(0), kind, origin };
        if !bounds.contains(&bound) {
            bounds.push(bound);
        }
    }
    bounds
}

/// The bounds of a train program: those of its loss and of its test loss.
pub fn train_index_bounds(train: &TrainProgram) -> Vec<IndexBound> {
    let mut bounds = index_bounds(train, &train.loss);
    if let Some(test_loss) = &train.test_loss {
        for bound in index_bounds(train, test_loss) {
            if !bounds.contains(&bound) {
                bounds.push(bound);
            }
        }
    }
    bounds
}

/// The first value outside `0..bound`, with its position.
pub fn first_out_of_range(values: &[i32], bound: usize) -> Option<(usize, i32)> {
    values.iter().position(|&value| value < 0 || value as usize >= bound).map(|position| (position, values[position]))
}

/// A flat position in a row-major tensor of `shape` as its index, `[17, 3]`.
fn index_text(shape: &[usize], position: usize) -> String {
    let mut index = vec![0; shape.len()];
    let mut rest = position;
    for (slot, &size) in index.iter_mut().zip(shape).rev() {
        if size > 0 {
            *slot = rest % size;
            rest /= size;
        }
    }
    let parts: Vec<String> = index.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Where value `position` of field `field` is in the files of data set `info`: the file, then its
/// line and column (CSV) or its index (`.npy`, IDX).
fn locate(info: &DataInfo, directory: &Path, field: &str, shape: &[usize], position: usize) -> String {
    let path_of = |key: &str| {
        info.paths.iter().find(|(name, _)| name == key).map(|(_, path)| directory.join(path).display().to_string())
    };
    let example = position / shape.iter().skip(1).product::<usize>().max(1);
    match info.kind.as_str() {
        "csv" => {
            let path = directory.join(info.paths.iter().find(|(name, _)| name == "path").map_or("", |(_, path)| path));
            let column = info.label.as_deref().unwrap_or(field);
            match curv_data::csv_row_line(&path, info.label.as_deref(), example) {
                Ok(Some(line)) => format!("{}: line {line}, column '{column}'", path.display()),
                _ => format!("{}: data row {}, column '{column}'", path.display(), example + 1),
            }
        }
        "idx" if field == "y" => {
            format!("{}: label index [{example}]", path_of("labels").unwrap_or_else(|| info.name.clone()))
        }
        _ => {
            let file = path_of(field).or_else(|| path_of("path")).unwrap_or_else(|| info.name.clone());
            format!("{file}: index {} of field `{field}`", index_text(shape, position))
        }
    }
}

/// Checks every integer field of a loaded data set against the bounds the train program puts on
/// it. The error, `[E0403] FILE: line 19, column 'label': label 12 is outside 0..10 (the 10
/// classes of the loss)`, names the first value out of range in file order.
pub fn check_dataset(train: &TrainProgram, dataset: &Dataset, directory: &Path) -> Result<(), String> {
    for bound in train_index_bounds(train) {
        if bound.source != dataset.name {
            continue;
        }
        let Some(field) = dataset.fields.iter().find(|field| field.name == bound.field) else { continue };
        let FieldData::I32(values) = &field.data else { continue };
        if let Some((position, value)) = first_out_of_range(values, bound.bound) {
            let mut shape = vec![dataset.examples];
            shape.extend(&field.example_shape);
            let location = locate(&train.data, directory, &field.name, &shape, position);
            return Err(format!("[{INDEX_OUT_OF_RANGE}] {location}: {}", bound.describe(value)));
        }
    }
    Ok(())
}

/// Checks one batch of an integer input (`source.field`, of `shape`) of the library's train step
/// against the program's bounds; the error names the input and the index in the batch.
pub fn check_batch(
    bounds: &[IndexBound],
    source: &str,
    field: &str,
    shape: &[usize],
    values: &[i32],
) -> Result<(), String> {
    for bound in bounds.iter().filter(|bound| bound.source == source && bound.field == field) {
        if let Some((position, value)) = first_out_of_range(values, bound.bound) {
            return Err(format!(
                "[{INDEX_OUT_OF_RANGE}] input `{source}.{field}`, index {}: {}",
                index_text(shape, position),
                bound.describe(value)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_row_major_indices() {
        assert_eq!(index_text(&[4, 3], 7), "[2, 1]");
        assert_eq!(index_text(&[5], 4), "[4]");
        assert_eq!(index_text(&[2, 0], 0), "[0, 0]");
    }

    #[test]
    fn the_first_value_out_of_range_is_found() {
        assert_eq!(first_out_of_range(&[0, 9, 3], 10), None);
        assert_eq!(first_out_of_range(&[0, 10, -1], 10), Some((1, 10)));
        assert_eq!(first_out_of_range(&[0, -1], 10), Some((1, -1)));
    }

    #[test]
    fn a_batch_out_of_range_names_the_input_and_the_index() {
        let bounds = vec![IndexBound {
            source: "digits".to_string(),
            field: "y".to_string(),
            bound: 10,
            kind: "label",
            origin: "the 10 classes of the loss".to_string(),
        }];
        assert_eq!(check_batch(&bounds, "digits", "y", &[3], &[1, 2, 9]), Ok(()));
        assert_eq!(
            check_batch(&bounds, "digits", "y", &[3], &[1, 12, 9]),
            Err("[E0403] input `digits.y`, index [1]: label 12 is outside 0..10 (the 10 classes of the loss)"
                .to_string())
        );
        assert_eq!(check_batch(&bounds, "digits", "x", &[3], &[12, 12, 12]), Ok(()));
    }
}
