//! Reading MNIST-style IDX files: an image file of unsigned bytes with dimensions (count, rows, columns)
//! paired with a label file of unsigned bytes with dimension (count).
//!
//! An IDX file starts with a big-endian magic number whose first two bytes are zero, whose third byte is
//! the element type (0x08 for unsigned bytes) and whose fourth byte is the number of dimensions. Each
//! dimension follows as a big-endian 32-bit count, and the raw data follows the dimensions.

use std::path::Path;

use crate::error::{count_to_i64, describe_foreign_format, open_regular_file, read_up_to, DataError};
use crate::{DataSchema, ElementType, FieldSchema};

/// The IDX element-type code for unsigned bytes, the only element type MNIST uses.
const IDX_UNSIGNED_BYTE_TYPE_CODE: u8 = 0x08;

/// The number of dimensions of an IDX image file: count, rows, columns.
const IDX_IMAGE_DIMENSION_COUNT: u8 = 3;

/// The number of dimensions of an IDX label file: count.
const IDX_LABEL_DIMENSION_COUNT: u8 = 1;

/// The validated header of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdxHeader {
    /// The dimensions, outermost (the example count) first.
    pub dimensions: Vec<u32>,
}

/// Reads the header of an IDX file of unsigned bytes with `expected_dimension_count` dimensions and
/// checks that the file holds exactly the data the header describes. `role` ("image" or "label") is
/// used in messages.
pub(crate) fn read_idx_header(path: &Path, expected_dimension_count: u8, role: &str) -> Result<IdxHeader, DataError> {
    let (mut file, file_length) = open_regular_file(path)?;

    let mut magic = [0u8; 4];
    let magic_length = read_up_to(path, &mut file, &mut magic)?;
    if let Some(description) = describe_foreign_format(&magic[..magic_length]) {
        return Err(DataError::corrupt(path, format!("not an IDX {role} file: {description}")));
    }
    if magic_length < magic.len() {
        return Err(DataError::corrupt(path, format!("not an IDX {role} file: it is only {magic_length} bytes long")));
    }
    let expected_magic = u32::from_be_bytes([0, 0, IDX_UNSIGNED_BYTE_TYPE_CODE, expected_dimension_count]);
    let found_magic = u32::from_be_bytes(magic);
    if found_magic != expected_magic {
        let mut message =
            format!("not an IDX {role} file: the magic number is 0x{found_magic:08x}, expected 0x{expected_magic:08x}");
        if magic[..3] == [0, 0, IDX_UNSIGNED_BYTE_TYPE_CODE] {
            match magic[3] {
                IDX_IMAGE_DIMENSION_COUNT => message.push_str(" (this looks like an image file)"),
                IDX_LABEL_DIMENSION_COUNT => message.push_str(" (this looks like a label file)"),
                _ => {}
            }
        }
        return Err(DataError::corrupt(path, message));
    }

    let mut dimension_bytes = vec![0u8; usize::from(expected_dimension_count) * 4];
    if read_up_to(path, &mut file, &mut dimension_bytes)? < dimension_bytes.len() {
        return Err(DataError::corrupt(path, format!("the IDX {role} file is truncated inside its header")));
    }
    let dimensions: Vec<u32> = dimension_bytes
        .chunks_exact(4)
        .map(|chunk| u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect();

    let data_offset = (magic.len() + dimension_bytes.len()) as u64;
    let data_length = dimensions.iter().try_fold(1u64, |product, &dimension| product.checked_mul(u64::from(dimension)));
    let expected_file_length = data_length.and_then(|data_length| data_length.checked_add(data_offset));
    if expected_file_length != Some(file_length) {
        let dimensions_text = dimensions.iter().map(u32::to_string).collect::<Vec<_>>().join(" x ");
        let described_length = match expected_file_length {
            Some(length) => format!("{length} bytes"),
            None => "an impossibly large size".to_string(),
        };
        let problem = if expected_file_length.is_some_and(|length| length > file_length) {
            "is truncated"
        } else {
            "has the wrong size"
        };
        return Err(DataError::corrupt(
            path,
            format!(
                "the IDX {role} file {problem}: its header describes {dimensions_text} bytes of data, so the file should be {described_length}, but it is {file_length} bytes"
            ),
        ));
    }
    Ok(IdxHeader { dimensions })
}

/// Reads the schema of an MNIST-style pair of IDX files.
///
/// The image file must have magic number 0x00000803 (unsigned bytes, dimensions count, rows, columns)
/// and the label file 0x00000801 (unsigned bytes, dimension count). Both files must be exactly as long
/// as their headers say, and their counts must agree. The schema has a field "x" (F32, shape
/// `[count, rows * columns]`) and a field "y" (I32, shape `[count]`).
pub fn probe_idx(images: &Path, labels: &Path) -> Result<DataSchema, DataError> {
    let image_header = read_idx_header(images, IDX_IMAGE_DIMENSION_COUNT, "image")?;
    let label_header = read_idx_header(labels, IDX_LABEL_DIMENSION_COUNT, "label")?;
    let (image_count, image_rows, image_columns) = match image_header.dimensions.as_slice() {
        [count, rows, columns] => (*count, *rows, *columns),
        _ => return Err(DataError::corrupt(images, "the IDX image file does not have three dimensions")),
    };
    let label_count = match label_header.dimensions.as_slice() {
        [count] => *count,
        _ => return Err(DataError::corrupt(labels, "the IDX label file does not have one dimension")),
    };

    if image_count == 0 {
        return Err(DataError::corrupt(images, "the IDX image file contains no images"));
    }
    if image_rows == 0 || image_columns == 0 {
        return Err(DataError::corrupt(
            images,
            format!("the IDX image file has empty {image_rows} x {image_columns} images"),
        ));
    }
    if label_count != image_count {
        return Err(DataError::corrupt(
            labels,
            format!(
                "the label file has {label_count} labels, but the image file {} has {image_count} images",
                images.display()
            ),
        ));
    }

    let examples = i64::from(image_count);
    let pixels_per_image = count_to_i64(images, u64::from(image_rows) * u64::from(image_columns), "image size")?;
    Ok(DataSchema {
        fields: vec![
            FieldSchema {
                name: "x".to_string(),
                element_type: ElementType::F32,
                shape: vec![examples, pixels_per_image],
            },
            FieldSchema { name: "y".to_string(), element_type: ElementType::I32, shape: vec![examples] },
        ],
        examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{scratch_directory, write_file};
    use crate::DataErrorKind;

    /// Builds an IDX file of unsigned bytes with the given dimensions and `data_length` zero data bytes.
    fn idx_bytes(dimensions: &[u32], data_length: usize) -> Vec<u8> {
        let mut bytes = vec![0, 0, IDX_UNSIGNED_BYTE_TYPE_CODE, dimensions.len() as u8];
        for dimension in dimensions {
            bytes.extend_from_slice(&dimension.to_be_bytes());
        }
        bytes.extend(std::iter::repeat_n(0u8, data_length));
        bytes
    }

    /// Writes an image file and a label file and probes the pair.
    fn probe_pair(test_name: &str, image_bytes: &[u8], label_bytes: &[u8]) -> Result<DataSchema, DataError> {
        let directory = scratch_directory(test_name);
        let images = write_file(&directory, "images-idx3-ubyte", image_bytes);
        let labels = write_file(&directory, "labels-idx1-ubyte", label_bytes);
        probe_idx(&images, &labels)
    }

    #[test]
    fn good_pair_probes() {
        let schema =
            probe_pair("idx_good", &idx_bytes(&[5, 3, 4], 60), &idx_bytes(&[5], 5)).expect("the pair is valid");
        assert_eq!(schema.examples, 5);
        assert_eq!(
            schema.fields,
            vec![
                FieldSchema { name: "x".to_string(), element_type: ElementType::F32, shape: vec![5, 12] },
                FieldSchema { name: "y".to_string(), element_type: ElementType::I32, shape: vec![5] },
            ]
        );
    }

    #[test]
    fn mismatched_counts_are_corrupt() {
        let error = probe_pair("idx_mismatch", &idx_bytes(&[5, 3, 4], 60), &idx_bytes(&[6], 6))
            .expect_err("the counts disagree");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("6 labels"), "{error}");
        assert!(error.message.contains("5 images"), "{error}");
    }

    #[test]
    fn truncated_and_oversized_files_are_corrupt() {
        let error = probe_pair("idx_truncated", &idx_bytes(&[5, 3, 4], 59), &idx_bytes(&[5], 5))
            .expect_err("the image file is one byte short");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("truncated"), "{error}");
        let error = probe_pair("idx_oversized", &idx_bytes(&[5, 3, 4], 60), &idx_bytes(&[5], 6))
            .expect_err("the label file is one byte long");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("wrong size"), "{error}");
    }

    #[test]
    fn swapped_and_foreign_files_are_corrupt() {
        let error = probe_pair("idx_swapped", &idx_bytes(&[5], 5), &idx_bytes(&[5, 3, 4], 60))
            .expect_err("the files are swapped");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("looks like a label file"), "{error}");
        let error = probe_pair("idx_gzip", b"\x1f\x8b\x08\x00compressed", &idx_bytes(&[5], 5))
            .expect_err("gzip files must be decompressed first");
        assert!(error.message.contains("gzip"), "{error}");
    }

    #[test]
    fn missing_label_file_is_not_found() {
        let directory = scratch_directory("idx_missing");
        let images = write_file(&directory, "images", &idx_bytes(&[1, 2, 2], 4));
        let error = probe_idx(&images, &directory.join("labels")).expect_err("the label file is missing");
        assert_eq!(error.kind, DataErrorKind::NotFound);
        assert_eq!(error.path, directory.join("labels"));
    }

    #[test]
    fn huge_dimensions_do_not_overflow() {
        let error = probe_pair("idx_huge", &idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], 0), &idx_bytes(&[1], 1))
            .expect_err("the dimensions are impossible");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let directory = scratch_directory("idx_truncations");
        let labels = write_file(&directory, "labels", &idx_bytes(&[2], 2));
        let image_bytes = idx_bytes(&[2, 2, 2], 8);
        for length in 0..image_bytes.len() {
            let images = write_file(&directory, "images", &image_bytes[..length]);
            let error = probe_idx(&images, &labels).expect_err("a truncated file is invalid");
            assert_eq!(error.kind, DataErrorKind::Corrupt, "length {length}: {error}");
        }
    }
}
