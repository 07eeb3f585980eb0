//! A long function as several bounded ones. LLVM compiles one long function, or one long
//! basic block, in time that grows faster than its length, so a CPU function whose body passes
//! [`SPLIT_LINES`] is cut, between kernels, into parts of about [`MAX_PART_LINES`]. Each part is
//! a private function that LLVM must not inline; it takes the table of buffers and a workspace,
//! and the entry function allocates the workspace and calls the parts in order. Parts have
//! internal linkage, so the objects of `curv build` and of the kernel cache export only the
//! entry's symbols.
//!
//! - A part reads from the table only the buffers it uses.
//! - A value one part defines and a later part uses goes through the workspace, at an offset
//!   fixed here (written with `bufferization.materialize_in_destination`, read with
//!   `bufferization.to_tensor` of a `memref.view`).
//! - A definition with no value operands (a buffer read, a constant) is repeated in each part
//!   that uses it instead.
//! - An output is written by the part that defines its value. Output buffers are the
//!   function's own (the runtime never passes an input's buffer as an output), so an output
//!   written early does not change what a later part reads.
//!
//! The cut is a decision that `curv emit --stage mlir` prints: parts are named `NAME__partK`.

use super::*;
use std::collections::{HashMap as Map, HashSet};

/// A function of more lines of MLIR (roughly, operations) than this is cut into parts. The
/// examples' functions have at most about 600 lines and are not cut.
pub const SPLIT_LINES: usize = 1_000;

/// The most lines in one part of a function that is cut, where its kernels allow a cut (a single
/// kernel longer than this is one part; fusion bounds a kernel, see
/// `curv_ir::fusion::MAX_FUSED_INSTRUCTIONS`). LLVM's machine scheduler is quadratic in the
/// memory operations of a block: with 10^4 parameters, parts of 1,000 lines compiled in 1.4
/// times the time of parts of 500, and parts of 250 gained little more.
pub const MAX_PART_LINES: usize = 500;

/// When a function is cut and how long its parts are: [`SPLIT_LINES`] and [`MAX_PART_LINES`]
/// unless a test asks for others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartLimits {
    /// A function of more lines than this is cut.
    pub split_above: usize,
    /// The most lines of a part, where a cut is allowed.
    pub part_lines: usize,
}

impl Default for PartLimits {
    fn default() -> PartLimits {
        PartLimits { split_above: SPLIT_LINES, part_lines: MAX_PART_LINES }
    }
}

/// The byte alignment of every value in the workspace.
const WORKSPACE_ALIGNMENT: u64 = 64;

/// The text one step of the body wrote: a buffer read, a constant or a kernel.
pub(super) struct StepText {
    pub text: String,
}

/// An SSA name the body uses: a value (`%v12`), a temporary (`%t3`) or a buffer (`%arg0`,
/// `%out2`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Name {
    Value(u32),
    Temporary(u32),
    Buffer(usize),
}

/// The names a step defines and uses, in the order first seen.
struct Names {
    defined: Vec<Name>,
    used: Vec<Name>,
    lines: usize,
}

/// `%v12` and the like: the names of the body among the SSA names of `line` (the block
/// arguments and scalars of kernel bodies, `%a0`, `%s3`, `%out`, are not).
fn scan(line: &str, buffers: &Map<&str, usize>, into: &mut Vec<Name>) {
    let bytes = line.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] != b'%' {
            index += 1;
            continue;
        }
        let start = index + 1;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let token = &line[start..end];
        let number = |prefix: &str| {
            token
                .strip_prefix(prefix)
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u32>().ok())
        };
        if let Some(number) = number("v") {
            into.push(Name::Value(number));
        } else if let Some(number) = number("t") {
            into.push(Name::Temporary(number));
        } else if let Some(&buffer) = buffers.get(token) {
            into.push(Name::Buffer(buffer));
        }
        index = end.max(start);
    }
}

fn names_of(text: &str, buffers: &Map<&str, usize>) -> Names {
    let mut defined = Vec::new();
    let mut defined_set = HashSet::new();
    let mut used = Vec::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let trimmed = line.trim_start();
        let (left, right) = match trimmed.split_once(" = ") {
            Some((left, right)) if trimmed.starts_with('%') => (left, right),
            _ => ("", trimmed),
        };
        let mut here = Vec::new();
        scan(left, buffers, &mut here);
        for name in here {
            if defined_set.insert(name) {
                defined.push(name);
            }
        }
        let mut here = Vec::new();
        scan(right, buffers, &mut here);
        used.extend(here.into_iter().filter(|name| !defined_set.contains(name)));
    }
    let mut seen = HashSet::new();
    used.retain(|name| seen.insert(*name));
    Names { defined, used, lines }
}

/// The lines that make a workspace slot's memref, `%vN_view`, in a part.
fn view(value: u32, offset: u64, memref: &str, workspace: &str) -> String {
    format!(
        "    %ws_offset{value} = arith.constant {offset} : index\n    \
         %v{value}_view = memref.view %workspace[%ws_offset{value}][] : {workspace} to {memref}\n"
    )
}

/// Cuts the body of function `name` into parts, or `None` when it is short enough or no cut is
/// possible. A step that is one definition with no value operands (a buffer read or a constant)
/// belongs to no part: each part that uses it repeats it. `steps` are the body in order,
/// `outputs` the output writes (the value each writes and its line), `buffers` the function's
/// buffers (table order), `value_type` a value's shape and element type. Returns the text of the
/// parts and of the entry function.
pub(super) fn split(
    limits: PartLimits,
    name: &str,
    steps: &[StepText],
    outputs: &[(ValueId, String)],
    buffers: &[entry::Buffer],
    value_type: &dyn Fn(u32) -> (Vec<i64>, DType),
) -> Option<String> {
    let total: usize = steps.iter().map(|step| step.text.lines().count()).sum::<usize>() + outputs.len();
    if total <= limits.split_above {
        return None;
    }
    let buffer_names: Map<&str, usize> =
        buffers.iter().enumerate().map(|(index, (argument, _, _))| (&argument[1..], index)).collect();
    let names: Vec<Names> = steps.iter().map(|step| names_of(&step.text, &buffer_names)).collect();
    // A step is repeated where it is used when it is one definition with no value operands.
    let repeated: Vec<bool> = names
        .iter()
        .map(|names| {
            names.lines == 1
                && names.defined.len() == 1
                && names.used.iter().all(|name| matches!(name, Name::Buffer(_)))
        })
        .collect();
    let mut definer: Map<Name, usize> = Map::new();
    for (step, names) in names.iter().enumerate() {
        for name in &names.defined {
            definer.insert(*name, step);
        }
    }
    // A cut before step `s` is blocked when a temporary defined before `s` is used from `s` on
    // (temporaries are not values of the IR: they have no type to give the workspace).
    let mut blocked = vec![0i64; steps.len() + 1];
    for (step, names) in names.iter().enumerate() {
        for name in &names.used {
            if let (Name::Temporary(_), Some(&from)) = (name, definer.get(name)) {
                if from < step && !repeated[from] {
                    blocked[from + 1] += 1;
                    blocked[step + 1] -= 1;
                }
            }
        }
    }
    let mut open = 0;
    let cut_allowed: Vec<bool> = blocked
        .iter()
        .map(|delta| {
            open += delta;
            open == 0
        })
        .collect();
    // The units a part is made of, in order: a step with the output writes of the values it
    // defines, then each output write of a repeated definition. A unit costs its lines and,
    // for every buffer or repeated definition it reads, the lines that bring it into a part.
    let mut writes_of: Map<usize, Vec<usize>> = Map::new();
    let mut tail_writes = Vec::new();
    for (output, (value, _)) in outputs.iter().enumerate() {
        match definer.get(&Name::Value(value.0)) {
            Some(&step) if !repeated[step] => writes_of.entry(step).or_default().push(output),
            _ => tail_writes.push(output),
        }
    }
    let brought = |name: &Name| match name {
        Name::Buffer(_) => 5,
        name => usize::from(definer.get(name).is_some_and(|&step| repeated[step])),
    };
    let write_cost = |output: usize| {
        let mut here = Vec::new();
        scan(&outputs[output].1, &buffer_names, &mut here);
        1 + here.iter().map(brought).sum::<usize>()
    };
    // (step, its writes, cost, whether a part may start here)
    let mut units: Vec<(Option<usize>, Vec<usize>, usize, bool)> = Vec::new();
    for step in 0..steps.len() {
        if repeated[step] {
            continue;
        }
        let writes = writes_of.remove(&step).unwrap_or_default();
        let cost = names[step].lines
            + names[step].used.iter().map(brought).sum::<usize>()
            + writes.iter().map(|&output| write_cost(output)).sum::<usize>();
        units.push((Some(step), writes, cost, cut_allowed[step]));
    }
    for output in tail_writes {
        units.push((None, vec![output], write_cost(output), true));
    }
    // Greedy: a part grows until the next unit would pass the bound and a cut is allowed.
    let mut part_of = vec![usize::MAX; steps.len()];
    let mut output_part = vec![usize::MAX; outputs.len()];
    let mut parts: Vec<Vec<usize>> = vec![Vec::new()];
    let mut lines = 0;
    for (step, writes, cost, may_start) in units {
        if lines > 0 && lines + cost > limits.part_lines && may_start {
            parts.push(Vec::new());
            lines = 0;
        }
        lines += cost;
        let part = parts.len() - 1;
        if let Some(step) = step {
            part_of[step] = part;
            parts[part].push(step);
        }
        for output in writes {
            output_part[output] = part;
        }
    }
    if parts.len() < 2 {
        return None;
    }
    // What each part needs from elsewhere, and the workspace slots of values that cross parts.
    let mut needs: Vec<Vec<Name>> = vec![Vec::new(); parts.len()];
    for (part, members) in parts.iter().enumerate() {
        let mut seen = HashSet::new();
        let defined: HashSet<Name> = members.iter().flat_map(|&step| names[step].defined.iter().copied()).collect();
        let mut want = |name: Name, needs: &mut Vec<Name>| {
            if !defined.contains(&name) && seen.insert(name) {
                needs.push(name);
            }
        };
        for &step in members {
            for &name in &names[step].used {
                want(name, &mut needs[part]);
            }
        }
        for (output, (value, line)) in outputs.iter().enumerate() {
            if output_part[output] == part {
                want(Name::Value(value.0), &mut needs[part]);
                let mut here = Vec::new();
                scan(line, &buffer_names, &mut here);
                for name in here {
                    want(name, &mut needs[part]);
                }
            }
        }
    }
    let mut offsets: Map<u32, u64> = Map::new();
    let mut exports: Vec<Vec<u32>> = vec![Vec::new(); parts.len()];
    let mut size: u64 = 0;
    for (part, part_needs) in needs.iter().enumerate() {
        for name in part_needs {
            match *name {
                Name::Buffer(_) => {}
                Name::Value(_) | Name::Temporary(_) => {
                    let step = *definer.get(name)?;
                    if repeated[step] {
                        continue;
                    }
                    // A temporary never crosses (the cuts above avoid it), nor does a later value.
                    let Name::Value(value) = *name else { return None };
                    let from = part_of[step];
                    if from >= part {
                        return None;
                    }
                    if let std::collections::hash_map::Entry::Vacant(slot) = offsets.entry(value) {
                        let (shape, dtype) = value_type(value);
                        let count: i64 = shape.iter().product();
                        let bytes = (count.max(1) as u64) * dtype.size_in_bytes();
                        slot.insert(size);
                        size += bytes.div_ceil(WORKSPACE_ALIGNMENT) * WORKSPACE_ALIGNMENT;
                        exports[from].push(value);
                    }
                }
            }
        }
    }
    let workspace = format!("memref<{}xi8>", size.max(WORKSPACE_ALIGNMENT));
    let mut text = String::new();
    for (part, members) in parts.iter().enumerate() {
        let _ = writeln!(
            text,
            "  func.func private @{name}__part{part}(%table: !llvm.ptr, %workspace: {workspace}) attributes {{passthrough = [\"noinline\"], llvm.linkage = #llvm.linkage<internal>}} {{"
        );
        // The buffers the part reads or writes, its own and those of repeated definitions.
        let mut used_buffers: Vec<usize> = Vec::new();
        let mut repeats = String::new();
        let mut imports = String::new();
        for name in &needs[part] {
            match *name {
                Name::Buffer(buffer) => used_buffers.push(buffer),
                Name::Value(_) | Name::Temporary(_) => {
                    let step = definer[name];
                    if repeated[step] {
                        for used in &names[step].used {
                            if let Name::Buffer(buffer) = used {
                                used_buffers.push(*buffer);
                            }
                        }
                        repeats.push_str(&steps[step].text);
                    } else if let Name::Value(value) = *name {
                        let (shape, dtype) = value_type(value);
                        let memref = memref_type(&shape, dtype);
                        imports.push_str(&view(value, offsets[&value], &memref, &workspace));
                        let _ = writeln!(
                            imports,
                            "    %v{value} = bufferization.to_tensor %v{value}_view restrict : {memref} to {}",
                            tensor_type(&shape, dtype)
                        );
                    }
                }
            }
        }
        used_buffers.sort_unstable();
        used_buffers.dedup();
        let selected: Vec<(usize, &entry::Buffer)> =
            used_buffers.iter().map(|&index| (index, &buffers[index])).collect();
        text.push_str(&entry::table_prologue(&selected));
        text.push_str(&repeats);
        text.push_str(&imports);
        for &step in members {
            text.push_str(&steps[step].text);
        }
        for &value in &exports[part] {
            let (shape, dtype) = value_type(value);
            let memref = memref_type(&shape, dtype);
            text.push_str(&view(value, offsets[&value], &memref, &workspace));
            let _ = writeln!(
                text,
                "    bufferization.materialize_in_destination %v{value} in restrict writable %v{value}_view : ({}, {memref}) -> ()",
                tensor_type(&shape, dtype)
            );
        }
        for (output, (_, line)) in outputs.iter().enumerate() {
            if output_part[output] == part {
                text.push_str(line);
            }
        }
        text.push_str("    return\n  }\n");
    }
    let _ = writeln!(text, "  func.func @{name}(%table: !llvm.ptr) attributes {{ llvm.emit_c_interface }} {{");
    let _ = writeln!(text, "    %workspace = memref.alloc() {{alignment = {WORKSPACE_ALIGNMENT} : i64}} : {workspace}");
    for part in 0..parts.len() {
        let _ =
            writeln!(text, "    func.call @{name}__part{part}(%table, %workspace) : (!llvm.ptr, {workspace}) -> ()");
    }
    text.push_str("    return\n  }\n");
    Some(text)
}
