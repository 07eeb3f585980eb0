//! Reading NumPy `.npy` arrays (format versions 1, 2 and 3): their headers for probing, and their data
//! for loading.
//!
//! A `.npy` file is the magic string `\x93NUMPY`, a two-byte version, a little-endian header length
//! (two bytes in version 1, four bytes in versions 2 and 3), and a header that is a Python dictionary
//! literal with the keys 'descr', 'fortran_order' and 'shape'. The raw array data follows the header.

use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use crate::error::{count_to_i64, describe_foreign_format, read_up_to, DataError, Source};
use crate::{ElementType, FieldData};

/// The magic string every `.npy` file starts with.
const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The largest header this reader accepts; real headers are a few hundred bytes, and the cap keeps a
/// corrupt length field from causing a huge allocation.
const MAXIMUM_NPY_HEADER_LENGTH: u64 = 1 << 20;

/// How deeply tuples and lists may nest in a header before it is rejected, so that hostile input cannot
/// exhaust the stack.
const MAXIMUM_HEADER_NESTING_DEPTH: usize = 32;

/// How many bytes of array data are read and converted at a time, so that loading never holds the raw
/// bytes and the converted elements of a large array in memory at once. It is a multiple of every
/// supported element size.
const DATA_CHUNK_LENGTH: usize = 1 << 16;

/// The on-disk element types this crate can read, with their byte order fixed to what NumPy writes on
/// little-endian machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NpyStoredType {
    /// `'<f4'`: little-endian 32-bit float.
    LittleEndianF32,
    /// `'<f8'`: little-endian 64-bit float.
    LittleEndianF64,
    /// `'<i4'`: little-endian 32-bit signed integer.
    LittleEndianI32,
    /// `'<i8'`: little-endian 64-bit signed integer, narrowed to 32 bits on load.
    LittleEndianI64,
    /// `'|u1'`: unsigned byte, widened to a 32-bit float on load.
    UnsignedByte,
}

impl NpyStoredType {
    /// The element type that arrays of this stored type have once loaded.
    pub(crate) fn element_type(self) -> ElementType {
        match self {
            NpyStoredType::LittleEndianF32 | NpyStoredType::UnsignedByte => ElementType::F32,
            NpyStoredType::LittleEndianF64 => ElementType::F64,
            NpyStoredType::LittleEndianI32 | NpyStoredType::LittleEndianI64 => ElementType::I32,
        }
    }

    /// The size of one stored element in bytes.
    pub(crate) fn bytes_per_element(self) -> u64 {
        match self {
            NpyStoredType::UnsignedByte => 1,
            NpyStoredType::LittleEndianF32 | NpyStoredType::LittleEndianI32 => 4,
            NpyStoredType::LittleEndianF64 | NpyStoredType::LittleEndianI64 => 8,
        }
    }
}

/// A parsed and validated `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NpyHeader {
    /// How the elements are stored in the file.
    pub stored_type: NpyStoredType,
    /// The array's dimensions, outermost first (C order). The file is known to be long enough to hold
    /// this many elements after the header.
    pub shape: Vec<i64>,
    /// The number of elements, the product of the shape's dimensions.
    pub element_count: u64,
    /// The byte offset at which the array data starts, just after the header.
    pub data_offset: u64,
}

/// Reads and validates the header of a `.npy` file, including that the file is long enough to hold the
/// data it describes.
pub(crate) fn read_npy_header(source: Source) -> Result<NpyHeader, DataError> {
    let path = source.path();
    let (mut file, file_length) = source.open()?;

    let mut magic_and_version = [0u8; 8];
    let leading_length = read_up_to(path, &mut file, &mut magic_and_version)?;
    let leading_bytes = &magic_and_version[..leading_length];
    if !leading_bytes.starts_with(NPY_MAGIC) {
        let message = match describe_foreign_format(leading_bytes) {
            Some(description) => format!("not a .npy file: {description}"),
            None => "not a .npy file: it does not start with the magic string \\x93NUMPY".to_string(),
        };
        return Err(DataError::corrupt(path, message));
    }
    if leading_length < magic_and_version.len() {
        return Err(DataError::corrupt(path, "the .npy file is truncated inside its format version"));
    }
    let (major_version, minor_version) = (magic_and_version[6], magic_and_version[7]);

    let header_length_field_size: usize = match major_version {
        1 => 2,
        2 | 3 => 4,
        _ => {
            return Err(DataError::corrupt(
                path,
                format!(
                "unsupported .npy format version {major_version}.{minor_version}; versions 1, 2 and 3 are supported"
            ),
            ))
        }
    };
    let mut header_length_bytes = [0u8; 4];
    let header_length_field = &mut header_length_bytes[..header_length_field_size];
    if read_up_to(path, &mut file, header_length_field)? < header_length_field_size {
        return Err(DataError::corrupt(path, "the .npy file is truncated inside its header length"));
    }
    let header_length = u64::from(u32::from_le_bytes(header_length_bytes));
    let header_offset = (magic_and_version.len() + header_length_field_size) as u64;
    let data_offset = header_offset + header_length;

    if header_length > MAXIMUM_NPY_HEADER_LENGTH {
        return Err(DataError::corrupt(
            path,
            format!("the .npy header claims to be {header_length} bytes long, which is implausibly large"),
        ));
    }
    if data_offset > file_length {
        return Err(DataError::corrupt(
            path,
            format!(
                "the .npy file is truncated: its header should end at byte {data_offset}, but the file is only {file_length} bytes long"
            ),
        ));
    }
    let mut header_bytes = vec![0u8; header_length as usize];
    if read_up_to(path, &mut file, &mut header_bytes)? < header_bytes.len() {
        return Err(DataError::corrupt(path, "the .npy file is truncated inside its header"));
    }

    // Versions 1 and 2 store the header as Latin-1, where every byte is one character; version 3 uses UTF-8.
    let header_text: String = if major_version == 3 {
        String::from_utf8(header_bytes)
            .map_err(|_| DataError::corrupt(path, "the .npy header is not valid UTF-8 text"))?
    } else {
        header_bytes.iter().map(|&byte| char::from(byte)).collect()
    };

    let dictionary = parse_header_dictionary(&header_text)
        .map_err(|problem| DataError::corrupt(path, format!("the .npy header is malformed: {problem}")))?;
    interpret_header_dictionary(path, &dictionary, data_offset, file_length)
}

/// Checks the header dictionary's keys and values and turns them into an [`NpyHeader`].
fn interpret_header_dictionary(
    path: &Path,
    dictionary: &[(String, PythonValue)],
    data_offset: u64,
    file_length: u64,
) -> Result<NpyHeader, DataError> {
    let lookup = |key: &str| {
        dictionary
            .iter()
            .find(|(candidate, _)| candidate == key)
            .map(|(_, value)| value)
            .ok_or_else(|| DataError::corrupt(path, format!("the .npy header has no '{key}' entry")))
    };
    let descr = lookup("descr")?;
    let fortran_order = lookup("fortran_order")?;
    let shape = lookup("shape")?;

    match fortran_order {
        PythonValue::Boolean(false) => {}
        PythonValue::Boolean(true) => {
            return Err(DataError::bad_option(path, "Fortran-ordered arrays are not supported"))
        }
        _ => return Err(DataError::corrupt(path, "the .npy header's 'fortran_order' is not True or False")),
    }

    let stored_type = match descr {
        PythonValue::String(descr) => parse_descr(path, descr)?,
        PythonValue::List(_) => {
            return Err(DataError::bad_option(
                path,
                "structured (record) arrays are not supported; save each field as its own array",
            ))
        }
        _ => return Err(DataError::corrupt(path, "the .npy header's 'descr' is not a string")),
    };

    let PythonValue::Tuple(dimensions) = shape else {
        return Err(DataError::corrupt(path, "the .npy header's 'shape' is not a tuple"));
    };
    let mut shape = Vec::with_capacity(dimensions.len());
    let mut element_count: u64 = 1;
    for dimension in dimensions {
        let PythonValue::Integer(dimension) = dimension else {
            return Err(DataError::corrupt(path, "the .npy header's 'shape' contains something other than an integer"));
        };
        let dimension = u64::try_from(*dimension).map_err(|_| {
            DataError::corrupt(path, format!("the .npy header's 'shape' has a negative dimension {dimension}"))
        })?;
        element_count = element_count
            .checked_mul(dimension)
            .ok_or_else(|| DataError::corrupt(path, "the .npy header's 'shape' describes too many elements"))?;
        shape.push(count_to_i64(path, dimension, "array dimension")?);
    }

    let data_length = element_count
        .checked_mul(stored_type.bytes_per_element())
        .ok_or_else(|| DataError::corrupt(path, "the .npy header's 'shape' describes too many bytes"))?;
    let available_data_length = file_length - data_offset;
    if available_data_length < data_length {
        return Err(DataError::corrupt(
            path,
            format!(
                "the .npy file is truncated: its header describes {element_count} elements ({data_length} bytes), but only {available_data_length} bytes of data follow the header"
            ),
        ));
    }
    Ok(NpyHeader { stored_type, shape, element_count, data_offset })
}

/// Maps a NumPy type descriptor such as `'<f4'` to a supported stored type, explaining unsupported ones.
fn parse_descr(path: &Path, descr: &str) -> Result<NpyStoredType, DataError> {
    match descr {
        "<f4" => Ok(NpyStoredType::LittleEndianF32),
        "<f8" => Ok(NpyStoredType::LittleEndianF64),
        "<i4" => Ok(NpyStoredType::LittleEndianI32),
        "<i8" => Ok(NpyStoredType::LittleEndianI64),
        "|u1" => Ok(NpyStoredType::UnsignedByte),
        big_endian if big_endian.starts_with('>') => Err(DataError::bad_option(
            path,
            format!("big-endian arrays ('{big_endian}') are not supported; convert with array.astype(array.dtype.newbyteorder('<'))"),
        )),
        other => Err(DataError::bad_option(
            path,
            format!("unsupported array dtype '{other}'; supported dtypes are '<f4', '<f8', '<i4', '<i8' and '|u1'"),
        )),
    }
}

/// Reads the element type and shape of a NumPy `.npy` file (format version 1, 2 or 3) from its header.
///
/// Supported dtypes are `'<f4'` (F32), `'<f8'` (F64), `'<i4'` and `'<i8'` (I32; 64-bit integers are
/// narrowed on load) and `'|u1'` (F32). Fortran-ordered arrays are rejected with `BadOption`, and a
/// file too short for the data its header describes is `Corrupt`. The shape is returned exactly as
/// stored, outermost dimension first.
pub fn probe_npy(path: &Path) -> Result<(ElementType, Vec<i64>), DataError> {
    probe_npy_source(Source::file(path))
}

/// [`probe_npy`] of a file's bytes already in memory; `path` only names the file in messages.
pub fn probe_npy_bytes(path: &Path, bytes: &[u8]) -> Result<(ElementType, Vec<i64>), DataError> {
    probe_npy_source(Source::bytes(path, bytes))
}

fn probe_npy_source(source: Source) -> Result<(ElementType, Vec<i64>), DataError> {
    let header = read_npy_header(source)?;
    Ok((header.stored_type.element_type(), header.shape))
}

/// Loads a whole NumPy `.npy` array with the same validation as [`probe_npy`] and returns its shape
/// (outermost dimension first) and its elements in C order.
///
/// `'<f4'` arrays load as F32 unchanged. `'<f8'` arrays are converted to F32 (a finite value too large
/// for a 32-bit float is `Corrupt`) and `'|u1'` arrays are widened to F32 without scaling. `'<i4'` and
/// `'<i8'` arrays load as I32; a 64-bit value outside the 32-bit range is `Corrupt`, and the message
/// names its position. Bytes after the array data are ignored, as NumPy itself ignores them.
pub fn load_npy(path: &Path) -> Result<(Vec<usize>, FieldData), DataError> {
    load_npy_source(Source::file(path))
}

/// [`load_npy`] of a file's bytes already in memory; `path` only names the file in messages.
pub fn load_npy_bytes(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, FieldData), DataError> {
    load_npy_source(Source::bytes(path, bytes))
}

fn load_npy_source(source: Source) -> Result<(Vec<usize>, FieldData), DataError> {
    let path = source.path();
    let header = read_npy_header(source)?;
    let shape = header
        .shape
        .iter()
        .map(|&dimension| {
            usize::try_from(dimension).map_err(|_| {
                DataError::corrupt(path, format!("the array dimension {dimension} does not fit in memory"))
            })
        })
        .collect::<Result<Vec<usize>, DataError>>()?;
    let element_count = usize::try_from(header.element_count)
        .map_err(|_| DataError::corrupt(path, "the array has too many elements to fit in memory"))?;

    let (mut file, _file_length) = source.open()?;
    file.seek(SeekFrom::Start(header.data_offset)).map_err(|error| DataError::from_io(path, &error))?;
    let mut reader = BufReader::new(file);
    let data = match header.stored_type {
        NpyStoredType::LittleEndianF32 => {
            FieldData::F32(read_converted_elements(path, &mut reader, element_count, |_, bytes: [u8; 4]| {
                Ok(f32::from_le_bytes(bytes))
            })?)
        }
        NpyStoredType::LittleEndianF64 => FieldData::F32(read_converted_elements(
            path,
            &mut reader,
            element_count,
            |element_index, bytes: [u8; 8]| {
                let value = f64::from_le_bytes(bytes);
                let narrowed = value as f32;
                if value.is_finite() && !narrowed.is_finite() {
                    Err(format!("element {element_index} ({value}) is too large for a 32-bit float"))
                } else {
                    Ok(narrowed)
                }
            },
        )?),
        NpyStoredType::LittleEndianI32 => {
            FieldData::I32(read_converted_elements(path, &mut reader, element_count, |_, bytes: [u8; 4]| {
                Ok(i32::from_le_bytes(bytes))
            })?)
        }
        NpyStoredType::LittleEndianI64 => FieldData::I32(read_converted_elements(
            path,
            &mut reader,
            element_count,
            |element_index, bytes: [u8; 8]| {
                let value = i64::from_le_bytes(bytes);
                i32::try_from(value)
                    .map_err(|_| format!("element {element_index} ({value}) does not fit in a 32-bit integer"))
            },
        )?),
        NpyStoredType::UnsignedByte => {
            FieldData::F32(read_converted_elements(path, &mut reader, element_count, |_, bytes: [u8; 1]| {
                Ok(f32::from(bytes[0]))
            })?)
        }
    };
    Ok((shape, data))
}

/// Reads `element_count` elements of `ELEMENT_SIZE` bytes each, in chunks, and converts each with
/// `convert`, which receives the element's flat (C-order) index and may explain why a value cannot be
/// loaded.
fn read_converted_elements<const ELEMENT_SIZE: usize, Element>(
    path: &Path,
    reader: &mut impl std::io::Read,
    element_count: usize,
    mut convert: impl FnMut(usize, [u8; ELEMENT_SIZE]) -> Result<Element, String>,
) -> Result<Vec<Element>, DataError> {
    let mut elements = Vec::with_capacity(element_count);
    let mut chunk = vec![0u8; DATA_CHUNK_LENGTH];
    while elements.len() < element_count {
        let elements_in_chunk = (element_count - elements.len()).min(DATA_CHUNK_LENGTH / ELEMENT_SIZE);
        let chunk = &mut chunk[..elements_in_chunk * ELEMENT_SIZE];
        if read_up_to(path, reader, chunk)? < chunk.len() {
            // The header check saw enough data, so the file must have shrunk since then.
            return Err(DataError::corrupt(path, "the .npy file is truncated inside its array data"));
        }
        for element_bytes in chunk.chunks_exact(ELEMENT_SIZE) {
            let mut bytes = [0u8; ELEMENT_SIZE];
            bytes.copy_from_slice(element_bytes);
            let element = convert(elements.len(), bytes)
                .map_err(|problem| DataError::corrupt(path, format!("cannot load the array: {problem}")))?;
            elements.push(element);
        }
    }
    Ok(elements)
}

/// The subset of Python literal values that appear in `.npy` headers.
#[derive(Debug, Clone, PartialEq)]
enum PythonValue {
    String(String),
    Integer(i64),
    Boolean(bool),
    None,
    Tuple(Vec<PythonValue>),
    List(Vec<PythonValue>),
}

/// Parses a `.npy` header: a Python dictionary literal with string keys, optionally followed by padding
/// spaces and a newline. Returns the entries in file order.
fn parse_header_dictionary(text: &str) -> Result<Vec<(String, PythonValue)>, String> {
    let mut parser = PythonLiteralParser { characters: text.chars().collect(), position: 0 };
    let dictionary = parser.parse_dictionary()?;
    parser.skip_whitespace();
    if parser.position < parser.characters.len() {
        return Err(format!("unexpected text after the dictionary at character {}", parser.position + 1));
    }
    Ok(dictionary)
}

/// A small recursive-descent parser for the Python literals NumPy writes into `.npy` headers.
struct PythonLiteralParser {
    characters: Vec<char>,
    position: usize,
}

impl PythonLiteralParser {
    fn peek(&self) -> Option<char> {
        self.characters.get(self.position).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.position += 1;
        }
    }

    /// Consumes `expected` after optional whitespace, or explains what was found instead.
    fn expect(&mut self, expected: char) -> Result<(), String> {
        self.skip_whitespace();
        match self.peek() {
            Some(found) if found == expected => {
                self.position += 1;
                Ok(())
            }
            Some(found) => Err(format!("expected '{expected}' at character {} but found '{found}'", self.position + 1)),
            None => Err(format!("expected '{expected}' but the header ended")),
        }
    }

    fn parse_dictionary(&mut self) -> Result<Vec<(String, PythonValue)>, String> {
        self.expect('{')?;
        let mut entries = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some('}') {
                self.position += 1;
                return Ok(entries);
            }
            let key = match self.parse_value(0)? {
                PythonValue::String(key) => key,
                _ => return Err("a dictionary key is not a string".to_string()),
            };
            self.expect(':')?;
            let value = self.parse_value(0)?;
            entries.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(',') => self.position += 1,
                Some('}') => {}
                Some(found) => {
                    return Err(format!("expected ',' or '}}' at character {} but found '{found}'", self.position + 1))
                }
                None => return Err("the dictionary is not closed with '}'".to_string()),
            }
        }
    }

    fn parse_value(&mut self, depth: usize) -> Result<PythonValue, String> {
        if depth > MAXIMUM_HEADER_NESTING_DEPTH {
            return Err("tuples or lists are nested too deeply".to_string());
        }
        self.skip_whitespace();
        match self.peek() {
            Some(quote @ ('\'' | '"')) => self.parse_string(quote).map(PythonValue::String),
            Some('(') => self.parse_sequence(')', depth).map(PythonValue::Tuple),
            Some('[') => self.parse_sequence(']', depth).map(PythonValue::List),
            Some(character) if character.is_ascii_digit() || character == '-' || character == '+' => {
                self.parse_integer().map(PythonValue::Integer)
            }
            Some(character) if character.is_alphabetic() => {
                let start = self.position;
                while self.peek().is_some_and(|character| character.is_alphanumeric() || character == '_') {
                    self.position += 1;
                }
                let word: String = self.characters[start..self.position].iter().collect();
                match word.as_str() {
                    "True" => Ok(PythonValue::Boolean(true)),
                    "False" => Ok(PythonValue::Boolean(false)),
                    "None" => Ok(PythonValue::None),
                    _ => Err(format!("unexpected word '{word}' at character {}", start + 1)),
                }
            }
            Some(found) => Err(format!("unexpected '{found}' at character {}", self.position + 1)),
            None => Err("the header ended where a value was expected".to_string()),
        }
    }

    /// Parses a quoted string; backslash escapes keep the escaped character as is, which is enough for
    /// the type descriptors and field names NumPy writes.
    fn parse_string(&mut self, quote: char) -> Result<String, String> {
        let start = self.position;
        self.position += 1;
        let mut contents = String::new();
        loop {
            match self.peek() {
                None => return Err(format!("the string starting at character {} is not closed", start + 1)),
                Some(character) if character == quote => {
                    self.position += 1;
                    return Ok(contents);
                }
                Some('\\') => {
                    self.position += 1;
                    if let Some(escaped) = self.peek() {
                        contents.push(escaped);
                        self.position += 1;
                    }
                }
                Some(character) => {
                    contents.push(character);
                    self.position += 1;
                }
            }
        }
    }

    /// Parses a decimal integer, accepting the `L` suffix that Python 2 wrote after long integers.
    fn parse_integer(&mut self) -> Result<i64, String> {
        let start = self.position;
        if matches!(self.peek(), Some('-' | '+')) {
            self.position += 1;
        }
        while self.peek().is_some_and(|character| character.is_ascii_digit()) {
            self.position += 1;
        }
        let digits: String = self.characters[start..self.position].iter().collect();
        if matches!(self.peek(), Some('L' | 'l')) {
            self.position += 1;
        }
        digits.parse().map_err(|_| format!("'{digits}' at character {} is not a valid integer", start + 1))
    }

    /// Parses the items of a tuple or list up to `closing`, allowing a trailing comma.
    fn parse_sequence(&mut self, closing: char, depth: usize) -> Result<Vec<PythonValue>, String> {
        self.position += 1;
        let mut items = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some(closing) {
                self.position += 1;
                return Ok(items);
            }
            items.push(self.parse_value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(',') => self.position += 1,
                Some(found) if found == closing => {}
                Some(found) => {
                    return Err(format!(
                        "expected ',' or '{closing}' at character {} but found '{found}'",
                        self.position + 1
                    ))
                }
                None => return Err(format!("a sequence is not closed with '{closing}'")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{scratch_directory, write_file};
    use crate::DataErrorKind;

    /// Builds a `.npy` file by hand: magic, version, header length, the header padded with spaces and a
    /// newline so the data starts on a 64-byte boundary, then `data_length` zero bytes.
    fn npy_bytes(major_version: u8, header: &str, data_length: usize) -> Vec<u8> {
        let length_field_size = if major_version == 1 { 2 } else { 4 };
        let prelude_length = 8 + length_field_size;
        let unpadded_length = prelude_length + header.len() + 1;
        let padding = (64 - unpadded_length % 64) % 64;
        let padded_header = format!("{header}{}\n", " ".repeat(padding));
        let mut bytes = b"\x93NUMPY".to_vec();
        bytes.extend_from_slice(&[major_version, 0]);
        let header_length = padded_header.len() as u32;
        bytes.extend_from_slice(&header_length.to_le_bytes()[..length_field_size]);
        bytes.extend_from_slice(padded_header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_length));
        bytes
    }

    /// Writes a `.npy` file and probes it.
    fn probe_bytes(test_name: &str, bytes: &[u8]) -> Result<(ElementType, Vec<i64>), DataError> {
        let directory = scratch_directory(test_name);
        let path = write_file(&directory, "array.npy", bytes);
        probe_npy(&path)
    }

    #[test]
    fn good_arrays_of_every_supported_dtype_and_version() {
        let cases = [
            (1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 48, ElementType::F32, vec![3, 4]),
            (1, "{'descr': '<f8', 'fortran_order': False, 'shape': (5,), }", 40, ElementType::F64, vec![5]),
            (2, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2, 2), }", 32, ElementType::I32, vec![2, 2, 2]),
            (3, "{\"descr\": \"<i8\", \"fortran_order\": False, \"shape\": (6L,)}", 48, ElementType::I32, vec![6]),
            (
                1,
                "{'descr': '|u1', 'fortran_order': False, 'shape': (10, 28, 28), }",
                7840,
                ElementType::F32,
                vec![10, 28, 28],
            ),
            (1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4, ElementType::F32, vec![]),
            (1, "{'shape': (0, 3), 'fortran_order': False, 'descr': '<f4'}", 0, ElementType::F32, vec![0, 3]),
        ];
        for (index, (version, header, data_length, element_type, shape)) in cases.into_iter().enumerate() {
            let probed = probe_bytes(&format!("npy_good_{index}"), &npy_bytes(version, header, data_length));
            assert_eq!(probed, Ok((element_type, shape)), "{header}");
        }
    }

    /// Writes a version 1 `.npy` file with the given dtype, shape and little-endian data bytes, and loads it.
    fn load_array(
        test_name: &str,
        descr: &str,
        shape: &str,
        data: &[u8],
    ) -> Result<(Vec<usize>, FieldData), DataError> {
        let directory = scratch_directory(test_name);
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let mut bytes = npy_bytes(1, &header, 0);
        bytes.extend_from_slice(data);
        let path = write_file(&directory, "array.npy", &bytes);
        load_npy(&path)
    }

    /// Concatenates the little-endian bytes of every value.
    fn little_endian_bytes<const SIZE: usize, Value: Copy>(
        values: &[Value],
        to_bytes: fn(Value) -> [u8; SIZE],
    ) -> Vec<u8> {
        values.iter().flat_map(|&value| to_bytes(value)).collect()
    }

    #[test]
    fn loads_float_arrays() {
        let values = [1.5f32, -2.0, 0.0, 3.25, f32::MAX, -0.125];
        let loaded = load_array("npy_load_f4", "<f4", "(2, 3)", &little_endian_bytes(&values, f32::to_le_bytes));
        assert_eq!(loaded, Ok((vec![2, 3], FieldData::F32(values.to_vec()))));

        let values = [1.5f64, -2.0, 1e-3, 123456.789];
        let loaded = load_array("npy_load_f8", "<f8", "(4,)", &little_endian_bytes(&values, f64::to_le_bytes));
        assert_eq!(loaded, Ok((vec![4], FieldData::F32(values.iter().map(|&value| value as f32).collect()))));

        let error =
            load_array("npy_load_f8_overflow", "<f8", "(2,)", &little_endian_bytes(&[1.0, 1e300], f64::to_le_bytes))
                .expect_err("1e300 does not fit in a 32-bit float");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("element 1"), "{error}");
    }

    #[test]
    fn loads_integer_arrays() {
        let values = [0i32, -1, i32::MAX, i32::MIN, 7, 9];
        let loaded = load_array("npy_load_i4", "<i4", "(3, 2)", &little_endian_bytes(&values, i32::to_le_bytes));
        assert_eq!(loaded, Ok((vec![3, 2], FieldData::I32(values.to_vec()))));

        let values = [0i64, -1, i64::from(i32::MAX), i64::from(i32::MIN), 42];
        let loaded = load_array("npy_load_i8", "<i8", "(5,)", &little_endian_bytes(&values, i64::to_le_bytes));
        assert_eq!(loaded, Ok((vec![5], FieldData::I32(vec![0, -1, i32::MAX, i32::MIN, 42]))));

        let values = [3i64, 4, 1 << 31, 5];
        let error =
            load_array("npy_load_i8_overflow", "<i8", "(2, 2)", &little_endian_bytes(&values, i64::to_le_bytes))
                .expect_err("2^31 does not fit in a 32-bit integer");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("element 2"), "{error}");
        assert!(error.message.contains("2147483648"), "{error}");
    }

    #[test]
    fn loads_byte_arrays_scalars_and_empty_arrays() {
        let loaded = load_array("npy_load_u1", "|u1", "(2, 2, 2)", &[0, 1, 2, 3, 128, 200, 254, 255]);
        assert_eq!(loaded, Ok((vec![2, 2, 2], FieldData::F32(vec![0.0, 1.0, 2.0, 3.0, 128.0, 200.0, 254.0, 255.0]))));
        let loaded = load_array("npy_load_scalar", "<f4", "()", &2.5f32.to_le_bytes());
        assert_eq!(loaded, Ok((vec![], FieldData::F32(vec![2.5]))));
        let loaded = load_array("npy_load_empty", "<i4", "(0, 3)", &[]);
        assert_eq!(loaded, Ok((vec![0, 3], FieldData::I32(vec![]))));
    }

    #[test]
    fn loads_arrays_larger_than_one_chunk_and_ignores_trailing_bytes() {
        let values: Vec<f32> = (0..50_000).map(|index| index as f32 * 0.5).collect();
        let mut data = little_endian_bytes(&values, f32::to_le_bytes);
        data.extend_from_slice(b"trailing");
        let loaded = load_array("npy_load_large", "<f4", "(25000, 2)", &data);
        assert_eq!(loaded, Ok((vec![25000, 2], FieldData::F32(values))));
    }

    #[test]
    fn loading_reports_the_same_errors_as_probing() {
        let error = load_array("npy_load_truncated", "<f4", "(3,)", &[0; 11]).expect_err("one byte is missing");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("truncated"), "{error}");
        let directory = scratch_directory("npy_load_missing");
        let error = load_npy(&directory.join("missing.npy")).expect_err("the file is missing");
        assert_eq!(error.kind, DataErrorKind::NotFound);
    }

    #[test]
    fn bad_magic_is_corrupt() {
        let error = probe_bytes("npy_bad_magic", b"\x93NUMPZ\x01\x00rest of the file").expect_err("the magic is wrong");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("not a .npy file"), "{error}");
        let error = probe_bytes("npy_zip", b"PK\x03\x04 an npz archive").expect_err("a zip is not a .npy file");
        assert!(error.message.contains(".npz"), "{error}");
    }

    #[test]
    fn fortran_order_is_unsupported() {
        let bytes = npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }", 48);
        let error = probe_bytes("npy_fortran", &bytes).expect_err("Fortran order is unsupported");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert_eq!(error.message, "Fortran-ordered arrays are not supported");
    }

    #[test]
    fn truncated_data_is_corrupt() {
        let bytes = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 47);
        let error = probe_bytes("npy_truncated_data", &bytes).expect_err("one byte is missing");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("truncated"), "{error}");
    }

    #[test]
    fn unsupported_dtypes_are_bad_options() {
        for (index, descr) in ["'>f4'", "'<c8'", "'<f2'", "[('a', '<f4'), ('b', '<i4')]"].iter().enumerate() {
            let header = format!("{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}");
            let error = probe_bytes(&format!("npy_dtype_{index}"), &npy_bytes(1, &header, 8))
                .expect_err("the dtype is unsupported");
            assert_eq!(error.kind, DataErrorKind::BadOption, "{descr}: {error}");
        }
    }

    #[test]
    fn malformed_headers_are_corrupt() {
        let headers = [
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, -4), }",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,",
            "{'descr': '<f4' 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296)}",
            "not a dictionary",
        ];
        for (index, header) in headers.iter().enumerate() {
            let error = probe_bytes(&format!("npy_malformed_{index}"), &npy_bytes(1, header, 64))
                .expect_err("the header is malformed");
            assert_eq!(error.kind, DataErrorKind::Corrupt, "{header}: {error}");
        }
        let deeply_nested = format!("{{'descr': {}'<f4'{}}}", "(".repeat(10_000), ")".repeat(10_000));
        let error =
            probe_bytes("npy_deeply_nested", &npy_bytes(2, &deeply_nested, 0)).expect_err("nesting is too deep");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
    }

    #[test]
    fn header_longer_than_file_is_corrupt() {
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"{'descr': '<f4'");
        let error = probe_bytes("npy_huge_header", &bytes).expect_err("the header length is absurd");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let directory = scratch_directory("npy_truncations");
        let bytes = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24);
        for length in 0..bytes.len() {
            let path = write_file(&directory, "array.npy", &bytes[..length]);
            let error = probe_npy(&path).expect_err("a truncated file is invalid");
            assert_eq!(error.kind, DataErrorKind::Corrupt, "length {length}: {error}");
        }
    }

    #[test]
    fn bytes_and_files_give_the_same_results() {
        let directory = scratch_directory("npy_bytes_and_files");
        let good = npy_bytes(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", 24);
        let huge = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }", 64);
        for (index, bytes) in [good.clone(), huge, good[..good.len() - 1].to_vec(), Vec::new()].iter().enumerate() {
            let path = write_file(&directory, &format!("array{index}.npy"), bytes);
            assert_eq!(probe_npy(&path), probe_npy_bytes(&path, bytes));
            assert_eq!(load_npy(&path), load_npy_bytes(&path, bytes));
        }
        let error = load_npy_bytes(
            Path::new("huge.npy"),
            &npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }", 64),
        )
        .expect_err("10^12 elements do not fit in 64 bytes");
        assert!(error.message.contains("1000000000000 elements"), "{error}");
    }
}
