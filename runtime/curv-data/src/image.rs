//! Reading PNG images as coordinate-to-value datasets: every pixel is one example, whose input is its
//! (row, column) coordinate and whose target is its channel values.

use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use crate::error::{count_to_i64, describe_foreign_format, open_regular_file, read_up_to, DataError, DataErrorKind};
use crate::{DataSchema, ElementType, FieldSchema};

/// The eight bytes every PNG file starts with.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// What the PNG header says about an image, reduced to what schema probing and later loading need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PngImageHeader {
    /// The image width in pixels; PNG guarantees it is non-zero.
    pub width: u32,
    /// The image height in pixels; PNG guarantees it is non-zero.
    pub height: u32,
    /// The number of channels kept as values: 1 for gray, 3 for RGB; alpha is always dropped.
    pub kept_channels: u32,
}

/// Reads the header of a PNG file and checks that its pixel format is supported, without decoding any
/// image data.
pub(crate) fn read_png_header(path: &Path) -> Result<PngImageHeader, DataError> {
    let (mut file, _file_length) = open_regular_file(path)?;

    let mut leading_bytes = [0u8; 8];
    let leading_length = read_up_to(path, &mut file, &mut leading_bytes)?;
    let leading_bytes = &leading_bytes[..leading_length];
    if leading_bytes != PNG_SIGNATURE {
        let message = match describe_foreign_format(leading_bytes) {
            Some(description) => format!("not a PNG file: {description}"),
            None if leading_length < PNG_SIGNATURE.len() => {
                format!("not a PNG file: it is only {leading_length} bytes long")
            }
            None => "not a PNG file: it does not start with the PNG signature".to_string(),
        };
        return Err(DataError::corrupt(path, message));
    }
    file.seek(SeekFrom::Start(0)).map_err(|error| DataError::from_io(path, &error))?;

    let decoder = png::Decoder::new(BufReader::new(file));
    let reader = decoder.read_info().map_err(|error| describe_png_decoding_error(path, error))?;
    let info = reader.info();

    let kept_channels = match info.color_type {
        png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => 1,
        png::ColorType::Rgb | png::ColorType::Rgba => 3,
        png::ColorType::Indexed => {
            return Err(DataError::bad_option(
                path,
                "palette (indexed-color) PNG images are not supported; save the image as grayscale or RGB",
            ))
        }
    };
    match info.bit_depth {
        png::BitDepth::Eight | png::BitDepth::Sixteen => {}
        other => {
            return Err(DataError::bad_option(
                path,
                format!(
                    "{}-bit PNG samples are not supported; save the image with 8 or 16 bits per sample",
                    other as u8
                ),
            ))
        }
    }
    Ok(PngImageHeader { width: info.width, height: info.height, kept_channels })
}

/// Translates a PNG decoder failure into a data error with a useful kind.
fn describe_png_decoding_error(path: &Path, error: png::DecodingError) -> DataError {
    match error {
        png::DecodingError::IoError(io_error) if io_error.kind() == std::io::ErrorKind::UnexpectedEof => {
            DataError::corrupt(path, "the PNG file is truncated: it ends before the image data starts")
        }
        png::DecodingError::IoError(io_error) => {
            DataError::new(path, DataErrorKind::Unreadable, format!("cannot read the file: {io_error}"))
        }
        png::DecodingError::Format(format_error) => {
            DataError::corrupt(path, format!("not a valid PNG image: {format_error}"))
        }
        png::DecodingError::LimitsExceeded => DataError::corrupt(path, "the PNG image is too large to decode"),
        png::DecodingError::Parameter(parameter_error) => {
            DataError::corrupt(path, format!("the PNG image could not be decoded: {parameter_error}"))
        }
    }
}

/// Reads the schema of an 8-bit or 16-bit grayscale, gray-alpha, RGB or RGBA PNG image.
///
/// Each pixel is one example. The field "coords" (F32, shape `[height * width, 2]`) holds pixel
/// coordinates and the field "values" (F32, shape `[height * width, channels]`) holds pixel values,
/// with one channel for gray images and three for color images; alpha is dropped. Only the header is
/// read, so this is cheap even for large images.
pub fn probe_image(path: &Path) -> Result<DataSchema, DataError> {
    let header = read_png_header(path)?;
    let pixel_count = count_to_i64(path, u64::from(header.width) * u64::from(header.height), "pixel count")?;
    let fields = vec![
        FieldSchema { name: "coords".to_string(), element_type: ElementType::F32, shape: vec![pixel_count, 2] },
        FieldSchema {
            name: "values".to_string(),
            element_type: ElementType::F32,
            shape: vec![pixel_count, i64::from(header.kept_channels)],
        },
    ];
    Ok(DataSchema { fields, examples: pixel_count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{scratch_directory, write_file};

    /// Encodes a PNG image with the given pixel format and returns its bytes.
    fn encode_png(width: u32, height: u32, color_type: png::ColorType, bit_depth: png::BitDepth) -> Vec<u8> {
        let mut encoded = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut encoded, width, height);
            encoder.set_color(color_type);
            encoder.set_depth(bit_depth);
            if color_type == png::ColorType::Indexed {
                encoder.set_palette(vec![0u8; 3 * 256]);
            }
            let mut writer = encoder.write_header().expect("the header can be written");
            let bits_per_pixel = color_type.samples() * bit_depth as usize;
            let row_bytes = (width as usize * bits_per_pixel).div_ceil(8);
            let pixels: Vec<u8> = (0..row_bytes * height as usize).map(|index| index as u8).collect();
            writer.write_image_data(&pixels).expect("the pixels can be written");
            writer.finish().expect("the image can be finished");
        }
        encoded
    }

    /// Returns the shapes of the "coords" and "values" fields of a probed image.
    fn probed_shapes(schema: &DataSchema) -> (Vec<i64>, Vec<i64>) {
        assert_eq!(schema.fields.len(), 2);
        assert_eq!(schema.fields[0].name, "coords");
        assert_eq!(schema.fields[1].name, "values");
        assert!(schema.fields.iter().all(|field| field.element_type == ElementType::F32));
        (schema.fields[0].shape.clone(), schema.fields[1].shape.clone())
    }

    #[test]
    fn gray_image_has_one_channel() {
        let directory = scratch_directory("png_gray");
        let path =
            write_file(&directory, "gray.png", &encode_png(4, 3, png::ColorType::Grayscale, png::BitDepth::Eight));
        let schema = probe_image(&path).expect("the image is valid");
        assert_eq!(schema.examples, 12);
        assert_eq!(probed_shapes(&schema), (vec![12, 2], vec![12, 1]));
    }

    #[test]
    fn rgb_image_has_three_channels() {
        let directory = scratch_directory("png_rgb");
        let path = write_file(&directory, "rgb.png", &encode_png(2, 2, png::ColorType::Rgb, png::BitDepth::Eight));
        let schema = probe_image(&path).expect("the image is valid");
        assert_eq!(schema.examples, 4);
        assert_eq!(probed_shapes(&schema), (vec![4, 2], vec![4, 3]));
    }

    #[test]
    fn alpha_channels_are_dropped_and_sixteen_bits_are_supported() {
        let directory = scratch_directory("png_alpha");
        let cases = [
            (png::ColorType::Rgba, png::BitDepth::Sixteen, 3),
            (png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, 1),
            (png::ColorType::Grayscale, png::BitDepth::Sixteen, 1),
        ];
        for (index, (color_type, bit_depth, channels)) in cases.into_iter().enumerate() {
            let path = write_file(&directory, &format!("image_{index}.png"), &encode_png(5, 2, color_type, bit_depth));
            let schema = probe_image(&path).expect("the image is valid");
            assert_eq!(probed_shapes(&schema), (vec![10, 2], vec![10, channels]));
        }
    }

    #[test]
    fn palette_and_low_bit_depth_images_are_unsupported() {
        let directory = scratch_directory("png_unsupported");
        let indexed =
            write_file(&directory, "indexed.png", &encode_png(2, 2, png::ColorType::Indexed, png::BitDepth::Eight));
        let error = probe_image(&indexed).expect_err("palette images are unsupported");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        let one_bit =
            write_file(&directory, "one_bit.png", &encode_png(9, 2, png::ColorType::Grayscale, png::BitDepth::One));
        let error = probe_image(&one_bit).expect_err("1-bit images are unsupported");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert!(error.message.contains("1-bit"), "{error}");
    }

    #[test]
    fn non_png_file_is_corrupt() {
        let directory = scratch_directory("png_not_png");
        let path = write_file(&directory, "not_an_image.png", b"a,b\n1,2\n");
        let error = probe_image(&path).expect_err("a CSV file is not a PNG");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("not a PNG file"), "{error}");
    }

    #[test]
    fn missing_image_is_not_found() {
        let directory = scratch_directory("png_missing");
        let error = probe_image(&directory.join("missing.png")).expect_err("the file does not exist");
        assert_eq!(error.kind, DataErrorKind::NotFound);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let directory = scratch_directory("png_truncations");
        let encoded = encode_png(4, 3, png::ColorType::Rgb, png::BitDepth::Eight);
        // The header ends where the first IDAT chunk starts; any shorter prefix must be rejected.
        let image_data_start = encoded.windows(4).position(|window| window == b"IDAT").expect("IDAT exists") - 4;
        for length in 0..image_data_start {
            let path = write_file(&directory, "truncated.png", &encoded[..length]);
            let error = probe_image(&path).expect_err("a truncated header is invalid");
            assert_eq!(error.kind, DataErrorKind::Corrupt, "length {length}: {error}");
        }
        for position in 0..encoded.len() {
            let mut corrupted = encoded.clone();
            corrupted[position] ^= 0x5a;
            let path = write_file(&directory, "corrupted.png", &corrupted);
            let _ = probe_image(&path);
        }
    }
}
