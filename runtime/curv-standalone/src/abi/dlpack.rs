//! DLPack's tensor types as the C ABI takes them, and views of a caller's tensor checked for
//! device, dtype, shape, strides and alignment.

use super::*;

// DLPack (v0.8 layout), the part the ABI reads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

pub(super) const DL_CPU: i32 = 1;

pub(super) const DL_CUDA: i32 = 2;

pub(super) const DL_INT: u8 = 0;

pub(super) const DL_FLOAT: u8 = 2;

/// A validated view of one tensor (from DLPack, or from an XLA buffer).
pub struct View {
    pub(super) data: *mut u8,
    pub(super) count: usize,
    pub dtype: DType,
    /// The data is CUDA device memory (a library built with `--device cuda`), which the host
    /// never reads or writes itself: the optimizer step copies it ([`stage_to_host`]).
    pub(super) cuda: bool,
}

impl View {
    pub fn new(data: *mut u8, count: usize, dtype: DType) -> View {
        View { data, count, dtype, cuda: false }
    }

    pub(super) fn bytes(&self) -> usize {
        self.count * if self.dtype == DType::F64 { 8 } else { 4 }
    }

    /// Writes a scalar view's one element.
    ///
    /// # Safety
    ///
    /// The view describes valid, writable memory of at least one element.
    pub unsafe fn write_scalar(&self, value: f64) {
        if self.count == 0 {
            return;
        }
        match self.dtype {
            DType::F64 => *(self.data as *mut f64) = value,
            DType::F32 => *(self.data as *mut f32) = value as f32,
            _ => {}
        }
    }

    /// Whether the two views share memory.
    pub fn overlaps(&self, other: &View) -> bool {
        (self.data as usize) < (other.data as usize) + other.bytes()
            && (other.data as usize) < (self.data as usize) + self.bytes()
    }

    /// Copies `source`'s elements here (same dtype and count; nothing when they are the same
    /// memory).
    ///
    /// # Safety
    ///
    /// Both views describe valid memory of their counts, and this one is writable.
    pub unsafe fn copy_from(&self, source: &View) {
        if self.data != source.data && self.dtype == source.dtype && self.count == source.count {
            std::ptr::copy(source.data as *const u8, self.data, self.bytes());
        }
    }
}
