//! The first stage of the GPU path: the same kernel modules the CPU backend compiles, lowered
//! through MLIR's `gpu` and `nvvm` dialects to PTX (`curv emit --stage ptx`).
//!
//! The pipeline splits reductions to a scalar into parallel partial results
//! ([`split_full_reductions`]), reorders the loops of reductions so that their parallel loops
//! come first ([`parallel_loops_first`]), splits long reductions in two stages
//! ([`split_long_reductions`]), bufferises the module as the CPU pipeline does, makes copies and
//! ops on scalars kernels ([`copies_as_kernels`], [`scalars_as_kernels`]), turns each `linalg`
//! op into parallel loops (reductions stay sequential inside a thread), tiles the parallel loops
//! with constant inner bounds (a guard inside instead of `min` bounds, so that every loop nest
//! becomes a launch: 256 threads for a module of one-dimensional loops, 32 by 8 otherwise,
//! [`tile_sizes_for`]) and maps the tiles to blocks and their iterations to threads, innermost
//! loop first, outlines every launch into a `gpu.func` kernel, and runs `gpu-lower-to-nvvm-pipeline` with `cubin-format=isa`,
//! which gives PTX text without a CUDA toolkit. The chip and PTX version come from [`GpuTarget`],
//! never from a user's string (an `sm_90` target without `+ptx80` aborts LLVM). Matrix products
//! stay calls on the host side of the module (on a GPU, cuBLAS calls). A module whose host side
//! then touches no memory ([`host_memory_access`]) tells the runtime that its launches need not
//! wait for their kernels ([`ordered_launches`]). The math
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
/// A copy of a whole splat constant of the module (every element the same: a rule's zero
/// initial state) is a `linalg.fill` of its element instead, which becomes a kernel too. Any other
/// copy from or to a constant of the module (`memref.get_global`, or a view of one) stays on the
/// host: the constant is in the host program's memory, which a kernel cannot reach.
pub fn copies_as_kernels(module: &str) -> String {
    // The splat constants of the module (`memref.global ... @NAME : TYPE = dense<VALUE>`) by name.
    let splats: Vec<(&str, &str)> = module
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("memref.global ")?;
            let name = rest[rest.find('@')? + 1..].split([' ', ':']).next()?;
            let value = rest.split_once(" = dense<")?.1.split_once('>')?.0;
            let splat = !value.starts_with('[') && !value.starts_with('"');
            (rest.contains(" constant ") && splat).then_some((name, value))
        })
        .collect();
    // Values that are a whole splat constant: the value and the constant's element.
    let mut splat_values: Vec<(&str, &str)> = Vec::new();
    let mut out = String::with_capacity(module.len());
    let mut host_values: Vec<&str> = Vec::new();
    let mut fills = 0;
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
            if let Some(global) = operation.strip_prefix("memref.get_global @") {
                let name = global.split([' ', ':']).next().unwrap_or("");
                if let Some((_, element)) = splats.iter().find(|(known, _)| *known == name) {
                    splat_values.push((value.trim(), element));
                }
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
            // A copy of a splat constant into device memory is a fill of its element.
            let splat = splat_values.iter().find(|(value, _)| *value == source.trim());
            if let (Some((_, element)), false) = (splat, host_values.contains(&target.trim())) {
                let element_type = target_type.trim().strip_prefix("memref<")?.split([',', '>']).next()?.rsplit('x').next()?;
                fills += 1;
                let indentation = &line[..start];
                return Some(format!(
                    "{indentation}%curv_splat{fills} = arith.constant {element} : {element_type}\n\
                     {indentation}linalg.fill ins(%curv_splat{fills} : {element_type}) outs({target} : {target_type}){location}\n"
                ));
            }
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
    let kinds =
        line[start..end].split(',').map(|kind| kind.trim().trim_matches('"')).filter(|kind| !kind.is_empty()).collect();
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
    rewrite_generic_ops(text, split_reduction)
}

/// The lines of the op whose first line is `header`: its header, its body (taken from `lines`)
/// and the line that closes its region.
fn op_lines<'a>(header: &'a str, lines: &mut impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut op = vec![header];
    let mut depth = brace_balance(header);
    while depth > 0 {
        let Some(body) = lines.next() else { break };
        depth += brace_balance(body);
        op.push(body);
    }
    op
}

/// `text` with every `linalg.generic` op (its lines, header to closing brace) replaced by what
/// `rewrite` makes of it, or left as it is where `rewrite` gives None.
fn rewrite_generic_ops(text: &str, rewrite: fn(&[&str]) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n');
    while let Some(line) = lines.next() {
        if iterator_types_of(line).is_none() {
            out.push_str(line);
            continue;
        }
        let op = op_lines(line, &mut lines);
        match rewrite(&op) {
            Some(rewritten) => out.push_str(&rewritten),
            None => op.iter().for_each(|line| out.push_str(line)),
        }
    }
    out
}

/// Splits every reduction to a scalar (a loss: a `linalg.generic` whose loops are all reductions
/// and whose output is a `tensor<f32>`, combining with `arith.addf`, `arith.maximumf` or
/// `arith.minimumf`) into kernels that run in parallel. Its longest loop becomes parallel: one
/// partial result per iteration of it (a row's sum), each from the neutral element; the partial
/// results are then combined into the original output, in two stages when there are enough of
/// them ([`full_reduction_parts`]: `P` parallel sums of `K` consecutive rows, then the `P`
/// sums). Otherwise a reduction to a scalar has no parallel loop, and its loops would run on
/// the host side of a GPU module, reading the kernels' results there; after this, only the last
/// combine (at most 64 terms) is sequential, and it is a kernel too ([`scalars_as_kernels`]).
/// The terms are added in another order, so results may differ in the last bits. Ops it does not
/// recognise are left as they are.
pub fn split_full_reductions(text: &str) -> String {
    rewrite_generic_ops(text, split_full_reduction)
}

/// How a reduction to a scalar over `rows` partial results combines them: `Some((P, K))` for
/// `P` sums of `K` rows each and then the `P` sums (`P` the largest power of two of at most 64
/// with `P * P <= rows` that divides `rows`, at least 8), None for one sequential combine.
pub fn full_reduction_parts(rows: i64) -> Option<(i64, i64)> {
    let mut parts = 64;
    while parts >= 8 && (parts * parts > rows || rows % parts != 0) {
        parts /= 2;
    }
    (parts >= 8).then_some((parts, rows / parts))
}

/// The parallel form of one reduction to a scalar (its lines), or None when it is not one
/// [`split_full_reductions`] knows how to split.
fn split_full_reduction(op: &[&str]) -> Option<String> {
    let header = op.first()?;
    let (_, _, kinds) = iterator_types_of(header)?;
    if kinds.is_empty() || kinds.iter().any(|kind| *kind != "reduction") {
        return None;
    }
    let TensorGeneric { result: name, indentation, maps, in_names, in_types, out_name, out_type } =
        TensorGeneric::parse(header)?;
    if out_type.trim() != "tensor<f32>" || !maps[in_types.len()].1.trim().is_empty() {
        return None;
    }
    let close = op.last()?;
    let body = &op[1..op.len() - 1];
    let (operation, neutral) = combiner(body)?;
    // The extent of each loop, from an input that reads it as a plain dimension.
    let extent = |loop_index: usize| -> Option<i64> {
        let dimension = format!("d{loop_index}");
        maps[..in_types.len()].iter().zip(&in_types).find_map(|((_, results), ty)| {
            let position = results.split(", ").position(|result| result.trim() == dimension)?;
            tensor_type(ty).and_then(|(dims, _)| dims.get(position).copied())
        })
    };
    let extents = (0..kinds.len()).map(extent).collect::<Option<Vec<i64>>>()?;
    // The longest loop, the first of the longest.
    let rows_loop = (0..kinds.len()).fold(0, |best, index| if extents[index] > extents[best] { index } else { best });
    let rows = extents[rows_loop];
    let location = close.rfind(" loc(").map_or("", |start| close[start..].trim());
    let domain = maps[0].0;
    let close_indentation = &close[..close.len() - close.trim_start().len()];
    let body_indentation = body.first().map_or("", |line| &line[..line.len() - line.trim_start().len()]);
    let inner = format!("{body_indentation}  ");
    let rows_type = format!("tensor<{rows}xf32>");
    let mut out = String::new();
    // A tensor of `ty` filled with the neutral element.
    let neutral_tensor = |out: &mut String, prefix: &str, ty: &str| {
        out.push_str(&format!("{indentation}{name}_{prefix}_empty = tensor.empty() : {ty} {location}\n"));
        out.push_str(&format!("{indentation}{name}_{prefix}_neutral = arith.constant {neutral} : f32 {location}\n"));
        out.push_str(&format!(
            "{indentation}{name}_{prefix}_init = linalg.fill ins({name}_{prefix}_neutral : f32) outs({name}_{prefix}_empty : {ty}) -> {ty} {location}\n"
        ));
    };
    // Stage one: the op itself with its longest loop parallel, one partial result per row.
    neutral_tensor(&mut out, "rows", &rows_type);
    let stage_one_maps: Vec<String> = maps[..in_types.len()]
        .iter()
        .map(|(domain, results)| format!("affine_map<({domain}) -> ({results})>"))
        .chain([format!("affine_map<({domain}) -> (d{rows_loop})>")])
        .collect();
    let stage_one_kinds: Vec<&str> =
        (0..kinds.len()).map(|index| if index == rows_loop { "\"parallel\"" } else { "\"reduction\"" }).collect();
    out.push_str(&format!(
        "{indentation}{name}_rows = linalg.generic {{indexing_maps = [{}], iterator_types = [{}]}} ins({} : {}) outs({name}_rows_init : {rows_type}) {{\n",
        stage_one_maps.join(", "),
        stage_one_kinds.join(", "),
        in_names.join(", "),
        in_types.join(", ")
    ));
    body.iter().for_each(|line| out.push_str(line));
    out.push_str(&format!("{close_indentation}}} -> {rows_type} {location}\n"));
    // A generic op that combines the partial results `input` into `output`.
    let combine = |out: &mut String, result: &str, maps: &str, kinds: &str, input: &str, output: &str, ty: &str| {
        out.push_str(&format!(
            "{indentation}{result} = linalg.generic {{indexing_maps = [{maps}], iterator_types = [{kinds}]}} ins({input}) outs({output}) {{\n"
        ));
        out.push_str(&format!("{body_indentation}^bb0(%part: f32, %accumulated: f32):\n"));
        out.push_str(&format!("{inner}%combined = {operation} %part, %accumulated : f32 {location}\n"));
        out.push_str(&format!("{inner}linalg.yield %combined : f32 {location}\n"));
        out.push_str(&format!("{close_indentation}}} -> {ty} {location}\n"));
    };
    let (last, last_type) = match full_reduction_parts(rows) {
        Some((parts, each)) => {
            // Stage two: `parts` sums of `each` consecutive rows.
            let split_type = format!("tensor<{parts}x{each}xf32>");
            let parts_type = format!("tensor<{parts}xf32>");
            out.push_str(&format!(
                "{indentation}{name}_rows_split = tensor.expand_shape {name}_rows [[0, 1]] output_shape [{parts}, {each}] : {rows_type} into {split_type} {location}\n"
            ));
            neutral_tensor(&mut out, "parts", &parts_type);
            combine(
                &mut out,
                &format!("{name}_parts"),
                "affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>",
                "\"parallel\", \"reduction\"",
                &format!("{name}_rows_split : {split_type}"),
                &format!("{name}_parts_init : {parts_type}"),
                &parts_type,
            );
            (format!("{name}_parts"), parts_type)
        }
        None => (format!("{name}_rows"), rows_type.clone()),
    };
    // The last stage: the partial results into the original output.
    combine(
        &mut out,
        name,
        "affine_map<(d0) -> (d0)>, affine_map<(d0) -> ()>",
        "\"reduction\"",
        &format!("{last} : {last_type}"),
        &format!("{out_name} : {out_type}"),
        out_type,
    );
    Some(out)
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

/// The header of a single-result `linalg.generic` op on tensors, taken apart:
/// `RESULT = linalg.generic {indexing_maps = [MAPS], iterator_types = [...]} ins(NAMES : TYPES)
/// outs(OUT : OUT_TYPE) {`.
struct TensorGeneric<'a> {
    result: &'a str,
    indentation: &'a str,
    /// The domain and results of each map, the inputs' then the output's.
    maps: Vec<(&'a str, &'a str)>,
    in_names: Vec<&'a str>,
    in_types: Vec<&'a str>,
    out_name: &'a str,
    out_type: &'a str,
}

impl<'a> TensorGeneric<'a> {
    fn parse(header: &'a str) -> Option<TensorGeneric<'a>> {
        let (result, rest) = header.trim_start().split_once(" = linalg.generic {")?;
        if result.contains(',') {
            return None;
        }
        let indentation = &header[..header.len() - header.trim_start().len()];
        let maps = affine_maps(&rest[..rest.find("iterator_types")?]);
        let operands = &rest[rest.find("} ins(")? + "} ins(".len()..];
        let (ins, after_ins) = operands.split_once(") outs(")?;
        let (outs, tail) = after_ins.split_once(") {")?;
        if !tail.trim().is_empty() {
            return None;
        }
        let (in_names, in_types) = ins.split_once(" : ")?;
        let in_names: Vec<&str> = in_names.split(", ").map(str::trim).collect();
        let in_types: Vec<&str> = in_types.split(", ").collect();
        let (out_name, out_type) = outs.split_once(" : ")?;
        if out_name.contains(',') || maps.len() != in_types.len() + 1 || in_names.len() != in_types.len() {
            return None;
        }
        Some(TensorGeneric { result: result.trim(), indentation, maps, in_names, in_types, out_name, out_type })
    }
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
    let TensorGeneric { result, indentation, maps, in_names, in_types, out_name, out_type } =
        TensorGeneric::parse(header)?;
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
    let close = op.last()?;
    let body = &op[1..op.len() - 1];
    let (operation, neutral) = combiner(body)?;
    if body.iter().any(|line| line.contains("linalg.index")) {
        return None;
    }
    let location = close.rfind(" loc(").map_or("", |start| close[start..].trim());
    // Stage one: loops `(d0 .. d{reduced - 1}, part, step)`. Every input that reads the reduction
    // loop as a dimension is reshaped so that the dimension is `[parts, each]` (a map cannot
    // read `part * each + step`: linalg infers every loop's bounds from a plain dimension), and
    // reads it as `(part, step)`; the output has the parts as a last dimension.
    let domain = (0..=reduced + 1).map(|index| format!("d{index}")).collect::<Vec<_>>().join(", ");
    let name = result;
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

/// The op that combines a reduction's body into its output, and that op's neutral element (the
/// value a partial result starts from): `arith.addf` (0), `arith.maximumf` (minus infinity) or
/// `arith.minimumf` (infinity), when the body yields that op's result and reads the output's
/// block argument (the last) there only. None for any other body.
fn combiner<'a>(body: &[&'a str]) -> Option<(&'a str, &'static str)> {
    let arguments = body.first()?.trim().strip_prefix("^bb0(")?.split_once("):")?.0;
    let output_argument = arguments.split(", ").last()?.split(':').next()?.trim();
    let yielded = body.iter().find_map(|line| line.trim().strip_prefix("linalg.yield "))?.split(" : ").next()?.trim();
    let combining = body.iter().find_map(|line| {
        let (name, operation) = line.trim().split_once(" = ")?;
        (name == yielded).then_some(operation)
    })?;
    let (operation, operands) = combining.split_once(' ')?;
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
    (uses == 1).then_some((operation, neutral))
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

/// The one-element form of a rank-0 memref type (`memref<f32>` is `memref<1xf32>`,
/// `memref<f32, strided<[], offset: ?>>` is `memref<1xf32, strided<[1], offset: ?>>`), or None
/// for any other type.
fn unit_memref_type(ty: &str) -> Option<String> {
    let inner = ty.trim().strip_prefix("memref<")?.strip_suffix('>')?;
    match inner.split_once(", ") {
        None if !inner.contains('x') && !inner.contains('<') => Some(format!("memref<1x{inner}>")),
        Some((element, layout)) if !element.contains('x') => {
            let offset = layout.strip_prefix("strided<[], offset: ")?.strip_suffix('>')?;
            Some(format!("memref<1x{element}, strided<[1], offset: {offset}>>"))
        }
        _ => None,
    }
}

/// The entries of an `indexing_maps = [...]` list, `#mapN` aliases replaced by their definitions
/// (`aliases`: name and `affine_map<...>` text).
fn indexing_maps(list: &str, aliases: &[(&str, &str)]) -> Option<Vec<String>> {
    let mut maps = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        let (map, tail) = if rest.starts_with("affine_map<") {
            let end = rest.find(")>")? + 2;
            (rest[..end].to_string(), &rest[end..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let alias = rest[..end].trim();
            (aliases.iter().find(|(name, _)| *name == alias)?.1.to_string(), &rest[end..])
        };
        maps.push(map);
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(maps)
}

/// Every `linalg` op of a bufferised module whose output is a rank-0 memref (a fill of a scalar,
/// a reduction to a scalar, an operation on scalars) and every copy between rank-0 memrefs given
/// a loop of one parallel iteration over a one-element view of its output: an op without loops
/// would run on the host side of a GPU module, the CPU reading the kernels' results and writing
/// the scalar there, which the next kernel would read back (and every kernel launch would have
/// to wait for its kernel first). With the loop, each is a kernel of one thread, and the host
/// side of a module touches no memory ([`host_memory_access`]). Ops it does not recognise stay
/// as they are.
pub fn scalars_as_kernels(module: &str) -> String {
    let aliases: Vec<(&str, &str)> = module
        .lines()
        .filter_map(|line| {
            let (alias, map) = line.split_once(" = ")?;
            (alias.starts_with("#map") && map.starts_with("affine_map<")).then(|| (alias.trim(), map.trim()))
        })
        .collect();
    let mut out = String::with_capacity(module.len());
    let mut views = 0;
    let mut view = |out: &mut String, indentation: &str, value: &str, ty: &str, unit: &str| -> String {
        views += 1;
        out.push_str(&format!(
            "{indentation}%curv_unit{views} = memref.expand_shape {value} [] output_shape [1] : {ty} into {unit}\n"
        ));
        format!("%curv_unit{views}")
    };
    let mut lines = module.split_inclusive('\n');
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let indentation = &line[..line.len() - trimmed.len()];
        // `linalg.fill ins(%c : f32) outs(%x : memref<f32>) loc(...)`
        if let Some(rest) = trimmed.strip_prefix("linalg.fill ins(") {
            let rewritten = (|| {
                let (input, after) = rest.split_once(") outs(")?;
                let (output, tail) = after.split_once(')')?;
                let (value, ty) = output.split_once(" : ")?;
                let unit = unit_memref_type(ty)?;
                let mut text = String::new();
                let unit_value = view(&mut text, indentation, value.trim(), ty.trim(), &unit);
                text.push_str(&format!("{indentation}linalg.fill ins({input}) outs({unit_value} : {unit}){tail}"));
                Some(text)
            })();
            out.push_str(rewritten.as_deref().unwrap_or(line));
            continue;
        }
        // `memref.copy %a, %b : memref<f32> to memref<f32> loc(...)`
        if let Some(rest) = trimmed.strip_prefix("memref.copy ") {
            let rewritten = (|| {
                let (values, types) = rest.split_once(" : ")?;
                let (source, target) = values.split_once(", ")?;
                let (types, location) = match types.find(" loc(") {
                    Some(start) => (&types[..start], types[start..].trim_end()),
                    None => (types.trim_end(), ""),
                };
                let (source_type, target_type) = types.split_once(" to ")?;
                let (source_unit, target_unit) = (unit_memref_type(source_type)?, unit_memref_type(target_type)?);
                let mut text = String::new();
                let source_value = view(&mut text, indentation, source.trim(), source_type.trim(), &source_unit);
                let target_value = view(&mut text, indentation, target.trim(), target_type.trim(), &target_unit);
                text.push_str(&format!(
                    "{indentation}linalg.copy ins({source_value} : {source_unit}) outs({target_value} : {target_unit}){location}\n"
                ));
                Some(text)
            })();
            out.push_str(rewritten.as_deref().unwrap_or(line));
            continue;
        }
        if !trimmed.starts_with("linalg.generic {") {
            out.push_str(line);
            continue;
        }
        let op = op_lines(line, &mut lines);
        let rewritten = (|| {
            let (_, end, kinds) = iterator_types_of(line)?;
            let maps_start = line.find("indexing_maps = [")? + "indexing_maps = [".len();
            let maps = indexing_maps(line[maps_start..].split_once("], iterator_types")?.0, &aliases)?;
            let (before_outs, outs) = line.split_once(" outs(")?;
            let (output, tail) = outs.split_once(')')?;
            let (value, ty) = output.split_once(" : ")?;
            if value.contains(',') {
                return None;
            }
            let unit = unit_memref_type(ty)?;
            let loops = kinds.len();
            let position: Vec<usize> = (1..=loops).collect();
            let domain = (0..=loops).map(|index| format!("d{index}")).collect::<Vec<_>>().join(", ");
            let mut new_maps = Vec::new();
            for (index, map) in maps.iter().enumerate() {
                let (_, results) = *affine_maps(map).first()?;
                let results =
                    if index + 1 == maps.len() { "d0".to_string() } else { renumber_dimensions(results, &position) };
                new_maps.push(format!("affine_map<({domain}) -> ({results})>"));
            }
            let kinds: Vec<String> = ["\"parallel\"".to_string()]
                .into_iter()
                .chain(kinds.iter().map(|kind| format!("\"{kind}\"")))
                .collect();
            let mut text = String::new();
            let unit_value = view(&mut text, indentation, value.trim(), ty.trim(), &unit);
            // `]} ins(...)` after the iterator types.
            let operands = before_outs.get(end + 1..)?;
            text.push_str(&format!(
                "{indentation}linalg.generic {{indexing_maps = [{}], iterator_types = [{}]{operands} outs({unit_value} : {unit}){tail}",
                new_maps.join(", "),
                kinds.join(", ")
            ));
            for body in &op[1..] {
                text.push_str(&renumber_index_ops(body, &position));
            }
            Some(text)
        })();
        match rewritten {
            Some(text) => out.push_str(&text),
            None => op.iter().for_each(|line| out.push_str(line)),
        }
    }
    out
}

/// The first line of the host side of an outlined module (outside its `gpu.module`s) that reads
/// or writes memory itself, or calls a function other than the runtime's matrix product and free,
/// or None when the host side only launches kernels, allocates and frees buffers, takes views of
/// them, computes scalars and calls the matrix product. Such a module's launches need not wait
/// for their kernels: the next piece of work on the one stream is ordered after them, and the
/// caller waits once at the end of the call.
///
/// A load from one of the function's first `inputs` arguments (a scalar hyperparameter the host
/// side reads once, outside the kernels) is no access in this sense: inputs are read-only (the
/// bufferisation writes only into the outputs and its own buffers), and the runtime waits for
/// the copies in before it calls the function.
pub fn host_memory_access(outlined: &str, inputs: usize) -> Option<String> {
    const ALLOWED: [&str; 16] = [
        "gpu.launch_func",
        "gpu.alloc",
        "gpu.dealloc",
        "memref.alloc",
        "memref.dealloc",
        "memref.subview",
        "memref.cast",
        "memref.expand_shape",
        "memref.collapse_shape",
        "memref.reinterpret_cast",
        "memref.extract_aligned_pointer_as_index",
        "memref.extract_strided_metadata",
        "memref.get_global",
        "memref.global",
        "memref.dim",
        "return",
    ];
    let mut sides = GpuModuleLines::default();
    for line in outlined.lines() {
        if !sides.host(line) {
            continue;
        }
        let trimmed = line.trim();
        let skipped = ["#", "//", "}", "module", "func.func", "^"];
        if trimmed.is_empty() || skipped.iter().any(|prefix| trimmed.starts_with(prefix)) {
            continue;
        }
        let operation = match trimmed.split_once(" = ") {
            Some((_, operation)) if trimmed.starts_with('%') => operation,
            _ => trimmed,
        };
        let name = operation.split([' ', '(']).next().unwrap_or("");
        let call_of_runtime = (name == "call" || name == "func.call")
            && ["@curv_cuda_sgemm(", "@curv_cuda_free("].iter().any(|callee| operation.contains(callee));
        let load_of_input = name == "memref.load"
            && operation["memref.load ".len()..]
                .strip_prefix("%arg")
                .and_then(|rest| rest.split('[').next())
                .and_then(|number| number.parse::<usize>().ok())
                .is_some_and(|argument| argument < inputs);
        let scalar_math = name.starts_with("arith.") || name.starts_with("math.");
        if !(scalar_math || load_of_input || ALLOWED.contains(&name) || call_of_runtime) {
            return Some(trimmed.to_string());
        }
    }
    None
}

/// A kernel module's loops outlined into GPU kernels: [`parallel_loops_first`],
/// [`split_long_reductions`], [`GPU_BUFFERISATION_PIPELINE`], [`copies_as_kernels`], then [`gpu_outlining_pipeline`] with the
/// module's [`tile_sizes_for`].
pub fn outline_kernels(text: &str) -> Result<String, MlirError> {
    let reordered = split_long_reductions(&parallel_loops_first(&split_full_reductions(text)));
    let bufferised = crate::run_pipeline_keeping_locations(&reordered, GPU_BUFFERISATION_PIPELINE)?;
    crate::run_pipeline_keeping_locations(
        &scalars_as_kernels(&copies_as_kernels(&bufferised)),
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
    lower_to_ptx_with_launches(text, target).map(|(modules, _)| modules)
}

/// How the launches of a kernel module run on a GPU, as `curv emit --stage ptx` prints it: back
/// to back when its host side touches no memory, each waiting for its kernel otherwise (naming
/// the host-side line that touches memory).
#[derive(Debug, Clone, PartialEq)]
pub enum Launches {
    BackToBack,
    EachWaits(String),
}

impl std::fmt::Display for Launches {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Launches::BackToBack => formatter.write_str("launches back to back (the host side touches no memory)"),
            Launches::EachWaits(line) => write!(formatter, "every launch waits (the host side runs `{line}`)"),
        }
    }
}

/// [`lower_to_ptx`], with how the module's launches run ([`host_memory_access`]).
pub fn lower_to_ptx_with_launches(text: &str, target: GpuTarget) -> Result<(Vec<PtxModule>, Launches), MlirError> {
    // Matrix products as they are called on a GPU (cuBLAS), as in [`lower_for_cuda`].
    let outlined = outline_kernels(&with_cuda_products(text))?;
    let launches = match host_memory_access(&device_allocations(&outlined)?, input_arguments(text)) {
        None => Launches::BackToBack,
        Some(line) => Launches::EachWaits(line),
    };
    let lowered = generate_kernels(&outlined, &outlined, target)?;
    let modules = extract_ptx(&lowered);
    if modules.is_empty() && lowered.contains("gpu.launch_func") {
        return Err(MlirError { message: "the GPU pipeline produced launches but no PTX".to_string() });
    }
    Ok((modules, launches))
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

/// Which lines of a printed module are on its host side: the lines of a `gpu.module` (printed at
/// an indentation of two, closed by `  }`, followed by its location when locations are printed)
/// are not.
#[derive(Default)]
struct GpuModuleLines {
    inside: bool,
}

impl GpuModuleLines {
    /// Whether `line`, the module's next line, is on its host side.
    fn host(&mut self, line: &str) -> bool {
        if self.inside {
            self.inside = !(line.trim_end() == "  }" || line.starts_with("  } loc("));
            return false;
        }
        self.inside = line.trim_start().starts_with("gpu.module @");
        !self.inside
    }
}

/// A kernel module's matrix products calling cuBLAS (`curv_cuda_sgemm`) instead of the CPU GEMM.
fn with_cuda_products(text: &str) -> String {
    text.replace("@curv_sgemm(", "@curv_cuda_sgemm(")
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
    // Inside a `gpu.module`, nothing changes.
    let mut sides = GpuModuleLines::default();
    let mut freed = 0;
    for line in module.split_inclusive('\n') {
        if !sides.host(line) {
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
    let text = with_cuda_products(text);
    let outlined = outline_kernels(&text)?;
    let host = device_allocations(&outlined)?;
    let host =
        if host_memory_access(&host, input_arguments(&text)).is_none() { ordered_launches(&host)? } else { host };
    generate_kernels(&host, &outlined, target)
}

/// How many input arguments the function of a kernel module (the text `crate::lower` produces)
/// has: they are named `%argN` there, its outputs `%outN`, and come first.
pub fn input_arguments(text: &str) -> usize {
    text.lines()
        .find(|line| line.trim_start().starts_with("func.func @"))
        .map_or(0, |line| line.matches("%arg").count())
}

/// A module whose host side touches no memory ([`host_memory_access`]) with a call of the
/// runtime's `curv_cuda_ordered_launches` first in each of its host functions: their launches
/// and matrix products do not wait for the device, and the runtime waits once when the call ends.
pub fn ordered_launches(module: &str) -> Result<String, MlirError> {
    let mut out = String::with_capacity(module.len() + 256);
    let mut sides = GpuModuleLines::default();
    for line in module.split_inclusive('\n') {
        out.push_str(line);
        let trimmed = line.trim();
        if sides.host(line) && trimmed.starts_with("func.func @") && trimmed.ends_with('{') {
            let indentation = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indentation}  func.call @curv_cuda_ordered_launches() : () -> ()\n"));
        }
    }
    let start = out.find("{\n").ok_or_else(|| MlirError { message: "a module without a body".to_string() })? + 2;
    out.insert_str(start, "  func.func private @curv_cuda_ordered_launches()\n");
    Ok(out)
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
    fn a_loss_is_summed_over_its_longest_loop_in_parallel_then_in_two_stages() {
        let loss = |rows: usize, combine: &str| {
            format!(
                "    %v29 = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>, affine_map<(d0, d1) -> ()>], iterator_types = [\"reduction\", \"reduction\"]}} ins(%v21, %v24 : tensor<{rows}x10xf32>, tensor<{rows}xf32>) outs(%t35 : tensor<f32>) {{\n\
                 \x20   ^bb0(%a0: f32, %a1: f32, %out: f32):\n\
                 \x20     %s0 = arith.subf %a0, %a1 : f32\n\
                 \x20     %combined = {combine} %s0, %out : f32\n\
                 \x20     linalg.yield %combined : f32\n\
                 \x20   }} -> tensor<f32> loc(\"digits.curv\":3:5)\n"
            )
        };
        let split = split_full_reductions(&loss(128, "arith.addf"));
        for expected in [
            "%v29_rows = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]} ins(%v21, %v24 : tensor<128x10xf32>, tensor<128xf32>) outs(%v29_rows_init : tensor<128xf32>)",
            "%v29_rows_split = tensor.expand_shape %v29_rows [[0, 1]] output_shape [8, 16] : tensor<128xf32> into tensor<8x16xf32>",
            "%v29_parts = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]} ins(%v29_rows_split : tensor<8x16xf32>) outs(%v29_parts_init : tensor<8xf32>)",
            "%v29 = linalg.generic {indexing_maps = [affine_map<(d0) -> (d0)>, affine_map<(d0) -> ()>], iterator_types = [\"reduction\"]} ins(%v29_parts : tensor<8xf32>) outs(%t35 : tensor<f32>)",
            "%v29_rows_neutral = arith.constant 0.000000e+00 : f32",
        ] {
            assert!(split.contains(expected), "missing `{expected}` in\n{split}");
        }
        // The longest loop is the parallel one, wherever it is; few rows combine in one stage.
        let wide = loss(4, "arith.maximumf")
            .replace("tensor<4x10xf32>, tensor<4xf32>", "tensor<4x10xf32>, tensor<10xf32>")
            .replace("(d0, d1) -> (d0)>, affine_map<(d0, d1) -> ()>", "(d0, d1) -> (d1)>, affine_map<(d0, d1) -> ()>");
        let split = split_full_reductions(&wide);
        assert!(
            split.contains("affine_map<(d0, d1) -> (d1)>], iterator_types = [\"reduction\", \"parallel\"]"),
            "{split}"
        );
        assert!(split.contains("arith.constant 0xFF800000 : f32"), "{split}");
        assert!(!split.contains("_parts"), "{split}");
        // A combine it does not know, and a reduction with a parallel loop, stay as they are.
        assert_eq!(split_full_reductions(&loss(128, "arith.mulf")), loss(128, "arith.mulf"));
        let partial =
            loss(128, "arith.addf").replace("[\"reduction\", \"reduction\"]", "[\"parallel\", \"reduction\"]");
        assert_eq!(split_full_reductions(&partial), partial);
        assert_eq!(full_reduction_parts(4096), Some((64, 64)));
        assert_eq!(full_reduction_parts(100), None);
    }

    #[test]
    fn ops_on_scalars_become_kernels_of_one_thread_and_leave_the_host_side_launching_only() {
        let module = "#map = affine_map<(d0) -> (d0)>\n\
            #map1 = affine_map<(d0) -> ()>\n\
            #map2 = affine_map<() -> ()>\n\
            module {\n\
            \x20 func.func @f(%arg0: memref<8xf32>, %arg1: memref<f32>, %arg2: memref<f32>) {\n\
            \x20   %cst = arith.constant 0.000000e+00 : f32\n\
            \x20   %alloc = memref.alloc() {alignment = 64 : i64} : memref<f32>\n\
            \x20   linalg.fill ins(%cst : f32) outs(%alloc : memref<f32>)\n\
            \x20   linalg.generic {indexing_maps = [#map, #map1], iterator_types = [\"reduction\"]} ins(%arg0 : memref<8xf32>) outs(%alloc : memref<f32>) {\n\
            \x20   ^bb0(%in: f32, %out: f32):\n\
            \x20     %i = linalg.index 0 : index\n\
            \x20     %0 = arith.addf %in, %out : f32\n\
            \x20     linalg.yield %0 : f32\n\
            \x20   }\n\
            \x20   linalg.generic {indexing_maps = [#map2, #map2], iterator_types = []} ins(%alloc : memref<f32>) outs(%arg1 : memref<f32>) {\n\
            \x20   ^bb0(%in: f32, %out: f32):\n\
            \x20     %0 = arith.mulf %in, %in : f32\n\
            \x20     linalg.yield %0 : f32\n\
            \x20   }\n\
            \x20   memref.copy %arg1, %arg2 : memref<f32> to memref<f32>\n\
            \x20   memref.dealloc %alloc : memref<f32>\n\
            \x20   return\n\
            \x20 }\n\
            }\n";
        let rewritten = scalars_as_kernels(module);
        for expected in [
            "%curv_unit1 = memref.expand_shape %alloc [] output_shape [1] : memref<f32> into memref<1xf32>",
            "linalg.fill ins(%cst : f32) outs(%curv_unit1 : memref<1xf32>)",
            "linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d1)>, affine_map<(d0, d1) -> (d0)>], iterator_types = [\"parallel\", \"reduction\"]} ins(%arg0 : memref<8xf32>) outs(%curv_unit2 : memref<1xf32>) {",
            "%i = linalg.index 1 : index",
            "linalg.generic {indexing_maps = [affine_map<(d0) -> ()>, affine_map<(d0) -> (d0)>], iterator_types = [\"parallel\"]} ins(%alloc : memref<f32>) outs(%curv_unit3 : memref<1xf32>) {",
            "linalg.copy ins(%curv_unit4 : memref<1xf32>) outs(%curv_unit5 : memref<1xf32>)",
        ] {
            assert!(rewritten.contains(expected), "missing `{expected}` in\n{rewritten}");
        }
        // Before, the host side runs the scalar ops itself; after, it only launches kernels.
        let outline = |text: &str| crate::run_pipeline_keeping_locations(text, &gpu_outlining_pipeline("256")).unwrap();
        let before = outline(module);
        assert!(host_memory_access(&before, 3).is_some(), "{before}");
        let after = device_allocations(&outline(&rewritten)).unwrap();
        assert_eq!(host_memory_access(&after, 3), None, "{after}");
        assert_eq!(after.matches("gpu.launch_func").count(), 4, "{after}");
        let ordered = ordered_launches(&after).unwrap();
        assert!(ordered.contains("func.func private @curv_cuda_ordered_launches()"), "{ordered}");
        assert_eq!(ordered.matches("func.call @curv_cuda_ordered_launches()").count(), 1, "{ordered}");
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
        // Unless it is a splat constant copied whole: then the copy is a fill of its element.
        let splat = format!(
            "  memref.global \"private\" constant @__constant_9xf32 : memref<9xf32> = dense<0.000000e+00> {{alignment = 64 : i64}}\n{module}"
        );
        let filled = copies_as_kernels(&splat);
        assert!(filled.contains("    %curv_splat1 = arith.constant 0.000000e+00 : f32\n    linalg.fill ins(%curv_splat1 : f32) outs(%arg2 : memref<9xf32>)\n"), "{filled}");
        assert!(filled.contains("    memref.copy %1, %arg3 : memref<4xf32> to memref<4xf32>\n"), "{filled}");
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
