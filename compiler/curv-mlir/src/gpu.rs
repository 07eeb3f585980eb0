//! The first stage of the GPU path: the same kernel modules the CPU backend compiles, lowered
//! through MLIR's `gpu` and `nvvm` dialects to PTX (`curv emit --stage ptx`).
//!
//! The pipeline reorders the loops of reductions so that their parallel loops come first
//! ([`parallel_loops_first`]), bufferises the module as the CPU pipeline does, turns each `linalg`
//! op into parallel loops (reductions stay sequential inside a thread), tiles the parallel loops
//! with constant inner bounds (a guard inside instead of `min` bounds, so that every loop nest
//! becomes a launch: 256 threads for a module of one-dimensional loops, 32 by 8 otherwise,
//! [`tile_sizes_for`]) and maps the tiles to blocks and their iterations to threads, innermost
//! loop first, outlines every launch into a `gpu.func` kernel, and runs `gpu-lower-to-nvvm-pipeline` with `cubin-format=isa`,
//! which gives PTX text without a CUDA toolkit. The chip and PTX version come from [`GpuTarget`],
//! never from a user's string (an `sm_90` target without `+ptx80` aborts LLVM). Matrix products
//! stay calls on the host side of the module (on a GPU they will be cuBLAS calls). The math
//! functions MLIR's NVVM lowering leaves to libdevice (`__nv_*`) are defined in every GPU module
//! with PTX instructions ([`DEVICE_MATH`]), so the PTX needs nothing at load time.

use crate::MlirError;

/// The NVIDIA targets curv generates PTX for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuTarget {
    /// Ampere (A100): `sm_80`, PTX ISA 7.0.
    Sm80,
    /// Hopper (H100, H200): `sm_90`, PTX ISA 8.0.
    Sm90,
}

impl GpuTarget {
    /// The target named `sm_80` or `sm_90`.
    pub fn parse(name: &str) -> Option<GpuTarget> {
        match name {
            "sm_80" => Some(GpuTarget::Sm80),
            "sm_90" => Some(GpuTarget::Sm90),
            _ => None,
        }
    }

    pub fn chip(self) -> &'static str {
        match self {
            GpuTarget::Sm80 => "sm_80",
            GpuTarget::Sm90 => "sm_90",
        }
    }

    /// The PTX feature the chip needs (checked against the table, never user text).
    pub fn features(self) -> &'static str {
        match self {
            GpuTarget::Sm80 => "+ptx70",
            GpuTarget::Sm90 => "+ptx80",
        }
    }
}

/// The first part of the GPU pipeline: a kernel module bufferised, with the deallocations of its
/// intermediate buffers.
pub const GPU_BUFFERISATION_PIPELINE: &str = "builtin.module(\
canonicalize,\
func.func(linalg-fuse-elementwise-ops),\
canonicalize,\
eliminate-empty-tensors,\
one-shot-bufferize{bufferize-function-boundaries=false},\
buffer-deallocation-pipeline)";

/// The second part: the module's `linalg` ops (its copies included, [`copies_as_kernels`]) turned
/// into parallel loops, tiled by `tile_sizes`, mapped to blocks and threads (innermost loop
/// first: consecutive threads take consecutive elements of a row-major buffer, so a warp's loads
/// coalesce) and outlined into `gpu.func` kernels, each in its own `gpu.module`.
pub fn gpu_outlining_pipeline(tile_sizes: &str) -> String {
    format!(
        "builtin.module(\
func.func(convert-linalg-to-parallel-loops,scf-parallel-loop-tiling{{parallel-loop-tile-sizes={tile_sizes} no-min-max-bounds=true}},gpu-map-parallel-loops{{mapping-policy=innermost-first}},convert-parallel-loops-to-gpu),\
gpu-kernel-outlining,\
canonicalize)"
    )
}

/// Every `memref.copy` of a bufferised module with at least one dimension made a `linalg.copy`,
/// which becomes a kernel. Bufferisation copies results into the function's output buffers with
/// `memref.copy`, which would run on the host: the CPU would read the kernels' results and write
/// the outputs itself, moving every page of both between the GPU and the host, and the next
/// kernel to use them would fault them back.
///
/// A copy from or to a constant of the module (`memref.get_global`, or a view of one) stays on
/// the host: the constant is in the host program's memory, which a kernel cannot reach.
pub fn copies_as_kernels(module: &str) -> String {
    let mut out = String::with_capacity(module.len());
    let mut host_values: Vec<&str> = Vec::new();
    for line in module.split_inclusive('\n') {
        // `%x = memref.get_global ...`, and views of such values, live in host memory.
        if let Some((value, operation)) = line.trim().split_once(" = ") {
            let view = [
                "memref.subview ",
                "memref.cast ",
                "memref.reinterpret_cast ",
                "memref.collapse_shape ",
                "memref.expand_shape ",
            ]
            .iter()
            .find_map(|view| operation.strip_prefix(view));
            let of_host = view.is_some_and(|operands| {
                let first = operands.split([' ', ',', '[', '(']).next().unwrap_or("");
                host_values.contains(&first)
            });
            if operation.starts_with("memref.get_global ") || of_host {
                host_values.push(value.trim());
            }
        }
        let rewritten = line.find("memref.copy ").and_then(|start| {
            // `memref.copy %a, %b : memref<...> to memref<...>`
            let operands = &line[start + "memref.copy ".len()..];
            let (values, types) = operands.split_once(" : ")?;
            let (source, target) = values.split_once(", ")?;
            // The copy keeps its location, when it has one.
            let (types, location) = match types.find(" loc(") {
                Some(start) => (&types[..start], types[start..].trim_end()),
                None => (types, ""),
            };
            let (source_type, target_type) = types.trim_end().split_once(" to ")?;
            let ranked = source_type.starts_with("memref<") && source_type.contains('x');
            let on_device = !host_values.contains(&source.trim()) && !host_values.contains(&target.trim());
            (ranked && on_device).then(|| {
                format!(
                    "{}linalg.copy ins({source} : {source_type}) outs({target} : {target_type}){location}\n",
                    &line[..start]
                )
            })
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
    }
    out
}

/// The tile sizes of a module whose loops are at most one-dimensional (an optimizer rule's update
/// over a flattened parameter): blocks of 256 threads, one element each. A block of 32 threads
/// would leave half of a multiprocessor's thread slots empty (it holds at most 32 blocks) and
/// halve the bandwidth of a memory-bound update.
pub const TILES_ONE_DIMENSIONAL: &str = "256";
/// The tile sizes of every other module: 32 rows by 8 columns, the 8 columns of a row being one
/// 32-byte memory sector of `f32`s, read by neighbouring threads.
pub const TILES_TWO_DIMENSIONAL: &str = "32,8";

/// The tile sizes for a kernel module: [`TILES_ONE_DIMENSIONAL`] when none of its `linalg.generic`
/// ops has more than one loop, [`TILES_TWO_DIMENSIONAL`] otherwise.
pub fn tile_sizes_for(text: &str) -> &'static str {
    let wider =
        text.lines().filter_map(|line| iterator_types_of(line).map(|(_, _, kinds)| kinds.len())).any(|loops| loops > 1);
    if wider {
        TILES_TWO_DIMENSIONAL
    } else {
        TILES_ONE_DIMENSIONAL
    }
}

/// The byte range of the list inside `iterator_types = [...]` of a line, and its entries.
fn iterator_types_of(line: &str) -> Option<(usize, usize, Vec<&str>)> {
    if !line.contains("linalg.generic") {
        return None;
    }
    let key = "iterator_types = [";
    let start = line.find(key)? + key.len();
    let end = start + line[start..].find(']')?;
    let kinds = line[start..end].split(',').map(|kind| kind.trim().trim_matches('"')).collect();
    Some((start, end, kinds))
}

/// Reorders the loops of every `linalg.generic` whose reduction loops come before a parallel one
/// (a sum over the batch: `["reduction", "parallel"]`) so that the parallel loops come first.
///
/// The loops of a generic op become parallel loops in their order, and a reduction loop outside
/// the parallel ones stays on the host: one kernel launch per iteration of it (a bias gradient
/// over a batch of 4096 rows was 4096 launches). With the parallel loops first, the reduction runs
/// inside each thread. The op's meaning is unchanged: the loops are renumbered in its indexing
/// maps and `linalg.index` ops, and every output element sums its terms in the same order.
pub fn parallel_loops_first(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n');
    while let Some(line) = lines.next() {
        let Some((start, end, kinds)) = iterator_types_of(line) else {
            out.push_str(line);
            continue;
        };
        let first_parallel_after_reduction =
            kinds.iter().enumerate().any(|(index, kind)| *kind == "parallel" && kinds[..index].contains(&"reduction"));
        if !first_parallel_after_reduction {
            out.push_str(line);
            continue;
        }
        // The new order: parallel loops, then reduction loops, each in their old order.
        let order: Vec<usize> = (0..kinds.len())
            .filter(|&index| kinds[index] == "parallel")
            .chain((0..kinds.len()).filter(|&index| kinds[index] != "parallel"))
            .collect();
        let mut position = vec![0; kinds.len()];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        let reordered: Vec<String> = order.iter().map(|&old| format!("\"{}\"", kinds[old])).collect();
        let header =
            format!("{}{}{}", renumber_map_results(&line[..start], &position), reordered.join(", "), &line[end..]);
        out.push_str(&header);
        // The body, up to the brace that closes the op's region: `linalg.index` renumbered.
        let mut depth = brace_balance(line);
        while depth > 0 {
            let Some(body) = lines.next() else { break };
            depth += brace_balance(body);
            out.push_str(&renumber_index_ops(body, &position));
        }
    }
    out
}

/// Reductions at least this long are split in two stages on the GPU ([`split_long_reductions`]).
pub const SPLIT_REDUCTION_MINIMUM: i64 = 1024;
/// The most partial results a split reduction makes per output element.
const SPLIT_REDUCTION_PARTS: i64 = 64;

/// Splits every long reduction (one reduction loop, innermost, of at least
/// [`SPLIT_REDUCTION_MINIMUM`] iterations, whose body combines into its output with `arith.addf`,
/// `arith.maximumf` or `arith.minimumf`) in two `linalg.generic` ops: the first computes `S`
/// partial results per output element (the reduction loop split into `S` parallel parts of `K`
/// iterations, `S K` being the length), the second combines them into the original output. On the
/// GPU the reduction loop runs inside one thread: a bias gradient over a batch of 4096 rows was
/// 4096 sequential iterations per thread, where the split form runs `S` times as many threads on
/// `K` iterations each, then `S` per output. The sum's terms are added in another order, so
/// results may differ in the last bits. Ops it does not recognise are left as they are.
pub fn split_long_reductions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if iterator_types_of(line).is_none() {
            out.push_str(line);
            continue;
        }
        // The op: its header, its body and the line that closes it.
        let mut op = vec![line];
        let mut depth = brace_balance(line);
        while depth > 0 {
            let Some(body) = lines.next() else { break };
            depth += brace_balance(body);
            op.push(body);
        }
        match split_reduction(&op) {
            Some(split) => out.push_str(&split),
            None => op.iter().for_each(|line| out.push_str(line)),
        }
    }
    out
}

/// The dimensions and element type of `tensor<4096x256xf32>` (`tensor<f32>`: no dimensions).
fn tensor_type(text: &str) -> Option<(Vec<i64>, &str)> {
    let inner = text.trim().strip_prefix("tensor<")?.strip_suffix('>')?;
    let mut parts: Vec<&str> = inner.split('x').collect();
    let element = parts.pop()?;
    let dims = parts.iter().map(|part| part.parse::<i64>().ok()).collect::<Option<Vec<i64>>>()?;
    Some((dims, element))
}

/// The domain and results of each `affine_map<(DOMAIN) -> (RESULTS)>` in `text`.
fn affine_maps(text: &str) -> Vec<(&str, &str)> {
    let mut maps = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("affine_map<(") {
        let body = &rest[start + "affine_map<(".len()..];
        let Some((domain, tail)) = body.split_once(") -> (") else { break };
        let Some(end) = tail.find(")>") else { break };
        maps.push((domain, &tail[..end]));
        rest = &tail[end..];
    }
    maps
}

/// The two-stage form of one `linalg.generic` op (its lines), or None when it is not a long
/// reduction [`split_long_reductions`] knows how to split.
fn split_reduction(op: &[&str]) -> Option<String> {
    let header = op.first()?;
    let (_, _, kinds) = iterator_types_of(header)?;
    let loops = kinds.len();
    if loops == 0 || kinds[loops - 1] != "reduction" || kinds[..loops - 1].iter().any(|kind| *kind != "parallel") {
        return None;
    }
    let reduced = loops - 1;
    let (result, rest) = header.trim_start().split_once(" = linalg.generic {")?;
    if result.contains(',') {
        return None;
    }
    let indentation = &header[..header.len() - header.trim_start().len()];
    let maps_text = &rest[..rest.find("iterator_types")?];
    let maps = affine_maps(maps_text);
    let operands = &rest[rest.find("} ins(")? + "} ins(".len()..];
    let (ins, after_ins) = operands.split_once(") outs(")?;
    let (outs, tail) = after_ins.split_once(") {")?;
    if !tail.trim().is_empty() {
        return None;
    }
    let (in_names, in_types) = ins.split_once(" : ")?;
    let in_types: Vec<&str> = in_types.split(", ").collect();
    let (out_name, out_type) = outs.split_once(" : ")?;
    if out_name.contains(',') || maps.len() != in_types.len() + 1 {
        return None;
    }
    let (out_dims, element) = tensor_type(out_type)?;
    if element != "f32" {
        return None;
    }
    // The reduction's length, from an input that reads the reduction loop as a dimension.
    let reduction_loop = format!("d{reduced}");
    let length = maps[..in_types.len()].iter().zip(&in_types).find_map(|((_, results), ty)| {
        let position = results.split(", ").position(|result| result.trim() == reduction_loop)?;
        tensor_type(ty).and_then(|(dims, _)| dims.get(position).copied())
    })?;
    if length < SPLIT_REDUCTION_MINIMUM {
        return None;
    }
    let mut parts = SPLIT_REDUCTION_PARTS;
    while parts > 1 && length % parts != 0 {
        parts /= 2;
    }
    if parts < 8 {
        return None;
    }
    let each = length / parts;
    // The body: its block arguments (the output's last), the value it yields and the op that
    // combines into the output, which must be the only use of the output's argument.
    let close = op.last()?;
    let body = &op[1..op.len() - 1];
    let arguments = body.first()?.trim().strip_prefix("^bb0(")?.split_once("):")?.0;
    let output_argument = arguments.split(", ").last()?.split(':').next()?.trim();
    let yielded = body.iter().find_map(|line| line.trim().strip_prefix("linalg.yield "))?.split(" : ").next()?.trim();
    let combiner = body.iter().find_map(|line| {
        let (name, operation) = line.trim().split_once(" = ")?;
        (name == yielded).then_some(operation)
    })?;
    let (operation, operands) = combiner.split_once(' ')?;
    let neutral = match operation {
        "arith.addf" => "0.000000e+00",
        "arith.maximumf" => "0xFF800000",
        "arith.minimumf" => "0x7F800000",
        _ => return None,
    };
    let operands: Vec<&str> = operands.split(" : ").next()?.split(", ").map(str::trim).collect();
    if operands.len() != 2 || !operands.contains(&output_argument) {
        return None;
    }
    let uses = body
        .iter()
        .skip(1)
        .flat_map(|line| line.split(|character: char| !(character.is_alphanumeric() || "%_$.".contains(character))))
        .filter(|token| *token == output_argument)
        .count();
    if uses != 1 || body.iter().any(|line| line.contains("linalg.index")) {
        return None;
    }
    let location = close.rfind(" loc(").map_or("", |start| close[start..].trim());
    // Stage one: loops `(d0 .. d{reduced - 1}, part, step)`. Every input that reads the reduction
    // loop as a dimension is reshaped so that the dimension is `[parts, each]` (a map cannot
    // read `part * each + step`: linalg infers every loop's bounds from a plain dimension), and
    // reads it as `(part, step)`; the output has the parts as a last dimension.
    let domain = (0..=reduced + 1).map(|index| format!("d{index}")).collect::<Vec<_>>().join(", ");
    let in_names: Vec<&str> = in_names.split(", ").map(str::trim).collect();
    if in_names.len() != in_types.len() {
        return None;
    }
    let name = result.trim();
    let mut reshapes = String::new();
    let (mut stage_one_inputs, mut stage_one_types, mut stage_one_maps) = (Vec::new(), Vec::new(), Vec::new());
    for (index, ((input, ty), (_, results))) in in_names.iter().zip(&in_types).zip(&maps).enumerate() {
        let results: Vec<&str> = results.split(", ").map(str::trim).filter(|result| !result.is_empty()).collect();
        let reads = |result: &&str| {
            result.split(|character: char| !character.is_alphanumeric()).any(|token| token == reduction_loop)
        };
        let plain: Vec<usize> = (0..results.len()).filter(|&position| results[position] == reduction_loop).collect();
        let (dims, input_element) = tensor_type(ty)?;
        match (plain.as_slice(), results.iter().filter(|result| reads(result)).count()) {
            (_, 0) => {
                stage_one_inputs.push(input.to_string());
                stage_one_types.push(ty.to_string());
                stage_one_maps.push(format!("affine_map<({domain}) -> ({})>", results.join(", ")));
            }
            ([position], 1) if dims.len() == results.len() => {
                let position = *position;
                let mut expanded = dims.clone();
                expanded.splice(position..=position, [parts, each]);
                let expanded_type = format!(
                    "tensor<{}x{input_element}>",
                    expanded.iter().map(i64::to_string).collect::<Vec<_>>().join("x")
                );
                let mut groups = Vec::new();
                let mut next = 0;
                for axis in 0..dims.len() {
                    if axis == position {
                        groups.push(format!("[{}, {}]", next, next + 1));
                        next += 2;
                    } else {
                        groups.push(format!("[{next}]"));
                        next += 1;
                    }
                }
                let reshaped = format!("{name}_split_input{index}");
                reshapes.push_str(&format!(
                    "{indentation}{reshaped} = tensor.expand_shape {input} [{}] output_shape [{}] : {ty} into {expanded_type} {location}\n",
                    groups.join(", "),
                    expanded.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                ));
                let mut results: Vec<String> = results.iter().map(|result| result.to_string()).collect();
                results.splice(position..=position, [reduction_loop.clone(), format!("d{}", reduced + 1)]);
                stage_one_inputs.push(reshaped);
                stage_one_types.push(expanded_type);
                stage_one_maps.push(format!("affine_map<({domain}) -> ({})>", results.join(", ")));
            }
            _ => return None,
        }
    }
    let out_results: Vec<&str> =
        maps[in_types.len()].1.split(", ").map(str::trim).filter(|result| !result.is_empty()).collect();
    let partial_results: Vec<String> =
        out_results.iter().map(|result| result.to_string()).chain([reduction_loop.clone()]).collect();
    stage_one_maps.push(format!("affine_map<({domain}) -> ({})>", partial_results.join(", ")));
    let partial_dims: Vec<String> = out_dims.iter().chain([&parts]).map(i64::to_string).collect();
    let partial_type = format!("tensor<{}xf32>", partial_dims.join("x"));
    let parallel = |count: usize| std::iter::repeat_n("\"parallel\"", count).collect::<Vec<_>>();
    let stage_one_kinds = [parallel(reduced + 1), vec!["\"reduction\""]].concat().join(", ");
    let mut out = reshapes;
    out.push_str(&format!("{indentation}{name}_split_empty = tensor.empty() : {partial_type} {location}\n"));
    out.push_str(&format!("{indentation}{name}_split_neutral = arith.constant {neutral} : f32 {location}\n"));
    out.push_str(&format!(
        "{indentation}{name}_split_init = linalg.fill ins({name}_split_neutral : f32) outs({name}_split_empty : {partial_type}) -> {partial_type} {location}\n"
    ));
    out.push_str(&format!(
        "{indentation}{name}_partial = linalg.generic {{indexing_maps = [{}], iterator_types = [{stage_one_kinds}]}} ins({} : {}) outs({name}_split_init : {partial_type}) {{\n",
        stage_one_maps.join(", "),
        stage_one_inputs.join(", "),
        stage_one_types.join(", ")
    ));
    body.iter().for_each(|line| out.push_str(line));
    let close_indentation = &close[..close.len() - close.trim_start().len()];
    out.push_str(&format!("{close_indentation}}} -> {partial_type} {location}\n"));
    // Stage two: the parts of each output element combined into the original output.
    let domain = (0..=reduced).map(|index| format!("d{index}")).collect::<Vec<_>>().join(", ");
    let stage_two_kinds = [parallel(reduced), vec!["\"reduction\""]].concat().join(", ");
    let body_indentation = body.first().map_or("", |line| &line[..line.len() - line.trim_start().len()]);
    let inner = format!("{body_indentation}  ");
    out.push_str(&format!(
        "{indentation}{name} = linalg.generic {{indexing_maps = [affine_map<({domain}) -> ({})>, affine_map<({domain}) -> ({})>], iterator_types = [{stage_two_kinds}]}} ins({name}_partial : {partial_type}) outs({out_name} : {out_type}) {{\n",
        partial_results.join(", "),
        out_results.join(", ")
    ));
    out.push_str(&format!("{body_indentation}^bb0(%part: f32, %accumulated: f32):\n"));
    out.push_str(&format!("{inner}%combined = {operation} %part, %accumulated : f32 {location}\n"));
    out.push_str(&format!("{inner}linalg.yield %combined : f32 {location}\n"));
    out.push_str(&format!("{close_indentation}}} -> {out_type} {location}\n"));
    Some(out)
}

fn brace_balance(line: &str) -> i64 {
    line.matches('{').count() as i64 - line.matches('}').count() as i64
}

/// `dK` made `d{position[K]}` in the results of every `affine_map<(...) -> (...)>` of `text`.
fn renumber_map_results(text: &str, position: &[usize]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(arrow) = rest.find(" -> (") {
        let results_start = arrow + " -> (".len();
        let Some(length) = rest[results_start..].find(')') else { break };
        out.push_str(&rest[..results_start]);
        out.push_str(&renumber_dimensions(&rest[results_start..results_start + length], position));
        rest = &rest[results_start + length..];
    }
    out.push_str(rest);
    out
}

/// Every `dK` (a loop of an affine map) of `expression` renumbered.
fn renumber_dimensions(expression: &str, position: &[usize]) -> String {
    let bytes = expression.as_bytes();
    let mut out = String::with_capacity(expression.len());
    let mut index = 0;
    while index < bytes.len() {
        let starts_name = bytes[index] == b'd' && (index == 0 || !(bytes[index - 1] as char).is_ascii_alphanumeric());
        let digits = bytes[index + 1..].iter().take_while(|byte| byte.is_ascii_digit()).count();
        if starts_name && digits > 0 {
            let number: usize = expression[index + 1..index + 1 + digits].parse().unwrap_or(usize::MAX);
            match position.get(number) {
                Some(new) => out.push_str(&format!("d{new}")),
                None => out.push_str(&expression[index..index + 1 + digits]),
            }
            index += 1 + digits;
        } else {
            out.push(bytes[index] as char);
            index += 1;
        }
    }
    out
}

/// `linalg.index K` made `linalg.index {position[K]}`.
fn renumber_index_ops(line: &str, position: &[usize]) -> String {
    let key = "linalg.index ";
    let Some(start) = line.find(key) else { return line.to_string() };
    let digits_start = start + key.len();
    let digits = line[digits_start..].bytes().take_while(u8::is_ascii_digit).count();
    match line[digits_start..digits_start + digits].parse::<usize>().ok().and_then(|number| position.get(number)) {
        Some(new) => format!("{}{new}{}", &line[..digits_start], &line[digits_start + digits..]),
        None => line.to_string(),
    }
}

/// A kernel module's loops outlined into GPU kernels: [`parallel_loops_first`],
/// [`split_long_reductions`], [`GPU_BUFFERISATION_PIPELINE`], [`copies_as_kernels`], then [`gpu_outlining_pipeline`] with the
/// module's [`tile_sizes_for`].
pub fn outline_kernels(text: &str) -> Result<String, MlirError> {
    let reordered = split_long_reductions(&parallel_loops_first(text));
    let bufferised = crate::run_pipeline_keeping_locations(&reordered, GPU_BUFFERISATION_PIPELINE)?;
    crate::run_pipeline_keeping_locations(
        &copies_as_kernels(&bufferised),
        &gpu_outlining_pipeline(tile_sizes_for(&reordered)),
    )
}

/// The source location of each kernel module of an outlined module (the location of its
/// launch, which is the location of the `linalg` op it came from: `"file.curv":12:5`), by the
/// kernel module's name. Kernels of ops without a location are left out.
pub fn kernel_locations(outlined: &str) -> Vec<(String, String)> {
    // Printed locations may be aliases (`loc(#loc3)`) defined at the end of the module.
    let aliases: Vec<(&str, &str)> = outlined
        .lines()
        .filter_map(|line| {
            let (alias, location) = line.split_once(" = loc(")?;
            alias.starts_with("#loc").then(|| (alias.trim(), location.strip_suffix(')').unwrap_or(location)))
        })
        .collect();
    let resolve = |location: &str| -> Option<String> {
        let location = aliases.iter().find(|(alias, _)| *alias == location).map_or(location, |(_, target)| *target);
        // `"file":line:column`; `"-"` is the text MLIR parsed, not a source file (an op made
        // without a location).
        let file_location =
            location.starts_with('"') && location.matches(':').count() >= 2 && !location.starts_with("\"-\"");
        file_location.then(|| location.replace('"', ""))
    };
    let mut out = Vec::new();
    for line in outlined.lines() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("gpu.launch_func") else { continue };
        let Some(module) = rest.trim_start().strip_prefix('@').and_then(|rest| rest.split("::").next()) else {
            continue;
        };
        let Some(start) = line.rfind(" loc(") else { continue };
        let location = line[start + " loc(".len()..].trim_end().strip_suffix(')').unwrap_or("");
        if let Some(location) = resolve(location) {
            if !out.iter().any(|(known, _): &(String, String)| known == module) {
                out.push((module.to_string(), location));
            }
        }
    }
    out
}

/// The first line of a kernel module's PTX that names the kernel and its source location: the
/// runtime reads it back when it loads the module and puts it in the kernel's errors.
pub const KERNEL_SOURCE_PREFIX: &str = "// curv kernel ";

/// Writes [`KERNEL_SOURCE_PREFIX`] lines at the start of the PTX of each `gpu.binary` op of a
/// lowered module whose kernel `locations` knows (`// curv kernel NAME at FILE:LINE:COLUMN`).
pub fn annotate_kernel_sources(lowered: &str, locations: &[(String, String)]) -> String {
    let mut out = String::with_capacity(lowered.len());
    let mut rest = lowered;
    while let Some((name, cut)) = next_binary(rest) {
        out.push_str(&rest[..cut]);
        if let Some((_, location)) = locations.iter().find(|(module, _)| *module == name) {
            // An MLIR string: a newline is `\0A`, a quote `\22`, a backslash `\5C`.
            let line = format!("{KERNEL_SOURCE_PREFIX}{name} at {location}").replace('\\', "\\5C").replace('"', "\\22");
            out.push_str(&line);
            out.push_str("\\0A");
        }
        rest = &rest[cut..];
    }
    out.push_str(rest);
    out
}

/// The second part: the kernels (with [`DEVICE_MATH`] in every GPU module) through NVVM to PTX
/// in `gpu.binary` ops, for `target`.
pub fn gpu_codegen_pipeline(target: GpuTarget) -> String {
    format!(
        "builtin.module(gpu-lower-to-nvvm-pipeline{{cubin-format=isa cubin-chip={} cubin-features={}}})",
        target.chip(),
        target.features()
    )
}

/// Definitions of the libdevice functions (`__nv_*`) that MLIR's NVVM lowering calls for math
/// without a PTX instruction of its own, written with PTX instructions, so the PTX is complete
/// and the CUDA driver can load it without libdevice (which only a CUDA toolkit has). The lowering
/// finds these definitions instead of declaring the functions external. `sqrt`, `fabs`, `fma`,
/// `copysign` and `rint` are exact PTX instructions; `log`, `exp` and `pow` go through the
/// hardware's base-2 approximations (`lg2.approx`, `ex2.approx`, relative error about 2^-22),
/// with `pow` following C's rules for a negative base (an odd integer exponent keeps the sign,
/// a fractional one gives NaN) and `pow(x, 0) = pow(1, y) = 1`. They are internal, so the ones
/// a kernel does not call are dropped.
pub const DEVICE_MATH: &str = r#"
    llvm.func internal @__nv_sqrtf(%x: f32) -> f32 {
      %r = llvm.inline_asm "sqrt.rn.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_fabsf(%x: f32) -> f32 {
      %r = llvm.inline_asm "abs.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_fmaf(%a: f32, %b: f32, %c: f32) -> f32 {
      %r = llvm.inline_asm "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f" %a, %b, %c : (f32, f32, f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_copysignf(%magnitude: f32, %sign: f32) -> f32 {
      %r = llvm.inline_asm "copysign.f32 $0, $2, $1;", "=f,f,f" %magnitude, %sign : (f32, f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_rintf(%x: f32) -> f32 {
      %r = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_logf(%x: f32) -> f32 {
      %l = llvm.inline_asm "lg2.approx.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      %ln2 = llvm.mlir.constant(0.693147182 : f32) : f32
      %r = llvm.fmul %l, %ln2 : f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_expf(%x: f32) -> f32 {
      %log2e = llvm.mlir.constant(1.44269502 : f32) : f32
      %s = llvm.fmul %x, %log2e : f32
      %r = llvm.inline_asm "ex2.approx.f32 $0, $1;", "=f,f" %s : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_powf(%a: f32, %b: f32) -> f32 {
      %magnitude = llvm.inline_asm "abs.f32 $0, $1;", "=f,f" %a : (f32) -> f32
      %l = llvm.inline_asm "lg2.approx.f32 $0, $1;", "=f,f" %magnitude : (f32) -> f32
      %bl = llvm.fmul %b, %l : f32
      %p = llvm.inline_asm "ex2.approx.f32 $0, $1;", "=f,f" %bl : (f32) -> f32
      %rounded = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %b : (f32) -> f32
      %integer = llvm.fcmp "oeq" %rounded, %b : f32
      %half_constant = llvm.mlir.constant(5.000000e-01 : f32) : f32
      %half = llvm.fmul %b, %half_constant : f32
      %half_rounded = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %half : (f32) -> f32
      %even = llvm.fcmp "oeq" %half_rounded, %half : f32
      %zero = llvm.mlir.constant(0.000000e+00 : f32) : f32
      %negative = llvm.fcmp "olt" %a, %zero : f32
      %true = llvm.mlir.constant(true) : i1
      %not_even = llvm.xor %even, %true : i1
      %odd = llvm.and %integer, %not_even : i1
      %flip = llvm.and %negative, %odd : i1
      %minus = llvm.fneg %p : f32
      %signed = llvm.select %flip, %minus, %p : i1, f32
      %fractional = llvm.xor %integer, %true : i1
      %undefined = llvm.and %negative, %fractional : i1
      %nan = llvm.mlir.constant(0x7FC00000 : f32) : f32
      %defined = llvm.select %undefined, %nan, %signed : i1, f32
      %one = llvm.mlir.constant(1.000000e+00 : f32) : f32
      %zero_exponent = llvm.fcmp "oeq" %b, %zero : f32
      %unit_base = llvm.fcmp "oeq" %a, %one : f32
      %unit = llvm.or %zero_exponent, %unit_base : i1
      %r = llvm.select %unit, %one, %defined : i1, f32
      llvm.return %r : f32
    }
"#;

/// Adds [`DEVICE_MATH`] at the start of every `gpu.module` of a printed module.
pub fn add_device_math(module: &str) -> String {
    let mut out = String::with_capacity(module.len());
    for line in module.split_inclusive('\n') {
        out.push_str(line);
        let trimmed = line.trim();
        if trimmed.starts_with("gpu.module @") && trimmed.ends_with('{') {
            out.push_str(DEVICE_MATH.trim_start_matches('\n'));
        }
    }
    out
}

unsafe extern "C" {
    fn LLVMInitializeNVPTXTargetInfo();
    fn LLVMInitializeNVPTXTarget();
    fn LLVMInitializeNVPTXTargetMC();
    fn LLVMInitializeNVPTXAsmPrinter();
}

/// Registers LLVM's NVPTX back end (once per process), which `gpu-module-to-binary` needs.
fn initialise_nvptx() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        LLVMInitializeNVPTXTargetInfo();
        LLVMInitializeNVPTXTarget();
        LLVMInitializeNVPTXTargetMC();
        LLVMInitializeNVPTXAsmPrinter();
    });
}

/// One generated GPU kernel module: its name and its PTX.
#[derive(Debug, Clone, PartialEq)]
pub struct PtxModule {
    pub name: String,
    pub ptx: String,
}

/// Lowers a kernel module (the text `crate::lower` produces) to PTX for `target`: one entry
/// per outlined kernel module, in the order of the module.
pub fn lower_to_ptx(text: &str, target: GpuTarget) -> Result<Vec<PtxModule>, MlirError> {
    let outlined = outline_kernels(text)?;
    let lowered = generate_kernels(&outlined, &outlined, target)?;
    let modules = extract_ptx(&lowered);
    if modules.is_empty() && lowered.contains("gpu.launch_func") {
        return Err(MlirError { message: "the GPU pipeline produced launches but no PTX".to_string() });
    }
    Ok(modules)
}

/// The `assembly` strings of the `gpu.binary` ops of a printed module, unescaped.
pub fn extract_ptx(module: &str) -> Vec<PtxModule> {
    let mut out = Vec::new();
    let mut rest = module;
    while let Some((name, assembly)) = next_binary(rest) {
        let (ptx, consumed) = unescape_mlir_string(&rest[assembly..]);
        out.push(PtxModule { name, ptx });
        rest = &rest[assembly + consumed..];
    }
    out
}

/// The next `gpu.binary` op of a printed module: its name and the byte offset in `text` where its
/// PTX (the `assembly` string, after its opening quote) starts.
fn next_binary(text: &str) -> Option<(String, usize)> {
    let start = text.find("gpu.binary @")? + "gpu.binary @".len();
    let name: String = text[start..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    let assembly = start + text[start..].find("assembly = \"")? + "assembly = \"".len();
    Some((name, assembly))
}

/// Reads an MLIR string literal's body up to its closing quote: `\XX` hex escapes, `\"`, `\\`.
/// Returns the text and the number of bytes consumed (including the quote).
fn unescape_mlir_string(body: &str) -> (String, usize) {
    let bytes = body.as_bytes();
    let mut out = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), index + 1),
            b'\\' if index + 1 < bytes.len() => {
                let next = bytes[index + 1];
                if (next == b'"' || next == b'\\') || index + 2 >= bytes.len() {
                    out.push(next);
                    index += 2;
                } else {
                    let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(byte) => {
                            out.push(byte);
                            index += 3;
                        }
                        Err(_) => {
                            out.push(next);
                            index += 2;
                        }
                    }
                }
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), bytes.len())
}

/// The host side's allocations of an outlined module made GPU allocations: `memref.alloc` becomes
/// `gpu.alloc host_shared` (the runtime gives managed memory, which kernels and the host side
/// both reach) and `memref.dealloc` a call of the runtime's `curv_cuda_free` on the buffer's
/// address. A stack allocation (`memref.alloca`),
/// which a kernel could not reach, is an error.
pub fn device_allocations(module: &str) -> Result<String, MlirError> {
    let unexpected =
        |line: &str| MlirError { message: format!("unexpected allocation on the host side: {}", line.trim()) };
    let mut out = String::with_capacity(module.len());
    // Inside a `gpu.module` (printed at an indentation of two, closed by `  }`), nothing changes.
    let mut in_gpu_module = false;
    let mut freed = 0;
    for line in module.split_inclusive('\n') {
        if in_gpu_module {
            // The module's closing brace (followed by its location when locations are printed).
            in_gpu_module = !(line.trim_end() == "  }" || line.starts_with("  } loc("));
            out.push_str(line);
            continue;
        }
        if line.trim_start().starts_with("gpu.module @") {
            in_gpu_module = true;
            out.push_str(line);
        } else if line.contains("memref.alloca") {
            return Err(MlirError {
                message: format!("a stack allocation on the host side, which kernels cannot reach: {}", line.trim()),
            });
        } else if let Some(start) = line.find("memref.alloc(") {
            // `memref.alloc(SIZES) {alignment = 64 : i64} : TYPE`
            let rest = &line[start + "memref.alloc(".len()..];
            let close = rest.find(')').ok_or_else(|| unexpected(line))?;
            let colon = rest.rfind(" : ").ok_or_else(|| unexpected(line))?;
            out.push_str(&line[..start]);
            out.push_str(&format!("gpu.alloc host_shared ({}){}", &rest[..close], &rest[colon..]));
        } else if let Some(start) = line.find("memref.dealloc ") {
            // `memref.dealloc %x : TYPE` (MLIR's lowering drops a synchronous `gpu.dealloc`).
            let operand = &line[start + "memref.dealloc ".len()..];
            let (value, ty) = operand.split_once(" : ").ok_or_else(|| unexpected(line))?;
            let ty = ty.split(" loc(").next().unwrap_or(ty).trim();
            let indentation = &line[..start];
            freed += 1;
            out.push_str(&format!(
                "{indentation}%curv_freed{freed} = memref.extract_aligned_pointer_as_index {value} : {ty} -> index\n"
            ));
            out.push_str(&format!("{indentation}func.call @curv_cuda_free(%curv_freed{freed}) : (index) -> ()\n"));
        } else {
            out.push_str(line);
        }
    }
    if freed > 0 {
        // Declare the runtime's free at the top of the module.
        let start = out.find("{\n").ok_or_else(|| MlirError { message: "a module without a body".to_string() })? + 2;
        out.insert_str(start, "  func.func private @curv_cuda_free(index)\n");
    }
    Ok(out)
}

/// Lowers a kernel module (the text `crate::lower` produces) for the GPU to the LLVM dialect, host
/// side included: kernels as PTX in `gpu.binary` ops, launches, allocations in managed memory and
/// matrix products (cuBLAS through the runtime) as calls into `curv-cuda`.
pub fn lower_for_cuda(text: &str, target: GpuTarget) -> Result<String, MlirError> {
    // Matrix products call cuBLAS (`curv_cuda_sgemm`) instead of the CPU GEMM.
    let text = text.replace("@curv_sgemm(", "@curv_cuda_sgemm(");
    let outlined = outline_kernels(&text)?;
    generate_kernels(&device_allocations(&outlined)?, &outlined, target)
}

/// The kernels of `module` (an outlined module, its host side possibly rewritten) through NVVM to
/// PTX for `target` ([`gpu_codegen_pipeline`]), each module's PTX naming the source location its
/// launch has in `outlined` ([`annotate_kernel_sources`]).
fn generate_kernels(module: &str, outlined: &str, target: GpuTarget) -> Result<String, MlirError> {
    initialise_nvptx();
    let lowered = crate::run_pipeline_on_text(&add_device_math(module), &gpu_codegen_pipeline(target))?;
    Ok(annotate_kernel_sources(&lowered, &kernel_locations(outlined)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_over_the_batch_gets_its_parallel_loop_first() {
        let text = "  %v2 = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d1)>], iterator_types = [\"reduction\", \"parallel\"]} ins(%v1 : tensor<128x256xf32>) outs(%t : tensor<256xf32>) {\n\
  ^bb0(%in: f32, %out: f32):\n\
    %s0 = linalg.index 0 : index\n\
    %s1 = linalg.index 1 : index\n\
    %r = arith.addf %in, %out : f32\n\
    linalg.yield %r : f32\n\
  } -> tensor<256xf32>\n\
  %s9 = linalg.index 0 : index\n";
        let reordered = parallel_loops_first(text);
        assert!(
            reordered.contains("[affine_map<(d0, d1) -> (d1, d0)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]}"),
            "{reordered}"
        );
        assert!(reordered.contains("%s0 = linalg.index 1 : index"), "{reordered}");
        assert!(reordered.contains("%s1 = linalg.index 0 : index"), "{reordered}");
        // Outside the op's region nothing is renumbered.
        assert!(reordered.contains("%s9 = linalg.index 0 : index"), "{reordered}");
        // Loops already in order, and whole reductions, are left as they are.
        for kinds in ["[\"parallel\", \"reduction\"]", "[\"reduction\", \"reduction\"]"] {
            let text = format!("%v = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>], iterator_types = {kinds}}} ins(%a : tensor<2x3xf32>) outs(%b : tensor<2xf32>) {{\n}} -> tensor<2xf32>\n");
            assert_eq!(parallel_loops_first(&text), text);
        }
    }

    #[test]
    fn a_long_sum_is_split_in_two_stages_and_short_or_indexed_ones_are_not() {
        let sum = |rows: usize, body: &str| {
            format!(
                "    %v50 = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d1, d0)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]}} ins(%v49 : tensor<{rows}x256xf32>) outs(%t65 : tensor<256xf32>) {{\n\
                 \x20     ^bb0(%a0: f32, %out: f32):\n\
                 {body}\
                 \x20     linalg.yield %s0 : f32 loc(\"siren.curv\":22:24)\n\
                 \x20   }} -> tensor<256xf32> loc(\"siren.curv\":22:24)\n"
            )
        };
        let add = "      %s0 = arith.addf %a0, %out : f32 loc(\"siren.curv\":22:24)\n";
        let split = split_long_reductions(&sum(4096, add));
        for expected in [
            "%v50_split_input0 = tensor.expand_shape %v49 [[0, 1], [2]] output_shape [64, 64, 256] : tensor<4096x256xf32> into tensor<64x64x256xf32>",
            "%v50_split_neutral = arith.constant 0.000000e+00 : f32",
            "%v50_partial = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2) -> (d1, d2, d0)>, affine_map<(d0, d1, d2) -> (d0, d1)>], iterator_types = [\"parallel\", \"parallel\", \"reduction\"]} ins(%v50_split_input0 : tensor<64x64x256xf32>) outs(%v50_split_init : tensor<256x64xf32>)",
            "%v50 = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]} ins(%v50_partial : tensor<256x64xf32>) outs(%t65 : tensor<256xf32>)",
            "%combined = arith.addf %part, %accumulated : f32 loc(\"siren.curv\":22:24)",
        ] {
            assert!(split.contains(expected), "missing `{expected}` in\n{split}");
        }
        // 1000 rows: too short; 1100 rows (4 x 275): no split into 8 parts or more divides it.
        for rows in [1000, 1100] {
            assert_eq!(split_long_reductions(&sum(rows, add)), sum(rows, add));
        }
        // A body that reads the output elsewhere, or its loop indices, is left as it is.
        let twice = "      %s1 = arith.mulf %out, %a0 : f32\n      %s0 = arith.addf %s1, %out : f32\n";
        let indexed = "      %i = linalg.index 1 : index\n      %s0 = arith.addf %a0, %out : f32\n";
        for body in [twice, indexed] {
            assert_eq!(split_long_reductions(&sum(4096, body)), sum(4096, body));
        }
        // A maximum starts its parts from minus infinity.
        let maximum = split_long_reductions(&sum(2048, "      %s0 = arith.maximumf %a0, %out : f32\n"));
        assert!(maximum.contains("arith.constant 0xFF800000 : f32"), "{maximum}");
        assert!(maximum.contains("%combined = arith.maximumf %part, %accumulated"), "{maximum}");
    }

    #[test]
    fn copies_with_dimensions_become_linalg_copies() {
        let module = "    memref.copy %alloc_26, %arg9 : memref<128x10xf32> to memref<128x10xf32>\n    memref.copy %a, %b : memref<f32> to memref<f32>\n";
        assert_eq!(
            copies_as_kernels(module),
            "    linalg.copy ins(%alloc_26 : memref<128x10xf32>) outs(%arg9 : memref<128x10xf32>)\n    memref.copy %a, %b : memref<f32> to memref<f32>\n"
        );
        // A constant lives in the host program: copies of it, or of a view of it, stay host copies.
        let module = "    %0 = memref.get_global @__constant_9xf32 : memref<9xf32>\n    %1 = memref.subview %0[0] [4] [1] : memref<9xf32> to memref<4xf32>\n    memref.copy %0, %arg2 : memref<9xf32> to memref<9xf32>\n    memref.copy %1, %arg3 : memref<4xf32> to memref<4xf32>\n";
        assert_eq!(copies_as_kernels(module), module);
    }

    #[test]
    fn a_module_of_one_dimensional_loops_gets_wide_blocks() {
        let one = "%v = linalg.generic {indexing_maps = [affine_map<(d0) -> (d0)>], iterator_types = [\"parallel\"]} ins(%a : tensor<9xf32>) outs(%b : tensor<9xf32>) {\n";
        let two = "%w = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>], iterator_types = [\"parallel\", \"parallel\"]} ins(%a : tensor<3x3xf32>) outs(%b : tensor<3x3xf32>) {\n";
        assert_eq!(tile_sizes_for(one), TILES_ONE_DIMENSIONAL);
        assert_eq!(tile_sizes_for(&format!("{one}{two}")), TILES_TWO_DIMENSIONAL);
    }

    #[test]
    fn mlir_string_escapes_are_undone() {
        let (text, consumed) = unescape_mlir_string(r#"a\0Ab\09\22c\\d" tail"#);
        assert_eq!(text, "a\nb\t\"c\\d");
        assert_eq!(&r#"a\0Ab\09\22c\\d" tail"#[consumed..], " tail");
    }

    #[test]
    fn targets_come_from_the_table() {
        assert_eq!(GpuTarget::parse("sm_90").map(GpuTarget::features), Some("+ptx80"));
        assert_eq!(GpuTarget::parse("sm_80").map(GpuTarget::features), Some("+ptx70"));
        assert_eq!(GpuTarget::parse("sm_90 +ptx70"), None);
    }
}
