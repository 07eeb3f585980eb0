//! Kernel grouping as data: which instructions of a function run as one kernel. The plan is a
//! pure function of the IR, printed by `curv emit --stage ir|grad` and followed by the MLIR
//! lowering, so fusion decisions can be read, tested and (later) overridden.
//!
//! The grouping is greedy and conservative:
//! - elementwise instructions (unary, binary, select, cast) of the same result shape join the
//!   kernel of an elementwise operand of that shape (vertical fusion) or else the latest
//!   elementwise kernel of that shape (horizontal fusion), so chains of elementwise work become
//!   one loop nest with several outputs if needed; constants, broadcasts and scalar work are
//!   recomputed inside their consumers;
//! - a reduction absorbs the elementwise chain that only it reads (its producers, of the shape of
//!   its operand, used nowhere else and not function outputs): `reduce_sum(exp(x - m))` is one
//!   loop nest that never stores `exp(x - m)`;
//! - a matrix product absorbs its epilogue (`matmul_epilogues`): the chain of elementwise
//!   instructions of its result's shape that starts at the product and goes on while each link is
//!   the only user of the previous one (`tanh(x @ w + b)`), so the chain runs over the product's
//!   buffer right after the GEMM, in place;
//! - every other structured op is a kernel of its own;
//! - inputs, parameters, data, hyperparameters and statistics are arguments, not kernels.

use crate::types::{Dim, Function, Op, ValueId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A fused chain of elementwise instructions.
    Elementwise,
    /// A reduction over some axes.
    Reduction,
    /// A matrix product (a GEMM call on the CPU).
    MatMul,
    /// Any other structured op, one per kernel.
    Other,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Elementwise => "elementwise",
            KernelKind::Reduction => "reduction",
            KernelKind::MatMul => "matmul",
            KernelKind::Other => "op",
        }
    }
}

/// One kernel: its kind and its instructions in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub kind: KernelKind,
    pub insts: Vec<ValueId>,
}

/// The kernels of a function; `kernel_of[i]` is the kernel of instruction `i` (`None` for
/// arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelPlan {
    pub kernels: Vec<Kernel>,
    pub kernel_of: Vec<Option<usize>>,
    /// [`inlined`] of the function, found once for every kernel's inputs.
    pub inlined: Vec<bool>,
    /// Per instruction, whether a kernel other than its own reads it or it is a function output,
    /// found once for every kernel's outputs (per kernel, the scan made lowering a function of
    /// many kernels quadratic).
    pub used_outside: Vec<bool>,
}

/// Whether an instruction is computed elementwise over its result's shape.
pub fn is_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast | Op::Broadcast { .. } | Op::Constant { .. })
}

fn is_argument(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Param { .. } | Op::Data { .. } | Op::Hyper { .. } | Op::Step | Op::Statistic { .. }
    )
}

/// Whether a constant, a broadcast or a scalar (rank-0) elementwise instruction is recomputed
/// inside each consumer kernel instead of being a kernel of its own: true when every use is an
/// elementwise instruction, and the value is not a function output. (Scalar work inside a loop
/// body does not depend on the loop indices, so LLVM hoists it out of the loop.)
pub fn inlined(function: &Function) -> Vec<bool> {
    let count = function.insts.len();
    let mut candidate: Vec<bool> = function
        .insts
        .iter()
        .map(|inst| {
            matches!(inst.op, Op::Constant { .. } | Op::Broadcast { .. })
                || (is_elementwise(&inst.op) && inst.ty.shape.is_empty())
        })
        .collect();
    for (_, value) in &function.outputs {
        candidate[value.0 as usize] = false;
    }
    // A broadcast of a broadcast is materialised (the lowering composes one level of indexing).
    for index in 0..count {
        let inst = &function.insts[index];
        if let Op::Broadcast { .. } = inst.op {
            let source = inst.args[0].0 as usize;
            if matches!(function.insts[source].op, Op::Broadcast { .. }) {
                candidate[source] = false;
            }
        }
    }
    // A use by anything but an elementwise instruction forces materialisation; walking users in
    // reverse lets that decision flow back through chains of inlined instructions.
    for (index, inst) in function.insts.iter().enumerate().rev() {
        for arg in &inst.args {
            let _ = index;
            if !is_elementwise(&inst.op) {
                candidate[arg.0 as usize] = false;
            }
        }
    }
    // A chain of inlined instructions is recomputed in the body of each kernel that reads it;
    // past `MAX_INLINED_CHAIN` links one is materialised, so that no kernel body (and no basic
    // block LLVM schedules, in time quadratic in its length) grows with the program.
    let mut chain = vec![0usize; count];
    for (index, inst) in function.insts.iter().enumerate() {
        if !candidate[index] {
            continue;
        }
        let longest = inst.args.iter().map(|arg| chain[arg.0 as usize]).max().unwrap_or(0);
        if longest >= MAX_INLINED_CHAIN {
            candidate[index] = false;
        } else {
            chain[index] = longest + 1;
        }
    }
    candidate
}

/// The longest chain of inlined instructions (see `inlined`).
pub const MAX_INLINED_CHAIN: usize = 256;

/// The most instructions a kernel takes in by fusion (an elementwise kernel, a reduction with
/// its prologue, a product with its epilogue) before a new kernel starts: LLVM compiles one long
/// loop body in time that grows faster than its length.
pub const MAX_FUSED_INSTRUCTIONS: usize = 1024;

/// Per instruction, how many instructions its kernel computes for it: itself and the inlined
/// instructions it reads, recomputed in its kernel's body (counted as a tree, at most
/// `MAX_FUSED_INSTRUCTIONS`). Fusion bounds a kernel by the sum of its members' weights.
pub fn weights(function: &Function, inlined: &[bool]) -> Vec<usize> {
    let mut weight = vec![1usize; function.insts.len()];
    for (index, inst) in function.insts.iter().enumerate() {
        let mut total = 1usize;
        for arg in &inst.args {
            if inlined[arg.0 as usize] {
                total = total.saturating_add(weight[arg.0 as usize]);
            }
        }
        weight[index] = total.min(MAX_FUSED_INSTRUCTIONS);
    }
    weight
}

/// The values an instruction reads once inlined constants and broadcasts are looked through.
pub fn effective_operands(function: &Function, inlined: &[bool], id: ValueId) -> Vec<ValueId> {
    // Depth first, left to right, with an explicit stack: chains of inlined instructions can be
    // as long as the program (a chain of scalar lets), and each is expanded once however often
    // it is shared.
    let mut out = Vec::new();
    let mut expanded = std::collections::HashSet::new();
    let mut work: Vec<ValueId> = function.inst(id).args.iter().rev().copied().collect();
    while let Some(arg) = work.pop() {
        if inlined[arg.0 as usize] {
            if expanded.insert(arg) {
                work.extend(function.inst(arg).args.iter().rev().copied());
            }
        } else if !out.contains(&arg) {
            out.push(arg);
        }
    }
    out
}

/// For every instruction absorbed into a reduction's kernel, the index of that reduction: the
/// elementwise instructions (not inlined, of the reduction operand's shape, not function outputs)
/// whose every user is the reduction or another absorbed instruction of it.
pub fn reduction_prologues(function: &Function, inlined: &[bool]) -> Vec<Option<usize>> {
    let count = function.insts.len();
    let weight = weights(function, inlined);
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (index, _) in function.insts.iter().enumerate() {
        if inlined[index] {
            continue;
        }
        for arg in effective_operands(function, inlined, ValueId(index as u32)) {
            users[arg.0 as usize].push(index);
        }
    }
    let mut is_output = vec![false; count];
    for (_, value) in &function.outputs {
        is_output[value.0 as usize] = true;
    }
    let mut absorbed: Vec<Option<usize>> = vec![None; count];
    for (index, inst) in function.insts.iter().enumerate() {
        if !matches!(inst.op, Op::Reduce { .. }) || inlined[index] {
            continue;
        }
        let operand_shape = &function.ty(inst.args[0]).shape;
        let mut pending: Vec<ValueId> = effective_operands(function, inlined, ValueId(index as u32));
        // A kernel computes at most `MAX_FUSED_INSTRUCTIONS` (see `weights`).
        let mut members = weight[index];
        while let Some(candidate) = pending.pop() {
            if members + weight[candidate.0 as usize] > MAX_FUSED_INSTRUCTIONS {
                continue;
            }
            let position = candidate.0 as usize;
            let candidate_inst = function.inst(candidate);
            let joins = absorbed[position].is_none()
                && !inlined[position]
                && !is_output[position]
                && is_elementwise(&candidate_inst.op)
                && !matches!(candidate_inst.op, Op::Constant { .. } | Op::Broadcast { .. })
                && candidate_inst.ty.shape == *operand_shape
                && users[position].iter().all(|user| *user == index || absorbed[*user] == Some(index));
            if joins {
                absorbed[position] = Some(index);
                members += weight[position];
                pending.extend(effective_operands(function, inlined, candidate));
            }
        }
    }
    absorbed
}

/// For every instruction absorbed into a matrix product's kernel as its epilogue, the index of
/// that product. The chain starts at a product that is not a function output and whose only
/// user is an elementwise instruction of the product's shape (not a constant or broadcast, not
/// absorbed by a reduction), and goes on while the last link has exactly one user of that kind
/// and is not a function output. Every other operand of a link must come before the product, so
/// the kernel still reads only kernels with a smaller index.
pub fn matmul_epilogues(function: &Function, inlined: &[bool], prologues: &[Option<usize>]) -> Vec<Option<usize>> {
    let count = function.insts.len();
    let weight = weights(function, inlined);
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); count];
    for index in 0..count {
        if inlined[index] {
            continue;
        }
        // Effective operands are distinct, so `index` is pushed once per operand (a `contains`
        // here made a value used by every instruction quadratic).
        for arg in effective_operands(function, inlined, ValueId(index as u32)) {
            users[arg.0 as usize].push(index);
        }
    }
    let mut is_output = vec![false; count];
    for (_, value) in &function.outputs {
        is_output[value.0 as usize] = true;
    }
    let mut absorbed: Vec<Option<usize>> = vec![None; count];
    for (index, inst) in function.insts.iter().enumerate() {
        if !matches!(inst.op, Op::MatMul) || inlined[index] {
            continue;
        }
        let shape = &inst.ty.shape;
        let mut last = index;
        // A kernel computes at most `MAX_FUSED_INSTRUCTIONS` (see `weights`).
        let mut members = weight[index];
        while !is_output[last] && users[last].len() == 1 {
            let next = users[last][0];
            if members + weight[next] > MAX_FUSED_INSTRUCTIONS {
                break;
            }
            let next_inst = &function.insts[next];
            let joins = is_elementwise(&next_inst.op)
                && !matches!(next_inst.op, Op::Constant { .. } | Op::Broadcast { .. })
                && !inlined[next]
                && prologues[next].is_none()
                && next_inst.ty.shape == *shape
                && next_inst.ty.dtype == inst.ty.dtype
                && effective_operands(function, inlined, ValueId(next as u32))
                    .iter()
                    .all(|arg| arg.0 as usize == last || (arg.0 as usize) < index);
            if !joins {
                break;
            }
            absorbed[next] = Some(index);
            members += weight[next];
            last = next;
        }
    }
    absorbed
}

/// Groups the instructions of `function` into kernels. Kernels only read kernels with a smaller
/// index, so running them in index order respects every dependency.
pub fn plan_kernels(function: &Function) -> KernelPlan {
    let count = function.insts.len();
    let inlined = inlined(function);
    let prologues = reduction_prologues(function, &inlined);
    let epilogues = matmul_epilogues(function, &inlined, &prologues);
    let weight = weights(function, &inlined);
    // Per kernel, the sum of its members' weights.
    let mut kernel_weights: Vec<usize> = Vec::new();
    let mut kernel_of: Vec<Option<usize>> = vec![None; count];
    let mut kernels: Vec<Kernel> = Vec::new();
    // Per kernel, the one result shape all of its instructions have (`None` when they differ),
    // kept as instructions join: rescanning a kernel for every candidate made fusing a long
    // chain quadratic.
    let mut uniform_shapes: Vec<Option<&[Dim]>> = Vec::new();
    // The elementwise kernels that begin with each shape, in order (for horizontal fusion).
    let mut by_shape: std::collections::HashMap<&[Dim], Vec<usize>> = std::collections::HashMap::new();
    // The instructions absorbed into each reduction, in order.
    let mut prologue_members: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (member, reduction) in prologues.iter().enumerate() {
        if let Some(reduction) = reduction {
            prologue_members[*reduction].push(member);
        }
    }
    fn push<'f>(
        function: &'f Function,
        kernels: &mut [Kernel],
        uniform_shapes: &mut [Option<&'f [Dim]>],
        (kernel_weights, weight): (&mut [usize], &[usize]),
        kernel: usize,
        id: ValueId,
    ) {
        kernel_weights[kernel] += weight[id.0 as usize];
        let shape = function.ty(id).shape.as_slice();
        if kernels[kernel].insts.is_empty() {
            uniform_shapes[kernel] = Some(shape);
        } else if uniform_shapes[kernel].is_some_and(|uniform| uniform != shape) {
            uniform_shapes[kernel] = None;
        }
        kernels[kernel].insts.push(id);
    }
    for (index, inst) in function.insts.iter().enumerate() {
        if let Some(product) = epilogues[index] {
            // An epilogue joins its product's kernel, in order.
            let kernel = kernel_of[product].expect("the product precedes its epilogue");
            push(
                function,
                &mut kernels,
                &mut uniform_shapes,
                (&mut kernel_weights, &weight),
                kernel,
                ValueId(index as u32),
            );
            kernel_of[index] = Some(kernel);
            continue;
        }
        if is_argument(&inst.op) || inlined[index] || prologues[index].is_some() {
            // Absorbed instructions join their reduction's kernel when the reduction comes: all
            // of them precede it, and nothing else reads them.
            continue;
        }
        let id = ValueId(index as u32);
        let kind = match &inst.op {
            op if is_elementwise(op) => KernelKind::Elementwise,
            Op::Reduce { .. } => KernelKind::Reduction,
            Op::MatMul => KernelKind::MatMul,
            _ => KernelKind::Other,
        };
        let mut joined = None;
        if kind == KernelKind::Elementwise && !matches!(inst.op, Op::Constant { .. } | Op::Broadcast { .. }) {
            let operands = effective_operands(function, &inlined, id);
            let operand_kernels: Vec<usize> = operands.iter().filter_map(|arg| kernel_of[arg.0 as usize]).collect();
            let fits = |kernel: usize| {
                kernels[kernel].kind == KernelKind::Elementwise
                    && kernel_weights[kernel] + weight[index] <= MAX_FUSED_INSTRUCTIONS
                    && uniform_shapes[kernel] == Some(inst.ty.shape.as_slice())
                    && operand_kernels.iter().all(|other| *other <= kernel)
            };
            // Vertical fusion: join the kernel of an operand. Otherwise horizontal fusion: join
            // the latest elementwise kernel of the same shape, as independent loops over the same
            // index space share one loop nest.
            joined = operands.iter().filter_map(|arg| kernel_of[arg.0 as usize]).find(|kernel| fits(*kernel));
            if joined.is_none() {
                // The latest fitting kernel of this shape. A kernel that is full or no longer of
                // one shape never fits again, so it leaves the list; one that fails only because
                // an operand's kernel comes after it means no earlier one fits either. (Scanning
                // every kernel made a function of many small kernels quadratic.)
                let candidates = by_shape.entry(inst.ty.shape.as_slice()).or_default();
                while let Some(&last) = candidates.last() {
                    if fits(last) {
                        joined = Some(last);
                        break;
                    }
                    let stale = kernel_weights[last] >= MAX_FUSED_INSTRUCTIONS
                        || uniform_shapes[last] != Some(inst.ty.shape.as_slice());
                    if !stale {
                        break;
                    }
                    candidates.pop();
                }
            }
        }
        let kernel = match joined {
            Some(kernel) => kernel,
            None => {
                kernels.push(Kernel { kind, insts: Vec::new() });
                uniform_shapes.push(None);
                kernel_weights.push(0);
                if kind == KernelKind::Elementwise {
                    by_shape.entry(inst.ty.shape.as_slice()).or_default().push(kernels.len() - 1);
                }
                kernels.len() - 1
            }
        };
        if kind == KernelKind::Reduction {
            for &member in &prologue_members[index] {
                push(
                    function,
                    &mut kernels,
                    &mut uniform_shapes,
                    (&mut kernel_weights, &weight),
                    kernel,
                    ValueId(member as u32),
                );
                kernel_of[member] = Some(kernel);
            }
        }
        push(function, &mut kernels, &mut uniform_shapes, (&mut kernel_weights, &weight), kernel, id);
        kernel_of[index] = Some(kernel);
    }
    let mut used_outside = vec![false; count];
    for index in 0..count {
        if inlined[index] {
            continue;
        }
        for arg in effective_operands(function, &inlined, ValueId(index as u32)) {
            if kernel_of[index] != kernel_of[arg.0 as usize] {
                used_outside[arg.0 as usize] = true;
            }
        }
    }
    for (_, value) in &function.outputs {
        used_outside[value.0 as usize] = true;
    }
    KernelPlan { kernels, kernel_of, inlined, used_outside }
}

impl KernelPlan {
    /// The values a kernel reads that it does not compute (inlined constants and broadcasts
    /// looked through).
    pub fn inputs(&self, function: &Function, kernel: usize) -> Vec<ValueId> {
        let mut inputs = Vec::new();
        for id in &self.kernels[kernel].insts {
            for arg in effective_operands(function, &self.inlined, *id) {
                if self.kernel_of[arg.0 as usize] != Some(kernel) && !inputs.contains(&arg) {
                    inputs.push(arg);
                }
            }
        }
        inputs
    }

    /// The values a kernel computes that are read outside it (or are function outputs).
    pub fn outputs(&self, _function: &Function, kernel: usize) -> Vec<ValueId> {
        self.kernels[kernel].insts.iter().copied().filter(|id| self.used_outside[id.0 as usize]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BinaryOp, DType, ReduceOp, TensorType};

    /// `x`, then `length` links `a = a * 0.5 + x` over `shape`, the last one the output.
    fn chain(shape: &[i64], length: usize, first: Op) -> Function {
        let mut function = Function::new("f");
        let ty = TensorType::known(DType::F32, shape);
        let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Default::default());
        let half = function.push(Op::Constant { value: 0.5 }, vec![], ty.clone(), Default::default());
        let mut value = match first {
            Op::MatMul => {
                let square = TensorType::known(DType::F32, &[shape[1], shape[1]]);
                let w = function.push(Op::Input { index: 1, name: "w".into() }, vec![], square, Default::default());
                function.push(Op::MatMul, vec![x, w], ty.clone(), Default::default())
            }
            op => function.push(op, vec![x, x], ty.clone(), Default::default()),
        };
        for _ in 0..length {
            let scaled = function.push(Op::Binary(BinaryOp::Mul), vec![value, half], ty.clone(), Default::default());
            value = function.push(Op::Binary(BinaryOp::Add), vec![scaled, x], ty.clone(), Default::default());
        }
        function.outputs.push(("y".into(), value));
        function
    }

    /// The computed instructions of each kernel, inlined ones counted (see `weights`).
    fn kernel_weights(function: &Function) -> Vec<usize> {
        let plan = plan_kernels(function);
        let weight = weights(function, &plan.inlined);
        plan.kernels.iter().map(|kernel| kernel.insts.iter().map(|id| weight[id.0 as usize]).sum()).collect()
    }

    #[test]
    fn a_product_takes_in_a_bounded_epilogue() {
        let function = chain(&[4, 2], 3_000, Op::MatMul);
        let plan = plan_kernels(&function);
        let first = &plan.kernels[0];
        assert_eq!(first.kind, KernelKind::MatMul);
        let weights = kernel_weights(&function);
        assert!(weights.iter().all(|&weight| weight <= MAX_FUSED_INSTRUCTIONS), "{weights:?}");
        // The chain goes on in elementwise kernels; every link is in some kernel.
        let members: usize = plan.kernels.iter().map(|kernel| kernel.insts.len()).sum();
        assert_eq!(members, plan.kernel_of.iter().filter(|kernel| kernel.is_some()).count());
        assert!(plan.kernels.len() >= 6, "{} kernels", plan.kernels.len());
    }

    #[test]
    fn a_chain_of_scalars_makes_kernels_of_bounded_weight() {
        // Scalars are inlined into the kernels that read them, up to `MAX_INLINED_CHAIN` links;
        // counting instructions only, one kernel took in 1,024 materialised links of 256 inlined
        // ones each.
        let function = chain(&[], 100_000, Op::Binary(BinaryOp::Add));
        let weights = kernel_weights(&function);
        assert!(weights.iter().all(|&weight| weight <= MAX_FUSED_INSTRUCTIONS), "{:?}", weights.iter().max());
        let computed: usize = weights.iter().sum();
        assert!(computed >= 200_001, "every instruction is computed once at least: {computed}");
    }

    #[test]
    fn a_reduction_takes_in_a_bounded_prologue() {
        let mut function = chain(&[64], 3_000, Op::Binary(BinaryOp::Add));
        let last = function.outputs.pop().expect("the chain's output").1;
        let total = TensorType::known(DType::F32, &[]);
        let sum = function.push(Op::Reduce { op: ReduceOp::Sum, axes: vec![0] }, vec![last], total, Default::default());
        function.outputs.push(("total".into(), sum));
        let plan = plan_kernels(&function);
        let reduction = plan.kernel_of[sum.0 as usize].expect("the sum has a kernel");
        assert_eq!(plan.kernels[reduction].kind, KernelKind::Reduction);
        assert!(plan.kernels[reduction].insts.len() > 1, "the reduction takes in part of the chain");
        let weights = kernel_weights(&function);
        assert!(weights.iter().all(|&weight| weight <= MAX_FUSED_INSTRUCTIONS), "{weights:?}");
    }
}
