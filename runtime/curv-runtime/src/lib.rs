//! `curv-runtime` owns training: loading data sets and cutting them into seeded batches,
//! initialising parameters, executing optimizer plans (interpreted `rule`s, the native `diagonal`
//! and `factored` structures, the matrix structures `kronecker` and `orthogonalize` in
//! [`kronecker`], with Hutchinson, sampled-label and K-FAC statistics), the training loop with its
//! non-finite checks, metrics, checkpoints in safetensors and metric plots.
//!
//! Randomness is counter-based (see [`random`]): batches, probes and sampled labels are pure
//! functions of the seed and the step, which is what makes `--resume` continue bit for bit.

pub mod adafisher;
pub mod backend;
pub mod checkpoint;
pub mod compiled;
pub mod data_check;
pub mod dataset;
pub mod error;
pub mod gemm;
pub mod init;
pub mod kronecker;
pub mod linalg;
pub mod lowrank;
pub mod mkor;
pub mod newton;
pub mod optimizer;
pub mod plot;
pub mod psgd;
pub mod random;
pub mod schedule;
pub mod shampoo4bit;
pub mod singd;
pub mod structure_kernels;
pub mod trainer;

pub use backend::{Backend, Interpreter};
pub use checkpoint::Checkpoint;
pub use dataset::Dataset;
pub use error::{Error, ErrorCode};
pub use trainer::{first_non_finite, Metrics, NonFinitePolicy, StepReport, TrainError, Trainer};
