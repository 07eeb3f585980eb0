//! The scalar arithmetic of kernel bodies: each IR unary and binary op as `arith` and `math`
//! instructions inside a `linalg.generic`, with `exp`, `tanh`, `sin` and `cos` in single precision
//! written out (no library call, so that LLVM vectorises the loops around them).

use super::*;

pub(super) fn element_of_type(ty: &str) -> String {
    ty.rsplit('x').next().unwrap_or("f32").trim_start_matches("tensor<").trim_end_matches('>').to_string()
}

/// Appends the scalar instruction `%sN = text` to a kernel body and returns its name `%sN`.
pub(super) fn emit(lines: &mut Vec<String>, text: String) -> String {
    let name = format!("%s{}", lines.len());
    lines.push(format!("{name} = {text}"));
    name
}

/// Appends an `f32` constant to a kernel body and returns its name.
pub(super) fn constant(lines: &mut Vec<String>, value: f64) -> String {
    emit(lines, format!("arith.constant {} : f32", float_literal(value)))
}

/// The scalar instructions of a unary op applied to `x` of element type `ty`.
pub(super) fn unary_body(op: UnaryOp, x: &str, ty: &str, lines: &mut Vec<String>) -> String {
    match op {
        UnaryOp::Neg => emit(lines, format!("arith.negf {x} : {ty}")),
        UnaryOp::Sin if ty == "f32" => sine_f32(x, 0, lines),
        UnaryOp::Cos if ty == "f32" => sine_f32(x, 1, lines),
        UnaryOp::Sin => emit(lines, format!("math.sin {x} : {ty}")),
        UnaryOp::Cos => emit(lines, format!("math.cos {x} : {ty}")),
        UnaryOp::Tanh if ty == "f32" => tanh_f32(x, lines),
        UnaryOp::Exp if ty == "f32" => exp_f32(x, lines),
        UnaryOp::Tanh => emit(lines, format!("math.tanh {x} : {ty}")),
        UnaryOp::Exp => emit(lines, format!("math.exp {x} : {ty}")),
        UnaryOp::Log => emit(lines, format!("math.log {x} : {ty}")),
        UnaryOp::Sqrt => emit(lines, format!("math.sqrt {x} : {ty}")),
        UnaryOp::Abs => emit(lines, format!("math.absf {x} : {ty}")),
        UnaryOp::Sign => {
            let zero = emit(lines, format!("arith.constant 0.0 : {ty}"));
            let one = emit(lines, format!("arith.constant 1.0 : {ty}"));
            let minus_one = emit(lines, format!("arith.constant -1.0 : {ty}"));
            let positive = emit(lines, format!("arith.cmpf ogt, {x}, {zero} : {ty}"));
            let negative = emit(lines, format!("arith.cmpf olt, {x}, {zero} : {ty}"));
            let upper = emit(lines, format!("arith.select {positive}, {one}, {zero} : {ty}"));
            emit(lines, format!("arith.select {negative}, {minus_one}, {upper} : {ty}"))
        }
        UnaryOp::Relu => {
            let zero = emit(lines, format!("arith.constant 0.0 : {ty}"));
            let positive = emit(lines, format!("arith.cmpf ogt, {x}, {zero} : {ty}"));
            emit(lines, format!("arith.select {positive}, {x}, {zero} : {ty}"))
        }
        UnaryOp::Sigmoid => {
            let one = emit(lines, format!("arith.constant 1.0 : {ty}"));
            let negated = emit(lines, format!("arith.negf {x} : {ty}"));
            let exponential =
                if ty == "f32" { exp_f32(&negated, lines) } else { emit(lines, format!("math.exp {negated} : {ty}")) };
            let denominator = emit(lines, format!("arith.addf {one}, {exponential} : {ty}"));
            emit(lines, format!("arith.divf {one}, {denominator} : {ty}"))
        }
        UnaryOp::Softplus => {
            // max(x, 0) + log(1 + exp(-|x|)), as the interpreter computes it.
            let zero = emit(lines, format!("arith.constant 0.0 : {ty}"));
            let one = emit(lines, format!("arith.constant 1.0 : {ty}"));
            let positive = emit(lines, format!("arith.cmpf ogt, {x}, {zero} : {ty}"));
            let clamped = emit(lines, format!("arith.select {positive}, {x}, {zero} : {ty}"));
            let absolute = emit(lines, format!("math.absf {x} : {ty}"));
            let negated = emit(lines, format!("arith.negf {absolute} : {ty}"));
            let exponential = emit(lines, format!("math.exp {negated} : {ty}"));
            let sum = emit(lines, format!("arith.addf {one}, {exponential} : {ty}"));
            let log = emit(lines, format!("math.log {sum} : {ty}"));
            emit(lines, format!("arith.addf {clamped}, {log} : {ty}"))
        }
    }
}

/// `exp(x)` in single precision without a library call: `x = n ln2 + r` (Cody-Waite, two parts),
/// a degree-7 Taylor polynomial for `exp(r)` on |r| <= ln2 / 2 (truncation below 6e-9), and `2^n`
/// built from the exponent bits. Overflow gives +inf and underflow 0, as the library does
/// (subnormal results are flushed to zero).
pub(super) fn exp_f32(x: &str, lines: &mut Vec<String>) -> String {
    let upper = constant(lines, 88.72);
    let lower = constant(lines, -87.33);
    let clamped_high = emit(lines, format!("arith.minimumf {x}, {upper} : f32"));
    let clamped = emit(lines, format!("arith.maximumf {clamped_high}, {lower} : f32"));
    let log2e = constant(lines, std::f64::consts::LOG2_E);
    let scaled = emit(lines, format!("arith.mulf {clamped}, {log2e} : f32"));
    let n = emit(lines, format!("math.roundeven {scaled} : f32"));
    let minus_n = emit(lines, format!("arith.negf {n} : f32"));
    let ln2_high = constant(lines, 0.693145751953125);
    let ln2_low = constant(lines, 1.428606765330187e-6);
    let r1 = emit(lines, format!("math.fma {minus_n}, {ln2_high}, {clamped} : f32"));
    let r = emit(lines, format!("math.fma {minus_n}, {ln2_low}, {r1} : f32"));
    let mut polynomial = constant(lines, 1.0 / 5040.0);
    for coefficient in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        let c = constant(lines, coefficient);
        polynomial = emit(lines, format!("math.fma {polynomial}, {r}, {c} : f32"));
    }
    let n_int = emit(lines, format!("arith.fptosi {n} : f32 to i32"));
    let bias = emit(lines, "arith.constant 127 : i32".to_string());
    let biased = emit(lines, format!("arith.addi {n_int}, {bias} : i32"));
    let shift = emit(lines, "arith.constant 23 : i32".to_string());
    let bits = emit(lines, format!("arith.shli {biased}, {shift} : i32"));
    let power = emit(lines, format!("arith.bitcast {bits} : i32 to f32"));
    let value = emit(lines, format!("arith.mulf {polynomial}, {power} : f32"));
    let infinity = constant(lines, f64::INFINITY);
    let zero = constant(lines, 0.0);
    let overflow = emit(lines, format!("arith.cmpf ogt, {x}, {upper} : f32"));
    let underflow = emit(lines, format!("arith.cmpf olt, {x}, {lower} : f32"));
    let high = emit(lines, format!("arith.select {overflow}, {infinity}, {value} : f32"));
    let low = emit(lines, format!("arith.select {underflow}, {zero}, {high} : f32"));
    // A NaN input stays NaN.
    let is_nan = emit(lines, format!("arith.cmpf uno, {x}, {x} : f32"));
    emit(lines, format!("arith.select {is_nan}, {x}, {low} : f32"))
}

/// `tanh(x)` in single precision without a library call: `sign(x) (1 - 2 / (exp(2|x|) + 1))`,
/// and the odd Taylor polynomial to x^7 below |x| = 0.05, where the subtraction would lose
/// relative precision.
pub(super) fn tanh_f32(x: &str, lines: &mut Vec<String>) -> String {
    let absolute = emit(lines, format!("math.absf {x} : f32"));
    let two = constant(lines, 2.0);
    let doubled = emit(lines, format!("arith.mulf {absolute}, {two} : f32"));
    let exponential = exp_f32(&doubled, lines);
    let one = constant(lines, 1.0);
    let denominator = emit(lines, format!("arith.addf {exponential}, {one} : f32"));
    let fraction = emit(lines, format!("arith.divf {two}, {denominator} : f32"));
    let magnitude = emit(lines, format!("arith.subf {one}, {fraction} : f32"));
    let signed = emit(lines, format!("math.copysign {magnitude}, {x} : f32"));
    let square = emit(lines, format!("arith.mulf {x}, {x} : f32"));
    let mut series = constant(lines, -17.0 / 315.0);
    for coefficient in [2.0 / 15.0, -1.0 / 3.0, 1.0] {
        let c = constant(lines, coefficient);
        series = emit(lines, format!("math.fma {series}, {square}, {c} : f32"));
    }
    let small_value = emit(lines, format!("arith.mulf {series}, {x} : f32"));
    let threshold = constant(lines, 0.05);
    let small = emit(lines, format!("arith.cmpf olt, {absolute}, {threshold} : f32"));
    emit(lines, format!("arith.select {small}, {small_value}, {signed} : f32"))
}

/// `sin(x)` (`shift = 0`) or `cos(x) = sin(x + pi/2)` (`shift = 1`) in single precision, without a
/// library call so that LLVM can vectorise the loop around it: Cody-Waite reduction by pi/2 in
/// three parts with fused multiply-adds, Cephes' minimax polynomials for sin and cos on
/// [-pi/4, pi/4], and the quadrant picking the polynomial and the sign. Accurate to about 1e-7
/// absolute for |x| up to 1e3 (the tests check 100); beyond about 1e5 the reduction loses accuracy.
// The reduction constants are written with every digit: they split pi/2 exactly in f32 parts.
#[allow(clippy::excessive_precision)]
pub(super) fn sine_f32(x: &str, shift: i32, lines: &mut Vec<String>) -> String {
    let two_over_pi = constant(lines, std::f64::consts::FRAC_2_PI);
    let scaled = emit(lines, format!("arith.mulf {x}, {two_over_pi} : f32"));
    let k = emit(lines, format!("math.roundeven {scaled} : f32"));
    let minus_k = emit(lines, format!("arith.negf {k} : f32"));
    let c1 = constant(lines, 1.5703125);
    let c2 = constant(lines, 4.837512969970703125e-4);
    let c3 = constant(lines, 7.54978995489188216e-8);
    let r1 = emit(lines, format!("math.fma {minus_k}, {c1}, {x} : f32"));
    let r2 = emit(lines, format!("math.fma {minus_k}, {c2}, {r1} : f32"));
    let r = emit(lines, format!("math.fma {minus_k}, {c3}, {r2} : f32"));
    let z = emit(lines, format!("arith.mulf {r}, {r} : f32"));
    // sin(r) = r + r z (s1 + z (s2 + z s3))
    let s3 = constant(lines, -1.9515295891e-4);
    let s2 = constant(lines, 8.3321608736e-3);
    let s1 = constant(lines, -1.6666654611e-1);
    let sin_a = emit(lines, format!("math.fma {z}, {s3}, {s2} : f32"));
    let sin_b = emit(lines, format!("math.fma {z}, {sin_a}, {s1} : f32"));
    let rz = emit(lines, format!("arith.mulf {r}, {z} : f32"));
    let sine = emit(lines, format!("math.fma {rz}, {sin_b}, {r} : f32"));
    // cos(r) = 1 - z / 2 + z^2 (c1 + z (c2 + z c3))
    let k3 = constant(lines, 2.443315711809948e-5);
    let k2 = constant(lines, -1.388731625493765e-3);
    let k1 = constant(lines, 4.166664568298827e-2);
    let cos_a = emit(lines, format!("math.fma {z}, {k3}, {k2} : f32"));
    let cos_b = emit(lines, format!("math.fma {z}, {cos_a}, {k1} : f32"));
    let zz = emit(lines, format!("arith.mulf {z}, {z} : f32"));
    let half = constant(lines, -0.5);
    let one = constant(lines, 1.0);
    let linear = emit(lines, format!("math.fma {z}, {half}, {one} : f32"));
    let cosine = emit(lines, format!("math.fma {zz}, {cos_b}, {linear} : f32"));
    // Quadrant q = (k + shift) mod 4: 0 sin, 1 cos, 2 -sin, 3 -cos.
    let k_int = emit(lines, format!("arith.fptosi {k} : f32 to i32"));
    let shift_value = emit(lines, format!("arith.constant {shift} : i32"));
    let shifted = emit(lines, format!("arith.addi {k_int}, {shift_value} : i32"));
    let one_int = emit(lines, "arith.constant 1 : i32".to_string());
    let two_int = emit(lines, "arith.constant 2 : i32".to_string());
    let zero_int = emit(lines, "arith.constant 0 : i32".to_string());
    let odd = emit(lines, format!("arith.andi {shifted}, {one_int} : i32"));
    let use_cos = emit(lines, format!("arith.cmpi ne, {odd}, {zero_int} : i32"));
    let high = emit(lines, format!("arith.andi {shifted}, {two_int} : i32"));
    let negative = emit(lines, format!("arith.cmpi ne, {high}, {zero_int} : i32"));
    let magnitude = emit(lines, format!("arith.select {use_cos}, {cosine}, {sine} : f32"));
    let negated = emit(lines, format!("arith.negf {magnitude} : f32"));
    emit(lines, format!("arith.select {negative}, {negated}, {magnitude} : f32"))
}

pub(super) fn binary_body(op: BinaryOp, a: &str, b: &str, ty: &str, lines: &mut Vec<String>) -> String {
    match op {
        BinaryOp::Add => emit(lines, format!("arith.addf {a}, {b} : {ty}")),
        BinaryOp::Sub => emit(lines, format!("arith.subf {a}, {b} : {ty}")),
        BinaryOp::Mul => emit(lines, format!("arith.mulf {a}, {b} : {ty}")),
        BinaryOp::Div => emit(lines, format!("arith.divf {a}, {b} : {ty}")),
        BinaryOp::Pow => emit(lines, format!("math.powf {a}, {b} : {ty}")),
        BinaryOp::Max => {
            // `b` when b > a, else `a`: ties and NaNs as in the interpreter.
            let greater = emit(lines, format!("arith.cmpf ogt, {b}, {a} : {ty}"));
            emit(lines, format!("arith.select {greater}, {b}, {a} : {ty}"))
        }
        BinaryOp::Min => {
            let less = emit(lines, format!("arith.cmpf olt, {b}, {a} : {ty}"));
            emit(lines, format!("arith.select {less}, {b}, {a} : {ty}"))
        }
        BinaryOp::Equal | BinaryOp::Greater => {
            let predicate = if op == BinaryOp::Equal { "oeq" } else { "ogt" };
            let condition = emit(lines, format!("arith.cmpf {predicate}, {a}, {b} : {ty}"));
            let one = emit(lines, format!("arith.constant 1.0 : {ty}"));
            let zero = emit(lines, format!("arith.constant 0.0 : {ty}"));
            emit(lines, format!("arith.select {condition}, {one}, {zero} : {ty}"))
        }
    }
}
