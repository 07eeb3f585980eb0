//! Dense row-major tensors.

/// A dense row-major tensor of `E`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<E> {
    pub shape: Vec<usize>,
    pub data: Vec<E>,
}

impl<E: Copy> Tensor<E> {
    pub fn new(shape: Vec<usize>, data: Vec<E>) -> Tensor<E> {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }

    pub fn filled(shape: Vec<usize>, value: E) -> Tensor<E> {
        let count = shape.iter().product();
        Tensor { shape, data: vec![value; count] }
    }

    pub fn scalar(value: E) -> Tensor<E> {
        Tensor { shape: Vec::new(), data: vec![value] }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// A dense row-major tensor borrowed from its owner (an optimizer's gradient, or a library
/// caller's tensor read where it is).
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a, E> {
    pub shape: &'a [usize],
    pub data: &'a [E],
}

impl<E: Copy> TensorRef<'_, E> {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl<'a, E> From<&'a Tensor<E>> for TensorRef<'a, E> {
    fn from(tensor: &'a Tensor<E>) -> Self {
        TensorRef { shape: &tensor.shape, data: &tensor.data }
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for axis in (0..shape.len().saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    strides
}

/// Calls `visit(flat_index, coordinates)` for every element of `shape` in row-major order.
pub fn for_each_index(shape: &[usize], mut visit: impl FnMut(usize, &[usize])) {
    let count: usize = shape.iter().product();
    if count == 0 {
        return;
    }
    let mut coordinates = vec![0usize; shape.len()];
    for flat in 0..count {
        visit(flat, &coordinates);
        for axis in (0..shape.len()).rev() {
            coordinates[axis] += 1;
            if coordinates[axis] < shape[axis] {
                break;
            }
            coordinates[axis] = 0;
        }
    }
}
