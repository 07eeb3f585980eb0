//! Data sets in memory: loading through `curv-data`, the seeded train/test split, and batches
//! that are a pure function of the step (so a resumed run sees the same batches).

use crate::random::{Random, Stream};
use curv_data::{FieldData, LoadedData};
use curv_interp::{Real, Tensor, Value};
use curv_ir::DataInfo;
use std::collections::HashMap;
use std::path::Path;

/// One loaded field with its per-example shape.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    /// The shape of one example (the full shape without its leading dimension).
    pub example_shape: Vec<usize>,
    pub data: FieldData,
}

impl Field {
    /// The values of every example, in example order, for a floating-point field.
    pub fn f32_values(&self) -> Option<&[f32]> {
        match &self.data {
            FieldData::F32(values) => Some(values),
            FieldData::I32(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub fields: Vec<Field>,
    pub examples: usize,
    /// Example indices of the training split, in their fixed order.
    pub train: Vec<usize>,
    /// Example indices of the test split.
    pub test: Vec<usize>,
}

fn option(info: &DataInfo, key: &str, default: f64) -> f64 {
    info.options.iter().find(|(name, _)| name == key).map_or(default, |(_, value)| *value)
}

impl Dataset {
    /// Loads the data set a train program reads, resolving paths against `directory`.
    pub fn load(info: &DataInfo, directory: &Path) -> Result<Dataset, String> {
        let path_of = |key: &str| -> Result<std::path::PathBuf, String> {
            info.paths
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, path)| directory.join(path))
                .ok_or_else(|| format!("data `{}` has no `{key}` path", info.name))
        };
        let scale = option(info, "scale", 1.0) as f32;
        let loaded: LoadedData = match info.kind.as_str() {
            "csv" => curv_data::load_csv_data(&path_of("path")?, info.label.as_deref(), scale)
                .map_err(|error| error.to_string())?,
            "image" => curv_data::load_image(&path_of("path")?).map_err(|error| error.to_string())?,
            "idx" => {
                curv_data::load_idx(&path_of("images")?, &path_of("labels")?, option(info, "scale", 1.0 / 255.0) as f32)
                    .map_err(|error| error.to_string())?
            }
            "npy" => {
                let mut fields = Vec::new();
                let mut examples = 0;
                for key in ["x", "y"] {
                    let Ok(path) = path_of(key) else { continue };
                    let (shape, data) = curv_data::load_npy(&path).map_err(|error| error.to_string())?;
                    let data = match (key, data) {
                        // Features are always floats, as the checker typed them.
                        ("x", FieldData::I32(values)) => {
                            FieldData::F32(values.into_iter().map(|value| value as f32).collect())
                        }
                        (_, data) => data,
                    };
                    examples = shape.first().copied().unwrap_or(0);
                    fields.push(curv_data::LoadedField { name: key.to_string(), shape, data });
                }
                LoadedData { fields, examples }
            }
            other => return Err(format!("unknown data source `{other}`")),
        };
        if loaded.examples as i64 != info.examples {
            return Err(format!(
                "data `{}` changed since it was checked: {} examples instead of {}",
                info.name, loaded.examples, info.examples
            ));
        }
        let fields = loaded
            .fields
            .into_iter()
            .map(|field| Field { name: field.name, example_shape: field.shape[1..].to_vec(), data: field.data })
            .collect();
        let split_seed = option(info, "seed", 0.0) as u64;
        let order = Random::new(split_seed, Stream::Split, 0).permutation(loaded.examples);
        let test_count = info.test_examples.max(0) as usize;
        let mut test: Vec<usize> = order[..test_count].to_vec();
        let mut train: Vec<usize> = order[test_count..].to_vec();
        test.sort_unstable();
        train.sort_unstable();
        Ok(Dataset { name: info.name.clone(), fields, examples: loaded.examples, train, test })
    }

    /// The training examples of step `step` (1-based): the epoch's seeded permutation of the
    /// training split, cut into full batches. `batch == train.len()` gives the whole split in order.
    pub fn batch_indices(&self, step: u64, batch: usize, seed: u64) -> Vec<usize> {
        let count = self.train.len();
        if batch >= count {
            return self.train.clone();
        }
        let steps_per_epoch = (count / batch) as u64;
        let epoch = (step - 1) / steps_per_epoch;
        let offset = ((step - 1) % steps_per_epoch) as usize * batch;
        let order = Random::new(seed, Stream::Shuffle, epoch).permutation(count);
        order[offset..offset + batch].iter().map(|&position| self.train[position]).collect()
    }

    /// The fields of the given examples as interpreter values, keyed like `Op::Data`.
    pub fn gather<T: Real>(&self, examples: &[usize]) -> HashMap<(String, String), Value<T>> {
        self.gather_fields(examples, |_| true)
    }

    /// [`Dataset::gather`] of the fields `wanted` selects.
    pub fn gather_fields<T: Real>(
        &self,
        examples: &[usize],
        wanted: impl Fn(&Field) -> bool,
    ) -> HashMap<(String, String), Value<T>> {
        let mut values = HashMap::new();
        for field in self.fields.iter().filter(|field| wanted(field)) {
            let width: usize = field.example_shape.iter().product();
            let mut shape = vec![examples.len()];
            shape.extend(&field.example_shape);
            let value = match &field.data {
                FieldData::F32(data) => {
                    let mut rows = Vec::with_capacity(examples.len() * width);
                    for &example in examples {
                        rows.extend(
                            data[example * width..(example + 1) * width].iter().map(|&x| T::from_f64(x as f64)),
                        );
                    }
                    Value::Real(Tensor::new(shape, rows))
                }
                FieldData::I32(data) => {
                    let mut rows = Vec::with_capacity(examples.len() * width);
                    for &example in examples {
                        rows.extend_from_slice(&data[example * width..(example + 1) * width]);
                    }
                    Value::Int(Tensor::new(shape, rows))
                }
            };
            values.insert((self.name.clone(), field.name.clone()), value);
        }
        values
    }
}
