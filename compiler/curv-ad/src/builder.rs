//! Emitting typed instructions while differentiating.

use curv_grammar::Span;
use curv_ir::{BinaryOp, DType, Dim, Function, Op, ReduceOp, TensorType, UnaryOp, ValueId};

/// Appends instructions to a function, deriving each result type from the operands.
pub struct Builder<'a> {
    pub function: &'a mut Function,
    /// The span given to generated instructions (the source of the value being differentiated).
    pub span: Span,
}

impl Builder<'_> {
    pub fn ty(&self, value: ValueId) -> TensorType {
        self.function.ty(value).clone()
    }

    pub fn push(&mut self, op: Op, args: Vec<ValueId>, ty: TensorType) -> ValueId {
        self.function.push(op, args, ty, self.span)
    }

    pub fn constant(&mut self, value: f64, ty: TensorType) -> ValueId {
        self.push(Op::Constant { value }, Vec::new(), ty)
    }

    /// A constant with the type of `like`.
    pub fn constant_like(&mut self, value: f64, like: ValueId) -> ValueId {
        let ty = self.ty(like);
        self.constant(value, ty)
    }

    pub fn unary(&mut self, op: UnaryOp, operand: ValueId) -> ValueId {
        let ty = self.ty(operand);
        self.push(Op::Unary(op), vec![operand], ty)
    }

    pub fn binary(&mut self, op: BinaryOp, left: ValueId, right: ValueId) -> ValueId {
        let ty = self.ty(left);
        self.push(Op::Binary(op), vec![left, right], ty)
    }

    pub fn add(&mut self, left: ValueId, right: ValueId) -> ValueId {
        self.binary(BinaryOp::Add, left, right)
    }

    pub fn sub(&mut self, left: ValueId, right: ValueId) -> ValueId {
        self.binary(BinaryOp::Sub, left, right)
    }

    pub fn mul(&mut self, left: ValueId, right: ValueId) -> ValueId {
        self.binary(BinaryOp::Mul, left, right)
    }

    pub fn div(&mut self, left: ValueId, right: ValueId) -> ValueId {
        self.binary(BinaryOp::Div, left, right)
    }

    pub fn neg(&mut self, operand: ValueId) -> ValueId {
        self.unary(UnaryOp::Neg, operand)
    }

    pub fn select(&mut self, condition: ValueId, when_true: ValueId, when_false: ValueId) -> ValueId {
        let ty = self.ty(when_true);
        self.push(Op::Select, vec![condition, when_true, when_false], ty)
    }

    /// The float type of `value` with another shape.
    fn with_shape(&self, value: ValueId, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype: self.ty(value).dtype, shape }
    }

    pub fn matmul(&mut self, left: ValueId, right: ValueId) -> ValueId {
        let left_ty = self.ty(left);
        let right_ty = self.ty(right);
        let mut shape = left_ty.shape[..left_ty.rank() - 1].to_vec();
        shape.push(right_ty.shape[right_ty.rank() - 1].clone());
        let ty = self.with_shape(left, shape);
        self.push(Op::MatMul, vec![left, right], ty)
    }

    pub fn transpose(&mut self, operand: ValueId, permutation: Vec<usize>) -> ValueId {
        let operand_ty = self.ty(operand);
        let shape = permutation.iter().map(|&axis| operand_ty.shape[axis].clone()).collect();
        let ty = self.with_shape(operand, shape);
        self.push(Op::Transpose { permutation }, vec![operand], ty)
    }

    /// Swaps the last two axes.
    pub fn transpose_last_two(&mut self, operand: ValueId) -> ValueId {
        let rank = self.ty(operand).rank();
        let mut permutation: Vec<usize> = (0..rank).collect();
        permutation.swap(rank - 2, rank - 1);
        self.transpose(operand, permutation)
    }

    pub fn reshape(&mut self, operand: ValueId, shape: Vec<Dim>) -> ValueId {
        if self.ty(operand).shape == shape {
            return operand;
        }
        let ty = TensorType { dtype: self.ty(operand).dtype, shape };
        self.push(Op::Reshape, vec![operand], ty)
    }

    pub fn broadcast(&mut self, operand: ValueId, dims: Vec<usize>, shape: Vec<Dim>) -> ValueId {
        let ty = self.with_shape(operand, shape);
        self.push(Op::Broadcast { dims }, vec![operand], ty)
    }

    pub fn reduce(&mut self, operand: ValueId, op: ReduceOp, axes: Vec<usize>) -> ValueId {
        if axes.is_empty() {
            return operand;
        }
        let operand_ty = self.ty(operand);
        let shape = operand_ty
            .shape
            .iter()
            .enumerate()
            .filter(|(axis, _)| !axes.contains(axis))
            .map(|(_, dim)| dim.clone())
            .collect();
        let ty = self.with_shape(operand, shape);
        self.push(Op::Reduce { op, axes }, vec![operand], ty)
    }

    pub fn cast_to(&mut self, operand: ValueId, dtype: DType) -> ValueId {
        let ty = TensorType { dtype, shape: self.ty(operand).shape };
        self.push(Op::Cast, vec![operand], ty)
    }

    /// `Some(a) + Some(b)`, treating `None` as zero.
    pub fn add_optional(&mut self, left: Option<ValueId>, right: Option<ValueId>) -> Option<ValueId> {
        match (left, right) {
            (Some(left), Some(right)) => Some(self.add(left, right)),
            (Some(value), None) | (None, Some(value)) => Some(value),
            (None, None) => None,
        }
    }
}
