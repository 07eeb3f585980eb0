//! Finite-difference checks (f64) of the autodiff transforms on programs that together use every
//! differentiable op: gradients, Hessian-vector products, Gauss-Newton-vector products, the
//! JVP/VJP dot-product identity, and the K-FAC captures against an explicit computation.

use curv_ad::products::{ggn_program, gradient_program, hvp_program, param_values};
use curv_interp::{evaluate, Inputs, Tensor, Value};
use curv_ir::{Dim, Function, TrainProgram};

/// A small deterministic generator (SplitMix64) so the tests need no dependency.
struct Random(u64);

impl Random {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [low, high).
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

const PREAMBLE: &str = "data digits = csv(\"digits.csv\", label = \"label\")\ndata pic = image(\"pic.png\")\n";

/// Compiles a program against the in-memory probe (digits: x f32[100, 64], y i32[100] in 0..10;
/// pic: coords f32[64, 2], values f32[64, 1]).
fn compile(body: &str) -> TrainProgram {
    let text = format!("{PREAMBLE}{body}");
    let source = curv_driver::SourceFile::in_memory("gradcheck.curv", &text, std::path::Path::new("/nonexistent"));
    let compilation = curv_driver::compile_with_probe(source, &mut curv_driver::fuzzing::MemoryProbe);
    let rendered = curv_driver::render_diagnostics(&compilation, false);
    assert!(!compilation.has_errors(), "{rendered}");
    compilation.analysis.unwrap().program.trains.into_iter().next().expect("a train block")
}

fn known(shape: &[Dim]) -> Vec<usize> {
    shape
        .iter()
        .map(|dim| match dim {
            Dim::Known(size) => *size as usize,
            Dim::Symbol(name) => panic!("symbolic dimension {name}"),
        })
        .collect()
}

fn random_tensor(random: &mut Random, shape: Vec<usize>, scale: f64) -> Tensor<f64> {
    let count = shape.iter().product();
    Tensor::new(shape, (0..count).map(|_| random.uniform(-scale, scale)).collect())
}

/// Random parameters and a random data batch for the program.
fn random_inputs(program: &TrainProgram, seed: u64) -> Inputs<'static, f64> {
    let mut random = Random(seed);
    let mut inputs = Inputs::default();
    for param in &program.params {
        inputs.params.push(random_tensor(&mut random, known(&param.ty.shape), 0.5));
    }
    for inst in &program.loss.insts {
        if let curv_ir::Op::Data { source, field } = &inst.op {
            let shape = known(&inst.ty.shape);
            let value = if inst.ty.dtype == curv_ir::DType::I32 {
                let count = shape.iter().product();
                Value::Int(Tensor::new(shape, (0..count).map(|_| (random.next_u64() % 10) as i32).collect()))
            } else {
                Value::Real(random_tensor(&mut random, shape, 1.0))
            };
            inputs.data.insert((source.clone(), field.clone()), value);
        }
    }
    inputs
}

fn output(function: &Function, values: &[Value<f64>], name: &str) -> Tensor<f64> {
    let id = function.output(name).unwrap_or_else(|| panic!("no output {name}"));
    values[id.0 as usize].as_real().unwrap().clone()
}

fn loss_at(program: &TrainProgram, inputs: &Inputs<f64>) -> f64 {
    let values = evaluate(&program.loss, inputs).unwrap();
    output(&program.loss, &values, "loss").data[0]
}

fn relative_error(a: f64, b: f64) -> f64 {
    (a - b).abs() / (a.abs().max(b.abs()).max(1e-2))
}

/// The central-difference gradient of the loss agrees with reverse mode for every parameter.
fn check_gradient(program: &TrainProgram, seed: u64, tolerance: f64) {
    let inputs = random_inputs(program, seed);
    let gradients = gradient_program(&program.loss, &program.params);
    let values = evaluate(&gradients.function, &inputs).unwrap();
    let step = 1e-6;
    let mut random = Random(seed ^ 0xABCD);
    for (param_index, param) in program.params.iter().enumerate() {
        let gradient = output(&gradients.function, &values, &format!("grad.{}", param.name));
        // A handful of random coordinates per parameter keeps the test fast.
        for _ in 0..6 {
            let coordinate = (random.next_u64() % gradient.len() as u64) as usize;
            let mut plus = inputs.clone();
            plus.params[param_index].data[coordinate] += step;
            let mut minus = inputs.clone();
            minus.params[param_index].data[coordinate] -= step;
            let numeric = (loss_at(program, &plus) - loss_at(program, &minus)) / (2.0 * step);
            let analytic = gradient.data[coordinate];
            assert!(
                relative_error(numeric, analytic) < tolerance,
                "{}[{coordinate}]: finite differences {numeric}, autodiff {analytic}",
                param.name
            );
        }
    }
}

fn tangent_inputs<'a>(
    program: &TrainProgram,
    inputs: &Inputs<'a, f64>,
    seed: u64,
) -> (Inputs<'a, f64>, Vec<Tensor<f64>>) {
    let mut random = Random(seed);
    let tangents: Vec<Tensor<f64>> =
        program.params.iter().map(|param| random_tensor(&mut random, known(&param.ty.shape), 1.0)).collect();
    let mut extended = inputs.clone();
    extended.inputs = tangents.iter().cloned().map(Value::Real).collect();
    (extended, tangents)
}

/// The HVP agrees with central differences of the gradient along the same tangent.
fn check_hessian_vector_product(program: &TrainProgram, seed: u64, tolerance: f64) {
    let inputs = random_inputs(program, seed);
    let hvp = hvp_program(&program.loss, &program.params);
    let (extended, tangents) = tangent_inputs(program, &inputs, seed + 1);
    let values = evaluate(&hvp, &extended).unwrap();
    let gradients = gradient_program(&program.loss, &program.params).function;
    let step = 1e-5;
    let shifted = |sign: f64| {
        let mut shifted = inputs.clone();
        for (param, tangent) in shifted.params.iter_mut().zip(&tangents) {
            for (value, direction) in param.data.iter_mut().zip(&tangent.data) {
                *value += sign * step * direction;
            }
        }
        evaluate(&gradients, &shifted).unwrap()
    };
    let (plus, minus) = (shifted(1.0), shifted(-1.0));
    for param in &program.params {
        let name = format!("grad.{}", param.name);
        let numeric: Vec<f64> = output(&gradients, &plus, &name)
            .data
            .iter()
            .zip(&output(&gradients, &minus, &name).data)
            .map(|(a, b)| (a - b) / (2.0 * step))
            .collect();
        let analytic = output(&hvp, &values, &format!("hvp.{}", param.name));
        for (coordinate, (numeric, analytic)) in numeric.iter().zip(&analytic.data).enumerate() {
            assert!(
                relative_error(*numeric, *analytic) < tolerance,
                "hvp {}[{coordinate}]: {numeric} vs {analytic}",
                param.name
            );
        }
    }
}

fn dot(left: &[Tensor<f64>], right: &[Tensor<f64>]) -> f64 {
    left.iter().zip(right).map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum::<f64>()).sum()
}

const MLP: &str = "
model mlp(x: f32[B, 64]) -> f32[B, 10] {
    param w1: f32[64, 16] = glorot_uniform
    param b1: f32[16] = zeros
    param w2: f32[16, 10] = glorot_uniform
    param b2: f32[10] = zeros
    return tanh(x @ w1 + b1) @ w2 + b2
}
train t {
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer o
    batch 8
    steps 1
}
optimizer o {
    lr 0.1
    * : diagonal
}
";

/// Programs that together exercise every differentiable op of the IR.
fn programs() -> Vec<(&'static str, String)> {
    let optimizer = "optimizer o {\n    lr 0.1\n    * : diagonal\n}\n";
    let train =
        |loss: &str| format!("train t {{\n    loss {loss}\n    optimizer o\n    batch 8\n    steps 1\n}}\n{optimizer}");
    vec![
        ("mlp_tanh_cross_entropy", MLP.to_string()),
        (
            "siren_sin_mse",
            format!(
                "model s(x: f32[N, 2]) -> f32[N, 1] {{\n    param w0: f32[2, 8] = glorot_uniform\n    param b0: f32[8] = zeros\n    param w1: f32[8, 1] = glorot_uniform\n    return sin(3 * (x @ w0 + b0)) @ w1\n}}\n{}",
                train("mse(s(pic.coords), pic.values)")
            ),
        ),
        (
            "elementwise_zoo",
            format!(
                "model m(x: f32[B, 64]) -> f32[B, 10] {{\n    param w: f32[64, 10] = glorot_uniform\n    param c: f32[10] = ones\n    let z = x @ w\n    let positive = softplus(z) + 0.1\n    return sigmoid(z) * exp(0.1 * z) + log(positive) - sqrt(positive) / (1 + square(c)) + gelu(z) + relu(z) * c ^ 2 + max(z, 0.3 * c) - min(z, c) + cos(z) * abs(c)\n}}\n{}",
                train("cross_entropy(m(digits.x), digits.y)")
            ),
        ),
        (
            "layer_norm_softmax_attention",
            format!(
                "model m(x: f32[B, 64]) -> f32[B, 10] {{\n    param w: f32[64, 16] = glorot_uniform\n    param v: f32[16, 10] = glorot_uniform\n    param gamma: f32[16] = ones\n    let h = layer_norm(x @ w) * gamma\n    let scores = softmax(h @ transpose(h) / 4 + causal_mask(h @ transpose(h)))\n    return log_softmax((scores @ h) @ v) + reshape(amax(h, axis = 1) * 0.1 + sum(h, axis = 1), [B, 1])\n}}\n{}",
                train("cross_entropy(m(digits.x), digits.y)")
            ),
        ),
        (
            "conv_embedding_slices",
            format!(
                "model m(x: f32[B, 64], y: i32[B]) -> f32[B, 10] {{\n    param k: f32[3, 1, 3, 3] = he_normal\n    param table: f32[10, 12] = normal(0, 1)\n    param w: f32[60, 10] = glorot_uniform\n    let images = reshape(x, [B, 1, 8, 8])\n    let features = tanh(conv2d(images, k, stride = 2, padding = 1))\n    let flat = reshape(features, [B, 48])\n    let embedded = embedding(table, y)\n    let joined = flat[:, 0:48] * mean(embedded[:, 0:12]) + 0\n    return reshape(transpose(reshape(joined, [B, 6, 8]), [0, 2, 1]), [B, 48]) @ w[0:48, :] + embedded @ w[48:60, :]\n}}\n{}",
                train("cross_entropy(m(digits.x, digits.y), digits.y) + 0.1 * mean(square(digits.x[:, 3]))")
            ),
        ),
    ]
}

#[test]
fn gradients_match_finite_differences() {
    for (name, body) in programs() {
        let program = compile(&body);
        for seed in [1, 2] {
            std::panic::catch_unwind(|| check_gradient(&program, seed, 1e-6))
                .unwrap_or_else(|_| panic!("{name} (seed {seed})"));
        }
    }
}

#[test]
fn hessian_vector_products_match_finite_differences_of_gradients() {
    for (name, body) in programs() {
        let program = compile(&body);
        std::panic::catch_unwind(|| check_hessian_vector_product(&program, 3, 1e-5))
            .unwrap_or_else(|_| panic!("{name}"));
    }
}

#[test]
fn vjp_and_jvp_satisfy_the_dot_product_identity() {
    // <u, J v> = <J^T u, v> for the Jacobian of the logits with respect to the parameters.
    let program = compile(MLP);
    let inputs = random_inputs(&program, 5);
    let logits = program.loss.output("logits").unwrap();
    let param_ids: Vec<_> = param_values(&program.loss, program.params.len()).into_iter().flatten().collect();
    let mut function = program.loss.clone();
    let logits_ty = function.ty(logits).clone();
    let u =
        function.push(curv_ir::Op::Input { index: 0, name: "u".into() }, vec![], logits_ty.clone(), Default::default());
    let reverse = curv_ad::vjp(&function, logits, &param_ids, curv_ad::Seed::Value(u));
    let mut function = reverse.function;
    let tangents: Vec<_> = program
        .params
        .iter()
        .enumerate()
        .map(|(index, param)| {
            function.push(
                curv_ir::Op::Input { index: index + 1, name: param.name.clone() },
                vec![],
                param.ty.clone(),
                Default::default(),
            )
        })
        .collect();
    let seeds: Vec<_> = param_ids.iter().copied().zip(tangents.iter().copied()).collect();
    let forward = curv_ad::jvp(&function, &seeds);
    let mut random = Random(9);
    let u_value = random_tensor(&mut random, known(&logits_ty.shape), 1.0);
    let v_values: Vec<Tensor<f64>> =
        program.params.iter().map(|param| random_tensor(&mut random, known(&param.ty.shape), 1.0)).collect();
    let mut extended = inputs.clone();
    extended.inputs = std::iter::once(u_value.clone()).chain(v_values.iter().cloned()).map(Value::Real).collect();
    let values = evaluate(&forward.function, &extended).unwrap();
    let jv = values[forward.tangents[&logits].0 as usize].as_real().unwrap().clone();
    let jtu: Vec<Tensor<f64>> =
        reverse.cotangents.iter().map(|id| values[id.unwrap().0 as usize].as_real().unwrap().clone()).collect();
    let left = dot(&[u_value], &[jv]);
    let right = dot(&jtu, &v_values);
    assert!(relative_error(left, right) < 1e-12, "<u, Jv> = {left}, <J^T u, v> = {right}");
}

#[test]
fn gauss_newton_products_equal_hessian_products_for_a_linear_model_and_are_psd() {
    // For a model linear in its parameters the Gauss-Newton matrix is the Hessian.
    let linear = "model lin(x: f32[B, 64]) -> f32[B, 10] {\n    param w: f32[64, 10] = glorot_uniform\n    param b: f32[10] = zeros\n    return x @ w + b\n}\ntrain t {\n    loss cross_entropy(lin(digits.x), digits.y)\n    optimizer o\n    batch 8\n    steps 1\n}\noptimizer o {\n    lr 0.1\n    * : diagonal\n}\n";
    for body in [linear.to_string(), MLP.to_string()] {
        let program = compile(&body);
        let inputs = random_inputs(&program, 11);
        let ggn = ggn_program(&program.loss, &program.params, "logits").expect("cross-entropy programs have logits");
        let hvp = hvp_program(&program.loss, &program.params);
        let (extended, tangents) = tangent_inputs(&program, &inputs, 12);
        let ggn_values = evaluate(&ggn, &extended).unwrap();
        let products: Vec<Tensor<f64>> =
            program.params.iter().map(|param| output(&ggn, &ggn_values, &format!("ggn.{}", param.name))).collect();
        // v^T G v >= 0: the Gauss-Newton matrix of a convex loss is positive semi-definite.
        assert!(dot(&tangents, &products) >= -1e-12);
        if body == linear {
            let hvp_values = evaluate(&hvp, &extended).unwrap();
            for (param, product) in program.params.iter().zip(&products) {
                let hessian_product = output(&hvp, &hvp_values, &format!("hvp.{}", param.name));
                for (a, b) in product.data.iter().zip(&hessian_product.data) {
                    assert!(relative_error(*a, *b) < 1e-10, "{}: ggn {a} vs hvp {b}", param.name);
                }
            }
        }
        // Symmetry: u^T G v = v^T G u.
        let (other_inputs, other_tangents) = tangent_inputs(&program, &inputs, 13);
        let other_values = evaluate(&ggn, &other_inputs).unwrap();
        let other_products: Vec<Tensor<f64>> =
            program.params.iter().map(|param| output(&ggn, &other_values, &format!("ggn.{}", param.name))).collect();
        assert!(relative_error(dot(&other_tangents, &products), dot(&tangents, &other_products)) < 1e-10);
    }
}

#[test]
fn kfac_captures_give_the_weight_gradient_as_input_times_output_cotangent() {
    let program = compile(MLP);
    let inputs = random_inputs(&program, 21);
    let gradients = gradient_program(&program.loss, &program.params);
    assert_eq!(gradients.layer_captures.len(), 2, "w1 and w2 are used as x @ W");
    let values = evaluate(&gradients.function, &inputs).unwrap();
    for capture in &gradients.layer_captures {
        let activations = values[capture.input.0 as usize].as_real().unwrap();
        let cotangent = values[capture.output_cotangent.0 as usize].as_real().unwrap();
        let explicit = curv_interp::matmul(&curv_interp::transpose(activations, &[1, 0]), cotangent).unwrap();
        let name = &program.params[capture.param].name;
        let gradient = output(&gradients.function, &values, &format!("grad.{name}"));
        for (a, b) in explicit.data.iter().zip(&gradient.data) {
            assert!(relative_error(*a, *b) < 1e-12, "{name}: a^T g = {a}, gradient {b}");
        }
    }
    // A convolution kernel is captured with its input and output cotangent, from which its
    // gradient is the kernel-gradient correlation.
    let (_, body) = programs().into_iter().find(|(name, _)| *name == "conv_embedding_slices").unwrap();
    let program = compile(&body);
    let inputs = random_inputs(&program, 22);
    let gradients = gradient_program(&program.loss, &program.params);
    let values = evaluate(&gradients.function, &inputs).unwrap();
    let capture = gradients
        .layer_captures
        .iter()
        .find(|capture| program.params[capture.param].name == "k")
        .expect("the kernel is captured");
    let curv_ad::LayerKind::Conv2d { stride, padding } = capture.kind else { panic!("not a convolution capture") };
    let input = values[capture.input.0 as usize].as_real().unwrap();
    let cotangent = values[capture.output_cotangent.0 as usize].as_real().unwrap();
    let gradient = output(&gradients.function, &values, "grad.k");
    let explicit =
        curv_interp::conv2d_kernel_gradient(input, cotangent, &gradient.shape, stride as usize, padding as usize);
    for (a, b) in explicit.data.iter().zip(&gradient.data) {
        assert!(relative_error(*a, *b) < 1e-12, "k: {a} vs {b}");
    }
}

#[test]
fn gradients_hvps_and_ggn_products_hold_on_random_shapes() {
    // Random widths, batch sizes and activations; each program is checked like the fixed ones.
    let mut random = Random(77);
    let activations = ["tanh", "sin", "sigmoid", "softplus"];
    for case in 0..6 {
        let hidden = 2 + (random.next_u64() % 9) as usize;
        let batch = 1 + (random.next_u64() % 12) as usize;
        let activation = activations[(random.next_u64() % activations.len() as u64) as usize];
        let body = format!(
            "model m(x: f32[B, 64]) -> f32[B, 10] {{\n    param w1: f32[64, {hidden}] = glorot_uniform\n    param b1: f32[{hidden}] = zeros\n    param w2: f32[{hidden}, 10] = glorot_uniform\n    return {activation}(x @ w1 + b1) @ w2\n}}\ntrain t {{\n    loss cross_entropy(m(digits.x), digits.y)\n    optimizer o\n    batch {batch}\n    steps 1\n}}\noptimizer o {{\n    lr 0.1\n    * : diagonal\n}}\n"
        );
        let program = compile(&body);
        let label = format!("case {case}: hidden {hidden}, batch {batch}, {activation}");
        std::panic::catch_unwind(|| check_gradient(&program, 100 + case, 1e-6))
            .unwrap_or_else(|_| panic!("gradient, {label}"));
        std::panic::catch_unwind(|| check_hessian_vector_product(&program, 200 + case, 1e-5))
            .unwrap_or_else(|_| panic!("hvp, {label}"));
        let inputs = random_inputs(&program, 300 + case);
        let ggn = ggn_program(&program.loss, &program.params, "logits").unwrap();
        let (extended, tangents) = tangent_inputs(&program, &inputs, 400 + case);
        let values = evaluate(&ggn, &extended).unwrap();
        let products: Vec<Tensor<f64>> =
            program.params.iter().map(|param| output(&ggn, &values, &format!("ggn.{}", param.name))).collect();
        assert!(dot(&tangents, &products) >= -1e-12, "GGN not PSD, {label}");
    }
}
