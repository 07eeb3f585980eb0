//! Matrix products: calls of the runtime's GEMM (`curv_sgemm`) on 2-D views of the operands, with
//! batch dimensions folded into rows and the result unfolded back.

use super::*;

/// The product of two matrices (`[m, k] @ [k, n]`): in `f32` a call of the runtime's GEMM on the
/// operands' buffers, in `f64` a `linalg.generic` whose loops run i, k, j (the innermost loop walks
/// rows of the right operand and of the result contiguously, which LLVM vectorises).
pub(super) fn product_2d(
    emitter: &mut Emitter,
    dtype: DType,
    left: (&str, &[i64]),
    right: (&str, &[i64]),
) -> (String, Vec<i64>) {
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
pub(super) fn lower_matmul(
    emitter: &mut Emitter,
    result: ValueId,
    left: ValueId,
    right: ValueId,
) -> Result<(), LowerError> {
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
