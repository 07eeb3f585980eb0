//! `curv-data` owns everything about reading training data from disk: CSV tables, NumPy `.npy` arrays,
//! MNIST IDX files and PNG images.
//!
//! Today it provides cheap *schema probing* for the type checker: each `probe_*` function reports the
//! fields (names, element types and shapes, including the leading example dimension) and the example
//! count of a data source, reading as little of the file as its format allows. Full loading lives next
//! to each probe and shares its validation, so a source that probes cleanly also loads; so far only CSV
//! tables can be loaded ([`load_csv`]).
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

pub use crate::csv::{load_csv, probe_csv};
pub use crate::error::{DataError, DataErrorKind};
pub use crate::idx::probe_idx;
pub use crate::image::probe_image;
pub use crate::npy::probe_npy;

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
}
