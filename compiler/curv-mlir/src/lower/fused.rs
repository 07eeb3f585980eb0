//! The kernels of the fusion plan as `linalg.generic` ops: an elementwise chain, a reduction with its
//! prologue, a matrix product's epilogue. The instructions a kernel inlines are resolved into its
//! body (iteratively past a depth), and scalar work that depends only on rank-0 inputs is hoisted in
//! front of the generic.

use super::*;

/// What the lowering emits next.
pub(super) enum Step {
    Instruction(usize),
    Fused(usize),
    FusedReduction(usize),
    MatMulEpilogue(usize),
}

/// Emits a reduction with the elementwise chain it absorbed (its prologue) as one
/// `linalg.generic` over the operand's index space: the chain is computed in the body from the
/// kernel's inputs and combined into the result, whose map keeps the non-reduced dimensions.
pub(super) fn emit_fused_reduction(
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
pub(super) fn emit_fused(
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
pub(super) fn emit_fused_after(
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
pub(super) fn value_tokens(line: &str) -> Vec<(usize, usize)> {
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
pub(super) fn hoist_invariant_lines(
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
pub(super) fn rank_zero_argument(inputs: &[(ValueId, Vec<String>)], token: &str) -> Option<usize> {
    let index: usize = token.strip_prefix("%a")?.parse().ok()?;
    inputs.get(index).filter(|(_, results)| results.is_empty()).map(|_| index)
}

/// The scalar code of a kernel's instructions `insts` inside a `linalg.generic` body over
/// `shape`: operands are resolved (inputs registered in `inputs`), results named in `names`.
#[allow(clippy::too_many_arguments)]
pub(super) fn emit_body(
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
pub(super) fn resolve_operand(
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
pub(super) const RECURSIVE_INLINING: usize = 64;

/// The inlined instructions `arg` reads, directly or through other inlined instructions, that
/// this kernel has not computed yet: operands before their users, left to right.
pub(super) fn unresolved_inlined(
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
pub(super) fn resolve_at_depth(
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
pub(super) fn scalar_instruction(
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
