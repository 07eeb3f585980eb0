//! Reading PNG images as coordinate-to-value datasets: every pixel is one example, whose input is its
//! (x, y) coordinate and whose target is its channel values; and writing reconstructed images back out.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{count_to_i64, describe_foreign_format, read_up_to, DataError, DataErrorKind, ReadSeek, Source};
use crate::{DataSchema, ElementType, FieldData, FieldSchema, LoadedData, LoadedField};

/// The eight bytes every PNG file starts with.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// The most that deflate, PNG's compression, can expand its input: a 258-byte match coded in two bits.
/// A PNG file can therefore never decode to more than this many bytes per byte of file, which lets a
/// corrupt header claiming gigantic dimensions be rejected before any memory is allocated for it.
const MAXIMUM_DEFLATE_EXPANSION_RATIO: u64 = 1032;

/// Distinguishes the temporary files of concurrent [`write_png`] calls within one process.
static TEMPORARY_FILE_COUNTER: AtomicUsize = AtomicUsize::new(0);

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
pub(crate) fn read_png_header(source: Source) -> Result<PngImageHeader, DataError> {
    open_png_reader(source).map(|(_reader, header, _file_length)| header)
}

/// A PNG decoder reading from a file or from bytes in memory.
type PngReader<'a> = png::Reader<BufReader<Box<dyn ReadSeek + 'a>>>;

/// Opens a PNG file, reads its header and checks that its pixel format is supported. Returns a decoder
/// positioned before the image data, the header, and the file's length in bytes.
fn open_png_reader<'a>(source: Source<'a>) -> Result<(PngReader<'a>, PngImageHeader, u64), DataError> {
    let path = source.path();
    let (mut file, file_length) = source.open()?;

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
    let reader = decoder.read_info().map_err(|error| {
        describe_png_decoding_error(path, error, "the PNG file is truncated: it ends before the image data starts")
    })?;
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
    let header = PngImageHeader { width: info.width, height: info.height, kept_channels };
    Ok((reader, header, file_length))
}

/// Translates a PNG decoder failure into a data error with a useful kind; `truncation_message` says what
/// an unexpected end of file means at the stage where decoding failed.
fn describe_png_decoding_error(path: &Path, error: png::DecodingError, truncation_message: &str) -> DataError {
    match error {
        png::DecodingError::IoError(io_error) if io_error.kind() == std::io::ErrorKind::UnexpectedEof => {
            DataError::corrupt(path, truncation_message)
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
    probe_image_source(Source::file(path))
}

/// [`probe_image`] of a PNG file's bytes already in memory; `path` only names the file in messages.
pub fn probe_image_bytes(path: &Path, bytes: &[u8]) -> Result<DataSchema, DataError> {
    probe_image_source(Source::bytes(path, bytes))
}

fn probe_image_source(source: Source) -> Result<DataSchema, DataError> {
    let path = source.path();
    let header = read_png_header(source)?;
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

/// Maps position `index` of `count` evenly onto [-1, 1]: the first position to -1 and the last to +1.
/// A dimension with a single position maps it to 0, the centre.
fn centred_coordinate(index: usize, count: usize) -> f32 {
    if count <= 1 {
        0.0
    } else {
        (index as f64 / (count - 1) as f64 * 2.0 - 1.0) as f32
    }
}

/// Loads an 8-bit or 16-bit grayscale, gray-alpha, RGB or RGBA PNG image as a coordinate-to-value data
/// set, for training coordinate networks; the fields match what [`probe_image`] reports.
///
/// Pixels are listed row by row: y is the outer loop, x the inner one. The field "coords" (F32, shape
/// `[height * width, 2]`) holds each pixel's (x, y), each mapped linearly onto [-1, 1] so that the first
/// pixel of a dimension is at -1 and the last at +1 (a dimension of size 1 is at 0). The field "values"
/// (F32, shape `[height * width, channels]`, one channel for gray and three for color; alpha is
/// dropped) holds each sample `v` mapped from [0, max] to [-1, 1] as `v / max * 2 - 1`, where max is 255
/// for 8-bit images and 65535 for 16-bit ones.
pub fn load_image(path: &Path) -> Result<LoadedData, DataError> {
    load_image_source(Source::file(path))
}

/// [`load_image`] of a PNG file's bytes already in memory; `path` only names the file in messages.
pub fn load_image_bytes(path: &Path, bytes: &[u8]) -> Result<LoadedData, DataError> {
    load_image_source(Source::bytes(path, bytes))
}

fn load_image_source(source: Source) -> Result<LoadedData, DataError> {
    let path = source.path();
    let (mut reader, header, file_length) = open_png_reader(source)?;
    let truncated = "the PNG file is truncated: it ends before the image data is complete";

    let decoded_length =
        reader.output_buffer_size().ok_or_else(|| DataError::corrupt(path, "the PNG image is too large to decode"))?;
    let largest_possible_decoded_length = file_length.saturating_mul(MAXIMUM_DEFLATE_EXPANSION_RATIO);
    if decoded_length as u64 > largest_possible_decoded_length {
        return Err(DataError::corrupt(
            path,
            format!(
                "{truncated}: its header describes {} x {} pixels, which cannot fit in a {file_length}-byte file",
                header.width, header.height
            ),
        ));
    }
    let mut decoded = vec![0u8; decoded_length];
    let frame = reader.next_frame(&mut decoded).map_err(|error| describe_png_decoding_error(path, error, truncated))?;

    let (width, height) = (frame.width as usize, frame.height as usize);
    let samples_per_pixel = frame.color_type.samples();
    let bytes_per_sample = match frame.bit_depth {
        png::BitDepth::Eight => 1,
        png::BitDepth::Sixteen => 2,
        other => return Err(DataError::bad_option(path, format!("{}-bit PNG samples are not supported", other as u8))),
    };
    let kept_channels = header.kept_channels as usize;
    let maximum_sample = if bytes_per_sample == 1 { f32::from(u8::MAX) } else { f32::from(u16::MAX) };
    let bytes_per_row = width * samples_per_pixel * bytes_per_sample;
    let pixel_count = width
        .checked_mul(height)
        .ok_or_else(|| DataError::corrupt(path, "the PNG image has too many pixels to fit in memory"))?;
    // Decoding succeeded, so the decoded buffer holds every row; check it anyway rather than risk a panic.
    if frame.line_size < bytes_per_row || decoded.len() < frame.line_size * height.saturating_sub(1) + bytes_per_row {
        return Err(DataError::corrupt(path, "the PNG decoder returned less image data than the header describes"));
    }

    let mut coordinates = Vec::with_capacity(pixel_count * 2);
    let mut values = Vec::with_capacity(pixel_count * kept_channels);
    for (row_index, row) in decoded.chunks(frame.line_size).take(height).enumerate() {
        let y = centred_coordinate(row_index, height);
        for (column_index, pixel) in row[..bytes_per_row].chunks_exact(samples_per_pixel * bytes_per_sample).enumerate()
        {
            coordinates.push(centred_coordinate(column_index, width));
            coordinates.push(y);
            for sample in pixel.chunks_exact(bytes_per_sample).take(kept_channels) {
                // Sixteen-bit samples are stored big-endian.
                let sample = match sample {
                    [byte] => f32::from(*byte),
                    [high, low] => f32::from(u16::from_be_bytes([*high, *low])),
                    _ => 0.0,
                };
                values.push(sample / maximum_sample * 2.0 - 1.0);
            }
        }
    }

    Ok(LoadedData {
        fields: vec![
            LoadedField { name: "coords".to_string(), shape: vec![pixel_count, 2], data: FieldData::F32(coordinates) },
            LoadedField {
                name: "values".to_string(),
                shape: vec![pixel_count, kept_channels],
                data: FieldData::F32(values),
            },
        ],
        examples: pixel_count,
    })
}

/// Writes an 8-bit grayscale (`channels` = 1) or RGB (`channels` = 3) PNG image, typically a network's
/// reconstruction of an image loaded with [`load_image`].
///
/// `values` holds `height * width * channels` samples row by row, in the [-1, 1] range that
/// [`load_image`] produces; each is clamped to that range and mapped back to a byte as
/// `round((v + 1) / 2 * 255)`. A NaN sample is rejected with `BadOption`, as are impossible dimensions.
/// The image is written to a temporary file in the same directory and then renamed over `path`, so a
/// reader never sees a half-written image; on failure the temporary file is removed. Failures to
/// create, write or rename files are `Unwritable`.
pub fn write_png(path: &Path, width: usize, height: usize, channels: usize, values: &[f32]) -> Result<(), DataError> {
    let color_type = match channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        _ => {
            return Err(DataError::bad_option(
                path,
                format!("cannot write a PNG image with {channels} channels; only 1 (gray) and 3 (RGB) are supported"),
            ))
        }
    };
    // PNG dimensions are non-zero and at most 2^31 - 1.
    let png_dimension = |dimension: usize, what: &str| {
        u32::try_from(dimension)
            .ok()
            .filter(|&dimension| dimension > 0 && dimension <= i32::MAX as u32)
            .ok_or_else(|| DataError::bad_option(path, format!("cannot write a PNG image with {what} {dimension}")))
    };
    let png_width = png_dimension(width, "width")?;
    let png_height = png_dimension(height, "height")?;
    let expected_length = width.checked_mul(height).and_then(|pixels| pixels.checked_mul(channels));
    if expected_length != Some(values.len()) {
        return Err(DataError::bad_option(
            path,
            format!(
                "cannot write a {width} x {height} PNG image with {channels} channel{} from {} values",
                if channels == 1 { "" } else { "s" },
                values.len()
            ),
        ));
    }
    if let Some(position) = values.iter().position(|value| value.is_nan()) {
        return Err(DataError::bad_option(
            path,
            format!(
                "cannot write the PNG image: the value for row {}, column {} is NaN",
                position / channels / width,
                position / channels % width
            ),
        ));
    }
    let samples: Vec<u8> =
        values.iter().map(|value| ((value.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0).round() as u8).collect();

    let file_name = path
        .file_name()
        .ok_or_else(|| DataError::bad_option(path, "cannot write a PNG image: the path does not name a file"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        TEMPORARY_FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temporary_path: PathBuf = path.with_file_name(temporary_name);

    let temporary_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary_path)
        .map_err(|error| DataError::from_write_io(path, &error))?;
    let written = encode_png_into_file(path, temporary_file, png_width, png_height, color_type, &samples)
        .and_then(|()| std::fs::rename(&temporary_path, path).map_err(|error| DataError::from_write_io(path, &error)));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary_path);
    }
    written
}

/// Encodes 8-bit samples as a PNG image into `file`, flushing and syncing it so that a later rename
/// publishes a complete image.
fn encode_png_into_file(
    path: &Path,
    file: File,
    width: u32,
    height: u32,
    color_type: png::ColorType,
    samples: &[u8],
) -> Result<(), DataError> {
    let describe_encoding_error = |error: png::EncodingError| match error {
        png::EncodingError::IoError(io_error) => DataError::from_write_io(path, &io_error),
        other => DataError::new(path, DataErrorKind::Unwritable, format!("cannot encode the PNG image: {other}")),
    };
    let mut buffered = BufWriter::new(file);
    {
        let mut encoder = png::Encoder::new(&mut buffered, width, height);
        encoder.set_color(color_type);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(describe_encoding_error)?;
        writer.write_image_data(samples).map_err(describe_encoding_error)?;
        writer.finish().map_err(describe_encoding_error)?;
    }
    let file = buffered.into_inner().map_err(|error| DataError::from_write_io(path, error.error()))?;
    file.sync_all().map_err(|error| DataError::from_write_io(path, &error))?;
    Ok(())
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

    /// Encodes a PNG image from explicit sample bytes (big-endian for 16-bit images) and returns its bytes.
    fn encode_png_with_samples(
        width: u32,
        height: u32,
        color_type: png::ColorType,
        bit_depth: png::BitDepth,
        samples: &[u8],
    ) -> Vec<u8> {
        let mut encoded = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut encoded, width, height);
            encoder.set_color(color_type);
            encoder.set_depth(bit_depth);
            let mut writer = encoder.write_header().expect("the header can be written");
            writer.write_image_data(samples).expect("the pixels can be written");
            writer.finish().expect("the image can be finished");
        }
        encoded
    }

    /// Returns the F32 data of a loaded field, checking its name and shape on the way.
    fn f32_field<'data>(loaded: &'data LoadedData, name: &str, shape: &[usize]) -> &'data [f32] {
        let field = loaded.field(name).expect("the field exists");
        assert_eq!(field.shape, shape, "shape of {name}");
        match &field.data {
            FieldData::F32(values) => values,
            FieldData::I32(_) => panic!("{name} should be F32"),
        }
    }

    /// Maps an 8-bit sample the way `load_image` documents.
    fn expected_value(sample: u8) -> f32 {
        f32::from(sample) / 255.0 * 2.0 - 1.0
    }

    #[test]
    fn gray_image_loads_exact_coordinates_and_values() {
        let directory = scratch_directory("png_load_gray");
        let samples = [0u8, 51, 255, 128, 17, 200];
        let path = write_file(
            &directory,
            "gray.png",
            &encode_png_with_samples(3, 2, png::ColorType::Grayscale, png::BitDepth::Eight, &samples),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(loaded.examples, 6);
        assert_eq!(loaded.fields.iter().map(|field| field.name.as_str()).collect::<Vec<_>>(), ["coords", "values"]);
        assert_eq!(
            f32_field(&loaded, "coords", &[6, 2]),
            [-1.0, -1.0, 0.0, -1.0, 1.0, -1.0, -1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
        );
        let values = f32_field(&loaded, "values", &[6, 1]);
        assert_eq!(values, samples.map(expected_value));
        assert_eq!((values[0], values[2]), (-1.0, 1.0));
    }

    #[test]
    fn single_row_and_column_images_are_centred() {
        let directory = scratch_directory("png_load_single");
        let path = write_file(
            &directory,
            "row.png",
            &encode_png_with_samples(2, 1, png::ColorType::Grayscale, png::BitDepth::Eight, &[0, 255]),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(f32_field(&loaded, "coords", &[2, 2]), [-1.0, 0.0, 1.0, 0.0]);
        let path = write_file(
            &directory,
            "pixel.png",
            &encode_png_with_samples(1, 1, png::ColorType::Grayscale, png::BitDepth::Eight, &[255]),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(f32_field(&loaded, "coords", &[1, 2]), [0.0, 0.0]);
        assert_eq!(f32_field(&loaded, "values", &[1, 1]), [1.0]);
    }

    #[test]
    fn rgba_image_loads_three_channels_and_drops_alpha() {
        let directory = scratch_directory("png_load_rgba");
        let samples = [255u8, 0, 51, 7, 0, 128, 255, 255];
        let path = write_file(
            &directory,
            "rgba.png",
            &encode_png_with_samples(2, 1, png::ColorType::Rgba, png::BitDepth::Eight, &samples),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(loaded.examples, 2);
        assert_eq!(f32_field(&loaded, "coords", &[2, 2]), [-1.0, 0.0, 1.0, 0.0]);
        assert_eq!(f32_field(&loaded, "values", &[2, 3]), [255, 0, 51, 0, 128, 255].map(expected_value));

        let path = write_file(
            &directory,
            "gray_alpha.png",
            &encode_png_with_samples(1, 2, png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, &[51, 0, 204, 9]),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(f32_field(&loaded, "coords", &[2, 2]), [0.0, -1.0, 0.0, 1.0]);
        assert_eq!(f32_field(&loaded, "values", &[2, 1]), [51, 204].map(expected_value));
    }

    #[test]
    fn sixteen_bit_images_use_the_full_sample_range() {
        let directory = scratch_directory("png_load_sixteen");
        let samples: [u16; 4] = [0, 65535, 32768, 258];
        let bytes: Vec<u8> = samples.iter().flat_map(|sample| sample.to_be_bytes()).collect();
        let path = write_file(
            &directory,
            "gray16.png",
            &encode_png_with_samples(2, 2, png::ColorType::Grayscale, png::BitDepth::Sixteen, &bytes),
        );
        let loaded = load_image(&path).expect("the image is valid");
        let expected: Vec<f32> = samples.iter().map(|&sample| f32::from(sample) / 65535.0 * 2.0 - 1.0).collect();
        assert_eq!(f32_field(&loaded, "values", &[4, 1]), expected);
        assert_eq!(f32_field(&loaded, "values", &[4, 1])[..2], [-1.0, 1.0]);

        let rgb16: Vec<u8> = [65535u16, 0, 1000].iter().flat_map(|sample| sample.to_be_bytes()).collect();
        let path = write_file(
            &directory,
            "rgb16.png",
            &encode_png_with_samples(1, 1, png::ColorType::Rgb, png::BitDepth::Sixteen, &rgb16),
        );
        let loaded = load_image(&path).expect("the image is valid");
        assert_eq!(f32_field(&loaded, "values", &[1, 3]), [1.0, -1.0, 1000.0 / 65535.0 * 2.0 - 1.0]);
    }

    #[test]
    fn loaded_fields_match_the_probed_schema() {
        let directory = scratch_directory("png_load_matches_probe");
        let cases = [
            (png::ColorType::Grayscale, png::BitDepth::Eight),
            (png::ColorType::GrayscaleAlpha, png::BitDepth::Sixteen),
            (png::ColorType::Rgb, png::BitDepth::Eight),
            (png::ColorType::Rgba, png::BitDepth::Sixteen),
        ];
        for (index, (color_type, bit_depth)) in cases.into_iter().enumerate() {
            let path = write_file(&directory, &format!("image_{index}.png"), &encode_png(5, 3, color_type, bit_depth));
            let schema = probe_image(&path).expect("the image is valid");
            let loaded = load_image(&path).expect("the image is valid");
            assert_eq!(loaded.examples as i64, schema.examples);
            for (field, probed) in loaded.fields.iter().zip(&schema.fields) {
                assert_eq!(field.name, probed.name);
                assert_eq!(field.data.element_type(), probed.element_type);
                assert_eq!(field.shape.iter().map(|&dimension| dimension as i64).collect::<Vec<_>>(), probed.shape);
                assert_eq!(field.data.len(), field.shape.iter().product::<usize>());
            }
            let values = f32_field(&loaded, "values", &[15, schema.fields[1].shape[1] as usize]);
            assert!(values.iter().all(|value| (-1.0..=1.0).contains(value)), "{values:?}");
        }
    }

    #[test]
    fn write_png_round_trips_through_load_image() {
        let directory = scratch_directory("png_write_round_trip");
        let (width, height) = (4, 3);
        for channels in [1, 3] {
            let values: Vec<f32> =
                (0..width * height * channels).map(|index| (index as f32 * 0.37).sin() * 1.2).collect();
            let path = directory.join(format!("reconstruction_{channels}.png"));
            write_png(&path, width, height, channels, &values).expect("the image can be written");
            let schema = probe_image(&path).expect("the written image is valid");
            assert_eq!(schema.fields[1].shape, vec![(width * height) as i64, channels as i64]);
            let loaded = load_image(&path).expect("the written image is valid");
            let reloaded = f32_field(&loaded, "values", &[width * height, channels]);
            for (original, reloaded) in values.iter().zip(reloaded) {
                let expected = original.clamp(-1.0, 1.0);
                assert!((expected - reloaded).abs() <= 1.0 / 255.0 + 1e-6, "{expected} became {reloaded}");
            }
        }
        // Overwriting an existing image replaces it, and no temporary files are left behind.
        let path = directory.join("reconstruction_1.png");
        write_png(&path, 1, 1, 1, &[1.0]).expect("the image can be overwritten");
        let loaded = load_image(&path).expect("the written image is valid");
        assert_eq!(f32_field(&loaded, "values", &[1, 1]), [1.0]);
        let mut names: Vec<String> = std::fs::read_dir(&*directory)
            .expect("the scratch directory is readable")
            .map(|entry| entry.expect("the entry is readable").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["reconstruction_1.png", "reconstruction_3.png"]);
    }

    #[test]
    fn write_png_maps_extremes_exactly() {
        let directory = scratch_directory("png_write_extremes");
        let path = directory.join("extremes.png");
        write_png(&path, 5, 1, 1, &[-1.0, 1.0, 0.0, -7.0, f32::INFINITY]).expect("the image can be written");
        let loaded = load_image(&path).expect("the written image is valid");
        assert_eq!(f32_field(&loaded, "values", &[5, 1]), [0u8, 255, 128, 0, 255].map(expected_value));
    }

    #[test]
    fn write_png_rejects_bad_arguments_and_unwritable_paths() {
        let directory = scratch_directory("png_write_errors");
        let path = directory.join("image.png");
        for (width, height, channels, length) in [(2, 2, 2, 8), (2, 2, 4, 16), (0, 2, 1, 0), (2, 2, 1, 3)] {
            let error =
                write_png(&path, width, height, channels, &vec![0.0; length]).expect_err("the arguments are bad");
            assert_eq!(error.kind, DataErrorKind::BadOption, "{error}");
            assert_eq!(error.path, path);
        }
        let error = write_png(&path, 2, 1, 1, &[0.0, f32::NAN]).expect_err("NaN cannot be written");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert!(error.message.contains("row 0, column 1"), "{error}");

        let missing_directory_path = directory.join("missing").join("image.png");
        let error = write_png(&missing_directory_path, 1, 1, 1, &[0.0]).expect_err("the directory is missing");
        assert_eq!(error.kind, DataErrorKind::Unwritable);
        assert_eq!(error.path, missing_directory_path);

        std::fs::create_dir(directory.join("occupied.png")).expect("the directory can be created");
        let error = write_png(&directory.join("occupied.png"), 1, 1, 1, &[0.0]).expect_err("a directory is in the way");
        assert_eq!(error.kind, DataErrorKind::Unwritable);
        let names: Vec<_> = std::fs::read_dir(&*directory).expect("readable").collect();
        assert_eq!(names.len(), 1, "the temporary file was removed");
        assert!(!path.exists());
    }

    #[test]
    fn loading_truncated_or_corrupted_images_is_an_error_not_a_panic() {
        let directory = scratch_directory("png_load_truncations");
        let encoded = encode_png(6, 5, png::ColorType::Rgba, png::BitDepth::Sixteen);
        // The decoder stops at the IEND chunk's type, so only a missing final CRC goes unnoticed.
        for length in 0..encoded.len() - 4 {
            let path = write_file(&directory, "truncated.png", &encoded[..length]);
            let error = load_image(&path).expect_err("a truncated image is invalid");
            assert_eq!(error.kind, DataErrorKind::Corrupt, "length {length}: {error}");
        }
        for position in 0..encoded.len() {
            let mut corrupted = encoded.clone();
            corrupted[position] ^= 0x5a;
            let path = write_file(&directory, "corrupted.png", &corrupted);
            let _ = load_image(&path);
        }
    }

    #[test]
    fn header_claiming_huge_dimensions_is_rejected_before_allocating() {
        let directory = scratch_directory("png_load_huge");
        let mut encoded = encode_png(2, 2, png::ColorType::Rgba, png::BitDepth::Sixteen);
        // Rewrite the IHDR width and height (bytes 16 to 23) and fix up its CRC.
        encoded[16..20].copy_from_slice(&1_000_000u32.to_be_bytes());
        encoded[20..24].copy_from_slice(&1_000_000u32.to_be_bytes());
        let crc = crc32(&encoded[12..29]);
        encoded[29..33].copy_from_slice(&crc.to_be_bytes());
        let path = write_file(&directory, "huge.png", &encoded);
        assert!(probe_image(&path).is_ok(), "the header itself is valid");
        let error = load_image(&path).expect_err("the pixels cannot fit in the file");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("1000000 x 1000000"), "{error}");
    }

    /// The CRC-32 that PNG chunks use, computed bit by bit.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
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

    #[test]
    fn bytes_and_files_give_the_same_results() {
        let directory = scratch_directory("image_bytes_and_files");
        let good = encode_png(3, 2, png::ColorType::Rgb, png::BitDepth::Eight);
        for (index, bytes) in [good.clone(), good[..good.len() / 2].to_vec(), b"not a png".to_vec()].iter().enumerate()
        {
            let path = write_file(&directory, &format!("image{index}.png"), bytes);
            assert_eq!(probe_image(&path), probe_image_bytes(&path, bytes));
            assert_eq!(load_image(&path), load_image_bytes(&path, bytes));
        }
    }
}
