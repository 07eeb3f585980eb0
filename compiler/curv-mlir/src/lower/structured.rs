//! The structured ops that are neither elementwise nor reductions nor matrix products: slices and
//! their transpose (`pad`), `argmax`, the embedding `gather` and its transpose (`scatter_add`),
//! and the 2-D convolution with its two gradients. Each is one kernel of the fusion plan.
//!
//! The convolutions go through im2col: a patch matrix `[N OH OW, C kH kW]`, built by a generic
//! that pads on the fly, times the kernel as a matrix through the runtime's GEMM; the kernel
//! gradient is `dout^T @ patches`, and the input gradient is `dout @ kernel` folded back by
//! col2im (a generic that sums, for every input position, the patch entries that read it).
//! Indices read from data (`gather`, `scatter_add`) are clamped to the table, so a bad index
//! cannot address memory outside it (the interpreter reports it as an error instead).

use super::{element, iterators, map, tensor_type, Emitter, LowerError};
use curv_ir::{DType, Op, ValueId};

impl Emitter<'_> {
    /// `operand` placed at `offsets` inside zeros of `shape`: a generic over the result whose
    /// body reads the operand where a position holds one of its elements and yields zero
    /// elsewhere. (A `tensor.insert_slice` would bufferise to a `memref.copy`, which the CPU
    /// pipeline lowers to a library call.)
    fn placed_in_zeros(
        &mut self,
        dtype: DType,
        operand: &str,
        operand_shape: &[i64],
        shape: &[i64],
        offsets: &[i64],
    ) -> String {
        let ty = element(dtype);
        let mut body =
            vec!["%cv_0 = arith.constant 0 : index".to_string(), "%cv_ok_0 = arith.constant true".to_string()];
        let mut sources = Vec::new();
        for axis in 0..shape.len() {
            body.extend([
                format!("%cv_off{axis} = arith.constant {} : index", offsets[axis]),
                format!("%cv_size{axis} = arith.constant {} : index", operand_shape[axis]),
                format!("%cv_last{axis} = arith.constant {} : index", operand_shape[axis] - 1),
                format!("%cv_src{axis} = arith.subi %cv_d{axis}, %cv_off{axis} : index"),
            ]);
            body.extend(bounds_check(
                &format!("a{axis}"),
                &format!("%cv_src{axis}"),
                &format!("%cv_size{axis}"),
                &format!("%cv_last{axis}"),
            ));
            body.push(format!("%cv_ok_{} = arith.andi %cv_ok_{axis}, %cv_a{axis}_ok : i1", axis + 1));
            sources.push(format!("%cv_a{axis}_at"));
        }
        body.extend([
            format!(
                "%cv_read = tensor.extract {operand}[{}] : {}",
                sources.join(", "),
                tensor_type(operand_shape, dtype)
            ),
            format!("%cv_zero = arith.constant 0.0 : {ty}"),
            format!("%cv_value = arith.select %cv_ok_{}, %cv_read, %cv_zero : {ty}", shape.len()),
        ]);
        self.computed(dtype, shape, 0, &body, false)
    }

    /// The window of `operand` at `offsets` of `shape`, named `result`: a `linalg.generic` whose
    /// input map adds the offsets.
    fn window(
        &mut self,
        dtype: DType,
        result: &str,
        operand: &str,
        operand_shape: &[i64],
        shape: &[i64],
        offsets: &[i64],
    ) {
        let ty = element(dtype);
        let rank = shape.len();
        if (0..rank).any(|axis| offsets[axis] == 0 && operand_shape[axis] != shape[axis]) {
            // An axis read from its start but not to its end: its map would be the plain loop
            // index, from which linalg infers the loop's range as the operand's size, which is
            // not the result's. The element is read by index instead, in the body.
            let mut body = Vec::new();
            let mut sources = Vec::new();
            for (axis, offset) in offsets.iter().enumerate().take(rank) {
                body.push(format!("%cv_off{axis} = arith.constant {offset} : index"));
                body.push(format!("%cv_src{axis} = arith.addi %cv_d{axis}, %cv_off{axis} : index"));
                sources.push(format!("%cv_src{axis}"));
            }
            body.push(format!(
                "%cv_value = tensor.extract {operand}[{}] : {}",
                sources.join(", "),
                tensor_type(operand_shape, dtype)
            ));
            let computed = self.computed(dtype, shape, 0, &body, false);
            let result_type = tensor_type(shape, dtype);
            self.line(&format!("{result} = tensor.cast {computed} : {result_type} to {result_type}"));
            return;
        }
        let init = self.empty(shape, dtype);
        let shifted: Vec<String> = (0..rank)
            .map(|axis| if offsets[axis] == 0 { format!("d{axis}") } else { format!("d{axis} + {}", offsets[axis]) })
            .collect();
        let result_type = tensor_type(shape, dtype);
        self.line(&format!(
            "{result} = linalg.generic {{indexing_maps = [{}, {}], iterator_types = {}}} ins({operand} : {}) outs({init} : {result_type}) {{",
            map(rank, &shifted),
            super::identity_map(rank),
            iterators(&vec!["parallel"; rank]),
            tensor_type(operand_shape, dtype)
        ));
        self.line(&format!("^bb0(%a0: {ty}, %out: {ty}):"));
        self.line(&format!("  linalg.yield %a0 : {ty}"));
        self.line(&format!("}} -> {result_type}"));
    }

    /// A `linalg.generic` over `shape` with no inputs whose body is `body` (lines that end by
    /// defining `%cv_value`), named by a fresh name.
    fn computed(&mut self, dtype: DType, shape: &[i64], reductions: usize, body: &[String], init_zero: bool) -> String {
        let ty = element(dtype);
        let rank = shape.len();
        let result_shape = &shape[..rank - reductions];
        let result_type = tensor_type(result_shape, dtype);
        let init = if init_zero { self.filled(result_shape, dtype, 0.0) } else { self.empty(result_shape, dtype) };
        let kept: Vec<String> = (0..rank - reductions).map(|axis| format!("d{axis}")).collect();
        let kinds: Vec<&str> =
            (0..rank).map(|axis| if axis < rank - reductions { "parallel" } else { "reduction" }).collect();
        // The reduction loops' sizes come from a small input of their shape, which the body
        // ignores (linalg infers every loop's range from an operand).
        let (ins, block) = if reductions > 0 {
            let sizes = &shape[rank - reductions..];
            let shape_input = self.filled(sizes, dtype, 0.0);
            let reduced: Vec<String> = (rank - reductions..rank).map(|axis| format!("d{axis}")).collect();
            (
                (format!("{}, ", map(rank, &reduced)), format!(" ins({shape_input} : {})", tensor_type(sizes, dtype))),
                format!("%cv_unused: {ty}, "),
            )
        } else {
            ((String::new(), String::new()), String::new())
        };
        let name = self.fresh();
        self.line(&format!(
            "{name} = linalg.generic {{indexing_maps = [{}{}], iterator_types = {}}}{} outs({init} : {result_type}) {{",
            ins.0,
            map(rank, &kept),
            iterators(&kinds),
            ins.1
        ));
        self.line(&format!("^bb0({block}%out: {ty}):"));
        for axis in 0..rank {
            self.line(&format!("  %cv_d{axis} = linalg.index {axis} : index"));
        }
        for line in body {
            self.line(&format!("  {line}"));
        }
        if reductions > 0 {
            self.line(&format!("  %cv_sum = arith.addf %out, %cv_value : {ty}"));
            self.line(&format!("  linalg.yield %cv_sum : {ty}"));
        } else {
            self.line(&format!("  linalg.yield %cv_value : {ty}"));
        }
        self.line(&format!("}} -> {result_type}"));
        name
    }

    /// `tensor.collapse_shape` of `value` by `groups`.
    fn collapse_groups(&mut self, dtype: DType, value: &str, shape: &[i64], groups: &[&[usize]]) -> (String, Vec<i64>) {
        let folded: Vec<i64> = groups.iter().map(|group| group.iter().map(|&axis| shape[axis]).product()).collect();
        let text: Vec<String> = groups
            .iter()
            .map(|group| format!("[{}]", group.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")))
            .collect();
        let name = self.fresh();
        self.line(&format!(
            "{name} = tensor.collapse_shape {value} [{}] : {} into {}",
            text.join(", "),
            tensor_type(shape, dtype),
            tensor_type(&folded, dtype)
        ));
        (name, folded)
    }

    /// `tensor.expand_shape` of a matrix into `shape` by `groups`.
    fn expand_groups(&mut self, dtype: DType, value: &str, from: &[i64], shape: &[i64], groups: &[&[usize]]) -> String {
        let text: Vec<String> = groups
            .iter()
            .map(|group| format!("[{}]", group.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")))
            .collect();
        let sizes: Vec<String> = shape.iter().map(i64::to_string).collect();
        let name = self.fresh();
        self.line(&format!(
            "{name} = tensor.expand_shape {value} [{}] output_shape [{}] : {} into {}",
            text.join(", "),
            sizes.join(", "),
            tensor_type(from, dtype),
            tensor_type(shape, dtype)
        ));
        name
    }

    /// A generic copy of `operand` with its axes permuted: result axis `a` is operand axis
    /// `permutation[a]` (`linalg.transpose`).
    fn permuted(
        &mut self,
        dtype: DType,
        operand: &str,
        operand_shape: &[i64],
        permutation: &[usize],
    ) -> (String, Vec<i64>) {
        let shape: Vec<i64> = permutation.iter().map(|&axis| operand_shape[axis]).collect();
        let init = self.empty(&shape, dtype);
        let name = self.fresh();
        self.line(&format!(
            "{name} = linalg.transpose ins({operand} : {}) outs({init} : {}) permutation = {permutation:?}",
            tensor_type(operand_shape, dtype),
            tensor_type(&shape, dtype)
        ));
        (name, shape)
    }

    /// The im2col matrix of a convolution's input: row `(n, y, x)`, column `(c, ky, kx)` holds
    /// `input[n, c, y s + ky - p, x s + kx - p]`, zero outside the input.
    fn patches(&mut self, dtype: DType, input: &str, input_shape: &[i64], geometry: &Geometry) -> (String, Vec<i64>) {
        let (n, c, h, w) = (input_shape[0], input_shape[1], input_shape[2], input_shape[3]);
        let Geometry { kernel_height, kernel_width, output_height, output_width, stride, padding } = *geometry;
        let ty = element(dtype);
        let mut body = vec![
            format!("%cv_s = arith.constant {stride} : index"),
            format!("%cv_p = arith.constant {padding} : index"),
            "%cv_0 = arith.constant 0 : index".to_string(),
            format!("%cv_h = arith.constant {h} : index"),
            format!("%cv_w = arith.constant {w} : index"),
            format!("%cv_h1 = arith.constant {} : index", h - 1),
            format!("%cv_w1 = arith.constant {} : index", w - 1),
            "%cv_ys = arith.muli %cv_d1, %cv_s : index".to_string(),
            "%cv_yk = arith.addi %cv_ys, %cv_d4 : index".to_string(),
            "%cv_row = arith.subi %cv_yk, %cv_p : index".to_string(),
            "%cv_xs = arith.muli %cv_d2, %cv_s : index".to_string(),
            "%cv_xk = arith.addi %cv_xs, %cv_d5 : index".to_string(),
            "%cv_col = arith.subi %cv_xk, %cv_p : index".to_string(),
        ];
        body.extend(bounds_check("row", "%cv_row", "%cv_h", "%cv_h1"));
        body.extend(bounds_check("col", "%cv_col", "%cv_w", "%cv_w1"));
        body.extend([
            "%cv_ok = arith.andi %cv_row_ok, %cv_col_ok : i1".to_string(),
            format!(
                "%cv_read = tensor.extract {input}[%cv_d0, %cv_d3, %cv_row_at, %cv_col_at] : {}",
                tensor_type(input_shape, dtype)
            ),
            format!("%cv_zero = arith.constant 0.0 : {ty}"),
            format!("%cv_value = arith.select %cv_ok, %cv_read, %cv_zero : {ty}"),
        ]);
        let shape = [n, output_height, output_width, c, kernel_height, kernel_width];
        let six = self.computed(dtype, &shape, 0, &body, false);
        self.collapse_groups(dtype, &six, &shape, &[&[0, 1, 2], &[3, 4, 5]])
    }
}

/// The sizes of a convolution besides its operands' shapes.
#[derive(Clone, Copy)]
struct Geometry {
    kernel_height: i64,
    kernel_width: i64,
    output_height: i64,
    output_width: i64,
    stride: i64,
    padding: i64,
}

/// Lines that check `0 <= index < size` into `%cv_NAME_ok` and clamp it into `%cv_NAME_at`.
fn bounds_check(name: &str, index: &str, size: &str, last: &str) -> Vec<String> {
    vec![
        format!("%cv_{name}_ge = arith.cmpi sge, {index}, %cv_0 : index"),
        format!("%cv_{name}_lt = arith.cmpi slt, {index}, {size} : index"),
        format!("%cv_{name}_ok = arith.andi %cv_{name}_ge, %cv_{name}_lt : i1"),
        format!("%cv_{name}_lo = arith.maxsi {index}, %cv_0 : index"),
        format!("%cv_{name}_at = arith.minsi %cv_{name}_lo, {last} : index"),
    ]
}

/// Lowers one structured instruction; `None` when `op` is not one of this module's.
pub(super) fn lower_structured(emitter: &mut Emitter, id: ValueId) -> Option<Result<(), LowerError>> {
    let function = emitter.function;
    let inst = function.inst(id);
    let shape = emitter.shape(id).to_vec();
    let dtype = inst.ty.dtype;
    let result_type = tensor_type(&shape, dtype);
    let value = emitter.value(id);
    match &inst.op {
        Op::Slice { starts } => {
            let operand = inst.args[0];
            let operand_shape = emitter.shape(operand).to_vec();
            let operand_value = emitter.value(operand);
            let operand_dtype = emitter.dtype(operand);
            emitter.window(operand_dtype, &value, &operand_value, &operand_shape, &shape, starts);
        }
        Op::Pad { starts } => {
            let operand = inst.args[0];
            let operand_shape = emitter.shape(operand).to_vec();
            let placed = emitter.placed_in_zeros(dtype, &emitter.value(operand), &operand_shape, &shape, starts);
            emitter.line(&format!("{value} = tensor.cast {placed} : {result_type} to {result_type}"));
        }
        Op::ArgMax { axis } => {
            // One pass with two outputs, the running maximum and its index; the first element
            // along the axis is always taken, then only a strictly larger one (as the interpreter).
            let operand = inst.args[0];
            let operand_shape = emitter.shape(operand).to_vec();
            let operand_dtype = emitter.dtype(operand);
            let ty = element(operand_dtype);
            let rank = operand_shape.len();
            let maximum = emitter.filled(&shape, operand_dtype, f64::NEG_INFINITY);
            let empty = emitter.empty(&shape, DType::I32);
            let minus_one = emitter.fresh();
            emitter.line(&format!("{minus_one} = arith.constant -1 : i32"));
            let positions = emitter.fresh();
            let index_type = tensor_type(&shape, DType::I32);
            emitter.line(&format!(
                "{positions} = linalg.fill ins({minus_one} : i32) outs({empty} : {index_type}) -> {index_type}"
            ));
            let kept: Vec<String> = (0..rank).filter(|other| other != axis).map(|other| format!("d{other}")).collect();
            let all: Vec<String> = (0..rank).map(|other| format!("d{other}")).collect();
            let kinds: Vec<&str> =
                (0..rank).map(|other| if other == *axis { "reduction" } else { "parallel" }).collect();
            let both = emitter.fresh();
            let maximum_type = tensor_type(&shape, operand_dtype);
            emitter.line(&format!(
                "{both}:2 = linalg.generic {{indexing_maps = [{}, {}, {}], iterator_types = {}}} ins({} : {}) outs({maximum}, {positions} : {maximum_type}, {index_type}) {{",
                map(rank, &all),
                map(rank, &kept),
                map(rank, &kept),
                iterators(&kinds),
                emitter.value(operand),
                tensor_type(&operand_shape, operand_dtype)
            ));
            emitter.line(&format!("^bb0(%a0: {ty}, %best: {ty}, %at: i32):"));
            emitter.line(&format!("  %s0 = linalg.index {axis} : index"));
            emitter.line("  %s1 = arith.index_cast %s0 : index to i32");
            emitter.line(&format!("  %s2 = arith.cmpf ogt, %a0, %best : {ty}"));
            emitter.line("  %s3 = arith.constant 0 : i32");
            emitter.line("  %s4 = arith.cmpi slt, %at, %s3 : i32");
            emitter.line("  %s5 = arith.ori %s2, %s4 : i1");
            emitter.line(&format!("  %s6 = arith.select %s5, %a0, %best : {ty}"));
            emitter.line("  %s7 = arith.select %s5, %s1, %at : i32");
            emitter.line(&format!("  linalg.yield %s6, %s7 : {ty}, i32"));
            emitter.line(&format!("}} -> ({maximum_type}, {index_type})"));
            emitter.line(&format!("{value} = tensor.cast {both}#1 : {index_type} to {result_type}"));
        }
        Op::Gather => {
            // `table [V, E]` rows picked by `ids [...]`: a generic over the result whose body
            // reads the table at the (clamped) id and the last loop index.
            let (table, ids) = (inst.args[0], inst.args[1]);
            let table_shape = emitter.shape(table).to_vec();
            let ids_shape = emitter.shape(ids).to_vec();
            let rank = shape.len();
            let kept: Vec<String> = (0..rank - 1).map(|axis| format!("d{axis}")).collect();
            let table_value = emitter.value(table);
            let table_type = tensor_type(&table_shape, dtype);
            let rows = table_shape[0];
            let input = (emitter.value(ids), tensor_type(&ids_shape, DType::I32), kept);
            emitter.generic(id, &[input], &|args, lines| {
                lines.push(format!("%s0 = arith.index_cast {} : i32 to index", args[0]));
                lines.push("%s1 = arith.constant 0 : index".to_string());
                lines.push(format!("%s2 = arith.constant {} : index", rows - 1));
                lines.push("%s3 = arith.maxsi %s0, %s1 : index".to_string());
                lines.push("%s4 = arith.minsi %s3, %s2 : index".to_string());
                lines.push(format!("%s5 = linalg.index {} : index", rank - 1));
                lines.push(format!("%s6 = tensor.extract {table_value}[%s4, %s5] : {table_type}"));
                "%s6".to_string()
            });
        }
        Op::ScatterAdd => {
            // Rows added one by one into zeros at their (clamped) ids, in order, as the
            // interpreter does: an `scf.for` carrying the table.
            let (ids, rows) = (inst.args[0], inst.args[1]);
            let ids_shape = emitter.shape(ids).to_vec();
            if ids_shape.is_empty() {
                return Some(Err(super::unsupported(&inst.op)));
            }
            let rows_shape = emitter.shape(rows).to_vec();
            let count: i64 = ids_shape.iter().product();
            let width = shape[1];
            let flat_ids_type = tensor_type(&[count], DType::I32);
            let flat_rows_type = tensor_type(&[count, width], dtype);
            let row_type = tensor_type(&[1, width], dtype);
            // The ids as one vector and the rows as one matrix (views, when not already so).
            let leading: Vec<usize> = (0..ids_shape.len()).collect();
            let (flat_ids, flat_rows) = if ids_shape.len() == 1 {
                (emitter.value(ids), emitter.value(rows))
            } else {
                let (flat_ids, _) = emitter.collapse_groups(DType::I32, &emitter.value(ids), &ids_shape, &[&leading]);
                let (flat_rows, _) =
                    emitter.collapse_groups(dtype, &emitter.value(rows), &rows_shape, &[&leading, &[ids_shape.len()]]);
                (flat_ids, flat_rows)
            };
            let zeros = emitter.filled(&shape, dtype, 0.0);
            let (start, end, step, low, high) =
                (emitter.fresh(), emitter.fresh(), emitter.fresh(), emitter.fresh(), emitter.fresh());
            emitter.line(&format!("{start} = arith.constant 0 : index"));
            emitter.line(&format!("{end} = arith.constant {count} : index"));
            emitter.line(&format!("{step} = arith.constant 1 : index"));
            emitter.line(&format!("{low} = arith.constant 0 : index"));
            emitter.line(&format!("{high} = arith.constant {} : index", shape[0] - 1));
            let (row, table) = (emitter.fresh(), emitter.fresh());
            emitter.line(&format!(
                "{value} = scf.for {row} = {start} to {end} step {step} iter_args({table} = {zeros}) -> ({result_type}) {{"
            ));
            let names: Vec<String> = (0..7).map(|_| emitter.fresh()).collect();
            emitter.line(&format!("  {} = tensor.extract {flat_ids}[{row}] : {flat_ids_type}", names[0]));
            emitter.line(&format!("  {} = arith.index_cast {} : i32 to index", names[1], names[0]));
            emitter.line(&format!("  {} = arith.maxsi {}, {low} : index", names[2], names[1]));
            emitter.line(&format!("  {} = arith.minsi {}, {high} : index", names[3], names[2]));
            emitter.line(&format!(
                "  {} = tensor.extract_slice {flat_rows}[{row}, 0] [1, {width}] [1, 1] : {flat_rows_type} to {row_type}",
                names[4]
            ));
            emitter.line(&format!(
                "  {} = tensor.extract_slice {table}[{}, 0] [1, {width}] [1, 1] : {result_type} to {row_type}",
                names[5], names[3]
            ));
            emitter.line(&format!(
                "  {} = linalg.add ins({}, {} : {row_type}, {row_type}) outs({} : {row_type}) -> {row_type}",
                names[6], names[5], names[4], names[5]
            ));
            let updated = emitter.fresh();
            emitter.line(&format!(
                "  {updated} = tensor.insert_slice {} into {table}[{}, 0] [1, {width}] [1, 1] : {row_type} into {result_type}",
                names[6], names[3]
            ));
            emitter.line(&format!("  scf.yield {updated} : {result_type}"));
            emitter.line("}");
        }
        Op::Conv2d { stride, padding } => {
            // im2col: patches [N OH OW, C kH kW] @ kernel^T [C kH kW, O], then NHWC to NCHW.
            let (input, kernel) = (inst.args[0], inst.args[1]);
            let input_shape = emitter.shape(input).to_vec();
            let kernel_shape = emitter.shape(kernel).to_vec();
            let geometry = Geometry {
                kernel_height: kernel_shape[2],
                kernel_width: kernel_shape[3],
                output_height: shape[2],
                output_width: shape[3],
                stride: *stride,
                padding: *padding,
            };
            let (patches, patches_shape) = emitter.patches(dtype, &emitter.value(input), &input_shape, &geometry);
            let (kernel_t, kernel_t_shape) =
                emitter.permuted(dtype, &emitter.value(kernel), &kernel_shape, &[1, 2, 3, 0]);
            let (kernel_columns, kernel_columns_shape) =
                emitter.collapse_groups(dtype, &kernel_t, &kernel_t_shape, &[&[0, 1, 2], &[3]]);
            let (product, product_shape) =
                super::product_2d(emitter, dtype, (&patches, &patches_shape), (&kernel_columns, &kernel_columns_shape));
            let nhwc = [shape[0], shape[2], shape[3], shape[1]];
            let expanded = emitter.expand_groups(dtype, &product, &product_shape, &nhwc, &[&[0, 1, 2], &[3]]);
            let init = emitter.empty(&shape, dtype);
            emitter.line(&format!(
                "{value} = linalg.transpose ins({expanded} : {}) outs({init} : {result_type}) permutation = [0, 3, 1, 2]",
                tensor_type(&nhwc, dtype)
            ));
        }
        Op::Conv2dKernelGradient { stride, padding } => {
            // dk [O, C kH kW] = dout^T [O, N OH OW] @ patches [N OH OW, C kH kW].
            let (input, output_gradient) = (inst.args[0], inst.args[1]);
            let input_shape = emitter.shape(input).to_vec();
            let gradient_shape = emitter.shape(output_gradient).to_vec();
            let geometry = Geometry {
                kernel_height: shape[2],
                kernel_width: shape[3],
                output_height: gradient_shape[2],
                output_width: gradient_shape[3],
                stride: *stride,
                padding: *padding,
            };
            let (patches, patches_shape) = emitter.patches(dtype, &emitter.value(input), &input_shape, &geometry);
            let (gradient_t, gradient_t_shape) =
                emitter.permuted(dtype, &emitter.value(output_gradient), &gradient_shape, &[1, 0, 2, 3]);
            let (gradient_rows, gradient_rows_shape) =
                emitter.collapse_groups(dtype, &gradient_t, &gradient_t_shape, &[&[0], &[1, 2, 3]]);
            let (product, product_shape) =
                super::product_2d(emitter, dtype, (&gradient_rows, &gradient_rows_shape), (&patches, &patches_shape));
            let expanded = emitter.expand_groups(dtype, &product, &product_shape, &shape, &[&[0], &[1, 2, 3]]);
            emitter.line(&format!("{value} = tensor.cast {expanded} : {result_type} to {result_type}"));
        }
        Op::Conv2dInputGradient { stride, padding } => {
            // dpatches [N OH OW, C kH kW] = dout [N OH OW, O] @ kernel [O, C kH kW], then col2im:
            // dx[n, c, h, w] sums dpatches[n, y, x, c, ky, kx] over h + p = y s + ky, w + p = x s + kx.
            let (output_gradient, kernel) = (inst.args[0], inst.args[1]);
            let gradient_shape = emitter.shape(output_gradient).to_vec();
            let kernel_shape = emitter.shape(kernel).to_vec();
            let (kernel_height, kernel_width) = (kernel_shape[2], kernel_shape[3]);
            let (output_height, output_width) = (gradient_shape[2], gradient_shape[3]);
            let (gradient_t, gradient_t_shape) =
                emitter.permuted(dtype, &emitter.value(output_gradient), &gradient_shape, &[0, 2, 3, 1]);
            let (gradient_rows, gradient_rows_shape) =
                emitter.collapse_groups(dtype, &gradient_t, &gradient_t_shape, &[&[0, 1, 2], &[3]]);
            let (kernel_rows, kernel_rows_shape) =
                emitter.collapse_groups(dtype, &emitter.value(kernel), &kernel_shape, &[&[0], &[1, 2, 3]]);
            let (product, product_shape) = super::product_2d(
                emitter,
                dtype,
                (&gradient_rows, &gradient_rows_shape),
                (&kernel_rows, &kernel_rows_shape),
            );
            let six_shape = [shape[0], output_height, output_width, shape[1], kernel_height, kernel_width];
            let six = emitter.expand_groups(dtype, &product, &product_shape, &six_shape, &[&[0, 1, 2], &[3, 4, 5]]);
            let ty = element(dtype);
            // Loops (n, c, h, w | ky, kx).
            let mut body = vec![
                format!("%cv_s = arith.constant {stride} : index"),
                format!("%cv_p = arith.constant {padding} : index"),
                "%cv_0 = arith.constant 0 : index".to_string(),
                format!("%cv_oh = arith.constant {output_height} : index"),
                format!("%cv_ow = arith.constant {output_width} : index"),
                format!("%cv_oh1 = arith.constant {} : index", output_height - 1),
                format!("%cv_ow1 = arith.constant {} : index", output_width - 1),
                "%cv_hp = arith.addi %cv_d2, %cv_p : index".to_string(),
                "%cv_ty = arith.subi %cv_hp, %cv_d4 : index".to_string(),
                "%cv_y = arith.divsi %cv_ty, %cv_s : index".to_string(),
                "%cv_ry = arith.remsi %cv_ty, %cv_s : index".to_string(),
                "%cv_wp = arith.addi %cv_d3, %cv_p : index".to_string(),
                "%cv_tx = arith.subi %cv_wp, %cv_d5 : index".to_string(),
                "%cv_x = arith.divsi %cv_tx, %cv_s : index".to_string(),
                "%cv_rx = arith.remsi %cv_tx, %cv_s : index".to_string(),
                "%cv_ty_ge = arith.cmpi sge, %cv_ty, %cv_0 : index".to_string(),
                "%cv_tx_ge = arith.cmpi sge, %cv_tx, %cv_0 : index".to_string(),
                "%cv_ry_ok = arith.cmpi eq, %cv_ry, %cv_0 : index".to_string(),
                "%cv_rx_ok = arith.cmpi eq, %cv_rx, %cv_0 : index".to_string(),
            ];
            body.extend(bounds_check("y", "%cv_y", "%cv_oh", "%cv_oh1"));
            body.extend(bounds_check("x", "%cv_x", "%cv_ow", "%cv_ow1"));
            body.extend([
                "%cv_ok1 = arith.andi %cv_ty_ge, %cv_tx_ge : i1".to_string(),
                "%cv_ok2 = arith.andi %cv_ry_ok, %cv_rx_ok : i1".to_string(),
                "%cv_ok3 = arith.andi %cv_y_ok, %cv_x_ok : i1".to_string(),
                "%cv_ok4 = arith.andi %cv_ok1, %cv_ok2 : i1".to_string(),
                "%cv_ok = arith.andi %cv_ok3, %cv_ok4 : i1".to_string(),
                format!(
                    "%cv_read = tensor.extract {six}[%cv_d0, %cv_y_at, %cv_x_at, %cv_d1, %cv_d4, %cv_d5] : {}",
                    tensor_type(&six_shape, dtype)
                ),
                format!("%cv_zero = arith.constant 0.0 : {ty}"),
                format!("%cv_value = arith.select %cv_ok, %cv_read, %cv_zero : {ty}"),
            ]);
            let loops = [shape[0], shape[1], shape[2], shape[3], kernel_height, kernel_width];
            let gradient = emitter.computed(dtype, &loops, 2, &body, true);
            emitter.line(&format!("{value} = tensor.cast {gradient} : {result_type} to {result_type}"));
        }
        _ => return None,
    }
    Some(Ok(()))
}
