//! Parameter initialisation. Fan-in and fan-out follow PyTorch's conventions for a parameter used
//! as `x @ W` (`W: [fan_in, fan_out]`) and for OIHW convolution kernels.

use crate::random::{Random, Stream};
use curv_interp::{Real, Tensor};
use curv_ir::{Init, ParamInfo};

fn fans(shape: &[usize]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f64, *n as f64),
        [rows, columns] => (*rows as f64, *columns as f64),
        [outputs, inputs, rest @ ..] => {
            let receptive: usize = rest.iter().product();
            ((inputs * receptive) as f64, (outputs * receptive) as f64)
        }
    }
}

/// The initial value of parameter `index`, drawn from its own random stream.
pub fn initialise<T: Real>(param: &ParamInfo, shape: &[usize], seed: u64, index: usize) -> Tensor<T> {
    let mut random = Random::new(seed, Stream::Init, index as u64);
    let count: usize = shape.iter().product();
    let (fan_in, fan_out) = fans(shape);
    let mut draw = |make: &mut dyn FnMut(&mut Random) -> f64| -> Vec<T> {
        (0..count).map(|_| T::from_f64(make(&mut random))).collect()
    };
    let data = match &param.init {
        Init::Zeros => vec![T::zero(); count],
        Init::Ones => vec![T::one(); count],
        Init::Constant(value) => vec![T::from_f64(*value); count],
        Init::Uniform { low, high } => draw(&mut |random| random.uniform_in(*low, *high)),
        Init::Normal { mean, std } => draw(&mut |random| mean + std * random.normal()),
        Init::GlorotUniform => {
            let limit = (6.0 / (fan_in + fan_out)).sqrt();
            draw(&mut |random| random.uniform_in(-limit, limit))
        }
        Init::GlorotNormal => {
            let std = (2.0 / (fan_in + fan_out)).sqrt();
            draw(&mut |random| std * random.normal())
        }
        Init::HeNormal => {
            let std = (2.0 / fan_in).sqrt();
            draw(&mut |random| std * random.normal())
        }
        Init::HeUniform => {
            let limit = (6.0 / fan_in).sqrt();
            draw(&mut |random| random.uniform_in(-limit, limit))
        }
        Init::SirenUniform { omega, first } => {
            let limit = if *first { 1.0 / fan_in } else { (6.0 / fan_in).sqrt() / omega };
            draw(&mut |random| random.uniform_in(-limit, limit))
        }
    };
    Tensor::new(shape.to_vec(), data)
}
