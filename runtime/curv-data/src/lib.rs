//! `curv-data` owns everything about reading training data from disk: CSV tables, NumPy `.npy` arrays,
//! MNIST IDX files and PNG images.
//!
//! It provides cheap *schema probing* for the type checker: each `probe_*` function reports the fields
//! (names, element types and shapes, including the leading example dimension) and the example count of
//! a data source, reading as little of the file as its format allows. Full loading lives next to each
//! probe and shares its validation, so a source that probes cleanly also loads, into the shapes the probe
//! reported: [`load_csv_data`], [`load_image`], [`load_npy`] and [`load_idx`] (plus the lower-level
//! [`load_csv`]). Every reader also takes a file's bytes already in memory (`probe_*_bytes`,
//! `load_*_bytes`, for fuzzing and for callers that hold the bytes), validated exactly as the file
//! would be. Finally, [`write_png`] turns a reconstructed image back into a PNG file.
//!
//! No input makes this crate panic. Every failure is a [`DataError`] that names the file, explains the
//! problem in a sentence fragment, and carries a [`DataErrorKind`] so callers can tell a missing file
//! from a corrupt one or from options (such as a label column name) that do not fit the file.

mod csv;
mod error;
mod idx;
mod image;
mod npy;

#[cfg(test)]
mod test_support;

pub use crate::csv::{csv_row_line, load_csv, load_csv_data, load_csv_data_bytes, probe_csv, probe_csv_bytes};
pub use crate::error::{DataError, DataErrorKind};
pub use crate::idx::{load_idx, load_idx_bytes, probe_idx, probe_idx_bytes};
pub use crate::image::{load_image, load_image_bytes, probe_image, probe_image_bytes, write_png};
pub use crate::npy::{load_npy, load_npy_bytes, probe_npy, probe_npy_bytes};

/// The element type of a field once loaded into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// A 32-bit IEEE float.
    F32,
    /// A 64-bit IEEE float.
    F64,
    /// A 32-bit signed integer.
    I32,
}

/// One named tensor that a data source provides, such as the features "x" or the labels "y".
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSchema {
    /// The field's name, by which training programs refer to it.
    pub name: String,
    /// The element type of the loaded field.
    pub element_type: ElementType,
    /// The full shape, whose first dimension is the number of examples.
    pub shape: Vec<i64>,
}

/// The fields of a data source and how many examples it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSchema {
    /// The fields, in a fixed order documented by each probe function.
    pub fields: Vec<FieldSchema>,
    /// The number of examples, which is also the leading dimension of every field.
    pub examples: i64,
}

/// The elements of a loaded field, stored row-major (C order) in the field's element type.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldData {
    /// 32-bit floats, used for features, coordinates and pixel values.
    F32(Vec<f32>),
    /// 32-bit signed integers, used for class labels.
    I32(Vec<i32>),
}

impl FieldData {
    /// The number of elements, whatever their type.
    pub fn len(&self) -> usize {
        match self {
            FieldData::F32(values) => values.len(),
            FieldData::I32(values) => values.len(),
        }
    }

    /// Whether there are no elements at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type of the data, as a schema would report it.
    pub fn element_type(&self) -> ElementType {
        match self {
            FieldData::F32(_) => ElementType::F32,
            FieldData::I32(_) => ElementType::I32,
        }
    }
}

/// One named field loaded into memory: row-major data with its full shape, whose leading dimension is
/// the number of examples.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedField {
    /// The field's name, the same as in the data source's schema.
    pub name: String,
    /// The full shape; the product of its dimensions is the number of elements in `data`.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: FieldData,
}

/// Every field of a data source, loaded into memory, and how many examples it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedData {
    /// The fields, in the same order as the data source's schema lists them.
    pub fields: Vec<LoadedField>,
    /// The number of examples, which is also the leading dimension of every field.
    pub examples: usize,
}

impl LoadedData {
    /// Finds a field by name.
    pub fn field(&self, name: &str) -> Option<&LoadedField> {
        self.fields.iter().find(|field| field.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Resolves a path under the repository's `examples/data` directory.
    fn example_data_path(file_name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data").join(file_name)
    }

    #[test]
    fn probes_the_digits_example_csv() {
        let schema = probe_csv(&example_data_path("digits.csv"), Some("label")).expect("digits.csv is valid");
        assert_eq!(schema.examples, 1797);
        assert_eq!(
            schema.fields,
            vec![
                FieldSchema { name: "x".to_string(), element_type: ElementType::F32, shape: vec![1797, 64] },
                FieldSchema { name: "y".to_string(), element_type: ElementType::I32, shape: vec![1797] },
            ]
        );
    }

    #[test]
    fn loads_the_digits_example_csv() {
        let (features, feature_count, labels) =
            load_csv(&example_data_path("digits.csv"), Some("label")).expect("digits.csv is valid");
        assert_eq!(feature_count, 64);
        assert_eq!(features.len(), 1797 * 64);
        let labels = labels.expect("a label column was requested");
        assert_eq!(labels.len(), 1797);
        assert!(labels.iter().all(|label| (0..10).contains(label)));
    }

    #[test]
    fn probes_the_camera_example_image() {
        let schema = probe_image(&example_data_path("camera_128.png")).expect("camera_128.png is valid");
        assert_eq!(schema.examples, 16384);
        assert_eq!(
            schema.fields,
            vec![
                FieldSchema { name: "coords".to_string(), element_type: ElementType::F32, shape: vec![16384, 2] },
                FieldSchema { name: "values".to_string(), element_type: ElementType::F32, shape: vec![16384, 1] },
            ]
        );
    }

    #[test]
    fn loads_the_camera_example_image_as_coordinates_and_values() {
        let path = example_data_path("camera_128.png");
        let loaded = load_image(&path).expect("camera_128.png is valid");
        assert_eq!(loaded.examples, 16384);
        let schema = probe_image(&path).expect("camera_128.png is valid");
        assert_loaded_data_matches_schema(&loaded, &schema);

        let Some(FieldData::F32(coordinates)) = loaded.field("coords").map(|field| &field.data) else {
            panic!("the coords field is F32");
        };
        assert_eq!(coordinates.len(), 16384 * 2);
        assert_eq!(coordinates[..2], [-1.0, -1.0]);
        assert_eq!(coordinates[2..4], [-1.0 + 2.0 / 127.0, -1.0]);
        assert_eq!(coordinates[coordinates.len() - 2..], [1.0, 1.0]);
        let Some(FieldData::F32(values)) = loaded.field("values").map(|field| &field.data) else {
            panic!("the values field is F32");
        };
        assert_eq!(values.len(), 16384);
        assert!(values.iter().all(|value| (-1.0..=1.0).contains(value)));
        // A photograph uses much of the range, so its values are not all the same.
        let smallest = values.iter().copied().fold(f32::INFINITY, f32::min);
        let largest = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(largest - smallest > 1.0, "values span [{smallest}, {largest}]");
    }

    #[test]
    fn loads_the_digits_example_csv_scaled_to_the_unit_interval() {
        let path = example_data_path("digits.csv");
        let loaded = load_csv_data(&path, Some("label"), 0.0625).expect("digits.csv is valid");
        assert_eq!(loaded.examples, 1797);
        let schema = probe_csv(&path, Some("label")).expect("digits.csv is valid");
        assert_loaded_data_matches_schema(&loaded, &schema);

        let Some(FieldData::F32(features)) = loaded.field("x").map(|field| &field.data) else {
            panic!("the x field is F32");
        };
        let largest = features.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let smallest = features.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!((smallest, largest), (0.0, 1.0));
        let Some(FieldData::I32(labels)) = loaded.field("y").map(|field| &field.data) else {
            panic!("the y field is I32");
        };
        assert!(labels.iter().all(|label| (0..10).contains(label)));
    }

    /// Checks that loaded data has exactly the fields, element types and shapes its probe reported.
    fn assert_loaded_data_matches_schema(loaded: &LoadedData, schema: &DataSchema) {
        assert_eq!(loaded.examples as i64, schema.examples);
        assert_eq!(loaded.fields.len(), schema.fields.len());
        for (field, probed) in loaded.fields.iter().zip(&schema.fields) {
            assert_eq!(field.name, probed.name);
            assert_eq!(field.data.element_type(), probed.element_type, "{}", field.name);
            let shape: Vec<i64> = field.shape.iter().map(|&dimension| dimension as i64).collect();
            assert_eq!(shape, probed.shape, "{}", field.name);
            assert_eq!(field.data.len(), field.shape.iter().product::<usize>(), "{}", field.name);
        }
    }
}
