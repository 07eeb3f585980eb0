//! The runtime functions compiled code calls: a single-precision GEMM on strided memrefs, backed
//! by the `matrixmultiply` crate (a blocked, SIMD micro-kernel GEMM). MLIR has no tuned GEMM for
//! the CPU; calling a well-kept library from the generated code is the choice issue 4 allows. The
//! JIT registers this function with its execution engine; standalone trainers export it under its
//! C-interface name `_mlir_ciface_curv_sgemm`.

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
