//! Reading comma-separated tables with a header line: a numeric feature matrix plus an optional
//! integer class-label column.
//!
//! The syntax is RFC 4180's, parsed by the `csv` crate: cells are separated by commas and may be
//! quoted with double quotes, inside which commas, line breaks and doubled quotes (`""`) are part of
//! the cell; lines end with `\n` or `\r\n`; a UTF-8 byte-order mark is skipped. Whitespace around a
//! cell is ignored. curv validates on top of it, with its own messages, which name the line in the
//! file (counting the header; a cell spanning lines is reported at the line its row starts on) and
//! the column. Both probing and loading run the same validating pass over every row, so a file that
//! probes cleanly is guaranteed to load.

use std::borrow::Cow;
use std::path::Path;

use crate::error::{check_scale_is_finite, count_to_i64, DataError, Source};
use crate::{DataSchema, ElementType, FieldData, FieldSchema, LoadedData, LoadedField};

/// How many column names a "label column not found" message lists before eliding the rest.
const COLUMN_NAMES_SHOWN_IN_MESSAGES: usize = 5;

/// How many characters of an offending cell an error message quotes before truncating it.
const CELL_CHARACTERS_SHOWN_IN_MESSAGES: usize = 32;

/// The UTF-8 byte-order mark some tools write at the start of a text file.
const UTF8_BYTE_ORDER_MARK: &[u8] = b"\xef\xbb\xbf";

/// The shape of a validated CSV table, as discovered by a full pass over its rows.
struct CsvTableSummary {
    /// The number of data rows, excluding the header and ignored trailing blank lines.
    row_count: usize,
    /// The number of feature columns: every column except the label column.
    feature_count: usize,
}

/// The header's column names and the position of the label column among them.
struct CsvHeader {
    column_names: Vec<String>,
    label_column_index: Option<usize>,
    /// The line the header starts on.
    line_number: u64,
}

impl CsvHeader {
    /// Describes a column for error messages, by name when it has one and by 1-based position otherwise.
    fn describe_column(&self, column_index: usize) -> String {
        match self.column_names.get(column_index) {
            Some(name) if !name.is_empty() => format!("column '{name}'"),
            _ => format!("column {}", column_index + 1),
        }
    }
}

/// One data row as [`read_csv_table`] hands it on: the line it starts on, its features and its label.
struct CsvRow<'row> {
    line_number: u64,
    features: &'row [f32],
    label: Option<i32>,
}

/// Reads the CSV header and every data row, validating all of them, and hands each row to
/// `visit_row`; the returned summary describes the whole table.
fn read_csv_table(
    source: Source,
    label_column_name: Option<&str>,
    mut visit_row: impl FnMut(CsvRow),
) -> Result<CsvTableSummary, DataError> {
    let path = source.path();
    let bytes = source.read_all()?;
    let bytes = bytes.strip_prefix(UTF8_BYTE_ORDER_MARK).unwrap_or(&bytes);
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(bytes);

    let mut record = csv::ByteRecord::new();
    let mut header: Option<CsvHeader> = None;
    let mut first_blank_line_number: Option<u64> = None;
    let mut lines = LineCounter::default();
    // The line the previous record ended on (0 before the first).
    let mut previous_last_line = 0u64;
    let mut row_features = Vec::new();
    let mut row_count = 0usize;

    loop {
        let more = reader.read_byte_record(&mut record).map_err(|error| describe_csv_error(path, &error))?;
        if !more {
            break;
        }
        // The parser reports a record's position before the empty lines it skipped and ends it
        // before or after its line break, so the lines are counted here from the bytes.
        let reported_start = record.position().map_or(0, |position| position.byte()) as usize;
        let end = (reader.position().byte() as usize).min(bytes.len());
        let start = reported_start.min(end);
        let start = start + bytes[start..end].iter().take_while(|&&byte| byte == b'\r' || byte == b'\n').count();
        let content_end =
            end - bytes[start..end].iter().rev().take_while(|&&byte| byte == b'\r' || byte == b'\n').count();
        let line_number = lines.line_at(bytes, start);
        let last_line = lines.line_at(bytes, content_end);
        if line_number > previous_last_line + 1 {
            // Empty lines, which the parser skips, sit between the previous record and this one.
            first_blank_line_number.get_or_insert(previous_last_line + 1);
        }
        previous_last_line = last_line;
        let blank_record = record.len() == 1 && record.get(0).is_some_and(<[u8]>::is_empty);
        if blank_record {
            first_blank_line_number.get_or_insert(line_number);
            continue;
        }
        if let Some(blank_line_number) = first_blank_line_number {
            return Err(DataError::corrupt(
                path,
                format!(
                    "line {blank_line_number} is blank, but more lines follow it; only trailing blank lines are allowed"
                ),
            ));
        }

        let Some(header) = header.as_ref() else {
            header = Some(parse_header(path, &record, line_number, label_column_name)?);
            continue;
        };

        row_features.clear();
        let label = parse_data_row(path, header, &record, line_number, &mut row_features)?;
        visit_row(CsvRow { line_number, features: &row_features, label });
        row_count += 1;
    }

    let Some(header) = header else {
        let message = if first_blank_line_number.is_none() && bytes.iter().all(|&byte| byte != b'\n') {
            "no data rows: the file is empty"
        } else {
            "no data rows: the file contains only blank lines"
        };
        return Err(DataError::corrupt(path, message));
    };
    if row_count == 0 {
        return Err(DataError::corrupt(path, "no data rows: the file has a header line but nothing after it"));
    }
    let feature_count = header.column_names.len() - usize::from(header.label_column_index.is_some());
    Ok(CsvTableSummary { row_count, feature_count })
}

/// Line numbers (from 1) of byte offsets that only move forward, counted incrementally; lines end
/// with `\n`, `\r\n` or a lone `\r`.
#[derive(Default)]
struct LineCounter {
    offset: usize,
    line: u64,
}

impl LineCounter {
    /// The line the byte at `offset` is on; offsets before the previous one count from there.
    fn line_at(&mut self, bytes: &[u8], offset: usize) -> u64 {
        let offset = offset.min(bytes.len());
        if offset > self.offset {
            // A line ends at `\n`, or at a `\r` that no `\n` follows, as the parser ends records.
            let breaks = (self.offset..offset)
                .filter(|&index| {
                    bytes[index] == b'\n' || (bytes[index] == b'\r' && bytes.get(index + 1) != Some(&b'\n'))
                })
                .count();
            self.line += breaks as u64;
            self.offset = offset;
        }
        self.line + 1
    }
}

/// Turns a failure of the CSV parser into a data error that names the line where it happened.
fn describe_csv_error(path: &Path, error: &csv::Error) -> DataError {
    match error.kind() {
        csv::ErrorKind::Io(io_error) => DataError::from_io(path, io_error),
        _ => match error.position() {
            Some(position) => DataError::corrupt(path, format!("line {} is not valid CSV: {error}", position.line())),
            None => DataError::corrupt(path, format!("the file is not valid CSV: {error}")),
        },
    }
}

/// Decodes one cell as UTF-8 text, reporting invalid bytes with the cell's line and column. A cell
/// quoted after leading whitespace (`a, "b"`), which RFC 4180 leaves as written, is unquoted too.
fn cell_text<'cell>(
    path: &Path,
    cell: &'cell [u8],
    line_number: u64,
    column: impl FnOnce() -> String,
) -> Result<Cow<'cell, str>, DataError> {
    let text = std::str::from_utf8(cell)
        .map_err(|_| DataError::corrupt(path, format!("line {line_number}, {}: not valid UTF-8 text", column())))?;
    match text.strip_prefix('"').and_then(|inner| inner.strip_suffix('"')) {
        Some(inner) => Ok(Cow::Owned(inner.replace("\"\"", "\"").trim().to_string())),
        None => Ok(Cow::Borrowed(text)),
    }
}

/// Reads the header's column names and locates the requested label column.
fn parse_header(
    path: &Path,
    record: &csv::ByteRecord,
    line_number: u64,
    label_column_name: Option<&str>,
) -> Result<CsvHeader, DataError> {
    let column_names = record
        .iter()
        .enumerate()
        .map(|(column_index, cell)| {
            cell_text(path, cell, line_number, || format!("column {}", column_index + 1)).map(Cow::into_owned)
        })
        .collect::<Result<Vec<String>, DataError>>()?;

    let label_column_index = match label_column_name {
        None => None,
        Some(wanted_name) => Some(find_label_column(path, &column_names, wanted_name)?),
    };

    if label_column_index.is_some() && column_names.len() == 1 {
        return Err(DataError::bad_option(path, "the label column is the only column, so no feature columns remain"));
    }
    Ok(CsvHeader { column_names, label_column_index, line_number })
}

/// Finds the unique column called `wanted_name`, explaining what the header offers when it is missing.
fn find_label_column(path: &Path, column_names: &[String], wanted_name: &str) -> Result<usize, DataError> {
    let matching_indices: Vec<usize> = column_names
        .iter()
        .enumerate()
        .filter(|(_, name)| name.as_str() == wanted_name)
        .map(|(index, _)| index)
        .collect();
    match matching_indices.as_slice() {
        [index] => Ok(*index),
        [] => {
            let mut message = format!(
                "label column '{wanted_name}' not found; the header has {} column{}: {}",
                column_names.len(),
                if column_names.len() == 1 { "" } else { "s" },
                summarize_column_names(column_names)
            );
            if let Some(near_miss) = column_names.iter().find(|name| name.eq_ignore_ascii_case(wanted_name)) {
                message.push_str(&format!(" (did you mean '{near_miss}'?)"));
            }
            Err(DataError::bad_option(path, message))
        }
        several => Err(DataError::bad_option(
            path,
            format!("label column '{wanted_name}' appears {} times in the header, so it is ambiguous", several.len()),
        )),
    }
}

/// Lists the first few column names, followed by "..." when there are more.
fn summarize_column_names(column_names: &[String]) -> String {
    let mut summary = column_names
        .iter()
        .take(COLUMN_NAMES_SHOWN_IN_MESSAGES)
        .map(|name| if name.is_empty() { "(unnamed)" } else { name.as_str() })
        .collect::<Vec<_>>()
        .join(", ");
    if column_names.len() > COLUMN_NAMES_SHOWN_IN_MESSAGES {
        summary.push_str(", ...");
    }
    summary
}

/// Validates one data row, appends its features to `row_features` and returns its label, if the table
/// has a label column.
fn parse_data_row(
    path: &Path,
    header: &CsvHeader,
    record: &csv::ByteRecord,
    line_number: u64,
    row_features: &mut Vec<f32>,
) -> Result<Option<i32>, DataError> {
    let field_count = record.len();
    if field_count != header.column_names.len() {
        return Err(DataError::corrupt(
            path,
            format!(
                "line {line_number} has {field_count} field{}, but the header (line {}) has {} column{}",
                if field_count == 1 { "" } else { "s" },
                header.line_number,
                header.column_names.len(),
                if header.column_names.len() == 1 { "" } else { "s" },
            ),
        ));
    }

    let mut label = None;
    for (column_index, cell) in record.iter().enumerate() {
        let cell = cell_text(path, cell, line_number, || header.describe_column(column_index))?;
        let located = |problem: String| {
            DataError::corrupt(path, format!("line {line_number}, {}: {problem}", header.describe_column(column_index)))
        };
        if Some(column_index) == header.label_column_index {
            label = Some(parse_label_cell(&cell).map_err(located)?);
        } else {
            row_features.push(parse_feature_cell(&cell).map_err(located)?);
        }
    }
    Ok(label)
}

/// Parses a feature cell as a finite number that fits in a 32-bit float, or explains why it is not one.
fn parse_feature_cell(cell: &str) -> Result<f32, String> {
    if cell.is_empty() {
        return Err("empty cell; expected a number".to_string());
    }
    let value: f64 = cell.parse().map_err(|_| format!("{} is not a number", quote_cell(cell)))?;
    if !value.is_finite() {
        return Err(format!("{} is not a finite number", quote_cell(cell)));
    }
    let narrowed = value as f32;
    if !narrowed.is_finite() {
        return Err(format!("{} is too large for a 32-bit float", quote_cell(cell)));
    }
    Ok(narrowed)
}

/// Parses a label cell as a non-negative integer class index that fits in 32 bits, or explains why it is
/// not one. Integral decimals such as "3.0" are accepted because many tools write labels that way.
fn parse_label_cell(cell: &str) -> Result<i32, String> {
    if cell.is_empty() {
        return Err("empty cell; expected an integer class label".to_string());
    }
    let value: f64 = match cell.parse::<i64>() {
        Ok(integer) => integer as f64,
        Err(_) => match cell.parse::<f64>() {
            Ok(decimal) if decimal.is_finite() && decimal.fract() == 0.0 => decimal,
            _ => return Err(format!("{} is not an integer class label", quote_cell(cell))),
        },
    };
    if value < 0.0 {
        return Err(format!("class label {} is negative; labels must be integers >= 0", quote_cell(cell)));
    }
    if value > f64::from(i32::MAX) {
        return Err(format!("class label {} is too large for a 32-bit integer", quote_cell(cell)));
    }
    Ok(value as i32)
}

/// Quotes a cell for an error message, shortening very long cells.
fn quote_cell(cell: &str) -> String {
    if cell.chars().count() > CELL_CHARACTERS_SHOWN_IN_MESSAGES {
        let prefix: String = cell.chars().take(CELL_CHARACTERS_SHOWN_IN_MESSAGES).collect();
        format!("'{prefix}...'")
    } else {
        format!("'{cell}'")
    }
}

/// Reads the schema of a CSV file with a header line.
///
/// `label` names the label column, if there is one; every other column is a feature. The schema has a
/// field "x" of type F32 and shape `[rows, features]`, plus a field "y" of type I32 and shape `[rows]`
/// when a label column is given. Every row is validated, so this reads the whole file, but it keeps
/// only counts in memory.
pub fn probe_csv(path: &Path, label: Option<&str>) -> Result<DataSchema, DataError> {
    probe_csv_source(Source::file(path), label)
}

/// [`probe_csv`] of a file's bytes already in memory; `path` only names the file in messages.
pub fn probe_csv_bytes(path: &Path, bytes: &[u8], label: Option<&str>) -> Result<DataSchema, DataError> {
    probe_csv_source(Source::bytes(path, bytes), label)
}

fn probe_csv_source(source: Source, label: Option<&str>) -> Result<DataSchema, DataError> {
    let path = source.path();
    let summary = read_csv_table(source, label, |_| {})?;
    let rows = count_to_i64(path, summary.row_count as u64, "row count")?;
    let features = count_to_i64(path, summary.feature_count as u64, "feature count")?;
    let mut fields =
        vec![FieldSchema { name: "x".to_string(), element_type: ElementType::F32, shape: vec![rows, features] }];
    if label.is_some() {
        fields.push(FieldSchema { name: "y".to_string(), element_type: ElementType::I32, shape: vec![rows] });
    }
    Ok(DataSchema { fields, examples: rows })
}

/// Loads a whole CSV file with the same validation as [`probe_csv`].
///
/// Returns the features as a row-major `f32` matrix of shape `[rows, features]`, the number of feature
/// columns (so `rows` is the matrix length divided by it; it is never zero), and the labels when a label
/// column is given.
// The tuple return type is the documented public signature, so clippy's preference for a named type is declined.
#[allow(clippy::type_complexity)]
pub fn load_csv(path: &Path, label: Option<&str>) -> Result<(Vec<f32>, usize, Option<Vec<i32>>), DataError> {
    load_csv_source(Source::file(path), label)
}

// The same tuple as `load_csv`'s.
#[allow(clippy::type_complexity)]
fn load_csv_source(source: Source, label: Option<&str>) -> Result<(Vec<f32>, usize, Option<Vec<i32>>), DataError> {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let summary = read_csv_table(source, label, |row| {
        features.extend_from_slice(row.features);
        if let Some(row_label) = row.label {
            labels.push(row_label);
        }
    })?;
    Ok((features, summary.feature_count, label.map(|_| labels)))
}

/// The line of the file on which data row `row` (0-based, the header not counted) starts, counting
/// the header and any line breaks inside quoted cells; `None` when the table has fewer rows. The
/// whole file is validated as [`probe_csv`] validates it. Errors about a label or a feature of a
/// loaded table use it to point at the line in the file.
pub fn csv_row_line(path: &Path, label: Option<&str>, row: usize) -> Result<Option<u64>, DataError> {
    let mut rows_seen = 0usize;
    let mut found = None;
    read_csv_table(Source::file(path), label, |visited| {
        if rows_seen == row {
            found = Some(visited.line_number);
        }
        rows_seen += 1;
    })?;
    Ok(found)
}

/// Loads a whole CSV file into the fields that [`probe_csv`] describes.
///
/// The field "x" (F32, shape `[rows, features]`) holds every feature multiplied by `scale`, which must be
/// finite; the field "y" (I32, shape `[rows]`) holds the labels and is present only when `label` names a
/// label column. Validation is the same as for [`probe_csv`] and [`load_csv`].
pub fn load_csv_data(path: &Path, label: Option<&str>, scale: f32) -> Result<LoadedData, DataError> {
    load_csv_data_source(Source::file(path), label, scale)
}

/// [`load_csv_data`] of a file's bytes already in memory; `path` only names the file in messages.
pub fn load_csv_data_bytes(
    path: &Path,
    bytes: &[u8],
    label: Option<&str>,
    scale: f32,
) -> Result<LoadedData, DataError> {
    load_csv_data_source(Source::bytes(path, bytes), label, scale)
}

fn load_csv_data_source(source: Source, label: Option<&str>, scale: f32) -> Result<LoadedData, DataError> {
    let path = source.path();
    check_scale_is_finite(path, scale)?;
    let (mut features, feature_count, labels) = load_csv_source(source, label)?;
    // A successful load always has at least one feature column, but a zero count must not divide.
    let row_count = features
        .len()
        .checked_div(feature_count)
        .ok_or_else(|| DataError::corrupt(path, "the table has no feature columns"))?;
    for feature in &mut features {
        *feature *= scale;
    }
    if let Some(position) = features.iter().position(|feature| !feature.is_finite()) {
        return Err(DataError::bad_option(
            path,
            format!(
                "scaling row {} by {scale} overflows a 32-bit float; choose a smaller scale factor",
                position / feature_count + 1
            ),
        ));
    }

    let mut fields = vec![LoadedField {
        name: "x".to_string(),
        shape: vec![row_count, feature_count],
        data: FieldData::F32(features),
    }];
    if let Some(labels) = labels {
        fields.push(LoadedField { name: "y".to_string(), shape: vec![row_count], data: FieldData::I32(labels) });
    }
    Ok(LoadedData { fields, examples: row_count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{scratch_directory, write_file};
    use crate::DataErrorKind;

    /// Probes a CSV written from `contents` and returns the error, failing the test if probing succeeds.
    fn probe_error(test_name: &str, contents: &str, label: Option<&str>) -> DataError {
        let directory = scratch_directory(test_name);
        let path = write_file(&directory, "table.csv", contents.as_bytes());
        probe_csv(&path, label).expect_err("probing should fail")
    }

    #[test]
    fn good_csv_with_label_probes_and_loads() {
        let directory = scratch_directory("csv_good_with_label");
        let path = write_file(&directory, "table.csv", b"a, b ,label,c\n1,2.5,0,-3\n4,5e1,2,6\n\n\n");
        let schema = probe_csv(&path, Some("label")).expect("the CSV is valid");
        assert_eq!(schema.examples, 2);
        assert_eq!(
            schema.fields,
            vec![
                FieldSchema { name: "x".to_string(), element_type: ElementType::F32, shape: vec![2, 3] },
                FieldSchema { name: "y".to_string(), element_type: ElementType::I32, shape: vec![2] },
            ]
        );
        let (features, feature_count, labels) = load_csv(&path, Some("label")).expect("the CSV is valid");
        assert_eq!(features, vec![1.0, 2.5, -3.0, 4.0, 50.0, 6.0]);
        assert_eq!(feature_count, 3);
        assert_eq!(labels, Some(vec![0, 2]));
    }

    #[test]
    fn load_csv_data_scales_features_and_keeps_labels() {
        let directory = scratch_directory("csv_load_data_scaled");
        let path = write_file(&directory, "table.csv", b"a,label,b\n1,0,-2\n4,3,8\n16,1,0\n");
        let loaded = load_csv_data(&path, Some("label"), 0.25).expect("the CSV is valid");
        assert_eq!(loaded.examples, 3);
        assert_eq!(
            loaded.fields,
            vec![
                LoadedField {
                    name: "x".to_string(),
                    shape: vec![3, 2],
                    data: FieldData::F32(vec![0.25, -0.5, 1.0, 2.0, 4.0, 0.0]),
                },
                LoadedField { name: "y".to_string(), shape: vec![3], data: FieldData::I32(vec![0, 3, 1]) },
            ]
        );
        let unlabelled = load_csv_data(&path, None, 1.0).expect("the CSV is valid");
        assert_eq!(unlabelled.fields.len(), 1);
        assert_eq!(unlabelled.fields[0].shape, vec![3, 3]);
        assert_eq!(unlabelled.fields[0].data, FieldData::F32(vec![1.0, 0.0, -2.0, 4.0, 3.0, 8.0, 16.0, 1.0, 0.0]));
    }

    #[test]
    fn load_csv_data_rejects_bad_scales() {
        let directory = scratch_directory("csv_load_data_bad_scale");
        let path = write_file(&directory, "table.csv", b"a,b\n1,2\n3e38,4\n");
        let error = load_csv_data(&path, None, f32::NAN).expect_err("NaN is not a scale");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        let error = load_csv_data(&path, None, 10.0).expect_err("the scaled value overflows");
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert!(error.message.contains("row 2"), "{error}");
        let error = load_csv_data(&directory.join("missing.csv"), None, 1.0).expect_err("the file is missing");
        assert_eq!(error.kind, DataErrorKind::NotFound);
    }

    #[test]
    fn good_csv_without_label_has_only_features() {
        let directory = scratch_directory("csv_good_without_label");
        let path = write_file(&directory, "table.csv", b"\xef\xbb\xbfa,b\r\n1,2\r\n3,4\r\n");
        let schema = probe_csv(&path, None).expect("the CSV is valid");
        assert_eq!(schema.examples, 2);
        assert_eq!(
            schema.fields,
            vec![FieldSchema { name: "x".to_string(), element_type: ElementType::F32, shape: vec![2, 2] }]
        );
        let (features, feature_count, labels) = load_csv(&path, None).expect("the CSV is valid");
        assert_eq!((features, feature_count, labels), (vec![1.0, 2.0, 3.0, 4.0], 2, None));
    }

    #[test]
    fn missing_label_column_lists_available_columns() {
        let error = probe_error("csv_missing_label", "p0,p1,p2,p3,p4,p5,p6\n1,2,3,4,5,6,7\n", Some("target"));
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert!(error.message.contains("'target'"), "{error}");
        assert!(error.message.contains("p0, p1, p2, p3, p4, ..."), "{error}");
        assert!(!error.message.contains("p5"), "{error}");
    }

    #[test]
    fn label_column_with_different_case_is_suggested() {
        let error = probe_error("csv_label_case", "x,Label\n1,2\n", Some("label"));
        assert_eq!(error.kind, DataErrorKind::BadOption);
        assert!(error.message.contains("did you mean 'Label'"), "{error}");
    }

    #[test]
    fn ragged_row_reports_its_line_number() {
        let error = probe_error("csv_ragged", "a,b,label\n1,2,0\n3,4,1\n5,6\n", Some("label"));
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("line 4"), "{error}");
        assert!(error.message.contains("2 fields"), "{error}");
    }

    #[test]
    fn non_numeric_cell_reports_line_and_column() {
        let error = probe_error("csv_non_numeric", "a,b,label\n1,2,0\n3,abc,1\n", Some("label"));
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("line 3"), "{error}");
        assert!(error.message.contains("column 'b'"), "{error}");
        assert!(error.message.contains("'abc'"), "{error}");
    }

    #[test]
    fn non_finite_and_empty_cells_are_rejected() {
        for (index, bad_cell) in ["nan", "inf", "-infinity", "1e39", ""].iter().enumerate() {
            let contents = format!("a,b\n1,2\n3,{bad_cell}\n");
            let error = probe_error(&format!("csv_non_finite_{index}"), &contents, None);
            assert_eq!(error.kind, DataErrorKind::Corrupt, "{bad_cell}: {error}");
            assert!(error.message.contains("line 3, column 'b'"), "{error}");
        }
    }

    #[test]
    fn labels_must_be_non_negative_integers() {
        for (index, bad_label) in ["-1", "1.5", "cat", "3000000000"].iter().enumerate() {
            let contents = format!("a,label\n1,0\n2,{bad_label}\n");
            let error = probe_error(&format!("csv_bad_label_{index}"), &contents, Some("label"));
            assert_eq!(error.kind, DataErrorKind::Corrupt, "{bad_label}: {error}");
            assert!(error.message.contains("line 3, column 'label'"), "{error}");
        }
        let directory = scratch_directory("csv_integral_decimal_label");
        let path = write_file(&directory, "table.csv", b"a,label\n1,3.0\n");
        let (_, _, labels) = load_csv(&path, Some("label")).expect("integral decimals are labels");
        assert_eq!(labels, Some(vec![3]));
    }

    #[test]
    fn missing_file_is_not_found() {
        let directory = scratch_directory("csv_missing_file");
        let path = directory.join("does_not_exist.csv");
        let error = probe_csv(&path, None).expect_err("the file does not exist");
        assert_eq!(error.kind, DataErrorKind::NotFound);
        assert_eq!(error.path, path);
        assert!(error.to_string().starts_with(&format!("{}: ", path.display())), "{error}");
    }

    #[test]
    fn directory_is_unreadable() {
        let directory = scratch_directory("csv_directory");
        let error = probe_csv(&directory, None).expect_err("a directory is not a CSV file");
        assert_eq!(error.kind, DataErrorKind::Unreadable);
    }

    #[test]
    fn empty_file_and_header_only_have_no_data_rows() {
        for (index, contents) in ["", "a,b\n", "a,b\n\n\n", "\n\n"].iter().enumerate() {
            let error = probe_error(&format!("csv_no_rows_{index}"), contents, None);
            assert_eq!(error.kind, DataErrorKind::Corrupt, "{contents:?}: {error}");
            assert!(error.message.contains("no data rows"), "{error}");
        }
    }

    #[test]
    fn blank_line_between_rows_is_rejected() {
        let error = probe_error("csv_blank_middle", "a,b\n1,2\n\n3,4\n", None);
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("line 3 is blank"), "{error}");
    }

    #[test]
    fn label_as_only_column_leaves_no_features() {
        let error = probe_error("csv_only_label", "label\n1\n", Some("label"));
        assert_eq!(error.kind, DataErrorKind::BadOption);
    }

    #[test]
    fn invalid_utf8_is_corrupt() {
        let directory = scratch_directory("csv_invalid_utf8");
        let path = write_file(&directory, "table.csv", b"a,b\n1,\xff\n");
        let error = probe_csv(&path, None).expect_err("the file is not UTF-8");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.contains("line 2"), "{error}");
    }

    #[test]
    fn quoted_headers_and_cells_follow_rfc_4180() {
        let contents = "\"feature, one\",\"the \"\"label\"\"\", \"b\"\r\n\"1.5\",\"2\",3\r\n4,0, \"-5\" \r\n";
        let schema = probe_csv_bytes(Path::new("quoted.csv"), contents.as_bytes(), Some("the \"label\""))
            .expect("quoted names and cells are valid");
        assert_eq!(schema.examples, 2);
        let loaded = load_csv_data_bytes(Path::new("quoted.csv"), contents.as_bytes(), Some("the \"label\""), 1.0)
            .expect("valid");
        assert_eq!(loaded.fields[0].data, FieldData::F32(vec![1.5, 3.0, 4.0, -5.0]));
        assert_eq!(loaded.fields[1].data, FieldData::I32(vec![2, 0]));
    }

    #[test]
    fn commas_and_line_breaks_inside_quotes_belong_to_the_cell() {
        // The header's second name holds a comma and a line break, so the table has two columns,
        // and the first data row starts on line 3.
        let contents = "a,\"label,\nsecond line\"\n1,0\n2,\"1,5\"\n";
        let error = probe_csv_bytes(Path::new("t.csv"), contents.as_bytes(), Some("label,\nsecond line"))
            .expect_err("'1,5' is not a label");
        assert_eq!(error.kind, DataErrorKind::Corrupt);
        assert!(error.message.starts_with("line 4, column 'label,\nsecond line': '1,5' is not"), "{error}");

        let contents = "a,b\n\"x\ny\",2\n3,4\n";
        let error = probe_csv_bytes(Path::new("t.csv"), contents.as_bytes(), None).expect_err("'x y' is text");
        assert!(error.message.starts_with("line 2, column 'a':"), "{error}");
        let contents = "a,b\n1,\"2\"\n\"3\",\"4\n\n\"\n5,x\n";
        let error = probe_csv_bytes(Path::new("t.csv"), contents.as_bytes(), None).expect_err("'x' is text");
        assert!(error.message.starts_with("line 6, column 'b': 'x' is not a number"), "{error}");
    }

    #[test]
    fn line_numbers_count_the_header_blank_lines_and_breaks_inside_quotes() {
        let directory = scratch_directory("csv_row_lines");
        let path = write_file(&directory, "t.csv", b"a,label\r\n\"1\r\n\",0\r\n2,1\r\n\"3\",\"2\"\r\n\r\n");
        assert_eq!(csv_row_line(&path, Some("label"), 0), Ok(Some(2)));
        assert_eq!(csv_row_line(&path, Some("label"), 1), Ok(Some(4)));
        assert_eq!(csv_row_line(&path, Some("label"), 2), Ok(Some(5)));
        assert_eq!(csv_row_line(&path, Some("label"), 3), Ok(None));
        let error = probe_error("csv_blank_after_quoted", "a,b\n\"1\n\n\",2\n\n3,4\n", None);
        assert!(error.message.contains("line 5 is blank"), "{error}");
        let error = probe_error("csv_leading_blank", "\na,b\n1,2\n", None);
        assert!(error.message.contains("line 1 is blank"), "{error}");
        let error = probe_error("csv_carriage_returns", "a,b\r1,2\r\r3,x\r", None);
        assert!(error.message.contains("line 3 is blank"), "{error}");
        let error = probe_error("csv_carriage_returns_only", "a,b\r1,2\r3,x\r", None);
        assert!(error.message.starts_with("line 3, column 'b'"), "{error}");
    }

    #[test]
    fn bytes_and_files_give_the_same_results() {
        let directory = scratch_directory("csv_bytes_and_files");
        for contents in [&b"a,label\n1,0\n2,3\n"[..], b"a,label\n1,0\n2,x\n", b"", b"a,label\n1\n"] {
            let path = write_file(&directory, "t.csv", contents);
            assert_eq!(
                load_csv_data(&path, Some("label"), 0.5),
                load_csv_data_bytes(&path, contents, Some("label"), 0.5)
            );
            assert_eq!(probe_csv(&path, Some("label")), probe_csv_bytes(&path, contents, Some("label")));
        }
    }
}
