//! The matrix decompositions generated code calls (`curv_runtime::linalg`): a module that calls
//! them is compiled by the JIT, and its results are checked against the definitions (a
//! reconstruction, orthonormality) and against the runtime's double-precision results.

use curv_ir::abi::Signature;
use curv_ir::DType;
use curv_mlir::jit::{compile, Buffer};
use curv_mlir::lower::{entry, EntryAbi, DECOMPOSITION_DECLARATIONS};
use curv_runtime::linalg::{cholesky, symmetric_eigen, thin_qr, Matrix};

const DYNAMIC2: &str = "memref<?x?xf32, strided<[?, ?], offset: ?>>";
const DYNAMIC1: &str = "memref<?xf32, strided<[?], offset: ?>>";

/// A module whose function `decompose` takes a symmetric positive definite `A: [n, n]` and a
/// general `B: [m, k]` and writes the eigendecomposition and Cholesky factor of `A` and the thin
/// QR factors of `B`, all through the runtime functions.
fn module(n: usize, m: usize, k: usize) -> String {
    let p = m.min(k);
    let arguments = [
        ("a", vec![n, n]),
        ("b", vec![m, k]),
        ("values", vec![n]),
        ("vectors", vec![n, n]),
        ("lower", vec![n, n]),
        ("q", vec![m, p]),
        ("r", vec![p, k]),
    ];
    let arguments: Vec<(&str, Vec<i64>)> = arguments
        .into_iter()
        .map(|(name, shape)| (name, shape.into_iter().map(|size| size as i64).collect()))
        .collect();
    let mut text = String::from("module {\n");
    text.push_str(DECOMPOSITION_DECLARATIONS);
    text.push_str(&header("decompose", &arguments));
    for (name, shape) in &arguments {
        let ty = format!("memref<{}xf32>", shape.iter().map(|size| size.to_string()).collect::<Vec<_>>().join("x"));
        let dynamic = if *name == "values" { DYNAMIC1 } else { DYNAMIC2 };
        text.push_str(&format!("  %{name}_d = memref.cast %{name} : {ty} to {dynamic}\n"));
    }
    text.push_str(&format!(
        "  func.call @curv_seigh(%a_d, %values_d, %vectors_d) : ({DYNAMIC2}, {DYNAMIC1}, {DYNAMIC2}) -> ()\n"
    ));
    text.push_str(&format!("  func.call @curv_scholesky(%a_d, %lower_d) : ({DYNAMIC2}, {DYNAMIC2}) -> ()\n"));
    text.push_str(&format!("  func.call @curv_sqr(%b_d, %q_d, %r_d) : ({DYNAMIC2}, {DYNAMIC2}, {DYNAMIC2}) -> ()\n"));
    text.push_str("  return\n}\n}\n");
    text
}

/// The first lines of CPU function `name` of `f32` buffers (name, shape): its signature, which
/// takes the table of the buffers, and the prologue that reads them into `%NAME`.
fn header(name: &str, buffers: &[(&str, Vec<i64>)]) -> String {
    let buffers: Vec<(String, Vec<i64>, DType)> =
        buffers.iter().map(|(name, shape)| (format!("%{name}"), shape.clone(), DType::F32)).collect();
    let (signature, prologue) = entry(name, &buffers, EntryAbi::Table);
    format!("{signature} attributes {{ llvm.emit_c_interface }} {{\n{prologue}")
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn pseudo_random(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn to_matrix(rows: usize, columns: usize, data: &[f32]) -> Matrix {
    Matrix::new(rows, columns, data.iter().map(|&value| value as f64).collect()).unwrap()
}

fn largest_difference(left: &[f32], right: &Matrix) -> f64 {
    left.iter().zip(&right.data).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max)
}

#[test]
fn compiled_code_calls_the_decompositions() {
    let (n, m, k) = (6, 7, 4);
    // A = G^T G + I is symmetric positive definite, with entries rounded to f32 first so that the
    // compiled code and the reference decompose the same matrix.
    let g = pseudo_random(9 * n, 3);
    let mut a = vec![0.0f32; n * n];
    for row in 0..n {
        for column in 0..n {
            let dot: f32 = (0..9).map(|inner| g[inner * n + row] * g[inner * n + column]).sum();
            a[row * n + column] = dot + if row == column { 1.0 } else { 0.0 };
        }
    }
    let mut b = pseudo_random(m * k, 5);
    let p = m.min(k);
    let (mut values, mut vectors, mut lower) = (vec![0.0f32; n], vec![0.0f32; n * n], vec![0.0f32; n * n]);
    let (mut q, mut r) = (vec![0.0f32; m * p], vec![0.0f32; p * k]);
    // The signature only lists the buffers' shapes, in call order.
    let shapes = [vec![n, n], vec![m, k], vec![n], vec![n, n], vec![n, n], vec![m, p], vec![p, k]];
    let signature = Signature {
        arguments: Vec::new(),
        outputs: shapes
            .iter()
            .enumerate()
            .map(|(index, shape)| {
                (format!("buffer{index}"), shape.iter().map(|&size| size as i64).collect(), DType::F32)
            })
            .collect(),
    };
    let function = compile(&module(n, m, k), "decompose", signature, 2).expect("the module compiles");
    let mut a_input = a.clone();
    function
        .call(&mut [
            Buffer::F32(&mut a_input),
            Buffer::F32(&mut b),
            Buffer::F32(&mut values),
            Buffer::F32(&mut vectors),
            Buffer::F32(&mut lower),
            Buffer::F32(&mut q),
            Buffer::F32(&mut r),
        ])
        .expect("the call succeeds");

    let (expected_values, expected_vectors) = symmetric_eigen(&to_matrix(n, n, &a)).unwrap();
    let value_error = values.iter().zip(&expected_values).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    // The outputs are the f64 results rounded to f32: within a few units in the last place.
    assert!(value_error < 1e-5, "eigenvalues differ by {value_error}");
    assert!(largest_difference(&vectors, &expected_vectors) < 1e-6);
    // A V = V diag(values), in f32.
    for column in 0..n {
        for row in 0..n {
            let left: f32 = (0..n).map(|inner| a[row * n + inner] * vectors[inner * n + column]).sum();
            let right = vectors[row * n + column] * values[column];
            assert!((left - right).abs() < 1e-4, "A v != lambda v at ({row}, {column}): {left} vs {right}");
        }
    }
    assert!(largest_difference(&lower, &cholesky(&to_matrix(n, n, &a)).unwrap()) < 1e-6);
    let (expected_q, expected_r) = thin_qr(&to_matrix(m, k, &b)).unwrap();
    assert!(largest_difference(&q, &expected_q) < 1e-6);
    assert!(largest_difference(&r, &expected_r) < 1e-6);
    // Q R = B.
    for row in 0..m {
        for column in 0..k {
            let rebuilt: f32 = (0..p).map(|inner| q[row * p + inner] * r[inner * k + column]).sum();
            assert!((rebuilt - b[row * k + column]).abs() < 1e-5);
        }
    }
}

#[test]
fn a_failed_decomposition_gives_nan_not_a_crash() {
    // [[1, 2], [2, 1]] is indefinite: the Cholesky factor is NaN, which the trainer's non-finite
    // checks report; the eigendecomposition still succeeds.
    let n = 2;
    let text = format!(
        "module {{\n{DECOMPOSITION_DECLARATIONS}{}  %a_d = memref.cast %a : memref<2x2xf32> to {DYNAMIC2}\n  %l_d = memref.cast %l : memref<2x2xf32> to {DYNAMIC2}\n  func.call @curv_scholesky(%a_d, %l_d) : ({DYNAMIC2}, {DYNAMIC2}) -> ()\n  return\n}}\n}}\n",
        header("factor", &[("a", vec![2, 2]), ("l", vec![2, 2])])
    );
    let signature = Signature {
        arguments: Vec::new(),
        outputs: vec![("a".to_string(), vec![n, n], DType::F32), ("l".to_string(), vec![n, n], DType::F32)],
    };
    let function = compile(&text, "factor", signature, 2).expect("the module compiles");
    let (mut a, mut l) = (vec![1.0f32, 2.0, 2.0, 1.0], vec![0.0f32; 4]);
    function.call(&mut [Buffer::F32(&mut a), Buffer::F32(&mut l)]).unwrap();
    assert!(l.iter().all(|value| value.is_nan()), "{l:?}");
}

/// A memref descriptor as MLIR's C interface lays it out: allocated and aligned pointers, offset,
/// sizes, strides (row-major).
fn descriptor(data: &mut [f32], shape: &[i64]) -> Vec<i64> {
    let pointer = data.as_mut_ptr() as i64;
    let mut words = vec![pointer, pointer, 0];
    words.extend_from_slice(shape);
    let mut strides = vec![1i64; shape.len()];
    for axis in (0..shape.len().saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    words.extend(strides);
    words
}

#[test]
fn kernels_loaded_from_the_cache_reach_the_decompositions() {
    // A cached kernel is a shared object whose calls of runtime functions go through a trampoline
    // the loader points at the host's functions; check that path for the decompositions.
    let directory = std::env::temp_dir().join(format!("curv-decompositions-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let cache = curv_mlir::cache::KernelCache::in_directory(&directory);
    let name = curv_mlir::cache::KERNEL_NAME;
    let text = format!(
        "module {{\n{DECOMPOSITION_DECLARATIONS}{}  %a_d = memref.cast %a : memref<3x3xf32> to {DYNAMIC2}\n  %values_d = memref.cast %values : memref<3xf32> to {DYNAMIC1}\n  %vectors_d = memref.cast %vectors : memref<3x3xf32> to {DYNAMIC2}\n  func.call @curv_seigh(%a_d, %values_d, %vectors_d) : ({DYNAMIC2}, {DYNAMIC1}, {DYNAMIC2}) -> ()\n  return\n}}\n}}\n",
        header(name, &[("a", vec![3, 3]), ("values", vec![3]), ("vectors", vec![3, 3])])
    );
    for expected_hit in [false, true] {
        let (kernel, hit) = cache.load_or_build(&text, 2).expect("the kernel builds and loads");
        assert_eq!(hit, expected_hit);
        // diag(3, 1, 2) has eigenvalues 1, 2, 3 and the unit vectors as eigenvectors.
        let mut a = vec![3.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0];
        let (mut values, mut vectors) = (vec![0.0f32; 3], vec![0.0f32; 9]);
        let mut descriptors =
            [descriptor(&mut a, &[3, 3]), descriptor(&mut values, &[3]), descriptor(&mut vectors, &[3, 3])];
        let mut pointers: Vec<*mut i64> = descriptors.iter_mut().map(|words| words.as_mut_ptr()).collect();
        let mut slots: Vec<*mut ()> = pointers.iter_mut().map(|pointer| pointer as *mut *mut i64 as *mut ()).collect();
        kernel.call_packed(&mut slots);
        assert_eq!(values, vec![1.0, 2.0, 3.0]);
        assert_eq!(vectors, vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }
    let _ = std::fs::remove_dir_all(&directory);
}
