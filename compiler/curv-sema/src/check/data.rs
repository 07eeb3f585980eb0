//! Data declarations: the request the checker makes for each one (its source, paths and options),
//! answered by the driver through [`DataProbe`] with the fields' shapes and the number of examples,
//! since the checker does no I/O; then the data sets the train blocks see.

use super::*;

/// What the checker asks the data prober for one `data` declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRequest {
    pub name: String,
    /// `csv`, `image`, `npy` or `idx`.
    pub source: String,
    /// Path options (`path`, `x`, `y`, `images`, `labels`) as written, relative to the file.
    pub paths: Vec<(String, String)>,
    pub label: Option<String>,
    /// Every numeric option after defaults (`scale`, `test_fraction`, `seed`, ...).
    pub options: Vec<(String, f64)>,
}

/// The probe's answer: fields with their full shapes (leading dimension = examples).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbedData {
    pub fields: Vec<(String, DType, Vec<i64>)>,
    pub examples: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataProbeError {
    /// Which path option the error is about (its span gets the label).
    pub path_key: String,
    pub not_found: bool,
    pub message: String,
}

/// Reads data schemas for the checker; the driver implements it with real file access.
pub trait DataProbe {
    fn probe(&mut self, request: &DataRequest) -> Result<ProbedData, DataProbeError>;
}

impl<'a> Checker<'a> {
    pub(super) fn check_data(&mut self, probe: &mut dyn DataProbe) {
        let names: Vec<String> = self.data.keys().cloned().collect();
        for name in names {
            let decl = self.data[&name].decl;
            let Some((request, test_fraction, path_spans)) = self.data_request(decl) else {
                continue;
            };
            match probe.probe(&request) {
                Ok(schema) => {
                    let entry = self.data.get_mut(&name).expect("registered above");
                    entry.schema = Some(schema);
                    entry.test_fraction = test_fraction;
                    entry.request = Some(request);
                }
                Err(error) => {
                    let span = path_spans.get(&error.path_key).copied().unwrap_or(decl.source.span());
                    // The path as written, which is what the user can find in the source.
                    let written = request
                        .paths
                        .iter()
                        .find(|(key, _)| *key == error.path_key)
                        .map_or(String::new(), |(_, path)| path.clone());
                    let diagnostic = if error.not_found {
                        Diagnostic::error(
                            "E0400",
                            span,
                            format!("data file `{written}` not found"),
                            "this path does not exist",
                        )
                        .with_help("relative paths are resolved against the directory of the .curv file")
                    } else {
                        Diagnostic::error(
                            "E0401",
                            span,
                            format!("cannot read data file `{written}`: {}", error.message),
                            "this file is unreadable or corrupt",
                        )
                    };
                    self.emit(diagnostic);
                    self.data.get_mut(&name).expect("registered above").request = Some(request);
                }
            }
        }
    }

    /// Validates a data declaration's source call and turns it into a probe request.
    pub(super) fn data_request(&mut self, decl: &ast::DataDecl) -> Option<(DataRequest, f64, HashMap<String, Span>)> {
        let Expr::Call(call) = &decl.source else {
            self.emit(
                Diagnostic::error(
                    "E0402",
                    decl.source.span(),
                    "a data set must come from a data source",
                    "expected a call such as `csv(\"file.csv\")`",
                )
                .with_help("the data sources are: csv, image, npy, idx"),
            );
            return None;
        };
        let Some(spec) = builtins::data_source(&call.name.name) else {
            let names: Vec<&str> = builtins::DATA_SOURCES.iter().map(|spec| spec.name).collect();
            let mut diagnostic = Diagnostic::error(
                "E0106",
                call.name.span,
                format!("unknown data source `{}`", call.name.name),
                "not a data source",
            );
            diagnostic = match closest(&call.name.name, names.iter().copied()) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => diagnostic.with_help(format!("the data sources are: {}", names.join(", "))),
            };
            self.emit(diagnostic);
            return None;
        };
        let mut paths = Vec::new();
        let mut path_spans = HashMap::new();
        let mut label = None;
        let mut test_fraction = 0.0;
        let mut given_options: Vec<(String, f64)> = Vec::new();
        let mut positional_index = 0;
        for arg in &call.args {
            let (key, value) = match arg {
                ast::Arg::Positional(value) => {
                    let Some(key) = spec.paths.get(positional_index) else {
                        self.emit(Diagnostic::error(
                            "E0104",
                            value.span(),
                            format!("`{}` takes {} positional path argument(s)", spec.name, spec.paths.len()),
                            "unexpected argument",
                        ));
                        return None;
                    };
                    positional_index += 1;
                    (key.to_string(), value)
                }
                ast::Arg::Named(key, value) => (key.name.clone(), value),
            };
            if spec.paths.contains(&key.as_str()) || key == "label" {
                let Expr::Str(text, span) = value else {
                    self.emit(Diagnostic::error(
                        "E0112",
                        value.span(),
                        format!("`{key}` must be a string"),
                        "expected a string",
                    ));
                    return None;
                };
                if key == "label" {
                    label = Some(text.clone());
                } else {
                    paths.push((key.clone(), text.clone()));
                    path_spans.insert(key.clone(), *span);
                }
                continue;
            }
            let Some(option) = spec.options.iter().find(|option| option.name == key) else {
                let known: Vec<&str> =
                    spec.paths.iter().copied().chain(spec.options.iter().map(|option| option.name)).collect();
                let span = match arg {
                    ast::Arg::Named(ident, _) => ident.span,
                    ast::Arg::Positional(expr) => expr.span(),
                };
                self.emit(
                    Diagnostic::error(
                        "E0103",
                        span,
                        format!("`{}` has no option `{key}`", spec.name),
                        "unknown option",
                    )
                    .with_help(format!("the options of `{}` are: {}", spec.name, known.join(", "))),
                );
                return None;
            };
            let number = crate::optimizer::option_number_value(self, option, value)?;
            if key == "test_fraction" {
                test_fraction = number;
            }
            given_options.push((key.clone(), number));
        }
        let mut options = Vec::new();
        for option in spec.options {
            if let Some((_, value)) = given_options.iter().find(|(key, _)| key == option.name) {
                options.push((option.name.to_string(), *value));
            } else if let crate::builtins::OptionDefault::Number(value) = option.default {
                options.push((option.name.to_string(), value));
            }
        }
        for required in spec.paths {
            if !paths.iter().any(|(key, _)| key == required) {
                self.emit(Diagnostic::error(
                    "E0306",
                    call.span,
                    format!("`{}` needs the path `{required}`", spec.name),
                    format!("`{required}` is missing"),
                ));
                return None;
            }
        }
        if spec.name == "csv" && label.is_none() {
            self.emit(
                Diagnostic::error("E0306", call.span, "`csv` needs the name of its label column", "`label` is missing")
                    .with_help("add `label = \"name\"` with the column that holds the class or target"),
            );
            return None;
        }
        let request =
            DataRequest { name: decl.name.name.clone(), source: spec.name.to_string(), paths, label, options };
        Some((request, test_fraction, path_spans))
    }

    /// The data set's fields as the IR sees them, or `None` when the data could not be read.
    pub(crate) fn data_info(&self, name: &str) -> Option<DataInfo> {
        let entry = self.data.get(name)?;
        let schema = entry.schema.as_ref()?;
        let request = entry.request.as_ref()?;
        let test_examples = ((schema.examples as f64) * entry.test_fraction).round() as i64;
        Some(DataInfo {
            name: name.to_string(),
            kind: request.source.clone(),
            path: request.paths.first().map(|(_, path)| path.clone()).unwrap_or_default(),
            paths: request.paths.clone(),
            label: request.label.clone(),
            options: request.options.clone(),
            fields: schema
                .fields
                .iter()
                .map(|(field, dtype, shape)| (field.clone(), TensorType::known(*dtype, shape)))
                .collect(),
            examples: schema.examples,
            test_examples,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Models.
}
