//! Lowering of one IR function to an MLIR module in the `linalg`, `tensor`, `arith` and `math`
//! dialects, as text. Every external value (input, parameter, data, hyperparameter, step,
//! statistic) becomes an argument, every output a destination memref written with
//! `bufferization.materialize_in_destination`, so the compiled function reads and writes caller
//! buffers. Shapes are static: symbolic dimensions are bound by the caller.

use curv_ir::{BinaryOp, DType, Dim, Function, Op, ReduceOp, UnaryOp, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

mod entry;
mod fused;
mod matmul;
mod scalar;
mod schedule;
mod segment;
mod structured;
mod train;

pub use entry::{entry, EntryAbi};
use fused::*;
use matmul::*;
use scalar::*;
use schedule::*;
pub use segment::{PartLimits, MAX_PART_LINES, SPLIT_LINES};
pub use train::{lower_train_program, ModuleLocator};

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

/// The fewest consecutive outputs of one constant that are written by a loop.
const MIN_FILL_RUN: usize = 8;

/// The runs of at least [`MIN_FILL_RUN`] consecutive outputs whose values are one float
/// constant over one shape: `(first output, end, constant)`.
fn constant_output_runs(emitter: &Emitter) -> Vec<(usize, usize, f64)> {
    let function = emitter.function;
    let key = |index: usize| {
        let value = function.outputs[index].1;
        match function.inst(value).op {
            Op::Constant { value: constant } if emitter.dtype(value) != DType::I32 => {
                Some((constant.to_bits(), emitter.shape(value).to_vec(), emitter.dtype(value)))
            }
            _ => None,
        }
    };
    let mut runs = Vec::new();
    let mut first = 0;
    while first < function.outputs.len() {
        let Some(run_key) = key(first) else {
            first += 1;
            continue;
        };
        let mut end = first + 1;
        while end < function.outputs.len() && key(end).as_ref() == Some(&run_key) {
            end += 1;
        }
        if end - first >= MIN_FILL_RUN {
            runs.push((first, end, f64::from_bits(run_key.0)));
        }
        first = end;
    }
    runs
}

fn is_external(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Param { .. } | Op::Data { .. } | Op::Hyper { .. } | Op::Step | Op::Statistic { .. }
    )
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
    lower_function_for(function, name, bindings, locate, EntryAbi::Table, PartLimits::default())
}

/// [`lower_function`] with a long function cut into parts where `limits` say (see
/// [`PartLimits`]; tests cut short functions to check that the parts compute what the whole does).
pub fn lower_function_in_parts(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    limits: PartLimits,
) -> Result<(String, Signature), LowerError> {
    lower_function_for(function, name, bindings, None, EntryAbi::Table, limits)
}

/// [`lower_function_with_locations`] for a GPU: the function takes one memref per buffer
/// ([`EntryAbi::Descriptors`]), as `gpu::lower_for_cuda` expects.
pub fn lower_function_for_gpu(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    locate: Option<&dyn Fn(curv_grammar::Span) -> String>,
) -> Result<(String, Signature), LowerError> {
    lower_function_for(function, name, bindings, locate, EntryAbi::Descriptors, PartLimits::default())
}

fn lower_function_for(
    function: &Function,
    name: &str,
    bindings: &HashMap<String, i64>,
    locate: Option<&dyn Fn(curv_grammar::Span) -> String>,
    abi: EntryAbi,
    limits: PartLimits,
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
    // Where each step's text starts in the body, for cutting a long function into parts.
    let mut boundaries = Vec::with_capacity(steps.len() + 1);
    for step in steps {
        boundaries.push(emitter.body.len());
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
    boundaries.push(emitter.body.len());
    emitter.location = None;
    let mut outputs = Vec::new();
    let mut output_lines = Vec::new();
    // Runs of outputs that are one constant (the zero gradients of unused parameters), each
    // written by one loop over its table slots on the CPU: (first output, end, constant).
    let runs = if abi == EntryAbi::Table { constant_output_runs(&emitter) } else { Vec::new() };
    let first_output_slot = buffers.len();
    for (index, (output_name, value)) in function.outputs.iter().enumerate() {
        let start = emitter.body.len();
        let shape = emitter.shape(*value).to_vec();
        let dtype = emitter.dtype(*value);
        let argument_name = format!("%out{index}");
        buffers.push((argument_name.clone(), shape.clone(), dtype));
        outputs.push((output_name.clone(), shape.clone(), dtype));
        if let Some(&(first, end, constant)) = runs.iter().find(|(first, end, _)| (*first..*end).contains(&index)) {
            if index == first {
                let slots = first_output_slot + first..first_output_slot + end;
                emitter.body.push_str(&entry::fill_from_table(slots, &shape, dtype, constant));
                output_lines.push((*value, emitter.body[start..].to_string()));
            }
            continue;
        }
        let text = format!(
            "bufferization.materialize_in_destination {} in restrict writable {argument_name} : ({}, {}) -> ()",
            emitter.value(*value),
            tensor_type(&shape, dtype),
            memref_type(&shape, dtype)
        );
        emitter.line(&text);
        output_lines.push((*value, emitter.body[start..].to_string()));
    }
    let declarations = if emitter.uses_gemm { format!("  {GEMM_DECLARATION}\n") } else { String::new() };
    if abi == EntryAbi::Table {
        let step_texts: Vec<segment::StepText> = boundaries
            .windows(2)
            .map(|range| segment::StepText { text: emitter.body[range[0]..range[1]].to_string() })
            .collect();
        let value_type = |value: u32| (emitter.shapes[value as usize].clone(), function.insts[value as usize].ty.dtype);
        if let Some(functions) = segment::split(limits, name, &step_texts, &output_lines, &buffers, &value_type) {
            let text = format!(
                "module attributes {{transform.with_named_sequence}} {{\n{declarations}{functions}{}}}\n",
                schedule(&emitter.vector_tiles)
            );
            return Ok((text, Signature { arguments, outputs }));
        }
    }
    emitter.line("return");
    let (signature, prologue) = entry(name, &buffers, abi);
    let text = format!(
        "module attributes {{transform.with_named_sequence}} {{\n{declarations}  {signature} attributes {{ llvm.emit_c_interface }} {{\n{prologue}{}  }}\n{}}}\n",
        emitter.body,
        schedule(&emitter.vector_tiles)
    );
    Ok((text, Signature { arguments, outputs }))
}
