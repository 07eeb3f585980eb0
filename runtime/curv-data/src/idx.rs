//! Reading MNIST-style IDX files: an image file of unsigned bytes with dimensions (count, rows, columns)
//! paired with a label file of unsigned bytes with dimension (count).
//!
//! An IDX file starts with a big-endian magic number whose first two bytes are zero, whose third byte is
//! the element type (0x08 for unsigned bytes) and whose fourth byte is the number of dimensions. Each
//! dimension follows as a big-endian 32-bit count, and the raw data follows the dimensions.

use std::io::{Seek, SeekFrom};
use std::path::Path;

use crate::error::{check_scale_is_finite, count_to_i64, describe_foreign_format, read_up_to, DataError, Source};
use crate::{DataSchema, ElementType, FieldData, FieldSchema, LoadedData, LoadedField};

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
    /// The byte offset at which the data starts, just after the dimensions.
    pub data_offset: u64,
    /// The number of data bytes, which is exactly what follows the header.
    pub data_length: u64,
}

/// Reads the header of an IDX file of unsigned bytes with `expected_dimension_count` dimensions and
/// checks that the file holds exactly the data the header describes. `role` ("image" or "label") is
/// used in messages.
pub(crate) fn read_idx_header(
    source: Source,
    expected_dimension_count: u8,
    role: &str,
) -> Result<IdxHeader, DataError> {
    let path = source.path();
    let (mut file, file_length) = source.open()?;

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
    let data_length = file_length - data_offset;
    Ok(IdxHeader { dimensions, data_offset, data_length })
}

/// Reads all the data bytes of an IDX file whose header has been validated by [`read_idx_header`].
fn read_idx_data(source: Source, header: &IdxHeader, role: &str) -> Result<Vec<u8>, DataError> {
    let path = source.path();
    let data_length = usize::try_from(header.data_length)
        .map_err(|_| DataError::corrupt(path, format!("the IDX {role} file is too large to fit in memory")))?;
    let (mut file, _file_length) = source.open()?;
    file.seek(SeekFrom::Start(header.data_offset)).map_err(|error| DataError::from_io(path, &error))?;
    let mut data = vec![0u8; data_length];
    if read_up_to(path, &mut file, &mut data)? < data.len() {
        // The header check measured the file, so it must have shrunk since then.
        return Err(DataError::corrupt(path, format!("the IDX {role} file is truncated inside its data")));
    }
    Ok(data)
}

/// The validated headers of an MNIST-style pair of IDX files, with the image dimensions unpacked.
struct IdxPair {
    image_header: IdxHeader,
    label_header: IdxHeader,
    /// The number of images, which equals the number of labels and is never zero.
    count: u32,
    /// The number of pixels per image, rows times columns, never zero.
    pixels_per_image: u64,
}

/// Reads and cross-checks the headers of an image file and a label file.
fn read_idx_pair(image_source: Source, label_source: Source) -> Result<IdxPair, DataError> {
    let (images, labels) = (image_source.path(), label_source.path());
    let image_header = read_idx_header(image_source, IDX_IMAGE_DIMENSION_COUNT, "image")?;
    let label_header = read_idx_header(label_source, IDX_LABEL_DIMENSION_COUNT, "label")?;
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
    Ok(IdxPair {
        image_header,
        label_header,
        count: image_count,
        pixels_per_image: u64::from(image_rows) * u64::from(image_columns),
    })
}

/// Reads the schema of an MNIST-style pair of IDX files.
///
/// The image file must have magic number 0x00000803 (unsigned bytes, dimensions count, rows, columns)
/// and the label file 0x00000801 (unsigned bytes, dimension count). Both files must be exactly as long
/// as their headers say, and their counts must agree. The schema has a field "x" (F32, shape
/// `[count, rows * columns]`) and a field "y" (I32, shape `[count]`).
pub fn probe_idx(images: &Path, labels: &Path) -> Result<DataSchema, DataError> {
    probe_idx_sources(Source::file(images), Source::file(labels))
}

/// [`probe_idx`] of the two files' bytes already in memory; the paths only name them in messages.
pub fn probe_idx_bytes(
    images: &Path,
    image_bytes: &[u8],
    labels: &Path,
    label_bytes: &[u8],
) -> Result<DataSchema, DataError> {
    probe_idx_sources(Source::bytes(images, image_bytes), Source::bytes(labels, label_bytes))
}

fn probe_idx_sources(image_source: Source, label_source: Source) -> Result<DataSchema, DataError> {
    let images = image_source.path();
    let pair = read_idx_pair(image_source, label_source)?;
    let examples = i64::from(pair.count);
    let pixels_per_image = count_to_i64(images, pair.pixels_per_image, "image size")?;
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

/// Loads an MNIST-style pair of IDX files into the fields that [`probe_idx`] describes.
///
/// The field "x" (F32, shape `[count, rows * columns]`) holds each image's pixels row by row, each
/// multiplied by `scale` (which must be finite; 1/255 maps bytes to [0, 1]), and the field "y" (I32,
/// shape `[count]`) holds the labels. Validation is the same as for [`probe_idx`].
pub fn load_idx(images: &Path, labels: &Path, scale: f32) -> Result<LoadedData, DataError> {
    load_idx_sources(Source::file(images), Source::file(labels), scale)
}

/// [`load_idx`] of the two files' bytes already in memory; the paths only name them in messages.
pub fn load_idx_bytes(
    images: &Path,
    image_bytes: &[u8],
    labels: &Path,
    label_bytes: &[u8],
    scale: f32,
) -> Result<LoadedData, DataError> {
    load_idx_sources(Source::bytes(images, image_bytes), Source::bytes(labels, label_bytes), scale)
}

fn load_idx_sources(image_source: Source, label_source: Source, scale: f32) -> Result<LoadedData, DataError> {
    let images = image_source.path();
    check_scale_is_finite(images, scale)?;
    let pair = read_idx_pair(image_source, label_source)?;
    let examples = usize::try_from(pair.count)
        .map_err(|_| DataError::corrupt(images, "the IDX image file has too many images to fit in memory"))?;
    let pixels_per_image = usize::try_from(pair.pixels_per_image)
        .map_err(|_| DataError::corrupt(images, "the IDX images are too large to fit in memory"))?;

    let pixels: Vec<f32> = read_idx_data(image_source, &pair.image_header, "image")?
        .into_iter()
        .map(|pixel| f32::from(pixel) * scale)
        .collect();
    if pixels.iter().any(|pixel| !pixel.is_finite()) {
        return Err(DataError::bad_option(
            images,
            format!("scaling the pixels by {scale} overflows a 32-bit float; choose a smaller scale factor"),
        ));
    }
    let class_labels: Vec<i32> =
        read_idx_data(label_source, &pair.label_header, "label")?.into_iter().map(i32::from).collect();

    Ok(LoadedData {
        fields: vec![
            LoadedField {
                name: "x".to_string(),
                shape: vec![examples, pixels_per_image],
                data: FieldData::F32(pixels),
            },
            LoadedField { name: "y".to_string(), shape: vec![examples], data: FieldData::I32(class_labels) },
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
    fn good_pair_loads_scaled_pixels_and_labels() {
        let directory = scratch_directory("idx_load_good");
        let mut image_bytes = idx_bytes(&[3, 2, 2], 0);
        image_bytes.extend_from_slice(&[0, 1, 2, 3, 10, 20, 30, 40, 255, 128, 64, 0]);
        let mut label_bytes = idx_bytes(&[3], 0);
        label_bytes.extend_from_slice(&[7, 0, 9]);
        let images = write_file(&directory, "images-idx3-ubyte", &image_bytes);
        let labels = write_file(&directory, "labels-idx1-ubyte", &label_bytes);

        let loaded = load_idx(&images, &labels, 0.5).expect("the pair is valid");
        assert_eq!(loaded.examples, 3);
        assert_eq!(
            loaded.fields,
            vec![
                LoadedField {
                    name: "x".to_string(),
                    shape: vec![3, 4],
                    data: FieldData::F32(vec![0.0, 0.5, 1.0, 1.5, 5.0, 10.0, 15.0, 20.0, 127.5, 64.0, 32.0, 0.0]),
                },
                LoadedField { name: "y".to_string(), shape: vec![3], data: FieldData::I32(vec![7, 0, 9]) },
            ]
        );
        let schema = probe_idx(&images, &labels).expect("the pair is valid");
        for (field, probed) in loaded.fields.iter().zip(&schema.fields) {
            let shape: Vec<i64> = field.shape.iter().map(|&dimension| dimension as i64).collect();
            assert_eq!(
                (field.name.as_str(), field.data.element_type(), shape),
                (probed.name.as_str(), probed.element_type, probed.shape.clone())
            );
        }
    }

    #[test]
    fn loading_a_bad_pair_reports_the_probe_errors() {
        let directory = scratch_directory("idx_load_bad");
        let images = write_file(&directory, "images", &idx_bytes(&[2, 2, 2], 8));
        let labels = write_file(&directory, "labels", &idx_bytes(&[3], 3));
        let error = load_idx(&images, &labels, 1.0).expect_err("the counts disagree");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert_eq!(error.path, labels);
        let labels = write_file(&directory, "labels", &idx_bytes(&[2], 2));
        let error = load_idx(&images, &labels, f32::INFINITY).expect_err("the scale is not finite");
        assert_eq!(error.kind, DataErrorKind::BadOption);
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

    #[test]
    fn bytes_and_files_give_the_same_results() {
        let directory = scratch_directory("idx_bytes_and_files");
        let cases = [
            (idx_bytes(&[2, 2, 2], 8), idx_bytes(&[2], 2)),
            (idx_bytes(&[100000, 1000, 1000], 0), idx_bytes(&[2], 2)),
            (idx_bytes(&[2, 2, 2], 8), idx_bytes(&[3], 3)),
        ];
        for (index, (image_bytes, label_bytes)) in cases.iter().enumerate() {
            let images = write_file(&directory, &format!("images{index}"), image_bytes);
            let labels = write_file(&directory, &format!("labels{index}"), label_bytes);
            assert_eq!(probe_idx(&images, &labels), probe_idx_bytes(&images, image_bytes, &labels, label_bytes));
            assert_eq!(
                load_idx(&images, &labels, 0.5),
                load_idx_bytes(&images, image_bytes, &labels, label_bytes, 0.5)
            );
        }
    }
}
