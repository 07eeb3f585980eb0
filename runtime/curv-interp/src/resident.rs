//! Tensors kept where a backend computes: in host memory for the CPU, in device memory for a GPU.
//!
//! A training step that keeps its parameters, optimizer states and gradients resident hands the
//! backend [`Resident`] tensors as arguments and asks it to keep some outputs resident too, so a
//! GPU backend reads and writes them in device memory with no copy to or from the host between
//! calls. The host reads a resident tensor only when it asks for it ([`Resident::host_data`]).

use std::borrow::Cow;

/// Device memory holding a resident tensor (a GPU backend's buffer). The memory belongs to the
/// storage and is released when it is dropped.
pub trait DeviceStorage<T>: Send {
    /// The address kernels use.
    fn address(&self) -> *mut u8;
    /// The number of elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A copy of the elements on the host, once the device has finished writing them.
    fn read(&self) -> Result<Vec<T>, String>;
    /// Whether the memory is the device's (false for host memory that a caller lends in this
    /// form, which CPU kernels read where it is).
    fn on_device(&self) -> bool {
        true
    }
}

/// Copies `elements` floats at an address (host or device memory) to the host.
///
/// # Safety
///
/// The address holds `elements` floats of the memory the function reads.
pub type ReadLent = unsafe fn(*const u8, usize) -> Result<Vec<f32>, String>;

/// Memory a caller lends for the length of a call, as a resident tensor's storage: its caller's
/// device tensor (`device`), or host memory. Nothing is freed when it is dropped.
#[derive(Debug)]
pub struct LentStorage {
    address: *mut u8,
    elements: usize,
    device: bool,
    read: ReadLent,
}

// The lent memory outlives the storage (see `LentStorage::new`), whichever thread holds it.
unsafe impl Send for LentStorage {}

impl LentStorage {
    /// Storage over `elements` floats at `address`, which `read` copies to the host (a device
    /// copy for device memory).
    ///
    /// # Safety
    ///
    /// The memory holds `elements` floats, is not written by anything else while the storage
    /// lives, and outlives it; nothing writes through the storage (kernels only read arguments).
    pub unsafe fn new(address: *mut u8, elements: usize, device: bool, read: ReadLent) -> LentStorage {
        LentStorage { address, elements, device, read }
    }

    /// Reads host memory (the `read` of host storage).
    ///
    /// # Safety
    ///
    /// `address` holds `elements` floats of host memory.
    pub unsafe fn read_host(address: *const u8, elements: usize) -> Result<Vec<f32>, String> {
        Ok(std::slice::from_raw_parts(address as *const f32, elements).to_vec())
    }
}

impl DeviceStorage<f32> for LentStorage {
    fn address(&self) -> *mut u8 {
        self.address
    }

    fn len(&self) -> usize {
        self.elements
    }

    fn read(&self) -> Result<Vec<f32>, String> {
        // SAFETY: `LentStorage::new`'s contract: the memory holds `elements` floats of the kind
        // `read` reads.
        unsafe { (self.read)(self.address, self.elements) }
    }

    fn on_device(&self) -> bool {
        self.device
    }
}

/// Where a resident tensor's elements are.
pub enum Storage<T> {
    /// Host memory: what a CPU backend computes on.
    Host(Vec<T>),
    /// Device memory.
    Device(Box<dyn DeviceStorage<T>>),
}

/// A dense row-major tensor kept where a backend computes.
pub struct Resident<T> {
    pub shape: Vec<usize>,
    pub storage: Storage<T>,
}

impl<T> std::fmt::Debug for Resident<T> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self.storage {
            Storage::Host(_) => "host",
            Storage::Device(_) => "device",
        };
        write!(formatter, "Resident({place}, {:?})", self.shape)
    }
}

impl<T: Copy> Resident<T> {
    /// A resident tensor in host memory.
    pub fn host(shape: Vec<usize>, data: Vec<T>) -> Resident<T> {
        Resident { shape, storage: Storage::Host(data) }
    }

    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Host(data) => data.len(),
            Storage::Device(device) => device.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn on_device(&self) -> bool {
        matches!(&self.storage, Storage::Device(device) if device.on_device())
    }

    /// The elements on the host: borrowed where they are there, copied from the device otherwise.
    pub fn host_data(&self) -> Result<Cow<'_, [T]>, String> {
        match &self.storage {
            Storage::Host(data) => Ok(Cow::Borrowed(data)),
            Storage::Device(device) => device.read().map(Cow::Owned),
        }
    }

    /// A host copy of the tensor.
    pub fn to_tensor(&self) -> Result<crate::Tensor<T>, String> {
        Ok(crate::Tensor::new(self.shape.clone(), self.host_data()?.into_owned()))
    }

    /// The elements on the host, as an owned vector (host memory is moved out, not copied).
    pub fn into_host_data(self) -> Result<Vec<T>, String> {
        match self.storage {
            Storage::Host(data) => Ok(data),
            Storage::Device(device) => device.read(),
        }
    }
}

/// What a resident argument stands for in a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// `Op::Param { index }`.
    Param(usize),
    /// `Op::Input { index }`.
    Input(usize),
    /// `Op::Data { source, field }`.
    Data(String, String),
}
