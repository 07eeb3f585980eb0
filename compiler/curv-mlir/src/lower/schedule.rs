//! Tiling and vectorisation as data: each fused elementwise generic's vector tile, and the
//! transform-dialect sequence at the end of the module that tiles and vectorises the marked generics.

use super::*;

/// The vector width of the CPU code: eight `f32` lanes (AVX2) or four `f64` lanes.
pub(super) fn vector_lanes(dtype: DType) -> i64 {
    match dtype {
        DType::F64 => 4,
        _ => 8,
    }
}

/// The tile an elementwise generic over `shape` is cut into and vectorised by: one element of
/// every outer dimension and a vector along the innermost, contiguous one. None when the
/// innermost dimension is shorter than a vector (the loop stays scalar) or the op is rank 0.
pub(super) fn vector_tile(shape: &[i64], dtype: DType) -> Option<Vec<i64>> {
    let lanes = vector_lanes(dtype);
    let (&innermost, outer) = shape.split_last()?;
    if innermost < lanes {
        return None;
    }
    let mut tile = vec![1; outer.len()];
    tile.push(lanes);
    Some(tile)
}

pub(super) fn tile_attribute_text(tile: &[i64]) -> String {
    let sizes: Vec<String> = tile.iter().map(i64::to_string).collect();
    format!("array<i64: {}>", sizes.join(", "))
}

/// The module's tiling and vectorisation schedule, a transform-dialect sequence the CPU pipeline
/// interprets (and then erases): the generics marked `curv.tile = T` are tiled by `T` with
/// `scf.for` loops and each tile becomes vector code of shape `T` (masked where a tile is cut
/// short by the end of a dimension). Marks lost when MLIR's elementwise fusion rebuilds an op
/// leave that op to the scalar loops LLVM vectorises.
pub(super) fn schedule(tiles: &[Vec<i64>]) -> String {
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
