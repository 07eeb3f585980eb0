//! The runtime functions compiled code calls: a single-precision GEMM on strided memrefs, backed
//! by the `matrixmultiply` crate (a blocked, SIMD micro-kernel GEMM). MLIR has no tuned GEMM for
//! the CPU; calling a well-kept library from the generated code is the choice issue 4 allows. The
//! JIT registers this function with its execution engine; standalone trainers export it under its
//! C-interface name `_mlir_ciface_curv_sgemm`.

/// Products below this many multiply-adds (a 256-cube) run on the calling thread (faer's
/// sequential GEMM); larger ones use `matrixmultiply`'s threads. Measured on a 2-core machine
/// (`curv bench-kernels`): a 256-cube runs at 145 GFLOP/s threaded against 88 on one thread,
/// while the digits MLP's 128x256x256 products were slower threaded than not.
pub const SEQUENTIAL_GEMM_MULTIPLY_ADDS: usize = 1 << 24;

/// MLIR's descriptor of a rank-2 strided memref.
#[repr(C)]
pub struct StridedMemRef2 {
    pub allocated: *mut f32,
    pub aligned: *mut f32,
    pub offset: i64,
    pub sizes: [i64; 2],
    pub strides: [i64; 2],
}

/// `C = A B` for `A: [m, k]`, `B: [k, n]`, `C: [m, n]`, called by generated code through the C
/// interface (`_mlir_ciface_curv_sgemm`).
///
/// # Safety
///
/// The descriptors must describe valid, non-overlapping buffers of the stated sizes and strides,
/// as the code the lowering emits guarantees.
pub unsafe extern "C" fn curv_sgemm(a: *const StridedMemRef2, b: *const StridedMemRef2, c: *mut StridedMemRef2) {
    unsafe {
        let (a, b, c) = (&*a, &*b, &*c);
        let (m, k, n) = (a.sizes[0] as usize, a.sizes[1] as usize, b.sizes[1] as usize);
        if m.saturating_mul(k).saturating_mul(n) < SEQUENTIAL_GEMM_MULTIPLY_ADDS {
            let lhs = faer::MatRef::<f32>::from_raw_parts(
                a.aligned.offset(a.offset as isize),
                m,
                k,
                a.strides[0] as isize,
                a.strides[1] as isize,
            );
            let rhs = faer::MatRef::<f32>::from_raw_parts(
                b.aligned.offset(b.offset as isize),
                k,
                n,
                b.strides[0] as isize,
                b.strides[1] as isize,
            );
            let destination = faer::MatMut::<f32>::from_raw_parts_mut(
                c.aligned.offset(c.offset as isize),
                m,
                n,
                c.strides[0] as isize,
                c.strides[1] as isize,
            );
            faer::linalg::matmul::matmul(destination, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::Seq);
            return;
        }
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.aligned.offset(a.offset as isize),
            a.strides[0] as isize,
            a.strides[1] as isize,
            b.aligned.offset(b.offset as isize),
            b.strides[0] as isize,
            b.strides[1] as isize,
            0.0,
            c.aligned.offset(c.offset as isize),
            c.strides[0] as isize,
            c.strides[1] as isize,
        );
    }
}
