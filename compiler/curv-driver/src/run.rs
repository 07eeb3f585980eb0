//! `curv run` and `curv compare` as library functions: selecting the train block, loading data,
//! initialising or resuming, the loop with logging, metrics files, checkpoints, plots and the
//! reconstruction of coordinate networks. Progress is reported through [`RunObserver`].

use curv_interp::{Real, Tensor};
use curv_ir::{Program, TrainProgram};
use curv_runtime::plot::{plot_series, Series};
use curv_runtime::{Checkpoint, Dataset, Metrics, NonFinitePolicy, TrainError, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// Makes the compiled backend of an f32 run.
pub type BackendFactory = fn() -> Box<dyn curv_runtime::Backend<f32>>;

/// The command-line options of `curv run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub train: Option<String>,
    pub steps: Option<u64>,
    pub seed: Option<u64>,
    pub precision: Precision,
    pub init: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    pub out: Option<PathBuf>,
    /// A compiled backend for f32 runs (`--backend mlir`); `None` runs the interpreter.
    pub backend: Option<BackendFactory>,
    /// A training-batch metric value to report the first step and time of (`--target psnr=30`).
    pub target: Option<Target>,
    /// Stop training at the step that reaches `target`.
    pub stop_at_target: bool,
    /// The program's source file: a compiled backend names the source line of a failing GPU
    /// kernel with it.
    pub source: Option<crate::SourceFile>,
    /// Whether parameters that share an elementwise rule are updated by one kernel per block
    /// (`--grouped-updates on`, the default); `off` updates each with its own kernel, with the
    /// same numbers (for comparisons).
    pub grouped_updates: bool,
}

/// A value of a training-batch metric (`loss`, `accuracy` or `psnr`) to reach: `loss` is reached
/// at or below the value, the others at or above it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub metric: String,
    pub value: f64,
}

impl Target {
    /// Parses `METRIC=VALUE`.
    pub fn parse(text: &str) -> Result<Target, String> {
        let (metric, value) =
            text.split_once('=').ok_or_else(|| format!("`{text}` is not METRIC=VALUE (such as psnr=30)"))?;
        let metric = metric.trim().to_string();
        if !matches!(metric.as_str(), "loss" | "accuracy" | "psnr") {
            return Err(format!("`{metric}` is not a training metric; targets are loss, accuracy or psnr"));
        }
        let value: f64 = value.trim().parse().map_err(|_| format!("`{value}` is not a number"))?;
        if !value.is_finite() {
            return Err(format!("the target {value} is not finite"));
        }
        Ok(Target { metric, value })
    }

    fn reached(&self, metrics: &Metrics) -> bool {
        match self.metric.as_str() {
            "loss" => metrics.loss <= self.value,
            "accuracy" => metrics.accuracy.is_some_and(|value| value >= self.value),
            _ => metrics.psnr.is_some_and(|value| value >= self.value),
        }
    }
}

/// When a run first reached its target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetReached {
    pub step: u64,
    /// Training seconds up to and including that step, compilation excluded.
    pub seconds: f64,
}

/// A failure of `curv run`: `user` errors exit with 1, the others with 2.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    pub message: String,
    pub user: bool,
}

impl RunError {
    fn user(message: impl Into<String>) -> RunError {
        RunError { message: message.into(), user: true }
    }

    fn runtime(message: impl Into<String>) -> RunError {
        RunError { message: message.into(), user: false }
    }
}

/// One logged point.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub step: u64,
    pub values: Vec<(String, f64)>,
    pub elapsed_ms: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub train: String,
    pub optimizer: String,
    pub steps: u64,
    pub records: Vec<LogRecord>,
    pub final_values: Vec<(String, f64)>,
    pub step_ms_median: f64,
    pub files: Vec<PathBuf>,
    /// Milliseconds spent in autodiff, backend compilation and training (compilation excluded).
    pub timings: Vec<(&'static str, f64)>,
    /// When the run reached `RunOptions::target` (`None`: no target, or not reached).
    pub target_reached: Option<TargetReached>,
}

/// Receives progress while a run goes.
pub trait RunObserver {
    fn started(&mut self, _train: &TrainProgram, _first_step: u64, _total_steps: u64) {}
    fn stepped(&mut self, _step: u64, _loss: f64) {}
    fn logged(&mut self, _record: &LogRecord) {}
    fn warning(&mut self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;

impl RunObserver for Silent {}

/// Picks the train block to run.
pub fn select_train<'a>(program: &'a Program, name: Option<&str>) -> Result<&'a TrainProgram, RunError> {
    match name {
        Some(name) => program.trains.iter().find(|train| train.name == name).ok_or_else(|| {
            let names: Vec<&str> = program.trains.iter().map(|train| train.name.as_str()).collect();
            RunError::user(format!(
                "no train block `{name}`; the file has: {}",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ))
        }),
        None => program.trains.first().ok_or_else(|| RunError::user("the file has no `train` block to run")),
    }
}

/// Runs the selected train block of a checked program.
pub fn run_program(
    program: &Program,
    directory: &Path,
    options: &RunOptions,
    observer: &mut dyn RunObserver,
) -> Result<RunSummary, RunError> {
    let train = select_train(program, options.train.as_deref())?;
    curv_runtime::optimizer::check_executable(
        &train.optimizer,
        &train.params.iter().map(|param| param.name.clone()).collect::<Vec<_>>(),
    )
    .map_err(RunError::user)?;
    match (options.precision, options.backend) {
        (Precision::F32, backend) => {
            let backend = backend.map(|make| {
                let mut backend = make();
                if let Some(source) = &options.source {
                    backend.locate_sources(source_locator(program, source.clone()));
                }
                backend
            });
            run_train::<f32>(program, train, directory, options, observer, backend)
        }
        (Precision::F64, None) => run_train::<f64>(program, train, directory, options, observer, None),
        (Precision::F64, Some(_)) => {
            Err(RunError::user("the compiled backends compute in f32; use `--precision f64` with `--backend interp`"))
        }
    }
}

/// Where a function's code is: a rule's functions (keys `rule NAME ...`) in the rule's standard
/// library module, every other function in the user's file.
fn source_locator(program: &Program, source: crate::SourceFile) -> curv_runtime::backend::SourceLocator {
    let modules: Vec<(String, Option<String>)> =
        program.rules.iter().map(|rule| (rule.name.clone(), rule.module.clone())).collect();
    let locations = crate::SourceLocations::new(&source);
    Box::new(move |key: &str, offset: usize| {
        let rule = key.strip_prefix("rule ").and_then(|rest| rest.split(' ').next());
        let module = rule
            .and_then(|name| modules.iter().find(|(rule, _)| rule == name))
            .and_then(|(_, module)| module.as_deref());
        locations.location(&source, module, offset)
    })
}

fn metric_value(name: &str, batch: &Metrics, test: Option<&Metrics>) -> Option<f64> {
    match name {
        "loss" => Some(batch.loss),
        "accuracy" => batch.accuracy,
        "psnr" => batch.psnr,
        "test_loss" => test.map(|metrics| metrics.loss),
        "test_accuracy" => test.and_then(|metrics| metrics.accuracy),
        "test_psnr" => test.and_then(|metrics| metrics.psnr),
        _ => None,
    }
}

fn json_number(value: f64) -> String {
    if value.is_finite() {
        format!("{value}")
    } else {
        "null".to_string()
    }
}

fn json_line(fields: &[(String, f64)], extra: &[(&str, String)]) -> String {
    let mut parts: Vec<String> = extra.iter().map(|(key, value)| format!("\"{key}\": {value}")).collect();
    parts.extend(fields.iter().map(|(key, value)| format!("\"{key}\": {}", json_number(*value))));
    format!("{{{}}}\n", parts.join(", "))
}

fn run_train<T: Real>(
    program: &Program,
    train: &TrainProgram,
    directory: &Path,
    options: &RunOptions,
    observer: &mut dyn RunObserver,
    backend: Option<Box<dyn curv_runtime::Backend<T>>>,
) -> Result<RunSummary, RunError> {
    let total_steps = options.steps.unwrap_or(train.steps.max(0) as u64);
    let seed = options.seed.unwrap_or(train.seed.max(0) as u64);
    let dataset = Dataset::load(&train.data, directory).map_err(RunError::user)?;
    // Labels and embedding ids out of range are an error before step 1, whatever the backend.
    curv_runtime::data_check::check_dataset(train, &dataset, directory).map_err(RunError::user)?;
    let mut trainer: Trainer<T> = Trainer::new(train.clone(), program.rules.clone(), dataset, seed, total_steps);
    trainer.policy = if train.skip_nonfinite { NonFinitePolicy::Skip } else { NonFinitePolicy::Stop };
    if !options.grouped_updates {
        trainer.set_grouped_updates(false);
    }
    if let Some(backend) = backend {
        trainer.backend = backend;
    }
    let expected: Vec<(String, Vec<usize>)> = train
        .params
        .iter()
        .map(|param| {
            (
                param.name.clone(),
                param.ty.known_shape().unwrap_or_default().into_iter().map(|size| size as usize).collect(),
            )
        })
        .collect();
    if let Some(path) = &options.init {
        if !load_initial_parameters(&mut trainer, path, &expected)? {
            observer.warning(&format!(
                "{} carries no curv checksums (it was written by another program or an older curv): its values \
                 are used unverified",
                path.display()
            ));
        }
    }
    if let Some(path) = &options.resume {
        let checkpoint: Checkpoint<T> = Checkpoint::load(path, &expected).map_err(RunError::user)?;
        let does_not_fit = curv_runtime::checkpoint::DOES_NOT_FIT;
        if checkpoint.train != train.name {
            return Err(RunError::user(format!(
                "[{does_not_fit}] {}: written by train `{}`, not `{}`",
                path.display(),
                checkpoint.train,
                train.name
            )));
        }
        if checkpoint.seed != seed {
            return Err(RunError::user(format!(
                "[{does_not_fit}] {}: trained with seed {}, but this run uses seed {seed}",
                path.display(),
                checkpoint.seed
            )));
        }
        trainer.params = checkpoint.params.into_iter().map(|(_, tensor)| tensor).collect();
        trainer.states = checkpoint.states;
        trainer.step = checkpoint.step;
    }
    // Resident steps keep the parameters, states and gradients where the backend computes (in
    // device memory on a GPU) between steps: the default where that pays (a GPU backend).
    // `CURV_RESIDENT=on` or `off` forces the choice (for tests and comparisons; the numbers are
    // the same).
    let resident = match std::env::var("CURV_RESIDENT").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        _ => trainer.backend.keeps_resident(),
    };
    trainer.set_resident(resident).map_err(|error| RunError::runtime(error.to_string()))?;
    if let Some(out) = &options.out {
        std::fs::create_dir_all(out)
            .map_err(|error| RunError::user(format!("cannot create {}: {error}", out.display())))?;
    }
    let mut metrics_file = match &options.metrics {
        Some(path) => Some(
            std::fs::File::create(path)
                .map_err(|error| RunError::user(format!("cannot write {}: {error}", path.display())))?,
        ),
        None => None,
    };
    let log_every = train.log.as_ref().map_or((total_steps / 20).max(1), |log| log.every.max(1) as u64);
    let mut log_metrics: Vec<String> = train.log.as_ref().map_or(vec!["loss".to_string()], |log| log.metrics.clone());
    let eval_every = train.eval.as_ref().map(|eval| eval.every.max(1) as u64);
    if let Some(eval) = &train.eval {
        for metric in &eval.metrics {
            if !log_metrics.contains(metric) {
                log_metrics.push(metric.clone());
            }
        }
    }
    let checkpoint_every = train.checkpoint_every.map(|every| every.max(1) as u64);
    observer.started(train, trainer.step + 1, total_steps);
    let mut records = Vec::new();
    let mut step_times = Vec::new();
    let started = Instant::now();
    let mut last_test: Option<Metrics> = None;
    let mut last_batch = Metrics::default();
    let mut target_reached: Option<TargetReached> = None;
    while trainer.step < total_steps {
        let step_started = Instant::now();
        let report = match trainer.train_step() {
            Ok(report) => report,
            Err(error) => {
                let mut message = error.to_string();
                if let (TrainError::NonFinite { .. }, Some(out)) = (&error, &options.out) {
                    let path = out.join("checkpoint.safetensors");
                    trainer.sync_to_host().map_err(|error| RunError::runtime(error.to_string()))?;
                    save_checkpoint(&trainer, &path)?;
                    message.push_str(&format!(
                        "; the last good state (step {}) is in {}",
                        trainer.step,
                        path.display()
                    ));
                }
                return Err(RunError::runtime(message));
            }
        };
        step_times.push(step_started.elapsed().as_secs_f64() * 1000.0);
        if let Some(what) = &report.skipped {
            observer.warning(&format!("step {}: skipped the update: {what}", report.step));
        }
        observer.stepped(report.step, report.metrics.loss);
        last_batch = report.metrics.clone();
        let step = report.step;
        let mut stop_now = false;
        if let (None, Some(target)) = (&target_reached, &options.target) {
            if report.skipped.is_none() && target.reached(&report.metrics) {
                let seconds = started.elapsed().as_secs_f64() - trainer.backend.compile_seconds();
                target_reached = Some(TargetReached { step, seconds });
                stop_now = options.stop_at_target;
            }
        }
        let last_step = step == total_steps || stop_now;
        let evaluate_now = eval_every.is_some_and(|every| step % every == 0) || (last_step && train.eval.is_some());
        if evaluate_now {
            last_test = trainer.evaluate_test().map_err(|error| RunError::runtime(error.to_string()))?;
        }
        if step % log_every == 0 || last_step {
            let test = if evaluate_now { last_test.as_ref() } else { None };
            let values: Vec<(String, f64)> = log_metrics
                .iter()
                .filter_map(|name| metric_value(name, &report.metrics, test).map(|value| (name.clone(), value)))
                .collect();
            let record = LogRecord { step, values, elapsed_ms: started.elapsed().as_secs_f64() * 1000.0 };
            if let Some(file) = &mut metrics_file {
                let line = json_line(&record.values, &[("step", step.to_string())]);
                let line = line.replacen('}', &format!(", \"elapsed_ms\": {:.1}}}", record.elapsed_ms), 1);
                file.write_all(line.as_bytes())
                    .map_err(|error| RunError::runtime(format!("writing metrics: {error}")))?;
            }
            observer.logged(&record);
            records.push(record);
        }
        if let (Some(every), Some(out)) = (checkpoint_every, &options.out) {
            if step % every == 0 {
                trainer.sync_to_host().map_err(|error| RunError::runtime(error.to_string()))?;
                save_checkpoint(&trainer, &out.join("checkpoint.safetensors"))?;
            }
        }
        if stop_now {
            break;
        }
    }
    let mut sorted = step_times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let step_ms_median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    if train.eval.is_some() && last_test.is_none() {
        last_test = trainer.evaluate_test().map_err(|error| RunError::runtime(error.to_string()))?;
    }
    let final_values: Vec<(String, f64)> = log_metrics
        .iter()
        .filter_map(|name| metric_value(name, &last_batch, last_test.as_ref()).map(|value| (name.clone(), value)))
        .collect();
    if let Some(file) = &mut metrics_file {
        let line = json_line(
            &final_values,
            &[
                ("final", "true".to_string()),
                ("step", trainer.step.to_string()),
                ("step_ms_median", format!("{step_ms_median:.3}")),
            ],
        );
        file.write_all(line.as_bytes()).map_err(|error| RunError::runtime(format!("writing metrics: {error}")))?;
    }
    let mut files = Vec::new();
    trainer.sync_to_host().map_err(|error| RunError::runtime(error.to_string()))?;
    if let Some(out) = &options.out {
        files.extend(write_outputs(&trainer, train, out, &records)?);
    }
    let compile_ms = trainer.backend.compile_seconds() * 1000.0;
    let loop_ms = started.elapsed().as_secs_f64() * 1000.0;
    let timings =
        vec![("autodiff", trainer.autodiff_seconds * 1000.0), ("compile", compile_ms), ("train", loop_ms - compile_ms)];
    Ok(RunSummary {
        timings,
        train: train.name.clone(),
        optimizer: train.optimizer.name.clone(),
        steps: trainer.step,
        records,
        final_values,
        step_ms_median,
        files,
        target_reached,
    })
}

fn save_checkpoint<T: Real>(trainer: &Trainer<T>, path: &Path) -> Result<(), RunError> {
    let checkpoint = Checkpoint {
        step: trainer.step,
        seed: trainer.seed,
        train: trainer.program.name.clone(),
        params: trainer
            .program
            .params
            .iter()
            .map(|param| param.name.clone())
            .zip(trainer.params.iter().cloned())
            .collect(),
        states: trainer.states.clone(),
    };
    checkpoint.save(path).map_err(RunError::runtime)
}

/// Sets the parameters from a safetensors file (`--init`); the checksums curv stores are verified.
/// Returns whether the file carried them (a file of another program has none).
fn load_initial_parameters<T: Real>(
    trainer: &mut Trainer<T>,
    path: &Path,
    expected: &[(String, Vec<usize>)],
) -> Result<bool, RunError> {
    use curv_runtime::checkpoint::DOES_NOT_FIT;
    let contents = curv_runtime::checkpoint::read_file::<T>(path).map_err(RunError::user)?;
    let all = contents.tensors;
    for (index, (name, shape)) in expected.iter().enumerate() {
        let tensor = all.get(name).ok_or_else(|| {
            RunError::user(format!("[{DOES_NOT_FIT}] {}: parameter `{name}` is missing", path.display()))
        })?;
        if &tensor.shape != shape {
            return Err(RunError::user(format!(
                "[{DOES_NOT_FIT}] {}: parameter `{name}` has shape {:?}, expected {shape:?}",
                path.display(),
                tensor.shape
            )));
        }
        trainer.params[index] = tensor.clone();
    }
    let mut unknown: Vec<&String> = all.keys().filter(|key| !expected.iter().any(|(name, _)| name == *key)).collect();
    unknown.sort();
    if !unknown.is_empty() {
        return Err(RunError::user(format!(
            "[{DOES_NOT_FIT}] {}: tensors that are not parameters of this model: {unknown:?}",
            path.display()
        )));
    }
    Ok(contents.verified)
}

/// `final.safetensors`, the metric plots and, for coordinate networks, the reconstruction.
fn write_outputs<T: Real>(
    trainer: &Trainer<T>,
    train: &TrainProgram,
    out: &Path,
    records: &[LogRecord],
) -> Result<Vec<PathBuf>, RunError> {
    let mut files = Vec::new();
    let final_path = out.join("final.safetensors");
    let named: Vec<(String, &Tensor<T>)> =
        train.params.iter().map(|param| param.name.clone()).zip(trainer.params.iter()).collect();
    let metadata = [("train", train.name.clone()), ("step", trainer.step.to_string())];
    let bytes = curv_runtime::checkpoint::serialize(&named, &metadata).map_err(RunError::runtime)?;
    curv_runtime::checkpoint::write_atomically(&final_path, &bytes).map_err(RunError::runtime)?;
    files.push(final_path);
    let mut metric_names: Vec<String> = Vec::new();
    for record in records {
        for (name, _) in &record.values {
            if !metric_names.contains(name) {
                metric_names.push(name.clone());
            }
        }
    }
    for name in metric_names {
        let points: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|record| {
                record.values.iter().find(|(key, _)| *key == name).map(|(_, value)| (record.step as f64, *value))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let path = out.join(format!("{name}.svg"));
        let series = [Series { name: name.clone(), points }];
        plot_series(&path, &format!("{}: {name}", train.name), &name, &series).map_err(RunError::runtime)?;
        files.push(path);
    }
    if train.data.kind == "image" {
        if let Some(prediction) = trainer.predict_all().map_err(|error| RunError::runtime(error.to_string()))? {
            let (width, height) = image_size(trainer);
            let channels = prediction.shape.last().copied().unwrap_or(1);
            let values: Vec<f32> = prediction.data.iter().map(|value| value.to_f64() as f32).collect();
            let path = out.join("reconstruction.png");
            curv_data::write_png(&path, width, height, channels, &values)
                .map_err(|error| RunError::runtime(error.to_string()))?;
            files.push(path);
        }
    }
    Ok(files)
}

/// The image's width and height, recovered from its coordinates (x varies fastest).
fn image_size<T: Real>(trainer: &Trainer<T>) -> (usize, usize) {
    let coords = trainer.dataset.fields.iter().find(|field| field.name == "coords");
    let count = trainer.dataset.examples;
    if let Some(curv_data::FieldData::F32(data)) = coords.map(|field| &field.data) {
        let first_y = data.get(1).copied().unwrap_or(0.0);
        let width = data.chunks(2).take_while(|pair| pair[1] == first_y).count().max(1);
        return (width, count / width);
    }
    (count, 1)
}

/// Runs the train block once per optimizer, for `curv compare`.
pub fn compare(
    source: &crate::SourceFile,
    optimizers: &[String],
    options: &RunOptions,
    observer: &mut dyn RunObserver,
) -> Result<Vec<Result<RunSummary, RunError>>, Vec<curv_sema::Diagnostic>> {
    // Every variant is checked before any of them runs, so a mistake costs no training time.
    let mut programs = Vec::new();
    for optimizer in optimizers {
        let analysis_options =
            curv_sema::AnalysisOptions { optimizer_override: Some(optimizer.clone()), ..Default::default() };
        let compilation = crate::compile_file_with_options(source.clone(), &analysis_options);
        match compilation.analysis {
            Some(analysis) if !compilation.parsed.errors.is_empty() || analysis.has_errors() => {
                return Err(analysis.diagnostics)
            }
            Some(analysis) => programs.push((optimizer, analysis.program)),
            None => return Err(compilation.parsed.errors.into_iter().map(curv_sema::Diagnostic::from).collect()),
        }
    }
    let mut results = Vec::new();
    for (optimizer, program) in programs {
        let mut run_options = options.clone();
        run_options.out = options.out.as_ref().map(|out| out.join(optimizer));
        run_options.metrics = None;
        run_options.source = Some(source.clone());
        results.push(run_program(&program, &source.directory(), &run_options, observer));
    }
    Ok(results)
}

/// Writes the overlaid loss curves of a comparison.
pub fn plot_comparison(
    path: &Path,
    optimizers: &[String],
    results: &[Result<RunSummary, RunError>],
    metric: &str,
) -> Result<(), String> {
    let series: Vec<Series> = optimizers
        .iter()
        .zip(results)
        .filter_map(|(name, result)| {
            let summary = result.as_ref().ok()?;
            let points = summary
                .records
                .iter()
                .filter_map(|record| {
                    record.values.iter().find(|(key, _)| key == metric).map(|(_, value)| (record.step as f64, *value))
                })
                .collect();
            Some(Series { name: name.clone(), points })
        })
        .collect();
    plot_series(path, &format!("{metric} by optimizer"), metric, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trainer for `example` (relative to `examples/`) on the reference interpreter, with the
    /// rule updates grouped into multi-parameter kernels or not.
    fn trainer_grouped(example: &str, resident: bool, grouped: bool) -> Trainer<f32> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
        let source = crate::SourceFile::read(&path).unwrap();
        let compilation = crate::compile(source);
        let program = &compilation.analysis.as_ref().unwrap().program;
        let train = select_train(program, None).unwrap();
        let dataset = Dataset::load(&train.data, path.parent().unwrap()).unwrap();
        let mut trainer = Trainer::new(train.clone(), program.rules.clone(), dataset, 7, 100);
        trainer.set_grouped_updates(grouped);
        trainer.set_resident(resident).unwrap();
        trainer
    }

    #[test]
    fn resident_steps_give_the_host_steps_numbers_and_sync_back_to_the_host() {
        // Grouped, the parameters are updated by multi-parameter kernels; ungrouped, each by its
        // own rule's kernels (`update_rule_resident`), which also make the states at step 1.
        for (example, steps, grouped) in [
            ("digits_mlp.curv", 12, true),
            ("optimizers/adan.curv", 6, true),
            ("optimizers/sgd.curv", 5, true),
            ("digits_mlp.curv", 6, false),
            ("optimizers/adopt.curv", 5, false),
        ] {
            let mut host = trainer_grouped(example, false, grouped);
            let mut resident = trainer_grouped(example, true, grouped);
            let mut resident_after = Vec::new();
            for _ in 0..steps {
                let expected = host.train_step().unwrap();
                let got = resident.train_step().unwrap();
                assert_eq!(expected.metrics.loss.to_bits(), got.metrics.loss.to_bits(), "{example} step {}", got.step);
                assert_eq!(expected.skipped, got.skipped);
                resident_after.push(resident.is_resident());
            }
            // Grouped, the first step makes the states on the host; every later one is resident.
            assert_eq!(resident_after[0], !grouped, "{example}: the first step");
            assert!(resident_after[1..].iter().all(|&on| on), "{example}: {resident_after:?}");
            // The digits (one float field, the images) are uploaded whole and every batch is
            // gathered where they are.
            assert_eq!(resident.resident_data_fields(), 1, "{example}");
            assert!(!host.is_resident());
            // An evaluation reads the resident parameters where they are.
            let (expected, got) = (host.evaluate_test().unwrap(), resident.evaluate_test().unwrap());
            assert_eq!(expected.map(|metrics| metrics.loss.to_bits()), got.map(|metrics| metrics.loss.to_bits()));
            resident.sync_to_host().unwrap();
            assert_eq!(host.params, resident.params, "{example}: parameters");
            assert_eq!(host.states, resident.states, "{example}: states");
            // After a sync, the host values are current, and the run goes on resident.
            assert_eq!(resident.is_resident(), resident_after[steps - 1]);
            host.train_step().unwrap();
            resident.train_step().unwrap();
            // Back to host steps, and resident again.
            resident.set_resident(false).unwrap();
            assert!(!resident.is_resident());
            assert_eq!(host.params, resident.params, "{example}: parameters after one more step");
            host.train_step().unwrap();
            resident.train_step().unwrap();
            assert!(!resident.is_resident());
            resident.set_resident(true).unwrap();
            host.train_step().unwrap();
            resident.train_step().unwrap();
            assert!(resident.is_resident());
            resident.sync_to_host().unwrap();
            assert_eq!(host.params, resident.params, "{example}: parameters after the crossings");
            assert_eq!(host.states, resident.states, "{example}: states after the crossings");
        }
    }

    /// Sets `key` of every plan of `structure` (in its options, or in its modifier `modifier`).
    fn set_option(
        trainer: &mut Trainer<f32>,
        structure: curv_ir::StructureKind,
        modifier: Option<&str>,
        key: &str,
        value: curv_ir::OptionValue,
    ) {
        for plan in trainer.program.optimizer.plans.iter_mut().filter(|plan| plan.structure == structure) {
            let options = match modifier {
                None => &mut plan.options,
                Some(name) => match plan.modifiers.iter_mut().find(|modifier| modifier.name == name) {
                    Some(modifier) => &mut modifier.options,
                    None => {
                        plan.modifiers.push(curv_ir::ModifierPlan { name: name.to_string(), options: Vec::new() });
                        &mut plan.modifiers.last_mut().unwrap().options
                    }
                },
            };
            options.retain(|(name, _)| name != key);
            options.push((key.to_string(), value.clone()));
        }
    }

    #[test]
    fn resident_steps_of_the_matrix_and_diagonal_structures_agree_with_the_host_steps() {
        use curv_ir::{OptionValue, StructureKind};
        type Variant = (&'static str, usize, Vec<(StructureKind, Option<&'static str>, &'static str, OptionValue)>);
        let number = OptionValue::Number;
        let name = |text: &str| OptionValue::Name(text.to_string());
        // Muon (orthogonalize + Adam's diagonal), Shampoo (kronecker with Adam grafting + the
        // diagonal), and variants: every option that changes the functions or the host's part.
        let variants: Vec<Variant> = vec![
            ("optimizers/muon.curv", 6, vec![]),
            (
                "optimizers/muon.curv",
                5,
                vec![
                    (StructureKind::Orthogonalize, None, "nesterov", OptionValue::Bool(false)),
                    (StructureKind::Orthogonalize, Some("weight_decay"), "lambda", number(0.1)),
                    (StructureKind::Diagonal, None, "every", number(2.0)),
                    (StructureKind::Diagonal, None, "power", number(0.5)),
                ],
            ),
            // Roots at steps 10 and 20, preconditioned from step 10 on. The preset's `eps = 1e-12`
            // on the digits' factors, exactly singular (some pixels are always zero), makes the
            // roots depend on rounding (eigenvalues of 1e-12 to the power -1/4): the host's and
            // the functions' factors agree to 1e-7, their roots then by 0.8 of the largest. A
            // larger `eps` makes them well conditioned, so that the runs can be compared.
            ("optimizers/shampoo.curv", 22, vec![(StructureKind::Kronecker, None, "eps", number(1e-4))]),
            (
                "optimizers/shampoo.curv",
                8,
                vec![
                    (StructureKind::Kronecker, None, "eps", number(1e-4)),
                    (StructureKind::Kronecker, None, "ema", number(0.95)),
                    (StructureKind::Kronecker, None, "every", number(3.0)),
                    (StructureKind::Kronecker, None, "b1", number(0.0)),
                    (StructureKind::Kronecker, Some("graft"), "kind", name("adagrad")),
                    (StructureKind::Kronecker, Some("weight_decay"), "lambda", number(0.01)),
                ],
            ),
            // K-FAC: statistics and inverses at steps 1, 6 and 11 (the first a host step), its
            // biases folded into their weights' factors, and a variant with them on their own
            // (Adam's diagonal) and statistics every other step.
            ("optimizers/kfac.curv", 12, vec![]),
            (
                "optimizers/kfac.curv",
                7,
                vec![
                    (StructureKind::Kronecker, None, "bias", OptionValue::Bool(false)),
                    (StructureKind::Kronecker, None, "every", number(2.0)),
                    (StructureKind::Kronecker, None, "pi", OptionValue::Bool(false)),
                    (StructureKind::Kronecker, Some("weight_decay"), "lambda", number(0.1)),
                ],
            ),
            // K-FAC on convolutions (stride 1 and 2, padded): the input patches gathered where
            // the capture is; the dense layer's bias folded.
            ("digits_cnn.curv", 12, vec![]),
            // SOAP: bases refreshed at its steps 10 and 20 (steps 11 and 21), and a variant. Its
            // `eps = 1e-8` divides rounding by rounding in the rotated directions of the digits'
            // singular factors (both moments are zero there but for rounding), which makes
            // O(1) differences; `eps = 1e-3` keeps them at the rounding's size.
            ("optimizers/soap.curv", 23, vec![(StructureKind::Kronecker, None, "eps", number(1e-3))]),
            (
                "optimizers/soap.curv",
                9,
                vec![
                    (StructureKind::Kronecker, None, "eps", number(1e-3)),
                    (StructureKind::Kronecker, None, "every", number(3.0)),
                    (StructureKind::Kronecker, None, "ema", number(0.5)),
                    (StructureKind::Kronecker, Some("weight_decay"), "lambda", number(0.1)),
                ],
            ),
            (
                "optimizers/shampoo.curv",
                7,
                vec![
                    (StructureKind::Kronecker, None, "eps", number(1e-4)),
                    (StructureKind::Kronecker, None, "every", number(2.0)),
                    (StructureKind::Kronecker, None, "function", name("newton")),
                    (StructureKind::Kronecker, Some("graft"), "kind", name("sgd")),
                ],
            ),
        ];
        for (example, steps, changes) in variants {
            let mut host = trainer_grouped(example, false, true);
            let mut resident = trainer_grouped(example, true, true);
            for trainer in [&mut host, &mut resident] {
                for (structure, modifier, key, value) in &changes {
                    set_option(trainer, *structure, *modifier, key, value.clone());
                }
            }
            let mut resident_after = Vec::new();
            for _ in 0..steps {
                let expected = host.train_step().unwrap();
                let got = resident.train_step().unwrap();
                let step = got.step;
                let loss_difference = (expected.metrics.loss - got.metrics.loss).abs();
                assert!(loss_difference <= 1e-4 * expected.metrics.loss.abs(), "{example} {changes:?} step {step}");
                resident_after.push(resident.is_resident());
            }
            // The first step makes the states on the host; every later one is resident.
            assert!(!resident_after[0], "{example}");
            assert!(resident_after[1..].iter().all(|&on| on), "{example} {changes:?}: {resident_after:?}");
            resident.sync_to_host().unwrap();
            // The same numbers to rounding: the host computes some scalars in double precision
            // and its products in another order. (Measured: parameters within 3e-6 of their
            // largest element, Shampoo's roots within 6e-5.)
            let close = |expected: &[f32], got: &[f32]| {
                let scale = expected.iter().fold(0.0f32, |largest, value| largest.max(value.abs())).max(1e-3);
                expected.iter().zip(got).map(|(a, b)| (a - b).abs() / scale).fold(0.0f32, f32::max)
            };
            for (index, (expected, got)) in host.params.iter().zip(&resident.params).enumerate() {
                assert_eq!(expected.shape, got.shape);
                let error = close(&expected.data, &got.data);
                assert!(error < 2e-4, "{example} {changes:?}: parameter {index} differs by {error} of its largest");
            }
            for (index, (expected, got)) in host.states.iter().zip(&resident.states).enumerate() {
                let names = |state: &curv_runtime::optimizer::ParamState<f32>| {
                    let mut names: Vec<String> = state.iter().map(|(name, _)| name.clone()).collect();
                    names.sort();
                    names
                };
                assert_eq!(names(expected), names(got), "{example}: the states of parameter {index}");
                for (state_name, tensor) in expected {
                    let other = curv_runtime::optimizer::state_get(got, state_name).unwrap();
                    assert_eq!(tensor.shape, other.shape, "{example}: `{state_name}` of parameter {index}");
                    if state_name.ends_with("_basis") {
                        // SOAP's bases: columns of equal or nearly equal eigenvalues (the digits'
                        // factors are singular) are defined only up to rounding, in sign, order
                        // and rotation, which the direction does not see (measured: the bases
                        // differ by up to 1.2 of their largest element, the parameters by 1e-4).
                        // They must be orthogonal.
                        let n = (other.data.len() as f64).sqrt() as usize;
                        for (i, j) in (0..n).flat_map(|i| (0..n).map(move |j| (i, j))) {
                            let dot: f32 = (0..n).map(|k| other.data[k * n + i] * other.data[k * n + j]).sum();
                            let identity = if i == j { 1.0 } else { 0.0 };
                            assert!((dot - identity).abs() < 1e-3, "{example}: `{state_name}` is not orthogonal");
                        }
                        continue;
                    }
                    let error = close(&tensor.data, &other.data);
                    assert!(error < 2e-4, "{example} {changes:?}: `{state_name}` of parameter {index}: {error}");
                }
            }
        }
    }

    #[test]
    fn a_resident_step_that_goes_non_finite_reports_and_rolls_back_as_a_host_step_does() {
        for (policy, grouped) in
            [(NonFinitePolicy::Skip, true), (NonFinitePolicy::Stop, true), (NonFinitePolicy::Skip, false)]
        {
            let mut host = trainer_grouped("digits_mlp.curv", false, grouped);
            let mut resident = trainer_grouped("digits_mlp.curv", true, grouped);
            for trainer in [&mut host, &mut resident] {
                trainer.policy = policy;
                trainer.train_step().unwrap();
                trainer.train_step().unwrap();
                // A learning rate beyond f32's range: the update is infinite.
                trainer.program.optimizer.lr = 1e39;
            }
            assert!(resident.is_resident());
            let (expected, got) = (host.train_step(), resident.train_step());
            match (&expected, &got) {
                (Ok(expected), Ok(got)) => {
                    assert_eq!(expected.skipped, got.skipped);
                    assert!(
                        got.skipped.as_deref().is_some_and(|what| what.contains("not finite at flat index")),
                        "{got:?}"
                    );
                }
                (Err(expected), Err(got)) => assert_eq!(expected.to_string(), got.to_string()),
                _ => panic!("{expected:?} against {got:?}"),
            }
            assert_eq!(host.step, resident.step);
            resident.sync_to_host().unwrap();
            assert_eq!(host.params, resident.params, "the parameters are those before the step");
            assert_eq!(host.states, resident.states, "the states are those before the step");
        }
    }

    #[test]
    fn a_rule_function_is_located_in_its_module_and_every_other_in_the_users_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/digits_mlp.curv");
        let source = crate::SourceFile::read(&path).unwrap();
        let compilation = crate::compile(source.clone());
        let program = &compilation.analysis.as_ref().unwrap().program;
        let rule = &program.rules.iter().find(|rule| rule.name == "adam").unwrap();
        assert_eq!(rule.module.as_deref(), Some("std.optimizers.adam"));
        let locate = source_locator(program, source.clone());
        // The first byte of the user's file's second line.
        let second_line = source.text.find('\n').unwrap() + 1;
        assert_eq!(locate("loss_and_gradients", second_line), format!("{:?}:2:1", source.display_name));
        let (_, adam) = curv_sema::std_lib::MODULES[curv_sema::std_lib::find("std.optimizers.adam").unwrap()];
        let offset = adam.find('\n').unwrap() + 1;
        assert_eq!(locate("rule adam block 0 4096", offset), "\"std.optimizers.adam\":2:1");
        // A key naming no rule of the program is located in the user's file.
        assert_eq!(locate("rule other init 4", second_line), format!("{:?}:2:1", source.display_name));
    }
}
