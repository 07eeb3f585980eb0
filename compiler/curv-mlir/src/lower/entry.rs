//! How a lowered function takes its buffers: the CPU's table of packed descriptors or the GPU's
//! memref per buffer, and the prologue that turns the table into the memrefs the body uses.

use super::*;

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

/// A buffer of a lowered function: its SSA name (`%arg0`, `%out1`), shape and element type.
pub type Buffer = (String, Vec<i64>, DType);

/// The LLVM type of the descriptor of a memref of `rank` dimensions.
pub(super) fn descriptor_type(rank: usize) -> String {
    if rank == 0 {
        "!llvm.struct<(ptr, ptr, i64)>".to_string()
    } else {
        format!("!llvm.struct<(ptr, ptr, i64, array<{rank} x i64>, array<{rank} x i64>)>")
    }
}

/// The signature of function `name`, whose `buffers` are (SSA name such as `%arg0`, shape,
/// element type), and, for [`EntryAbi::Table`], the prologue that reads each buffer's descriptor
/// from the table into the memref the body uses under that name.
pub fn entry(name: &str, buffers: &[Buffer], abi: EntryAbi) -> (String, String) {
    match abi {
        EntryAbi::Descriptors => {
            let parameters: Vec<String> = buffers
                .iter()
                .map(|(argument, shape, dtype)| format!("{argument}: {}", memref_type(shape, *dtype)))
                .collect();
            (format!("func.func @{name}({})", parameters.join(", ")), String::new())
        }
        EntryAbi::Table => {
            let all: Vec<(usize, &Buffer)> = buffers.iter().enumerate().collect();
            (format!("func.func @{name}(%table: !llvm.ptr)"), table_prologue(&all))
        }
    }
}

/// The lines that read the descriptor in slot `slot` of `%table` (a constant, `3`, or an `i64`
/// value, `%i`) and cast it to `memref` under the name `target` (`%arg0`), each line after
/// `indent`; `stem` names the intermediate values.
fn read_slot(stem: &str, slot: &str, target: &str, shape: &[i64], dtype: DType, indent: &str) -> String {
    let descriptor = descriptor_type(shape.len());
    let memref = memref_type(shape, dtype);
    let slot_types = if slot.starts_with('%') { "(!llvm.ptr, i64)" } else { "(!llvm.ptr)" };
    format!(
        "{indent}%{stem}_slot = llvm.getelementptr %table[{slot}] : {slot_types} -> !llvm.ptr, !llvm.ptr\n\
         {indent}%{stem}_pointer = llvm.load %{stem}_slot : !llvm.ptr -> !llvm.ptr\n\
         {indent}%{stem}_descriptor_pointer = llvm.load %{stem}_pointer : !llvm.ptr -> !llvm.ptr\n\
         {indent}%{stem}_descriptor = llvm.load %{stem}_descriptor_pointer : !llvm.ptr -> {descriptor}\n\
         {indent}{target} = builtin.unrealized_conversion_cast %{stem}_descriptor : {descriptor} to {memref}\n"
    )
}

/// The lines that read buffers `(table index, (SSA name, shape, element type))` from `%table`
/// into the memrefs a body uses under those names.
pub(super) fn table_prologue(buffers: &[(usize, &Buffer)]) -> String {
    buffers
        .iter()
        .map(|(index, (argument, shape, dtype))| {
            read_slot(&argument[1..], &index.to_string(), argument, shape, *dtype, "    ")
        })
        .collect()
}

/// One loop that fills the buffers in table `slots` (all of `shape` and `dtype`) with
/// `constant`, each iteration reading a descriptor as the prologue does. Ten thousand unused
/// parameters made ten thousand writes of a zero gradient, each its own code.
pub(super) fn fill_from_table(slots: std::ops::Range<usize>, shape: &[i64], dtype: DType, constant: f64) -> String {
    let memref = memref_type(shape, dtype);
    let element = element(dtype);
    let stem = format!("fill{}", slots.start);
    let read = read_slot(&stem, &format!("%{stem}_slot_index"), &format!("%{stem}_buffer"), shape, dtype, "      ");
    format!(
        "    %{stem}_first = arith.constant {} : index\n    \
         %{stem}_end = arith.constant {} : index\n    \
         %{stem}_step = arith.constant 1 : index\n    \
         %{stem}_value = arith.constant {} : {element}\n    \
         scf.for %{stem}_index = %{stem}_first to %{stem}_end step %{stem}_step {{\n      \
         %{stem}_slot_index = arith.index_cast %{stem}_index : index to i64\n\
         {read}      \
         linalg.fill ins(%{stem}_value : {element}) outs(%{stem}_buffer : {memref})\n    \
         }}\n",
        slots.start,
        slots.end,
        float_literal(constant)
    )
}
