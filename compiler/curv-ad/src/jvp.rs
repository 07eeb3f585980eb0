//! Forward mode: the Jacobian-vector product, emitted as tangent instructions interleaved after
//! the instructions they differentiate (appended at the end, which keeps dependency order).

use crate::builder::Builder;
use crate::vjp::{rebroadcast, unary_derivative};
use curv_ir::{BinaryOp, DType, Function, Op, ReduceOp, ValueId};
use std::collections::HashMap;

/// The function with tangent instructions appended, and the tangent of every value that has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Jvp {
    pub function: Function,
    pub tangents: HashMap<ValueId, ValueId>,
}

/// Appends the forward-mode derivative of every value along the given seed tangents
/// (`(value, tangent)` pairs, the tangents being values of the function already).
pub fn jvp(function: &Function, seeds: &[(ValueId, ValueId)]) -> Jvp {
    let mut result = function.clone();
    let mut tangents: HashMap<ValueId, ValueId> = seeds.iter().copied().collect();
    let original_count = function.insts.len();
    {
        let mut builder = Builder { function: &mut result, span: Default::default() };
        for index in 0..original_count {
            let id = ValueId(index as u32);
            if tangents.contains_key(&id) {
                continue;
            }
            let inst = function.inst(id).clone();
            if !inst.ty.dtype.is_float() {
                continue;
            }
            let operand_tangents: Vec<Option<ValueId>> =
                inst.args.iter().map(|arg| tangents.get(arg).copied()).collect();
            if operand_tangents.iter().all(Option::is_none) {
                continue;
            }
            builder.span = inst.span;
            if let Some(tangent) = forward(&mut builder, &inst.op, &inst.args, id, &operand_tangents) {
                tangents.insert(id, tangent);
            }
        }
    }
    Jvp { function: result, tangents }
}

fn forward(
    builder: &mut Builder,
    op: &Op,
    args: &[ValueId],
    result: ValueId,
    dots: &[Option<ValueId>],
) -> Option<ValueId> {
    // Applies a linear op to the tangent of its single differentiable operand.
    let same_op_on = |builder: &mut Builder, tangent: ValueId, replace: usize| {
        let mut operands = args.to_vec();
        operands[replace] = tangent;
        let ty = builder.ty(result);
        builder.push(op.clone(), operands, ty)
    };
    match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Data { .. }
        | Op::Hyper { .. }
        | Op::Step
        | Op::Constant { .. }
        | Op::CausalMask
        | Op::Statistic { .. }
        | Op::ArgMax { .. }
        | Op::Count { .. }
        | Op::OneHot { .. } => None,
        Op::Unary(unary) => {
            let derivative = unary_derivative(builder, *unary, args[0], result)?;
            Some(builder.mul(dots[0]?, derivative))
        }
        Op::Binary(binary) => {
            let (a, b) = (args[0], args[1]);
            match binary {
                BinaryOp::Add => builder.add_optional(dots[0], dots[1]),
                BinaryOp::Sub => {
                    let negated = dots[1].map(|dot| builder.neg(dot));
                    builder.add_optional(dots[0], negated)
                }
                BinaryOp::Mul => {
                    let left = dots[0].map(|dot| builder.mul(dot, b));
                    let right = dots[1].map(|dot| builder.mul(a, dot));
                    builder.add_optional(left, right)
                }
                BinaryOp::Div => {
                    let left = dots[0];
                    let right = dots[1].map(|dot| {
                        let product = builder.mul(result, dot);
                        builder.neg(product)
                    });
                    let numerator = builder.add_optional(left, right)?;
                    Some(builder.div(numerator, b))
                }
                BinaryOp::Pow => {
                    let left = dots[0].map(|dot| {
                        let one = builder.constant_like(1.0, b);
                        let exponent = builder.sub(b, one);
                        let power = builder.binary(BinaryOp::Pow, a, exponent);
                        let scaled = builder.mul(b, power);
                        builder.mul(dot, scaled)
                    });
                    let right = dots[1].map(|dot| {
                        let log = builder.unary(curv_ir::UnaryOp::Log, a);
                        let scaled = builder.mul(result, log);
                        builder.mul(dot, scaled)
                    });
                    builder.add_optional(left, right)
                }
                BinaryOp::Max | BinaryOp::Min => {
                    let takes_right = if *binary == BinaryOp::Max {
                        builder.binary(BinaryOp::Greater, b, a)
                    } else {
                        builder.binary(BinaryOp::Greater, a, b)
                    };
                    let zero = builder.constant_like(0.0, result);
                    let left = dots[0].unwrap_or(zero);
                    let right = dots[1].unwrap_or(zero);
                    Some(builder.select(takes_right, right, left))
                }
                BinaryOp::Equal | BinaryOp::Greater => None,
            }
        }
        Op::Select => {
            let zero = builder.constant_like(0.0, result);
            let when_true = dots[1].unwrap_or(zero);
            let when_false = dots[2].unwrap_or(zero);
            Some(builder.select(args[0], when_true, when_false))
        }
        Op::MatMul | Op::Conv2d { .. } | Op::Conv2dInputGradient { .. } | Op::Conv2dKernelGradient { .. } => {
            // Bilinear: d(a . b) = da . b + a . db.
            let left = dots[0].map(|dot| same_op_on(builder, dot, 0));
            let right = dots[1].map(|dot| same_op_on(builder, dot, 1));
            builder.add_optional(left, right)
        }
        Op::Transpose { .. }
        | Op::Reshape
        | Op::Broadcast { .. }
        | Op::Reduce { op: ReduceOp::Sum, .. }
        | Op::Slice { .. }
        | Op::Pad { .. } => Some(same_op_on(builder, dots[0]?, 0)),
        Op::Reduce { op: ReduceOp::Max, axes } => {
            let maximum = rebroadcast(builder, result, args[0], axes);
            let mask = builder.binary(BinaryOp::Equal, args[0], maximum);
            let masked = builder.mul(mask, dots[0]?);
            Some(builder.reduce(masked, ReduceOp::Sum, axes.clone()))
        }
        Op::Gather => Some(same_op_on(builder, dots[0]?, 0)),
        Op::ScatterAdd => Some(same_op_on(builder, dots[1]?, 1)),
        Op::Cast => {
            let dot = dots[0]?;
            let dtype = builder.ty(result).dtype;
            if builder.ty(args[0]).dtype == DType::I32 {
                None
            } else {
                Some(builder.cast_to(dot, dtype))
            }
        }
    }
}
