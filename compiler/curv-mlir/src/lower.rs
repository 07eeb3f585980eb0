//! Lowering of one IR function to an MLIR module in the `linalg`, `tensor`, `arith` and `math`
//! dialects, as text. Every external value (input, parameter, data, hyperparameter, step,
//! statistic) becomes an argument, every output a destination memref written with
//! `bufferization.materialize_in_destination`, so the compiled function reads and writes caller
//! buffers. Shapes are static: symbolic dimensions are bound by the caller.

use curv_ir::{BinaryOp, DType, Dim, Function, Op, ReduceOp, UnaryOp, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

mod structured;

/// The strided 2-D memref type the runtime's GEMM takes.
const GEMM_MEMREF: &str = "memref<?x?xf32, strided<[?, ?], offset: ?>>";

/// The declarations of the runtime's matrix decompositions (`curv_runtime::linalg`), in double
/// precision inside, `f32` at the boundary: `curv_seigh(A, values, vectors)` (eigenvalues
/// ascending, eigenvectors as columns), `curv_scholesky(A, L)` and `curv_sqr(A, Q, R)` (thin QR).
/// A module that calls one includes its declaration; the JIT, the kernel cache and standalone
/// trainers all provide them.
pub const DECOMPOSITION_DECLARATIONS: &str = "\
func.func private @curv_seigh(memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?xf32, strided<[?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>) attributes { llvm.emit_c_interface }
func.func private @curv_scholesky(memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>) attributes { llvm.emit_c_interface }
func.func private @curv_sqr(memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>) attributes { llvm.emit_c_interface }
";

/// The declaration of the runtime's single-precision GEMM, `C = A B` (see `crate::gemm`).
const GEMM_DECLARATION: &str = "func.func private @curv_sgemm(memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>, memref<?x?xf32, strided<[?, ?], offset: ?>>) attributes { llvm.emit_c_interface }";

pub use curv_ir::abi::{Argument, Signature};

/// Why a function cannot be lowered.
#[derive(Debug, Clone, PartialEq)]
pub struct LowerError {
    pub message: String,
}

fn unsupported(op: &Op) -> LowerError {
    LowerError { message: format!("the MLIR backend does not lower `{}` yet", op.name()) }
}

fn element(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::I32 => "i32",
    }
}

fn shaped(prefix: &str, shape: &[i64], dtype: DType) -> String {
    let mut text = format!("{prefix}<");
    for size in shape {
        let _ = write!(text, "{size}x");
    }
    text.push_str(element(dtype));
    text.push('>');
    text
}

fn tensor_type(shape: &[i64], dtype: DType) -> String {
    shaped("tensor", shape, dtype)
}

fn memref_type(shape: &[i64], dtype: DType) -> String {
    shaped("memref", shape, dtype)
}

fn float_literal(value: f64) -> String {
    if value.is_nan() {
        "0x7FC00000".to_string()
    } else if value == f64::INFINITY {
        "0x7F800000".to_string()
    } else if value == f64::NEG_INFINITY {
        "0xFF800000".to_string()
    } else {
        format!("{value:.17e}")
    }
}

fn identity_map(rank: usize) -> String {
    let dims: Vec<String> = (0..rank).map(|axis| format!("d{axis}")).collect();
    format!("affine_map<({}) -> ({})>", dims.join(", "), dims.join(", "))
}

fn map(rank: usize, results: &[String]) -> String {
    let dims: Vec<String> = (0..rank).map(|axis| format!("d{axis}")).collect();
    format!("affine_map<({}) -> ({})>", dims.join(", "), results.join(", "))
}

fn iterators(kinds: &[&str]) -> String {
    let quoted: Vec<String> = kinds.iter().map(|kind| format!("\"{kind}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

struct Emitter<'a> {
    function: &'a Function,
    shapes: Vec<Vec<i64>>,
    body: String,
    counter: usize,
    /// Whether the function calls the runtime's GEMM (`curv_sgemm`), which must be declared.
    uses_gemm: bool,
    /// Maps a span to an MLIR file-line-column location (`"file.curv":3:5`), when known.
    locate: Option<&'a dyn Fn(curv_grammar::Span) -> String>,
    /// The location of the instruction or kernel being emitted.
    location: Option<String>,
    /// The vector tiles the module's generics are marked with (`curv.tile`), each once: the
    /// schedule at the end of the module tiles and vectorises the generics of each.
    vector_tiles: Vec<Vec<i64>>,
}

impl Emitter<'_> {
    fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("%t{}", self.counter)
    }

    fn value(&self, id: ValueId) -> String {
        format!("%v{}", id.0)
    }

    fn dtype(&self, id: ValueId) -> DType {
        self.function.ty(id).dtype
    }

    fn shape(&self, id: ValueId) -> &[i64] {
        &self.shapes[id.0 as usize]
    }

    /// Appends a line; a line that ends an operation gets the current source location.
    fn line(&mut self, text: &str) {
        self.body.push_str("    ");
        self.body.push_str(text);
        let trimmed = text.trim();
        if let Some(location) = &self.location {
            if !trimmed.ends_with('{') && !trimmed.starts_with('^') {
                self.body.push_str(&format!(" loc({location})"));
            }
        }
        self.body.push('\n');
    }

    fn locate(&mut self, id: ValueId) {
        self.location = self.locate.map(|locate| locate(self.function.inst(id).span));
    }

    /// `tensor.empty` of a shape.
    fn empty(&mut self, shape: &[i64], dtype: DType) -> String {
        let name = self.fresh();
        self.line(&format!("{name} = tensor.empty() : {}", tensor_type(shape, dtype)));
        name
    }

    /// A tensor filled with a constant (`linalg.fill`).
    fn filled(&mut self, shape: &[i64], dtype: DType, value: f64) -> String {
        let empty = self.empty(shape, dtype);
        let scalar = self.fresh();
        self.line(&format!("{scalar} = arith.constant {} : {}", float_literal(value), element(dtype)));
        let name = self.fresh();
        let ty = tensor_type(shape, dtype);
        self.line(&format!("{name} = linalg.fill ins({scalar} : {}) outs({empty} : {ty}) -> {ty}", element(dtype)));
        name
    }

    /// A `linalg.generic` over the result's shape. `inputs` are `(value, indexing results)`; the
    /// body receives the block argument names of the inputs and returns lines plus the yielded value.
    fn generic(
        &mut self,
        result: ValueId,
        inputs: &[(String, String, Vec<String>)],
        body: &dyn Fn(&[String], &mut Vec<String>) -> String,
    ) {
        let shape = self.shape(result).to_vec();
        let dtype = self.dtype(result);
        let rank = shape.len();
        let init = self.empty(&shape, dtype);
        let mut maps: Vec<String> = inputs.iter().map(|(_, _, results)| map(rank, results)).collect();
        maps.push(identity_map(rank));
        let names: Vec<String> = inputs.iter().map(|(name, _, _)| name.clone()).collect();
        let types: Vec<String> = inputs.iter().map(|(_, ty, _)| ty.clone()).collect();
        let block_args: Vec<String> = (0..inputs.len()).map(|index| format!("%a{index}")).collect();
        let mut lines = Vec::new();
        let yielded = body(&block_args, &mut lines);
        let result_type = tensor_type(&shape, dtype);
        let mut text = format!(
            "{} = linalg.generic {{indexing_maps = [{}], iterator_types = {}}}",
            self.value(result),
            maps.join(", "),
            iterators(&vec!["parallel"; rank])
        );
        if !inputs.is_empty() {
            let _ = write!(text, " ins({} : {})", names.join(", "), types.join(", "));
        }
        let _ = write!(text, " outs({init} : {result_type}) {{");
        self.line(&text);
        let mut arguments: Vec<String> =
            inputs.iter().zip(&block_args).map(|((_, ty, _), arg)| format!("{arg}: {}", element_of_type(ty))).collect();
        arguments.push(format!("%out: {}", element(dtype)));
        self.line(&format!("^bb0({}):", arguments.join(", ")));
        for line in lines {
            self.line(&format!("  {line}"));
        }
        self.line(&format!("  linalg.yield {yielded} : {}", element(dtype)));
        self.line(&format!("}} -> {result_type}"));
    }

    /// An operand of an elementwise op, indexed like the result.
    fn same_shape_input(&self, id: ValueId) -> (String, String, Vec<String>) {
        let rank = self.shape(id).len();
        (
            self.value(id),
            tensor_type(self.shape(id), self.dtype(id)),
            (0..rank).map(|axis| format!("d{axis}")).collect(),
        )
    }
}

fn element_of_type(ty: &str) -> String {
    ty.rsplit('x').next().unwrap_or("f32").trim_start_matches("tensor<").trim_end_matches('>').to_string()
}

/// Appends the scalar instruction `%sN = text` to a kernel body and returns its name `%sN`.
fn emit(lines: &mut Vec<String>, text: String) -> String {
    let name = format!("%s{}", lines.len());
    lines.push(format!("{name} = {text}"));
    name
}

/// Appends an `f32` constant to a kernel body and returns its name.
fn constant(lines: &mut Vec<String>, value: f64) -> String {
    emit(lines, format!("arith.constant {} : f32", float_literal(value)))
}

/// The scalar instructions of a unary op applied to `x` of element type `ty`.
fn unary_body(op: UnaryOp, x: &str, ty: &str, lines: &mut Vec<String>) -> String {
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
fn exp_f32(x: &str, lines: &mut Vec<String>) -> String {
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
fn tanh_f32(x: &str, lines: &mut Vec<String>) -> String {
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
fn sine_f32(x: &str, shift: i32, lines: &mut Vec<String>) -> String {
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

fn binary_body(op: BinaryOp, a: &str, b: &str, ty: &str, lines: &mut Vec<String>) -> String {
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

fn is_external(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Param { .. } | Op::Data { .. } | Op::Hyper { .. } | Op::Step | Op::Statistic { .. }
    )
}

/// How a lowered function takes its buffers (its arguments, then its outputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryAbi {
    /// One argument, `!llvm.ptr`: a table with one pointer per buffer, each to the pointer to
    /// the buffer's memref descriptor (the packed form `curv_runtime::compiled` builds). The
    /// CPU's: whatever the number of buffers, every call has one argument, where a call with a
    /// few thousand made LLVM's code generator quadratic (`DAGCombiner` merging the stores of
    /// the call's stack arguments; 1,000 parameters compiled for over ten minutes).
    Table,
    /// One memref argument per buffer: the host side of a GPU function, whose launches take
    /// descriptors (`curv_cuda::call_staged`).
    Descriptors,
}

/// Lowers `function` to an MLIR module whose function `name` has the C interface and takes its
/// buffers through a table ([`EntryAbi::Table`], the CPU's). `bindings` gives the sizes of
/// symbolic dimensions.
pub fn lower_function(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
) -> Result<(String, Signature), LowerError> {
    lower_function_with_locations(function, name, bindings, None)
}

/// [`lower_function`] with every operation carrying the location of the `.curv` code it comes
/// from, so MLIR's diagnostics and debug information point into the source.
pub fn lower_function_with_locations(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    locate: Option<&dyn Fn(curv_grammar::Span) -> String>,
) -> Result<(String, Signature), LowerError> {
    lower_function_for(function, name, bindings, locate, EntryAbi::Table)
}

/// [`lower_function_with_locations`] for a GPU: the function takes one memref per buffer
/// ([`EntryAbi::Descriptors`]), as `gpu::lower_for_cuda` expects.
pub fn lower_function_for_gpu(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    locate: Option<&dyn Fn(curv_grammar::Span) -> String>,
) -> Result<(String, Signature), LowerError> {
    lower_function_for(function, name, bindings, locate, EntryAbi::Descriptors)
}

/// The LLVM type of the descriptor of a memref of `rank` dimensions.
fn descriptor_type(rank: usize) -> String {
    if rank == 0 {
        "!llvm.struct<(ptr, ptr, i64)>".to_string()
    } else {
        format!("!llvm.struct<(ptr, ptr, i64, array<{rank} x i64>, array<{rank} x i64>)>")
    }
}

/// The signature of function `name`, whose `buffers` are (SSA name such as `%arg0`, shape,
/// element type), and, for [`EntryAbi::Table`], the prologue that reads each buffer's descriptor
/// from the table into the memref the body uses under that name.
pub fn entry(name: &str, buffers: &[(String, Vec<i64>, DType)], abi: EntryAbi) -> (String, String) {
    match abi {
        EntryAbi::Descriptors => {
            let parameters: Vec<String> = buffers
                .iter()
                .map(|(argument, shape, dtype)| format!("{argument}: {}", memref_type(shape, *dtype)))
                .collect();
            (format!("func.func @{name}({})", parameters.join(", ")), String::new())
        }
        EntryAbi::Table => {
            let mut prologue = String::new();
            for (index, (argument, shape, dtype)) in buffers.iter().enumerate() {
                let stem = &argument[1..];
                let descriptor = descriptor_type(shape.len());
                let _ = writeln!(
                    prologue,
                    "    %{stem}_slot = llvm.getelementptr %table[{index}] : (!llvm.ptr) -> !llvm.ptr, !llvm.ptr\n    \
                     %{stem}_pointer = llvm.load %{stem}_slot : !llvm.ptr -> !llvm.ptr\n    \
                     %{stem}_descriptor_pointer = llvm.load %{stem}_pointer : !llvm.ptr -> !llvm.ptr\n    \
                     %{stem}_descriptor = llvm.load %{stem}_descriptor_pointer : !llvm.ptr -> {descriptor}\n    \
                     {argument} = builtin.unrealized_conversion_cast %{stem}_descriptor : {descriptor} to {}",
                    memref_type(shape, *dtype)
                );
            }
            (format!("func.func @{name}(%table: !llvm.ptr)"), prologue)
        }
    }
}

fn lower_function_for(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    locate: Option<&dyn Fn(curv_grammar::Span) -> String>,
    abi: EntryAbi,
) -> Result<(String, Signature), LowerError> {
    let mut shapes = Vec::with_capacity(function.insts.len());
    for inst in &function.insts {
        let shape: Result<Vec<i64>, LowerError> = inst
            .ty
            .shape
            .iter()
            .map(|dim| match dim {
                Dim::Known(size) => Ok(*size),
                Dim::Symbol(symbol) => bindings
                    .get(symbol)
                    .copied()
                    .ok_or_else(|| LowerError { message: format!("dimension `{symbol}` is not bound") }),
            })
            .collect();
        shapes.push(shape?);
    }
    let mut emitter = Emitter {
        function,
        shapes,
        body: String::new(),
        counter: 0,
        uses_gemm: false,
        locate,
        location: None,
        vector_tiles: Vec::new(),
    };
    let mut arguments = Vec::new();
    let mut buffers = Vec::new();
    for (index, inst) in function.insts.iter().enumerate() {
        let id = ValueId(index as u32);
        if !is_external(&inst.op) {
            continue;
        }
        let shape = emitter.shape(id).to_vec();
        let dtype = inst.ty.dtype;
        let argument_name = format!("%arg{}", arguments.len());
        buffers.push((argument_name, shape.clone(), dtype));
        arguments.push(Argument { value: id, op: inst.op.clone(), shape, dtype });
    }
    // Arguments first, then the kernels of the fusion plan in order: a fused elementwise kernel
    // becomes one `linalg.generic`, every other kernel is its instructions one by one.
    let plan = curv_ir::fusion::plan_kernels(function);
    let inlined = curv_ir::fusion::inlined(function);
    let mut steps: Vec<Step> = (0..function.insts.len())
        .filter(|&index| is_external(&function.insts[index].op))
        .map(Step::Instruction)
        .collect();
    for (kernel_index, kernel) in plan.kernels.iter().enumerate() {
        let fused = kernel.kind == curv_ir::fusion::KernelKind::Elementwise
            && kernel
                .insts
                .iter()
                .any(|id| !matches!(function.inst(*id).op, Op::Constant { .. } | Op::Broadcast { .. }));
        if fused {
            steps.push(Step::Fused(kernel_index));
        } else if kernel.kind == curv_ir::fusion::KernelKind::Reduction && kernel.insts.len() > 1 {
            steps.push(Step::FusedReduction(kernel_index));
        } else if kernel.kind == curv_ir::fusion::KernelKind::MatMul && kernel.insts.len() > 1 {
            steps.push(Step::MatMulEpilogue(kernel_index));
        } else {
            steps.extend(kernel.insts.iter().map(|id| Step::Instruction(id.0 as usize)));
        }
    }
    let mut argument_index = 0;
    for step in steps {
        let index = match step {
            Step::Fused(kernel_index) => {
                if let Some(last) = plan.kernels[kernel_index].insts.last() {
                    emitter.locate(*last);
                }
                emit_fused(&mut emitter, &plan, &inlined, kernel_index)?;
                continue;
            }
            Step::FusedReduction(kernel_index) => {
                if let Some(last) = plan.kernels[kernel_index].insts.last() {
                    emitter.locate(*last);
                }
                emit_fused_reduction(&mut emitter, &plan, &inlined, kernel_index)?;
                continue;
            }
            Step::MatMulEpilogue(kernel_index) => {
                // The product, then its epilogue over the product's buffer (the generic's first
                // output starts as the product and is written in place).
                let product = plan.kernels[kernel_index].insts[0];
                emitter.locate(product);
                let product_inst = function.inst(product);
                lower_matmul(&mut emitter, product, product_inst.args[0], product_inst.args[1])?;
                if let Some(last) = plan.kernels[kernel_index].insts.last() {
                    emitter.locate(*last);
                }
                emit_fused_after(&mut emitter, &plan, &inlined, kernel_index, Some(product))?;
                continue;
            }
            Step::Instruction(index) => index,
        };
        emitter.locate(ValueId(index as u32));
        let inst = &function.insts[index];
        let id = ValueId(index as u32);
        let dtype = inst.ty.dtype;
        let shape = emitter.shape(id).to_vec();
        let result_type = tensor_type(&shape, dtype);
        let ty = element(dtype);
        match &inst.op {
            op if is_external(op) => {
                let argument = format!("%arg{argument_index}");
                argument_index += 1;
                let text = format!(
                    "{} = bufferization.to_tensor {argument} restrict : {} to {result_type}",
                    emitter.value(id),
                    memref_type(&shape, dtype)
                );
                emitter.line(&text);
            }
            Op::Constant { value } => {
                let text =
                    format!("{} = arith.constant dense<{}> : {result_type}", emitter.value(id), float_literal(*value));
                emitter.line(&text);
            }
            Op::Count { axes } => {
                let operand = emitter.shape(inst.args[0]).to_vec();
                let count: i64 = axes.iter().map(|&axis| operand[axis]).product();
                let text = format!(
                    "{} = arith.constant dense<{}> : {result_type}",
                    emitter.value(id),
                    float_literal(count as f64)
                );
                emitter.line(&text);
            }
            Op::CausalMask => {
                let rank = shape.len();
                let ty_name = ty.to_string();
                emitter.generic(id, &[], &|_, lines| {
                    lines.push(format!("%s0 = linalg.index {} : index", rank - 2));
                    lines.push(format!("%s1 = linalg.index {} : index", rank - 1));
                    lines.push("%s2 = arith.cmpi ugt, %s1, %s0 : index".to_string());
                    lines.push(format!("%s3 = arith.constant {} : {ty_name}", float_literal(f64::NEG_INFINITY)));
                    lines.push(format!("%s4 = arith.constant 0.0 : {ty_name}"));
                    lines.push(format!("%s5 = arith.select %s2, %s3, %s4 : {ty_name}"));
                    "%s5".to_string()
                });
            }
            Op::Unary(op) => {
                let input = emitter.same_shape_input(inst.args[0]);
                let (op, ty_name) = (*op, ty.to_string());
                emitter.generic(id, &[input], &|args, lines| unary_body(op, &args[0], &ty_name, lines));
            }
            Op::Binary(op) => {
                let inputs = [emitter.same_shape_input(inst.args[0]), emitter.same_shape_input(inst.args[1])];
                let (op, ty_name) = (*op, ty.to_string());
                emitter.generic(id, &inputs, &|args, lines| binary_body(op, &args[0], &args[1], &ty_name, lines));
            }
            Op::Select => {
                let inputs = [
                    emitter.same_shape_input(inst.args[0]),
                    emitter.same_shape_input(inst.args[1]),
                    emitter.same_shape_input(inst.args[2]),
                ];
                let ty_name = ty.to_string();
                emitter.generic(id, &inputs, &|args, lines| {
                    lines.push(format!("%s0 = arith.constant 0.0 : {ty_name}"));
                    lines.push(format!("%s1 = arith.cmpf une, {}, %s0 : {ty_name}", args[0]));
                    lines.push(format!("%s2 = arith.select %s1, {}, {} : {ty_name}", args[1], args[2]));
                    "%s2".to_string()
                });
            }
            Op::Broadcast { dims } => {
                let operand = inst.args[0];
                let operand_shape = emitter.shape(operand).to_vec();
                let results: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(axis, &result_axis)| {
                        if operand_shape[axis] == 1 && shape[result_axis] != 1 {
                            "0".to_string()
                        } else {
                            format!("d{result_axis}")
                        }
                    })
                    .collect();
                let input = (emitter.value(operand), tensor_type(&operand_shape, emitter.dtype(operand)), results);
                emitter.generic(id, &[input], &|args, _| args[0].clone());
            }
            Op::Transpose { permutation } => {
                let init = emitter.empty(&shape, dtype);
                let operand = inst.args[0];
                let text = format!(
                    "{} = linalg.transpose ins({} : {}) outs({init} : {result_type}) permutation = {permutation:?}",
                    emitter.value(id),
                    emitter.value(operand),
                    tensor_type(emitter.shape(operand), emitter.dtype(operand))
                );
                emitter.line(&text);
            }
            Op::Reshape => {
                let operand = inst.args[0];
                let operand_shape = emitter.shape(operand).to_vec();
                let operand_type = tensor_type(&operand_shape, emitter.dtype(operand));
                // Through a rank-1 tensor: collapse everything, then expand to the result.
                let count: i64 = shape.iter().product();
                let flat_type = tensor_type(&[count], dtype);
                let flat = if operand_shape.len() == 1 {
                    emitter.value(operand)
                } else if operand_shape.is_empty() {
                    let name = emitter.fresh();
                    emitter.line(&format!(
                        "{name} = tensor.expand_shape {} [] output_shape [1] : {operand_type} into {flat_type}",
                        emitter.value(operand)
                    ));
                    name
                } else {
                    let name = emitter.fresh();
                    let group: Vec<String> = (0..operand_shape.len()).map(|axis| axis.to_string()).collect();
                    emitter.line(&format!(
                        "{name} = tensor.collapse_shape {} [[{}]] : {operand_type} into {flat_type}",
                        emitter.value(operand),
                        group.join(", ")
                    ));
                    name
                };
                let text = if shape.len() == 1 {
                    format!("{} = tensor.cast {flat} : {flat_type} to {result_type}", emitter.value(id))
                } else if shape.is_empty() {
                    format!("{} = tensor.collapse_shape {flat} [] : {flat_type} into {result_type}", emitter.value(id))
                } else {
                    let group: Vec<String> = (0..shape.len()).map(|axis| axis.to_string()).collect();
                    let sizes: Vec<String> = shape.iter().map(|size| size.to_string()).collect();
                    format!(
                        "{} = tensor.expand_shape {flat} [[{}]] output_shape [{}] : {flat_type} into {result_type}",
                        emitter.value(id),
                        group.join(", "),
                        sizes.join(", ")
                    )
                };
                emitter.line(&text);
            }
            Op::Reduce { op, axes } => {
                let operand = inst.args[0];
                let operand_shape = emitter.shape(operand).to_vec();
                let rank = operand_shape.len();
                let initial = match op {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                };
                let init = emitter.filled(&shape, dtype, initial);
                let kept: Vec<String> =
                    (0..rank).filter(|axis| !axes.contains(axis)).map(|axis| format!("d{axis}")).collect();
                let kinds: Vec<&str> =
                    (0..rank).map(|axis| if axes.contains(&axis) { "reduction" } else { "parallel" }).collect();
                let combine = match op {
                    ReduceOp::Sum => format!("%s0 = arith.addf %a0, %out : {ty}"),
                    ReduceOp::Max => format!("%s0 = arith.maximumf %a0, %out : {ty}"),
                };
                let text = format!(
                    "{} = linalg.generic {{indexing_maps = [{}, {}], iterator_types = {}}} ins({} : {}) outs({init} : {result_type}) {{",
                    emitter.value(id),
                    identity_map(rank),
                    map(rank, &kept),
                    iterators(&kinds),
                    emitter.value(operand),
                    tensor_type(&operand_shape, emitter.dtype(operand))
                );
                emitter.line(&text);
                emitter.line(&format!("^bb0(%a0: {ty}, %out: {ty}):"));
                emitter.line(&format!("  {combine}"));
                emitter.line(&format!("  linalg.yield %s0 : {ty}"));
                emitter.line(&format!("}} -> {result_type}"));
            }
            Op::MatMul => lower_matmul(&mut emitter, id, inst.args[0], inst.args[1])?,
            Op::OneHot { .. } => {
                let labels = inst.args[0];
                let rank = shape.len();
                let results: Vec<String> = (0..rank - 1).map(|axis| format!("d{axis}")).collect();
                let input = (emitter.value(labels), tensor_type(emitter.shape(labels), DType::I32), results);
                let ty_name = ty.to_string();
                emitter.generic(id, &[input], &|args, lines| {
                    lines.push(format!("%s0 = linalg.index {} : index", rank - 1));
                    lines.push("%s1 = arith.index_cast %s0 : index to i32".to_string());
                    lines.push(format!("%s2 = arith.cmpi eq, {}, %s1 : i32", args[0]));
                    lines.push(format!("%s3 = arith.constant 1.0 : {ty_name}"));
                    lines.push(format!("%s4 = arith.constant 0.0 : {ty_name}"));
                    lines.push(format!("%s5 = arith.select %s2, %s3, %s4 : {ty_name}"));
                    "%s5".to_string()
                });
            }
            Op::Cast => {
                let operand = inst.args[0];
                let from = emitter.dtype(operand);
                let input = emitter.same_shape_input(operand);
                let ty_name = ty.to_string();
                emitter.generic(id, &[input], &|args, lines| match (from, dtype) {
                    (DType::I32, _) => {
                        lines.push(format!("%s0 = arith.sitofp {} : i32 to {ty_name}", args[0]));
                        "%s0".to_string()
                    }
                    (DType::F32, DType::F64) => {
                        lines.push(format!("%s0 = arith.extf {} : f32 to f64", args[0]));
                        "%s0".to_string()
                    }
                    (DType::F64, DType::F32) => {
                        lines.push(format!("%s0 = arith.truncf {} : f64 to f32", args[0]));
                        "%s0".to_string()
                    }
                    _ => args[0].clone(),
                });
            }
            other => match structured::lower_structured(&mut emitter, id) {
                Some(result) => result?,
                None => return Err(unsupported(other)),
            },
        }
    }
    emitter.location = None;
    let mut outputs = Vec::new();
    for (index, (output_name, value)) in function.outputs.iter().enumerate() {
        let shape = emitter.shape(*value).to_vec();
        let dtype = emitter.dtype(*value);
        let argument_name = format!("%out{index}");
        buffers.push((argument_name.clone(), shape.clone(), dtype));
        let text = format!(
            "bufferization.materialize_in_destination {} in restrict writable {argument_name} : ({}, {}) -> ()",
            emitter.value(*value),
            tensor_type(&shape, dtype),
            memref_type(&shape, dtype)
        );
        emitter.line(&text);
        outputs.push((output_name.clone(), shape, dtype));
    }
    emitter.line("return");
    let declarations = if emitter.uses_gemm { format!("  {GEMM_DECLARATION}\n") } else { String::new() };
    let (signature, prologue) = entry(name, &buffers, abi);
    let text = format!(
        "module attributes {{transform.with_named_sequence}} {{\n{declarations}  {signature} attributes {{ llvm.emit_c_interface }} {{\n{prologue}{}  }}\n{}}}\n",
        emitter.body,
        schedule(&emitter.vector_tiles)
    );
    Ok((text, Signature { arguments, outputs }))
}

/// The vector width of the CPU code: eight `f32` lanes (AVX2) or four `f64` lanes.
fn vector_lanes(dtype: DType) -> i64 {
    match dtype {
        DType::F64 => 4,
        _ => 8,
    }
}

/// The tile an elementwise generic over `shape` is cut into and vectorised by: one element of
/// every outer dimension and a vector along the innermost, contiguous one. None when the
/// innermost dimension is shorter than a vector (the loop stays scalar) or the op is rank 0.
fn vector_tile(shape: &[i64], dtype: DType) -> Option<Vec<i64>> {
    let lanes = vector_lanes(dtype);
    let (&innermost, outer) = shape.split_last()?;
    if innermost < lanes {
        return None;
    }
    let mut tile = vec![1; outer.len()];
    tile.push(lanes);
    Some(tile)
}

fn tile_attribute_text(tile: &[i64]) -> String {
    let sizes: Vec<String> = tile.iter().map(i64::to_string).collect();
    format!("array<i64: {}>", sizes.join(", "))
}

/// The module's tiling and vectorisation schedule, a transform-dialect sequence the CPU pipeline
/// interprets (and then erases): the generics marked `curv.tile = T` are tiled by `T` with
/// `scf.for` loops and each tile becomes vector code of shape `T` (masked where a tile is cut
/// short by the end of a dimension). Marks lost when MLIR's elementwise fusion rebuilds an op
/// leave that op to the scalar loops LLVM vectorises.
fn schedule(tiles: &[Vec<i64>]) -> String {
    let mut text =
        String::from("  transform.named_sequence @__transform_main(%root: !transform.any_op {transform.readonly}) {\n");
    for (index, tile) in tiles.iter().enumerate() {
        let sizes: Vec<String> = tile.iter().map(i64::to_string).collect();
        let sizes = sizes.join(", ");
        text.push_str(&format!(
            "    %generics{index} = transform.structured.match ops{{[\"linalg.generic\"]}} attributes {{curv.tile = {}}} in %root : (!transform.any_op) -> !transform.any_op\n",
            tile_attribute_text(tile)
        ));
        // One loop handle per tiled dimension.
        let loops: Vec<String> = (0..tile.len()).map(|axis| format!("%loops{index}_{axis}")).collect();
        let loop_types = vec!["!transform.any_op"; tile.len() + 1].join(", ");
        text.push_str(&format!(
            "    %tiles{index}, {} = transform.structured.tile_using_for %generics{index} tile_sizes [{sizes}] : (!transform.any_op) -> ({loop_types})\n",
            loops.join(", ")
        ));
        text.push_str(&format!(
            "    transform.structured.vectorize %tiles{index} vector_sizes [{sizes}] : !transform.any_op\n"
        ));
    }
    text.push_str("    transform.yield\n  }\n");
    text
}

/// What the lowering emits next.
enum Step {
    Instruction(usize),
    Fused(usize),
    FusedReduction(usize),
    MatMulEpilogue(usize),
}

/// Emits a reduction with the elementwise chain it absorbed (its prologue) as one
/// `linalg.generic` over the operand's index space: the chain is computed in the body from the
/// kernel's inputs and combined into the result, whose map keeps the non-reduced dimensions.
fn emit_fused_reduction(
    emitter: &mut Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
) -> Result<(), LowerError> {
    let function = emitter.function;
    let kernel = &plan.kernels[kernel_index];
    let reduction = *kernel.insts.last().expect("a reduction kernel ends with its reduction");
    let reduction_inst = function.inst(reduction);
    let Op::Reduce { op, axes } = &reduction_inst.op else {
        return Err(LowerError { message: "a reduction kernel must end with a reduction".to_string() });
    };
    let operand = reduction_inst.args[0];
    let shape = emitter.shape(operand).to_vec();
    let rank = shape.len();
    let mut inputs: Vec<(ValueId, Vec<String>)> = Vec::new();
    let mut names: std::collections::HashMap<ValueId, String> = std::collections::HashMap::new();
    let mut lines: Vec<String> = Vec::new();
    let prologue = &kernel.insts[..kernel.insts.len() - 1];
    emit_body(emitter, plan, inlined, kernel_index, &shape, prologue, &mut inputs, &mut names, &mut lines)?;
    let reduced =
        resolve_operand(emitter, plan, inlined, kernel_index, &shape, operand, &mut inputs, &mut names, &mut lines)?;
    let dtype = reduction_inst.ty.dtype;
    let ty = element(dtype);
    let result_shape = emitter.shape(reduction).to_vec();
    let result_type = tensor_type(&result_shape, dtype);
    let initial = match op {
        ReduceOp::Sum => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
    };
    let init = emitter.filled(&result_shape, dtype, initial);
    let kept: Vec<String> = (0..rank).filter(|axis| !axes.contains(axis)).map(|axis| format!("d{axis}")).collect();
    let kinds: Vec<&str> = (0..rank).map(|axis| if axes.contains(&axis) { "reduction" } else { "parallel" }).collect();
    let mut maps: Vec<String> = inputs.iter().map(|(_, results)| map(rank, results)).collect();
    maps.push(map(rank, &kept));
    let mut text = format!(
        "{} = linalg.generic {{indexing_maps = [{}], iterator_types = {}}}",
        emitter.value(reduction),
        maps.join(", "),
        iterators(&kinds)
    );
    if !inputs.is_empty() {
        let values: Vec<String> = inputs.iter().map(|(value, _)| emitter.value(*value)).collect();
        let types: Vec<String> =
            inputs.iter().map(|(value, _)| tensor_type(emitter.shape(*value), emitter.dtype(*value))).collect();
        text.push_str(&format!(" ins({} : {})", values.join(", "), types.join(", ")));
    }
    text.push_str(&format!(" outs({init} : {result_type}) {{"));
    emitter.line(&text);
    let mut arguments: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(position, (value, _))| format!("%a{position}: {}", element(emitter.dtype(*value))))
        .collect();
    arguments.push(format!("%out: {ty}"));
    emitter.line(&format!("^bb0({}):", arguments.join(", ")));
    for line in lines {
        emitter.line(&format!("  {line}"));
    }
    let combine = match op {
        ReduceOp::Sum => "arith.addf",
        ReduceOp::Max => "arith.maximumf",
    };
    emitter.line(&format!("  %combined = {combine} {reduced}, %out : {ty}"));
    emitter.line(&format!("  linalg.yield %combined : {ty}"));
    emitter.line(&format!("}} -> {result_type}"));
    Ok(())
}

/// Emits one fused elementwise kernel as a single `linalg.generic` with one result per kernel
/// output. Inlined constants become scalar constants in the body; inlined broadcasts read their
/// source through a broadcasting indexing map.
fn emit_fused(
    emitter: &mut Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
) -> Result<(), LowerError> {
    emit_fused_after(emitter, plan, inlined, kernel_index, None)
}

/// [`emit_fused`] for the elementwise instructions of a kernel; with `product`, the kernel is a
/// matrix product and its epilogue: the product (already emitted) is the initial value of the
/// generic's first output, read through that output's block argument, and the epilogue's first
/// result overwrites it in place.
fn emit_fused_after(
    emitter: &mut Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
    product: Option<ValueId>,
) -> Result<(), LowerError> {
    let function = emitter.function;
    let kernel = &plan.kernels[kernel_index];
    let first = kernel.insts[0];
    let shape = emitter.shape(first).to_vec();
    let rank = shape.len();
    let outputs = plan.outputs(function, kernel_index);
    if outputs.is_empty() {
        // Nothing reads what the kernel computes (a pruned function has no such kernel).
        return Ok(());
    }
    // Inputs: (source value, indexing results), unique; block argument `%a{k}` reads input k.
    let mut inputs: Vec<(ValueId, Vec<String>)> = Vec::new();
    let mut names: std::collections::HashMap<ValueId, String> = std::collections::HashMap::new();
    let mut lines: Vec<String> = Vec::new();
    if let Some(product) = product {
        names.insert(product, "%o0".to_string());
    }
    let body: Vec<ValueId> = kernel.insts.iter().copied().filter(|id| Some(*id) != product).collect();
    emit_body(emitter, plan, inlined, kernel_index, &shape, &body, &mut inputs, &mut names, &mut lines)?;
    if rank > 0 {
        lines = hoist_invariant_lines(emitter, &inputs, lines, &mut names);
    }
    let block_args: Vec<String> = (0..inputs.len()).map(|index| format!("%a{index}")).collect();
    // The generic itself.
    let mut maps: Vec<String> = inputs.iter().map(|(_, results)| map(rank, results)).collect();
    let mut inits = Vec::new();
    for (position, output) in outputs.iter().enumerate() {
        maps.push(identity_map(rank));
        match product {
            Some(product) if position == 0 => inits.push(emitter.value(product)),
            _ => inits.push(emitter.empty(&shape, emitter.dtype(*output))),
        }
    }
    let result_names: Vec<String> = outputs.iter().map(|output| emitter.value(*output)).collect();
    let result_types: Vec<String> = outputs.iter().map(|output| tensor_type(&shape, emitter.dtype(*output))).collect();
    let tile = vector_tile(&shape, emitter.dtype(first));
    let tile_attribute = match &tile {
        Some(tile) => {
            if !emitter.vector_tiles.contains(tile) {
                emitter.vector_tiles.push(tile.clone());
            }
            format!(", curv.tile = {}", tile_attribute_text(tile))
        }
        None => String::new(),
    };
    let mut text = format!(
        "{} = linalg.generic {{indexing_maps = [{}], iterator_types = {}{tile_attribute}}}",
        result_names.join(", "),
        maps.join(", "),
        iterators(&vec!["parallel"; rank])
    );
    if !inputs.is_empty() {
        let values: Vec<String> = inputs.iter().map(|(value, _)| emitter.value(*value)).collect();
        let types: Vec<String> =
            inputs.iter().map(|(value, _)| tensor_type(emitter.shape(*value), emitter.dtype(*value))).collect();
        text.push_str(&format!(" ins({} : {})", values.join(", "), types.join(", ")));
    }
    text.push_str(&format!(" outs({} : {}) {{", inits.join(", "), result_types.join(", ")));
    emitter.line(&text);
    let mut arguments: Vec<String> = inputs
        .iter()
        .zip(&block_args)
        .map(|((value, _), name)| format!("{name}: {}", element(emitter.dtype(*value))))
        .collect();
    for (position, output) in outputs.iter().enumerate() {
        arguments.push(format!("%o{position}: {}", element(emitter.dtype(*output))));
    }
    emitter.line(&format!("^bb0({}):", arguments.join(", ")));
    for line in lines {
        emitter.line(&format!("  {line}"));
    }
    let yielded: Vec<String> = outputs.iter().map(|output| names[output].clone()).collect();
    let yielded_types: Vec<String> = outputs.iter().map(|output| element(emitter.dtype(*output)).to_string()).collect();
    emitter.line(&format!("  linalg.yield {} : {}", yielded.join(", "), yielded_types.join(", ")));
    let closing =
        if result_types.len() == 1 { result_types[0].clone() } else { format!("({})", result_types.join(", ")) };
    emitter.line(&format!("}} -> {closing}"));
    Ok(())
}

/// The `%name` tokens of a line of MLIR text, with their byte ranges.
fn value_tokens(line: &str) -> Vec<(usize, usize)> {
    let bytes = line.as_bytes();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let start = index;
            index += 1;
            while index < bytes.len() && (bytes[index].is_ascii_alphanumeric() || bytes[index] == b'_') {
                index += 1;
            }
            tokens.push((start, index));
        } else {
            index += 1;
        }
    }
    tokens
}

/// Moves the body lines of an elementwise kernel that depend only on its rank-0 inputs and on
/// constants (Adam's bias corrections `1 - beta^t`, a learning rate times a constant) out of the
/// `linalg.generic`, in front of it: they are computed once per call instead of once per element,
/// and the vectoriser sees a broadcast scalar instead of a vector `powf`. The rank-0 inputs they
/// read are extracted from their tensors there; `names` follows the moved results.
fn hoist_invariant_lines(
    emitter: &mut Emitter,
    inputs: &[(ValueId, Vec<String>)],
    lines: Vec<String>,
    names: &mut std::collections::HashMap<ValueId, String>,
) -> Vec<String> {
    // Renaming of the body's names that are invariant: block arguments of rank-0 inputs (extracted
    // on first use) and the results of moved lines.
    let mut renamed: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    // Constants stay in the body (where the vectoriser makes them splats); a moved line that
    // reads one gets a copy in front of the generic.
    let mut constants: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut kept = Vec::new();
    for line in lines {
        let tokens = value_tokens(&line);
        let Some(&(result_start, result_end)) = tokens.first() else {
            kept.push(line);
            continue;
        };
        let defines = line[result_end..].trim_start().starts_with('=') && result_start == 0;
        let operands = &tokens[1..];
        if defines && operands.is_empty() {
            constants.insert(line[result_start..result_end].to_string(), line[result_end..].to_string());
            kept.push(line);
            continue;
        }
        let invariant = defines
            && operands.iter().all(|&(start, end)| {
                let token = &line[start..end];
                renamed.contains_key(token)
                    || constants.contains_key(token)
                    || rank_zero_argument(inputs, token).is_some()
            });
        if !invariant {
            kept.push(line);
            continue;
        }
        // The operands' names outside the generic (extracting rank-0 inputs and copying
        // constants on first use), then the result's.
        let mut replacements = Vec::new();
        for &(start, end) in operands {
            let token = &line[start..end];
            let name = if let Some(name) = renamed.get(token) {
                name.clone()
            } else if let Some(definition) = constants.get(token) {
                let name = emitter.fresh();
                emitter.line(&format!("{name}{definition}"));
                name
            } else {
                let index = rank_zero_argument(inputs, token).unwrap_or_default();
                let (source, _) = &inputs[index];
                let name = emitter.fresh();
                let source_name = emitter.value(*source);
                let ty = tensor_type(&[], emitter.dtype(*source));
                emitter.line(&format!("{name} = tensor.extract {source_name}[] : {ty}"));
                renamed.insert(token.to_string(), name.clone());
                name
            };
            replacements.push(name);
        }
        let result = emitter.fresh();
        renamed.insert(line[result_start..result_end].to_string(), result.clone());
        replacements.insert(0, result);
        let mut moved = String::new();
        let mut last = 0;
        for (&(start, end), replacement) in tokens.iter().zip(&replacements) {
            moved.push_str(&line[last..start]);
            moved.push_str(replacement);
            last = end;
        }
        moved.push_str(&line[last..]);
        emitter.line(&moved);
    }
    // The remaining lines read moved values by their new names.
    let kept: Vec<String> = kept
        .into_iter()
        .map(|line| {
            let mut out = String::new();
            let mut last = 0;
            for (start, end) in value_tokens(&line) {
                out.push_str(&line[last..start]);
                out.push_str(renamed.get(&line[start..end]).map(String::as_str).unwrap_or(&line[start..end]));
                last = end;
            }
            out.push_str(&line[last..]);
            out
        })
        .collect();
    for name in names.values_mut() {
        if let Some(new_name) = renamed.get(name.as_str()) {
            *name = new_name.clone();
        }
    }
    kept
}

/// The input index of `token` when it is the block argument (`%aK`) of a rank-0 input.
fn rank_zero_argument(inputs: &[(ValueId, Vec<String>)], token: &str) -> Option<usize> {
    let index: usize = token.strip_prefix("%a")?.parse().ok()?;
    inputs.get(index).filter(|(_, results)| results.is_empty()).map(|_| index)
}

/// The scalar code of a kernel's instructions `insts` inside a `linalg.generic` body over
/// `shape`: operands are resolved (inputs registered in `inputs`), results named in `names`.
#[allow(clippy::too_many_arguments)]
fn emit_body(
    emitter: &Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
    shape: &[i64],
    insts: &[ValueId],
    inputs: &mut Vec<(ValueId, Vec<String>)>,
    names: &mut std::collections::HashMap<ValueId, String>,
    lines: &mut Vec<String>,
) -> Result<(), LowerError> {
    let function = emitter.function;
    for id in insts {
        let inst = function.inst(*id);
        let ty = element(inst.ty.dtype).to_string();
        let mut operands = Vec::new();
        for arg in &inst.args {
            operands.push(resolve_operand(emitter, plan, inlined, kernel_index, shape, *arg, inputs, names, lines)?);
        }
        let result = scalar_instruction(function, *id, &operands, &ty, lines)?;
        names.insert(*id, result);
    }
    Ok(())
}

/// The body scalar of `arg` inside fused kernel `kernel_index`: a value the kernel computed, an
/// inlined instruction recomputed here, or a block argument reading an input (through a
/// broadcasting map when read through an inlined broadcast).
#[allow(clippy::too_many_arguments)]
fn resolve_operand(
    emitter: &Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
    shape: &[i64],
    arg: ValueId,
    inputs: &mut Vec<(ValueId, Vec<String>)>,
    names: &mut std::collections::HashMap<ValueId, String>,
    lines: &mut Vec<String>,
) -> Result<String, LowerError> {
    resolve_at_depth(emitter, plan, inlined, kernel_index, shape, arg, inputs, names, lines, 0)
}

/// How many inlined instructions deep operands are resolved recursively; past that, the rest of
/// the chain is resolved first, iteratively (a chain of scalar lets can be as long as the
/// program). Shallower chains keep the recursive order of the body's lines and inputs.
const RECURSIVE_INLINING: usize = 64;

/// The inlined instructions `arg` reads, directly or through other inlined instructions, that
/// this kernel has not computed yet: operands before their users, left to right.
fn unresolved_inlined(
    function: &Function,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
    arg: ValueId,
    names: &std::collections::HashMap<ValueId, String>,
) -> Vec<ValueId> {
    let pending = |value: ValueId| {
        inlined[value.0 as usize]
            && plan.kernel_of[value.0 as usize] != Some(kernel_index)
            && !names.contains_key(&value)
    };
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // (value, whether its operands have been pushed)
    let mut stack: Vec<(ValueId, bool)> =
        function.inst(arg).args.iter().rev().filter(|value| pending(**value)).map(|value| (*value, false)).collect();
    while let Some((value, expanded)) = stack.pop() {
        if expanded {
            order.push(value);
            continue;
        }
        if !seen.insert(value) {
            continue;
        }
        stack.push((value, true));
        for operand in function.inst(value).args.iter().rev() {
            if pending(*operand) && !seen.contains(operand) {
                stack.push((*operand, false));
            }
        }
    }
    order
}

#[allow(clippy::too_many_arguments)]
fn resolve_at_depth(
    emitter: &Emitter,
    plan: &curv_ir::fusion::KernelPlan,
    inlined: &[bool],
    kernel_index: usize,
    shape: &[i64],
    arg: ValueId,
    inputs: &mut Vec<(ValueId, Vec<String>)>,
    names: &mut std::collections::HashMap<ValueId, String>,
    lines: &mut Vec<String>,
    depth: usize,
) -> Result<String, LowerError> {
    if depth >= RECURSIVE_INLINING && inlined[arg.0 as usize] && !names.contains_key(&arg) {
        for dependency in unresolved_inlined(emitter.function, plan, inlined, kernel_index, arg, names) {
            // Its own inlined operands come before it in the list, so this is one level deep.
            resolve_at_depth(emitter, plan, inlined, kernel_index, shape, dependency, inputs, names, lines, 0)?;
        }
    }
    let rank = shape.len();
    let identity: Vec<String> = (0..rank).map(|axis| format!("d{axis}")).collect();
    let input = |inputs: &mut Vec<(ValueId, Vec<String>)>, source: ValueId, results: Vec<String>| -> String {
        let position = match inputs.iter().position(|(value, map)| *value == source && *map == results) {
            Some(position) => position,
            None => {
                inputs.push((source, results));
                inputs.len() - 1
            }
        };
        format!("%a{position}")
    };
    if plan.kernel_of[arg.0 as usize] == Some(kernel_index) || names.contains_key(&arg) {
        return Ok(names[&arg].clone());
    }
    let function = emitter.function;
    if !inlined[arg.0 as usize] {
        // A rank-0 value read by a body of higher rank (the operand of an inlined scalar op).
        let results = if function.ty(arg).shape.is_empty() { Vec::new() } else { identity };
        return Ok(input(inputs, arg, results));
    }
    let arg_inst = function.inst(arg);
    let value = match &arg_inst.op {
        Op::Broadcast { dims } => {
            let source = arg_inst.args[0];
            if inlined[source.0 as usize] || plan.kernel_of[source.0 as usize] == Some(kernel_index) {
                resolve_at_depth(emitter, plan, inlined, kernel_index, shape, source, inputs, names, lines, depth + 1)?
            } else {
                let source_shape = emitter.shape(source).to_vec();
                let target_shape = emitter.shape(arg).to_vec();
                let results: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(axis, &result_axis)| {
                        if source_shape[axis] == 1 && target_shape[result_axis] != 1 {
                            "0".to_string()
                        } else {
                            format!("d{result_axis}")
                        }
                    })
                    .collect();
                input(inputs, source, results)
            }
        }
        _ => {
            let mut operands = Vec::new();
            for inner in &arg_inst.args {
                operands.push(resolve_at_depth(
                    emitter,
                    plan,
                    inlined,
                    kernel_index,
                    shape,
                    *inner,
                    inputs,
                    names,
                    lines,
                    depth + 1,
                )?);
            }
            let ty = element(arg_inst.ty.dtype).to_string();
            scalar_instruction(function, arg, &operands, &ty, lines)?
        }
    };
    names.insert(arg, value.clone());
    Ok(value)
}

/// The body lines of one elementwise instruction on scalar operands; returns the result name.
fn scalar_instruction(
    function: &Function,
    id: ValueId,
    operands: &[String],
    ty: &str,
    lines: &mut Vec<String>,
) -> Result<String, LowerError> {
    let inst = function.inst(id);
    Ok(match &inst.op {
        Op::Unary(op) => unary_body(*op, &operands[0], ty, lines),
        Op::Binary(op) => binary_body(*op, &operands[0], &operands[1], ty, lines),
        Op::Select => {
            let zero = format!("%s{}", lines.len());
            lines.push(format!("{zero} = arith.constant 0.0 : {ty}"));
            let condition = format!("%s{}", lines.len());
            lines.push(format!("{condition} = arith.cmpf une, {}, {zero} : {ty}", operands[0]));
            let selected = format!("%s{}", lines.len());
            lines.push(format!("{selected} = arith.select {condition}, {}, {} : {ty}", operands[1], operands[2]));
            selected
        }
        Op::Cast => {
            let name = format!("%s{}", lines.len());
            let conversion = match (function.ty(inst.args[0]).dtype, inst.ty.dtype) {
                (DType::I32, _) => Some(format!("arith.sitofp {} : i32 to {ty}", operands[0])),
                (DType::F32, DType::F64) => Some(format!("arith.extf {} : f32 to f64", operands[0])),
                (DType::F64, DType::F32) => Some(format!("arith.truncf {} : f64 to f32", operands[0])),
                _ => None,
            };
            match conversion {
                Some(conversion) => {
                    lines.push(format!("{name} = {conversion}"));
                    name
                }
                None => operands[0].clone(),
            }
        }
        Op::Constant { value } => {
            let name = format!("%s{}", lines.len());
            lines.push(format!("{name} = arith.constant {} : {ty}", float_literal(*value)));
            name
        }
        Op::Broadcast { .. } => operands[0].clone(),
        other => return Err(unsupported(other)),
    })
}

/// The product of two matrices (`[m, k] @ [k, n]`): in `f32` a call of the runtime's GEMM on the
/// operands' buffers, in `f64` a `linalg.generic` whose loops run i, k, j (the innermost loop walks
/// rows of the right operand and of the result contiguously, which LLVM vectorises).
fn product_2d(emitter: &mut Emitter, dtype: DType, left: (&str, &[i64]), right: (&str, &[i64])) -> (String, Vec<i64>) {
    let (left_rows, left_rows_shape) = left;
    let (right_value, right_shape) = right;
    let out_shape = vec![left_rows_shape[0], right_shape[1]];
    let name = emitter.fresh();
    if dtype == DType::F32 {
        emitter.uses_gemm = true;
        let out_type = tensor_type(&out_shape, dtype);
        let mut dynamic = Vec::new();
        for (value, operand_shape) in [(left_rows, left_rows_shape), (right_value, right_shape)] {
            let memref = emitter.fresh();
            emitter.line(&format!(
                "{memref} = bufferization.to_buffer {value} read_only : {} to {}",
                tensor_type(operand_shape, dtype),
                memref_type(operand_shape, dtype)
            ));
            let cast = emitter.fresh();
            emitter.line(&format!(
                "{cast} = memref.cast {memref} : {} to {GEMM_MEMREF}",
                memref_type(operand_shape, dtype)
            ));
            dynamic.push(cast);
        }
        let output = emitter.fresh();
        emitter.line(&format!("{output} = memref.alloc() : {}", memref_type(&out_shape, dtype)));
        let output_cast = emitter.fresh();
        emitter.line(&format!(
            "{output_cast} = memref.cast {output} : {} to {GEMM_MEMREF}",
            memref_type(&out_shape, dtype)
        ));
        emitter.line(&format!(
            "func.call @curv_sgemm({}, {}, {output_cast}) : ({GEMM_MEMREF}, {GEMM_MEMREF}, {GEMM_MEMREF}) -> ()",
            dynamic[0], dynamic[1]
        ));
        emitter.line(&format!(
            "{name} = bufferization.to_tensor {output} restrict writable : {} to {out_type}",
            memref_type(&out_shape, dtype)
        ));
    } else {
        let init = emitter.filled(&out_shape, dtype, 0.0);
        let ty = element(dtype);
        emitter.line(&format!(
            "{name} = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d1)>, affine_map<(d0, d1, d2) -> (d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d2)>], iterator_types = [\"parallel\", \"reduction\", \"parallel\"]}} ins({left_rows}, {right_value} : {}, {}) outs({init} : {}) {{",
            tensor_type(left_rows_shape, dtype),
            tensor_type(right_shape, dtype),
            tensor_type(&out_shape, dtype)
        ));
        emitter.line(&format!("^bb0(%a0: {ty}, %a1: {ty}, %out: {ty}):"));
        emitter.line(&format!("  %s0 = arith.mulf %a0, %a1 : {ty}"));
        emitter.line(&format!("  %s1 = arith.addf %out, %s0 : {ty}"));
        emitter.line(&format!("  linalg.yield %s1 : {ty}"));
        emitter.line(&format!("}} -> {}", tensor_type(&out_shape, dtype)));
    }
    (name, out_shape)
}

/// `[..., m, k] @ [k, n]` folds the leading dimensions into rows; `[b, m, k] @ [b, k, n]` uses
/// `linalg.batch_matmul` (higher batch ranks are folded into one batch dimension).
fn lower_matmul(emitter: &mut Emitter, result: ValueId, left: ValueId, right: ValueId) -> Result<(), LowerError> {
    let dtype = emitter.dtype(result);
    let left_shape = emitter.shape(left).to_vec();
    let right_shape = emitter.shape(right).to_vec();
    let result_shape = emitter.shape(result).to_vec();
    let n = right_shape[right_shape.len() - 1];
    let collapse = |emitter: &mut Emitter, value: String, shape: &[i64], keep_last: usize| -> (String, Vec<i64>) {
        // Folds all but the last `keep_last` dimensions into one.
        let leading = shape.len() - keep_last;
        if leading <= 1 {
            return (value, shape.to_vec());
        }
        let mut folded = vec![shape[..leading].iter().product::<i64>()];
        folded.extend_from_slice(&shape[leading..]);
        let mut groups =
            vec![format!("[{}]", (0..leading).map(|axis| axis.to_string()).collect::<Vec<_>>().join(", "))];
        for axis in leading..shape.len() {
            groups.push(format!("[{axis}]"));
        }
        let name = emitter.fresh();
        emitter.line(&format!(
            "{name} = tensor.collapse_shape {value} [{}] : {} into {}",
            groups.join(", "),
            tensor_type(shape, dtype),
            tensor_type(&folded, dtype)
        ));
        (name, folded)
    };
    let (product, product_shape) = if right_shape.len() == 2 {
        let (left_rows, left_rows_shape) = collapse(emitter, emitter.value(left), &left_shape, 1);
        let right_value = emitter.value(right);
        product_2d(emitter, dtype, (&left_rows, &left_rows_shape), (&right_value, &right_shape))
    } else {
        let (left_batched, left_batched_shape) = collapse(emitter, emitter.value(left), &left_shape, 2);
        let (right_batched, right_batched_shape) = collapse(emitter, emitter.value(right), &right_shape, 2);
        let out_shape = vec![left_batched_shape[0], left_batched_shape[1], n];
        let init = emitter.filled(&out_shape, dtype, 0.0);
        let name = emitter.fresh();
        emitter.line(&format!(
            "{name} = linalg.batch_matmul ins({left_batched}, {right_batched} : {}, {}) outs({init} : {}) -> {}",
            tensor_type(&left_batched_shape, dtype),
            tensor_type(&right_batched_shape, dtype),
            tensor_type(&out_shape, dtype),
            tensor_type(&out_shape, dtype)
        ));
        (name, out_shape)
    };
    let target = emitter.value(result);
    if product_shape == result_shape {
        emitter.line(&format!(
            "{target} = tensor.cast {product} : {} to {}",
            tensor_type(&product_shape, dtype),
            tensor_type(&result_shape, dtype)
        ));
    } else {
        // The product's first dimension unfolds into the result's leading dimensions.
        let leading = result_shape.len() - (product_shape.len() - 1);
        let mut groups =
            vec![format!("[{}]", (0..leading).map(|axis| axis.to_string()).collect::<Vec<_>>().join(", "))];
        for axis in leading..result_shape.len() {
            groups.push(format!("[{axis}]"));
        }
        let sizes: Vec<String> = result_shape.iter().map(|size| size.to_string()).collect();
        emitter.line(&format!(
            "{target} = tensor.expand_shape {product} [{}] output_shape [{}] : {} into {}",
            groups.join(", "),
            sizes.join(", "),
            tensor_type(&product_shape, dtype),
            tensor_type(&result_shape, dtype)
        ));
    }
    Ok(())
}

/// Maps a span in the user's file (`None`) or in a standard-library module to an MLIR location.
pub type ModuleLocator<'a> = dyn Fn(Option<&str>, curv_grammar::Span) -> String + 'a;

/// The MLIR of a train program as `curv emit --stage mlir` prints it: the loss-and-gradient
/// function and, for every parameter governed by a `rule`, the rule's update functions
/// specialised to that parameter's size; each function takes its buffers as `abi` says.
pub fn lower_train_program(
    train: &curv_ir::TrainProgram,
    rules: &[curv_ir::RuleProgram],
    gradients: &Function,
    locate: Option<&ModuleLocator<'_>>,
    abi: EntryAbi,
) -> Result<String, LowerError> {
    let mut out = String::new();
    let user_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(None, span));
    let (text, _) = lower_function_for(
        gradients,
        "loss_and_gradients",
        &HashMap::new(),
        user_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
        abi,
    )?;
    let _ = writeln!(out, "// train {}: loss and gradients", train.name);
    out.push_str(&text);
    // Parameters sharing an elementwise rule: one module per block for the whole group.
    let groups = curv_ir::group::plan_groups(&train.optimizer.plans, rules, &[]);
    for (group_index, group) in groups.iter().enumerate() {
        let Some(rule) = rules.iter().find(|rule| rule.name == group.rule) else { continue };
        let members: Vec<(String, i64)> = group
            .plans
            .iter()
            .map(|&plan| {
                let param = &train.params[train.optimizer.plans[plan].param];
                (param.name.clone(), param.ty.element_count().unwrap_or(0))
            })
            .collect();
        let bindings: HashMap<String, i64> = members
            .iter()
            .enumerate()
            .map(|(member, (_, size))| (curv_ir::group::member_symbol(member, "P"), *size))
            .collect();
        for (block, update) in rule.updates.iter().enumerate() {
            let name = format!("rule_{}_block{block}_group{group_index}", rule.name);
            let module = rule.module.clone();
            let rule_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(module.as_deref(), span));
            let replicated = curv_ir::group::replicate(&update.function, members.len());
            let (text, _) = lower_function_for(
                &replicated,
                &name,
                &bindings,
                rule_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
                abi,
            )?;
            let described: Vec<String> = members.iter().map(|(name, size)| format!("{name} ({size})")).collect();
            let _ = writeln!(
                out,
                "// rule {} (every {} steps from {}), one kernel for {}",
                rule.name,
                update.period,
                update.from,
                described.join(", ")
            );
            out.push_str(&text);
        }
    }
    let grouped: Vec<usize> = groups.iter().flat_map(|group| group.plans.iter().copied()).collect();
    let mut done: Vec<(String, i64)> = Vec::new();
    for (plan_index, plan) in train.optimizer.plans.iter().enumerate() {
        if plan.structure != curv_ir::StructureKind::Rule || grouped.contains(&plan_index) {
            continue;
        }
        let Some(rule) = rules.iter().find(|rule| rule.name == plan.rule_name) else { continue };
        let size = train.params[plan.param].ty.element_count().unwrap_or(0);
        if done.contains(&(rule.name.clone(), size)) {
            continue;
        }
        done.push((rule.name.clone(), size));
        let bindings = HashMap::from([("P".to_string(), size)]);
        for (block, update) in rule.updates.iter().enumerate() {
            let name = format!("rule_{}_block{block}_p{size}", rule.name);
            let module = rule.module.clone();
            let rule_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(module.as_deref(), span));
            let (text, _) = lower_function_for(
                &update.function,
                &name,
                &bindings,
                rule_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
                abi,
            )?;
            let _ = writeln!(
                out,
                "// rule {} (every {} steps from {}), parameters of {size} elements",
                rule.name, update.period, update.from
            );
            out.push_str(&text);
        }
    }
    Ok(out)
}
