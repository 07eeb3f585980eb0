//! `curv-cuda` owns curv's CUDA runtime: finding the GPU, the functions the host side of the
//! generated GPU code calls, and the memory it runs on.
//!
//! MLIR's GPU lowering turns every kernel launch of a module into calls of `mgpu*` functions
//! (load the module's embedded PTX through the driver's JIT, look a kernel up, create a stream,
//! launch, synchronise) and curv's matrix products into calls of `_mlir_ciface_curv_sgemm`. This
//! crate defines those functions over the CUDA driver API and cuBLAS ([`runtime_symbols`] lists
//! them for an execution engine; a standalone trainer links them by name). Both libraries are
//! loaded at run time through `cudarc`'s dynamic loading, so curv builds and runs (on the CPU) on
//! a machine with neither, and [`probe`] says why there is no GPU.
//!
//! Memory is CUDA managed memory ([`ManagedBuffer`]): the host side of the generated code may read
//! and write it as ordinary memory, kernels reach it on the device, and the driver migrates the
//! pages. Buffers are pooled by size, and the runtime copies arguments in and outputs out through
//! the driver, so that a buffer's pages stay on the device from one training step to the next.
//! Errors never abort the process: the first one is kept, with the name of the kernel concerned,
//! and the caller takes it after the call ([`take_error`]). [`profile_report`] says where the
//! host's time went.

use cudarc::driver::sys as cu;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

/// Why there is no GPU to run on, or what failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so`) could not be loaded.
    NoDriver,
    /// The driver loaded but found no device.
    NoDevice,
    /// A driver or cuBLAS call failed.
    Failed(String),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NoDriver => {
                formatter.write_str("no CUDA device: the CUDA driver (libcuda.so) could not be loaded on this machine")
            }
            CudaError::NoDevice => formatter.write_str("no CUDA device: the CUDA driver found no GPU"),
            CudaError::Failed(message) => formatter.write_str(message),
        }
    }
}

impl std::error::Error for CudaError {}

/// The GPU curv runs on (the first device).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    /// Major and minor compute capability (9.0 for H100 and H200, 8.0 for A100).
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

impl DeviceInfo {
    /// The PTX target name of the device (`sm_90`, `sm_80`).
    pub fn chip(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

struct Context {
    context: cu::CUcontext,
    device: cu::CUdevice,
    info: DeviceInfo,
}

// The primary context of a device may be made current on any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

static CONTEXT: OnceLock<Result<Context, CudaError>> = OnceLock::new();

/// The name of a driver result (`CUDA_ERROR_OUT_OF_MEMORY`).
fn result_name(result: cu::CUresult) -> String {
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: only called once the driver is loaded; the name is a static string or null.
    unsafe {
        if cu::cuGetErrorName(result, &mut name) == cu::CUresult::CUDA_SUCCESS && !name.is_null() {
            return CStr::from_ptr(name).to_string_lossy().into_owned();
        }
    }
    format!("{result:?}")
}

fn check(result: cu::CUresult, what: &str) -> Result<(), CudaError> {
    if result == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Failed(format!("{what} failed: {}", result_name(result))))
    }
}

fn open() -> Result<Context, CudaError> {
    // SAFETY: `is_culib_present` only tries to load the library; every other call below is made
    // once it is loaded, with pointers to live locals.
    unsafe {
        if !cu::is_culib_present() {
            return Err(CudaError::NoDriver);
        }
        match cu::cuInit(0) {
            cu::CUresult::CUDA_SUCCESS => {}
            cu::CUresult::CUDA_ERROR_NO_DEVICE => return Err(CudaError::NoDevice),
            other => check(other, "cuInit")?,
        }
        let mut count = 0;
        check(cu::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
        if count == 0 {
            return Err(CudaError::NoDevice);
        }
        let mut device = 0;
        check(cu::cuDeviceGet(&mut device, 0), "cuDeviceGet")?;
        let mut context = std::ptr::null_mut();
        check(cu::cuDevicePrimaryCtxRetain(&mut context, device), "cuDevicePrimaryCtxRetain")?;
        let mut name = [0 as c_char; 256];
        check(cu::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, device), "cuDeviceGetName")?;
        let mut major = 0;
        let mut minor = 0;
        check(
            cu::cuDeviceGetAttribute(
                &mut major,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                device,
            ),
            "cuDeviceGetAttribute",
        )?;
        check(
            cu::cuDeviceGetAttribute(
                &mut minor,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                device,
            ),
            "cuDeviceGetAttribute",
        )?;
        let mut memory = 0usize;
        check(cu::cuDeviceTotalMem_v2(&mut memory, device), "cuDeviceTotalMem")?;
        let info = DeviceInfo {
            name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
            compute_capability: (major, minor),
            memory_bytes: memory,
        };
        Ok(Context { context, device, info })
    }
}

/// The device's context made current on the calling thread.
fn current() -> Result<&'static Context, CudaError> {
    let context = CONTEXT.get_or_init(open).as_ref().map_err(Clone::clone)?;
    // SAFETY: the context is the device's retained primary context.
    check(unsafe { cu::cuCtxSetCurrent(context.context) }, "cuCtxSetCurrent")?;
    Ok(context)
}

/// The GPU curv would run on, or why there is none. Loads the driver on first use.
pub fn probe() -> Result<DeviceInfo, CudaError> {
    current().map(|context| context.info.clone())
}

/// Waits for all work on the device.
pub fn synchronize() -> Result<(), CudaError> {
    current()?;
    check(unsafe { cu::cuCtxSynchronize() }, "cuCtxSynchronize")
}

/// Copies `bytes` bytes of device memory at `source` to host memory at `destination`, after
/// every piece of work queued on the device has finished (a caller's kernels writing the source
/// included, whatever their stream), and returns when the copy is complete.
///
/// # Safety
///
/// `source` is device memory of at least `bytes` bytes and `destination` host memory of as many.
pub unsafe fn copy_to_host(destination: *mut u8, source: *const u8, bytes: usize) -> Result<(), CudaError> {
    synchronize()?;
    check(cu::cuMemcpyDtoH_v2(destination as *mut c_void, source as usize as cu::CUdeviceptr, bytes), "cuMemcpyDtoH")
}

/// Copies `bytes` bytes of host memory at `source` to device memory at `destination` and waits
/// until the copy has landed, so that work queued afterwards on any stream sees it.
///
/// # Safety
///
/// `destination` is device memory of at least `bytes` bytes and `source` host memory of as many.
pub unsafe fn copy_to_device(destination: *mut u8, source: *const u8, bytes: usize) -> Result<(), CudaError> {
    current()?;
    check(
        cu::cuMemcpyHtoD_v2(destination as usize as cu::CUdeviceptr, source as *const c_void, bytes),
        "cuMemcpyHtoD",
    )?;
    synchronize()
}

/// Copies `bytes` bytes between device buffers on the one stream, in order after the kernels
/// queued there; the caller waits ([`synchronize`]) before anything else reads the destination.
///
/// # Safety
///
/// Both are device (or managed) memory of at least `bytes` bytes, and do not overlap.
pub unsafe fn copy_device_to_device(destination: *mut u8, source: *const u8, bytes: usize) -> Result<(), CudaError> {
    current()?;
    let stream = stream()?;
    check(
        cu::cuMemcpyDtoDAsync_v2(
            destination as usize as cu::CUdeviceptr,
            source as usize as cu::CUdeviceptr,
            bytes,
            stream,
        ),
        "cuMemcpyDtoDAsync",
    )
}

/// A host copy of `elements` floats of device memory at `address`, after the device's queued
/// work (the `read` of a lent CUDA tensor's `curv_interp::LentStorage`).
///
/// # Safety
///
/// `address` holds `elements` floats of device memory.
pub unsafe fn read_device_floats(address: *const u8, elements: usize) -> Result<Vec<f32>, String> {
    let mut data = vec![0.0f32; elements];
    if elements > 0 {
        copy_to_host(data.as_mut_ptr() as *mut u8, address, elements * 4).map_err(|error| error.to_string())?;
    }
    Ok(data)
}

// ---------------------------------------------------------------------------------------------
// Errors of the functions generated code calls.

static FIRST_ERROR: Mutex<Option<String>> = Mutex::new(None);

fn record(message: String) {
    let mut first = FIRST_ERROR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if first.is_none() {
        *first = Some(message);
    }
}

/// The first error a function called by generated code met since the last call, if any.
pub fn take_error() -> Option<String> {
    FIRST_ERROR.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
}

/// Kernel names by function handle, for messages.
static KERNEL_NAMES: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
/// The kernel launched last: an error that surfaces at synchronisation names it.
static LAST_KERNEL: Mutex<String> = Mutex::new(String::new());

/// A kernel as errors name it: `` `name` `` or, when its module's PTX says where it comes from,
/// `` `name` (examples/siren.curv:12:5) ``.
fn kernel_name(function: *mut c_void) -> String {
    let names = KERNEL_NAMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    names
        .iter()
        .find(|(handle, _)| *handle == function as usize)
        .map(|(_, name)| name.clone())
        .unwrap_or_else(|| "(unknown kernel)".to_string())
}

/// The line the compiler writes first in a kernel module's PTX (`curv_mlir::gpu`'s
/// `KERNEL_SOURCE_PREFIX`): `// curv kernel NAME at FILE:LINE:COLUMN`.
const KERNEL_SOURCE_PREFIX: &str = "// curv kernel ";

/// The kernel and source location a module's PTX names in its first line, as errors show them:
/// `` `loss_and_gradients_kernel_3` (examples/siren.curv:12:5) ``.
pub fn kernel_source(ptx: &str) -> Option<String> {
    let line = ptx.lines().next()?.strip_prefix(KERNEL_SOURCE_PREFIX)?;
    let (name, location) = line.split_once(" at ")?;
    Some(format!("`{}` ({})", name.trim(), location.trim()))
}

/// Where each loaded module's kernel comes from, by module handle ([`kernel_source`]).
static MODULE_SOURCES: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());

// ---------------------------------------------------------------------------------------------
// The `mgpu*` functions MLIR's `gpu-to-llvm` lowering and the `gpu.binary` translation call.

/// Loads a module's PTX through the driver's JIT (the constructor of a generated module calls it
/// once). Returns null, with the JIT's log kept as the error, when it fails.
///
/// # Safety
///
/// `data` is a NUL-terminated PTX string (the module's embedded binary).
#[no_mangle]
pub unsafe extern "C" fn mgpuModuleLoadJIT(data: *mut c_void, optimization_level: c_int) -> *mut c_void {
    if let Err(error) = current() {
        record(error.to_string());
        return std::ptr::null_mut();
    }
    let mut log = vec![0u8; 16 * 1024];
    let mut options = [
        cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        cu::CUjit_option::CU_JIT_OPTIMIZATION_LEVEL,
    ];
    // Option values are passed in pointer-sized slots.
    let mut values: [*mut c_void; 3] = [
        log.as_mut_ptr() as *mut c_void,
        log.len() as *mut c_void,
        optimization_level.clamp(0, 4) as usize as *mut c_void,
    ];
    let mut module = std::ptr::null_mut();
    let result =
        cu::cuModuleLoadDataEx(&mut module, data, options.len() as u32, options.as_mut_ptr(), values.as_mut_ptr());
    if result != cu::CUresult::CUDA_SUCCESS {
        let end = log.iter().position(|byte| *byte == 0).unwrap_or(log.len());
        record(format!(
            "the CUDA driver could not load the generated PTX ({}): {}",
            result_name(result),
            String::from_utf8_lossy(&log[..end]).trim()
        ));
        return std::ptr::null_mut();
    }
    // The PTX is a C string; its first line may say which kernel and source it holds.
    let text = CStr::from_ptr(data as *const c_char).to_string_lossy();
    if let Some(source) = kernel_source(&text) {
        MODULE_SOURCES.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((module as usize, source));
    }
    module as *mut c_void
}

/// [`mgpuModuleLoadJIT`] for a binary given with its size (a cubin or PTX).
///
/// # Safety
///
/// `data` points at the module's image.
#[no_mangle]
pub unsafe extern "C" fn mgpuModuleLoad(data: *mut c_void, _size: usize) -> *mut c_void {
    mgpuModuleLoadJIT(data, 4)
}

/// # Safety
///
/// `module` is null or a module [`mgpuModuleLoadJIT`] returned.
#[no_mangle]
pub unsafe extern "C" fn mgpuModuleUnload(module: *mut c_void) {
    if !module.is_null() && current().is_ok() {
        // Unloading at exit may fail once the context is gone; nothing is left to report to.
        let _ = cu::cuModuleUnload(module as cu::CUmodule);
    }
}

/// # Safety
///
/// `module` is null or a loaded module; `name` is a NUL-terminated kernel name.
#[no_mangle]
pub unsafe extern "C" fn mgpuModuleGetFunction(module: *mut c_void, name: *const c_char) -> *mut c_void {
    let name_text = if name.is_null() { String::new() } else { CStr::from_ptr(name).to_string_lossy().into_owned() };
    if module.is_null() {
        record(format!("kernel `{name_text}`: its module was not loaded"));
        return std::ptr::null_mut();
    }
    if let Err(error) = current() {
        record(error.to_string());
        return std::ptr::null_mut();
    }
    let mut function = std::ptr::null_mut();
    let result = cu::cuModuleGetFunction(&mut function, module as cu::CUmodule, name);
    if result != cu::CUresult::CUDA_SUCCESS {
        record(format!("kernel `{name_text}`: not found in its module ({})", result_name(result)));
        return std::ptr::null_mut();
    }
    let shown = MODULE_SOURCES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .find(|(handle, _)| *handle == module as usize)
        .map(|(_, source)| source.clone())
        .unwrap_or_else(|| format!("`{name_text}`"));
    let mut names = KERNEL_NAMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !names.iter().any(|(handle, _)| *handle == function as usize) {
        names.push((function as usize, shown));
    }
    function as *mut c_void
}

/// Launches a kernel; the launch does nothing but keep the error when the kernel is missing, a
/// dimension does not fit the driver's types, or the driver refuses.
///
/// # Safety
///
/// `params` holds one pointer per kernel parameter, as the generated code builds it.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn mgpuLaunchKernel(
    function: *mut c_void,
    grid_x: isize,
    grid_y: isize,
    grid_z: isize,
    block_x: isize,
    block_y: isize,
    block_z: isize,
    shared_memory: i32,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    _parameter_count: usize,
) {
    if function.is_null() {
        record("a kernel launch without its kernel (the module did not load)".to_string());
        return;
    }
    let name = kernel_name(function);
    *LAST_KERNEL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = name.clone();
    let dimensions = [grid_x, grid_y, grid_z, block_x, block_y, block_z];
    if dimensions.iter().any(|&dimension| dimension < 1 || dimension > u32::MAX as isize) || shared_memory < 0 {
        record(format!("kernel {name}: launch dimensions {dimensions:?} out of range"));
        return;
    }
    if let Err(error) = current() {
        record(error.to_string());
        return;
    }
    let started = std::time::Instant::now();
    let result = cu::cuLaunchKernel(
        function as cu::CUfunction,
        grid_x as u32,
        grid_y as u32,
        grid_z as u32,
        block_x as u32,
        block_y as u32,
        block_z as u32,
        shared_memory as u32,
        stream as cu::CUstream,
        params,
        extra,
    );
    account(Part::Launch, started);
    if result != cu::CUresult::CUDA_SUCCESS {
        record(format!("kernel {name} failed to launch: {}", result_name(result)));
    }
}

struct Stream(cu::CUstream);
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

static STREAM: OnceLock<Result<Stream, CudaError>> = OnceLock::new();

/// The one stream all of curv's GPU work goes to (launches and cuBLAS), created on first use.
fn stream() -> Result<cu::CUstream, CudaError> {
    current()?;
    STREAM
        .get_or_init(|| {
            let mut stream = std::ptr::null_mut();
            check(
                unsafe { cu::cuStreamCreate(&mut stream, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
                "cuStreamCreate",
            )?;
            Ok(Stream(stream))
        })
        .as_ref()
        .map(|stream| stream.0)
        .map_err(Clone::clone)
}

/// The generated code asks for a stream around every launch; it gets the one stream, so work is
/// ordered without extra streams.
///
/// # Safety
///
/// Called by generated code.
#[no_mangle]
pub unsafe extern "C" fn mgpuStreamCreate() -> *mut c_void {
    match stream() {
        Ok(stream) => stream as *mut c_void,
        Err(error) => {
            record(error.to_string());
            std::ptr::null_mut()
        }
    }
}

thread_local! {
    /// Whether the generated code running now said that its host side touches no memory
    /// ([`curv_cuda_ordered_launches`]), so that its launches and matrix products need not wait.
    static ORDERED_LAUNCHES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether every launch and matrix product waits for the device whatever the module says:
/// `CURV_CUDA_SYNC=each`, so that the error of a kernel that fails while running names that
/// kernel (otherwise it surfaces when the call ends, naming the last kernel launched).
fn wait_for_each() -> bool {
    static EACH: OnceLock<bool> = OnceLock::new();
    *EACH.get_or_init(|| std::env::var("CURV_CUDA_SYNC").is_ok_and(|value| value == "each"))
}

/// Whether a launch or matrix product of the generated code running now must wait for the device.
fn must_wait() -> bool {
    !ORDERED_LAUNCHES.with(std::cell::Cell::get) || wait_for_each()
}

/// Called first by generated code whose host side only launches kernels, calls the matrix
/// product and manages buffers (`curv_mlir::gpu::host_memory_access` found nothing else): its
/// launches and matrix products return without waiting for the device, so the kernels run back
/// to back on the one stream, and [`call_staged`] waits once when the call ends. It holds until
/// then.
#[no_mangle]
pub extern "C" fn curv_cuda_ordered_launches() {
    ORDERED_LAUNCHES.with(|ordered| ordered.set(true));
}

/// Waits for a launch's kernel, unless the generated code running now needs no wait
/// ([`curv_cuda_ordered_launches`]).
///
/// # Safety
///
/// `stream` is null or a stream [`mgpuStreamCreate`] returned.
#[no_mangle]
pub unsafe extern "C" fn mgpuStreamSynchronize(stream: *mut c_void) {
    if stream.is_null() || current().is_err() || !must_wait() {
        return;
    }
    let started = std::time::Instant::now();
    let result = cu::cuStreamSynchronize(stream as cu::CUstream);
    account(Part::StreamSynchronize, started);
    if result != cu::CUresult::CUDA_SUCCESS {
        let name = LAST_KERNEL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        record(format!("kernel {name} failed while running: {}", result_name(result)));
    }
}

/// The one stream outlives every call: nothing to destroy.
///
/// # Safety
///
/// Called by generated code.
#[no_mangle]
pub unsafe extern "C" fn mgpuStreamDestroy(_stream: *mut c_void) {}

/// Allocations of generated code (`gpu.alloc`) are managed memory whatever they ask for, so the
/// host side may touch them too. They come from the same pool as the staging buffers: a training
/// step allocates the same intermediate buffers every time, and a buffer used before has its
/// pages on the device already, where a fresh managed allocation costs the driver's allocation and
/// a page fault per page on its first use by a kernel.
///
/// # Safety
///
/// Called by generated code.
#[no_mangle]
pub unsafe extern "C" fn mgpuMemAlloc(bytes: u64, _stream: *mut c_void, _host_shared: bool) -> *mut c_void {
    match take_buffer(Pool::Intermediate, bytes as usize) {
        Ok(buffer) => {
            let pointer = buffer.as_mut_ptr();
            LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(buffer);
            pointer as *mut c_void
        }
        Err(error) => {
            record(format!("allocating {bytes} bytes of GPU memory: {error}"));
            std::ptr::null_mut()
        }
    }
}

/// Buffers generated code holds (from [`mgpuMemAlloc`] until it frees them).
static LIVE: Mutex<Vec<ManagedBuffer>> = Mutex::new(Vec::new());

/// Gives a buffer of generated code back to the pool. Every launch of generated code is
/// synchronous (the lowering waits on the stream after each) and the pool's next user works on
/// the same stream, so the buffer is free to reuse at once.
fn release(pointer: *mut u8) {
    if pointer.is_null() {
        return;
    }
    let mut live = LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match live.iter().rposition(|buffer| buffer.as_mut_ptr() == pointer) {
        Some(index) => {
            let buffer = live.swap_remove(index);
            drop(live);
            give_back(Pool::Intermediate, buffer);
        }
        None => {
            drop(live);
            free_managed(pointer);
        }
    }
}

/// # Safety
///
/// `pointer` is null or came from [`mgpuMemAlloc`].
#[no_mangle]
pub unsafe extern "C" fn mgpuMemFree(pointer: *mut c_void, _stream: *mut c_void) {
    release(pointer as *mut u8);
}

/// Frees a buffer generated code allocated with [`mgpuMemAlloc`], given its address (the
/// lowering's replacement for `memref.dealloc`, which would call the C library's `free`).
///
/// # Safety
///
/// `address` is zero or came from [`mgpuMemAlloc`] and is not used again.
#[no_mangle]
pub unsafe extern "C" fn curv_cuda_free(address: usize) {
    release(address as *mut u8);
}

// ---------------------------------------------------------------------------------------------
// Where a GPU run's host time goes.

/// The parts of the runtime whose time [`profile_report`] totals.
#[derive(Debug, Clone, Copy)]
enum Part {
    Launch,
    StreamSynchronize,
    MatrixProduct,
    MatrixProductWait,
    FreshAllocation,
    PooledAllocation,
    StageIn,
    Invoke,
    CallWait,
    StageOut,
}

const PARTS: [(Part, &str); 10] = [
    (Part::Launch, "kernel launches"),
    (Part::StreamSynchronize, "waits after launches"),
    (Part::MatrixProduct, "cuBLAS product calls"),
    (Part::MatrixProductWait, "waits after cuBLAS products"),
    (Part::FreshAllocation, "fresh managed allocations"),
    (Part::PooledAllocation, "allocations from the pool"),
    (Part::StageIn, "staging in (copies, prefetches)"),
    (Part::Invoke, "calls of generated code (all of the above but staging)"),
    (Part::CallWait, "waits for the device at the end of each call"),
    (Part::StageOut, "staging out (copies)"),
];

static PROFILE: [(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64); 10] =
    [const { (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)) }; 10];

fn account(part: Part, started: std::time::Instant) {
    let (count, nanoseconds) = &PROFILE[part as usize];
    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    nanoseconds.fetch_add(started.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The host time spent in each part of the runtime so far (count, total and mean), one line each:
/// where a GPU step's time goes. A trainer prints it at the end of a run when `CURV_CUDA_PROFILE`
/// is set.
pub fn profile_report() -> String {
    let mut out = String::new();
    for (part, name) in PARTS {
        let (count, nanoseconds) = &PROFILE[part as usize];
        let count = count.load(std::sync::atomic::Ordering::Relaxed);
        let milliseconds = nanoseconds.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
        if count > 0 {
            out.push_str(&format!(
                "{name:<58} {count:>9} calls {milliseconds:>11.3} ms {:>9.1} us each\n",
                milliseconds * 1e3 / count as f64
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Managed memory.

fn allocate_managed(bytes: usize) -> Result<*mut u8, CudaError> {
    current()?;
    let mut pointer: cu::CUdeviceptr = 0;
    // A zero-byte request still gets a distinct allocation.
    check(
        unsafe {
            cu::cuMemAllocManaged(&mut pointer, bytes.max(4), cu::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32)
        },
        "cuMemAllocManaged",
    )?;
    Ok(pointer as usize as *mut u8)
}

fn free_managed(pointer: *mut u8) {
    if !pointer.is_null() && current().is_ok() {
        // The device may still be using it: wait first.
        unsafe {
            let _ = cu::cuCtxSynchronize();
            let _ = cu::cuMemFree_v2(pointer as usize as cu::CUdeviceptr);
        }
    }
}

/// A block of managed memory, freed on drop.
#[derive(Debug)]
pub struct ManagedBuffer {
    pointer: *mut u8,
    bytes: usize,
}

// Managed memory belongs to the context, not to a thread.
unsafe impl Send for ManagedBuffer {}

impl ManagedBuffer {
    pub fn new(bytes: usize) -> Result<ManagedBuffer, CudaError> {
        Ok(ManagedBuffer { pointer: allocate_managed(bytes)?, bytes })
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Result<ManagedBuffer, CudaError> {
        let buffer = ManagedBuffer::new(data.len())?;
        // SAFETY: the buffer has room for `data` and is host-accessible managed memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buffer.pointer, data.len()) };
        Ok(buffer)
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.pointer
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The contents, read on the host (after [`synchronize`]).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `bytes` bytes of host-accessible memory.
        unsafe { std::slice::from_raw_parts(self.pointer, self.bytes) }
    }
}

impl Drop for ManagedBuffer {
    fn drop(&mut self) {
        free_managed(self.pointer);
    }
}

/// Calls generated GPU code whose packed arguments (`slots`: one pointer per argument then per
/// output, each pointing at the pointer to a contiguous memref descriptor
/// `[allocated, aligned, offset, sizes..., strides...]`) point at host memory: every buffer gets a
/// managed staging buffer (the arguments copied in), the descriptors point at them during
/// `invoke`, the outputs (from `first_output` on) are copied back once the device has finished, and the first error of
/// the runtime functions is the call's error. `layouts` gives each buffer's shape and element
/// size; `on_device` marks the buffers already in device memory (resident tensors, as
/// [`ResidentBuffer`]s), which are neither staged nor copied: the descriptor points at them. The copies go through the driver ([`copy_in`], [`copy_out`]), so a staging buffer's
/// pages stay on the device, and staging buffers are kept for the next call of the same sizes.
///
/// # Safety
///
/// The slots must be packed descriptors of the stated layouts over live buffers.
pub unsafe fn call_staged(
    layouts: &[(Vec<i64>, usize)],
    first_output: usize,
    on_device: &[bool],
    slots: &mut [*mut ()],
    invoke: &mut dyn FnMut(&mut [*mut ()]) -> Result<(), String>,
) -> Result<(), String> {
    if layouts.len() != slots.len() || on_device.len() != slots.len() {
        return Err(format!("{} buffers for {} layouts", slots.len(), layouts.len()));
    }
    let started = std::time::Instant::now();
    // Every staging buffer first, so that a failed allocation leaves the descriptors untouched.
    // A buffer already in device memory (a resident tensor) is used where it is: it gets an
    // empty staging buffer, which nothing copies to or from and no descriptor points at.
    let mut staged = Vec::with_capacity(slots.len());
    for ((shape, element_bytes), &resident) in layouts.iter().zip(on_device) {
        let bytes = if resident { 0 } else { shape.iter().product::<i64>().max(0) as usize * element_bytes };
        match take_buffer(Pool::Staging, bytes) {
            Ok(buffer) => staged.push(buffer),
            Err(error) => {
                staged.into_iter().for_each(|buffer| give_back(Pool::Staging, buffer));
                return Err(error.to_string());
            }
        }
    }
    // The arguments are copied in (the outputs are written whole by the call), and every
    // descriptor points at its staging buffer.
    let mut originals = Vec::with_capacity(slots.len());
    for (position, ((slot, (_, element_bytes)), buffer)) in slots.iter().zip(layouts).zip(&staged).enumerate() {
        if on_device[position] {
            continue;
        }
        let descriptor = *(*slot as *mut *mut i64);
        let (aligned, offset) = (*descriptor.add(1) as *mut u8, *descriptor.add(2));
        if position < first_output {
            let host = aligned.add(offset as usize * element_bytes);
            if buffer.len() <= SMALL_INPUT_BYTES && small_inputs_by_the_cpu() {
                std::ptr::copy_nonoverlapping(host, buffer.as_mut_ptr(), buffer.len());
            } else {
                copy_in(buffer, host);
            }
        }
        originals.push((descriptor, (*descriptor, *descriptor.add(1), *descriptor.add(2))));
        *descriptor = buffer.as_mut_ptr() as i64;
        *descriptor.add(1) = buffer.as_mut_ptr() as i64;
        *descriptor.add(2) = 0;
    }
    // The copies in are asynchronous to the device; the host side of the generated code may read
    // an argument itself (a scalar), so they must have landed before it runs.
    let landed = synchronize();
    account(Part::StageIn, started);
    if let Err(error) = landed {
        restore_descriptors(&originals);
        return Err(error.to_string());
    }
    take_error();
    let started = std::time::Instant::now();
    ORDERED_LAUNCHES.with(|ordered| ordered.set(false));
    let result = invoke(slots);
    let ordered = ORDERED_LAUNCHES.with(|ordered| ordered.replace(false));
    account(Part::Invoke, started);
    let started = std::time::Instant::now();
    let synchronised = synchronize();
    account(Part::CallWait, started);
    let started = std::time::Instant::now();
    // The descriptors point at the caller's buffers again, whatever happened.
    restore_descriptors(&originals);
    result?;
    if let Some(message) = take_error() {
        return Err(message);
    }
    synchronised.map_err(|error| {
        if ordered && !wait_for_each() {
            // The launches did not wait: the failure surfaced here, after the last launch.
            let name = LAST_KERNEL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
            format!(
                "a kernel failed while running ({error}); the last one launched was {name}; run with \
                 CURV_CUDA_SYNC=each to wait for each kernel and name the one that failed"
            )
        } else {
            error.to_string()
        }
    })?;
    // `originals` has an entry per staged buffer, in order; resident outputs are not copied out.
    let staged_positions: Vec<usize> = (0..slots.len()).filter(|&position| !on_device[position]).collect();
    let outputs = || {
        originals
            .iter()
            .zip(&staged_positions)
            .filter(|(_, &position)| position >= first_output)
            .map(|(original, &position)| (original, (&staged[position], &layouts[position])))
    };
    let host = |descriptor: *mut i64, element_bytes: usize| {
        (*descriptor.add(1) as *mut u8).add(*descriptor.add(2) as usize * element_bytes)
    };
    for ((descriptor, _), (buffer, (_, element_bytes))) in outputs() {
        copy_out(buffer, host(*descriptor, *element_bytes));
    }
    // One wait for all the copies out; if it fails, the CPU copies them instead.
    if synchronize().is_err() {
        for ((descriptor, _), (buffer, (_, element_bytes))) in outputs() {
            std::ptr::copy_nonoverlapping(buffer.as_slice().as_ptr(), host(*descriptor, *element_bytes), buffer.len());
        }
    }
    for buffer in staged {
        give_back(Pool::Staging, buffer);
    }
    account(Part::StageOut, started);
    Ok(())
}

/// The size up to which an input counts as small for [`small_inputs_by_the_cpu`] (a scalar
/// hyperparameter: a learning rate, a step count).
const SMALL_INPUT_BYTES: usize = 64;

/// Whether [`call_staged`] writes small inputs into their staging buffers with the CPU
/// (`CURV_CUDA_SMALL_INPUTS=cpu`) instead of the driver's copy. The host side of a rule update
/// reads its scalar hyperparameters itself (the bias corrections are computed once, outside the
/// kernels); after the driver's copy their pages are on the device, and each read may move a
/// page to the host. Written by the CPU, they stay on the host, where a kernel that reads one
/// moves it instead. Which costs less is for the GPU check to measure; the default is the
/// driver's copy.
fn small_inputs_by_the_cpu() -> bool {
    static CPU: OnceLock<bool> = OnceLock::new();
    *CPU.get_or_init(|| std::env::var("CURV_CUDA_SMALL_INPUTS").is_ok_and(|value| value == "cpu"))
}

/// Points descriptors back at the caller's buffers: `(descriptor, (allocated, aligned, offset))`.
///
/// # Safety
///
/// Each descriptor is a live packed memref descriptor.
unsafe fn restore_descriptors(originals: &[(*mut i64, (i64, i64, i64))]) {
    for (descriptor, (allocated, aligned, offset)) in originals {
        **descriptor = *allocated;
        *descriptor.add(1) = *aligned;
        *descriptor.add(2) = *offset;
    }
}

/// Copies `buffer.len()` bytes from the host into a staging buffer through the driver, which
/// writes the pages where they are (on the device, after the first call) instead of moving them
/// to the host for the CPU to write. Where the driver refuses, the CPU copies.
///
/// # Safety
///
/// `host` holds `buffer.len()` readable bytes.
unsafe fn copy_in(buffer: &ManagedBuffer, host: *const u8) {
    if buffer.is_empty() {
        return;
    }
    let device = buffer.as_mut_ptr() as usize as cu::CUdeviceptr;
    // On the one stream, after the prefetch of a fresh buffer and before the kernels; from
    // pageable memory the call returns once the driver holds the bytes.
    let copied = stream().map(|stream| cu::cuMemcpyHtoDAsync_v2(device, host as *const c_void, buffer.len(), stream));
    if copied != Ok(cu::CUresult::CUDA_SUCCESS) {
        let _ = synchronize();
        std::ptr::copy_nonoverlapping(host, buffer.as_mut_ptr(), buffer.len());
    }
}

/// Starts copying a staging buffer's bytes out to the host through the driver (on the one
/// stream), leaving its pages on the device; the caller waits for the stream before reading
/// `host`. Where the driver refuses, the CPU copies at once.
///
/// # Safety
///
/// `host` has room for `buffer.len()` bytes, and the device has finished writing the buffer.
unsafe fn copy_out(buffer: &ManagedBuffer, host: *mut u8) {
    if buffer.is_empty() {
        return;
    }
    let device = buffer.as_mut_ptr() as usize as cu::CUdeviceptr;
    let copied = stream().map(|stream| cu::cuMemcpyDtoHAsync_v2(host as *mut c_void, device, buffer.len(), stream));
    if copied != Ok(cu::CUresult::CUDA_SUCCESS) {
        let _ = synchronize();
        std::ptr::copy_nonoverlapping(buffer.as_slice().as_ptr(), host, buffer.len());
    }
}

/// The device memory of a resident tensor of `f32`s (`curv_interp::Resident`): a managed buffer
/// from its own pool, which kernels read and write where it is, and which goes back to the pool
/// when the tensor is dropped. The host reads it only through [`ResidentBuffer::read`], so its
/// pages stay on the device.
pub struct ResidentBuffer {
    buffer: Option<ManagedBuffer>,
    elements: usize,
}

impl ResidentBuffer {
    /// Device memory for `elements` floats, with unspecified contents (a kernel's output).
    pub fn new(elements: usize) -> Result<ResidentBuffer, CudaError> {
        let buffer = take_buffer(Pool::Resident, elements * 4)?;
        Ok(ResidentBuffer { buffer: Some(buffer), elements })
    }

    /// Device memory holding a copy of `data` (an upload, which has landed when this returns).
    pub fn copy_of(data: &[f32]) -> Result<ResidentBuffer, CudaError> {
        let resident = ResidentBuffer::new(data.len())?;
        if !data.is_empty() {
            // SAFETY: the buffer holds `data.len()` floats of device-accessible memory.
            unsafe { copy_to_device(resident.address(), data.as_ptr() as *const u8, data.len() * 4)? };
        }
        Ok(resident)
    }

    fn address(&self) -> *mut u8 {
        self.buffer.as_ref().map_or(std::ptr::null_mut(), ManagedBuffer::as_mut_ptr)
    }
}

/// Device memory for a kept output of `elements` floats, as a resident tensor's storage (the
/// allocator a GPU backend hands `curv_runtime::compiled::call_compiled_keeping`).
pub fn allocate_resident(elements: usize) -> Result<Box<dyn curv_interp::DeviceStorage<f32>>, String> {
    Ok(Box::new(ResidentBuffer::new(elements).map_err(|error| error.to_string())?))
}

/// A resident copy of `tensor` in device memory (a GPU backend's `Backend::upload`).
pub fn upload(tensor: curv_interp::Tensor<f32>) -> Result<curv_interp::Resident<f32>, String> {
    let buffer = ResidentBuffer::copy_of(&tensor.data).map_err(|error| error.to_string())?;
    Ok(curv_interp::Resident { shape: tensor.shape, storage: curv_interp::Storage::Device(Box::new(buffer)) })
}

impl curv_interp::DeviceStorage<f32> for ResidentBuffer {
    fn address(&self) -> *mut u8 {
        ResidentBuffer::address(self)
    }

    fn len(&self) -> usize {
        self.elements
    }

    fn read(&self) -> Result<Vec<f32>, String> {
        let mut data = vec![0.0f32; self.elements];
        if self.elements > 0 {
            // SAFETY: both sides hold `elements` floats; the copy waits for the device's work.
            unsafe { copy_to_host(data.as_mut_ptr() as *mut u8, self.address(), self.elements * 4) }
                .map_err(|error| error.to_string())?;
        }
        Ok(data)
    }
}

impl Drop for ResidentBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(Pool::Resident, buffer);
        }
    }
}

/// Moves the pages of managed buffers to the device in bulk (one prefetch each, on the stream)
/// instead of page by page on first touch. A device without prefetching (no concurrent managed
/// access) still works by faults, so a refused prefetch is not an error.
fn prefetch(buffers: &[ManagedBuffer]) {
    let (Ok(context), Ok(stream)) = (current(), stream()) else { return };
    for buffer in buffers.iter().filter(|buffer| !buffer.is_empty()) {
        let _ = unsafe {
            cu::cuMemPrefetchAsync(
                buffer.as_mut_ptr() as usize as cu::CUdeviceptr,
                buffer.len(),
                context.device,
                stream,
            )
        };
    }
}

/// Moves managed buffers to the device (a benchmark's inputs, before timing).
pub fn prefetch_to_device(buffers: &[ManagedBuffer]) {
    prefetch(buffers);
    let _ = synchronize();
}

/// The median time of a device-to-device copy of `bytes` (of `calls` copies), on buffers of device
/// memory.
pub fn copy_seconds(bytes: usize, calls: usize) -> Result<f64, CudaError> {
    current()?;
    let stream = stream()?;
    let (mut source, mut destination): (cu::CUdeviceptr, cu::CUdeviceptr) = (0, 0);
    unsafe {
        check(cu::cuMemAlloc_v2(&mut source, bytes.max(4)), "cuMemAlloc")?;
        check(cu::cuMemAlloc_v2(&mut destination, bytes.max(4)), "cuMemAlloc")?;
    }
    let copy = || {
        unsafe { check(cu::cuMemcpyDtoDAsync_v2(destination, source, bytes, stream), "cuMemcpyDtoD") }
            .and_then(|()| check(unsafe { cu::cuStreamSynchronize(stream) }, "cuStreamSynchronize"))
    };
    let mut times = Vec::with_capacity(calls);
    let mut outcome = Ok(());
    // Copies for a fifth of a second first, so that the GPU's clocks have risen from idle.
    let warming = std::time::Instant::now();
    while warming.elapsed().as_secs_f64() < 0.2 && outcome.is_ok() {
        outcome = copy();
    }
    for _ in 0..calls + 3 {
        let started = std::time::Instant::now();
        outcome = outcome.and_then(|()| copy());
        if outcome.is_err() {
            break;
        }
        times.push(started.elapsed().as_secs_f64());
    }
    unsafe {
        let _ = cu::cuMemFree_v2(source);
        let _ = cu::cuMemFree_v2(destination);
    }
    outcome?;
    times.drain(..3);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Buffers kept for the next call, by size (a training step calls the same functions with the
/// same shapes every time), up to [`POOL_LIMIT_BYTES`] in each of three pools: the staging buffers
/// of [`call_staged`], the intermediate buffers of generated code and the buffers of resident
/// tensors. Apart, because the host
/// reads and writes staging buffers through the driver's copies, and an intermediate buffer
/// should never have a page anywhere but on the device.
#[derive(Clone, Copy)]
enum Pool {
    Staging,
    Intermediate,
    /// The buffers of resident tensors ([`ResidentBuffer`]).
    Resident,
}

static POOLS: [Mutex<Vec<ManagedBuffer>>; 3] = [Mutex::new(Vec::new()), Mutex::new(Vec::new()), Mutex::new(Vec::new())];
const POOL_LIMIT_BYTES: usize = 4 << 30;

/// A buffer of `bytes` from `pool`, or a fresh one, whose pages are then moved to the device
/// before anything touches them (the first kernel to use it would otherwise fault them in one by
/// one).
fn take_buffer(pool: Pool, bytes: usize) -> Result<ManagedBuffer, CudaError> {
    let started = std::time::Instant::now();
    let mut held = POOLS[pool as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // The most recently returned buffer of the size: its pages are the likeliest to be where the
    // last user left them.
    match held.iter().rposition(|buffer| buffer.len() == bytes) {
        Some(index) => {
            let buffer = held.swap_remove(index);
            account(Part::PooledAllocation, started);
            Ok(buffer)
        }
        None => {
            drop(held);
            let buffer = ManagedBuffer::new(bytes)?;
            prefetch(std::slice::from_ref(&buffer));
            account(Part::FreshAllocation, started);
            Ok(buffer)
        }
    }
}

fn give_back(pool: Pool, buffer: ManagedBuffer) {
    let mut held = POOLS[pool as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let bytes: usize = held.iter().map(ManagedBuffer::len).sum();
    if bytes + buffer.len() <= POOL_LIMIT_BYTES {
        held.push(buffer);
    } else {
        // Freed outside the lock (freeing waits for the device).
        drop(held);
        drop(buffer);
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products on cuBLAS.

struct Blas(cudarc::cublas::sys::cublasHandle_t);
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

static BLAS: OnceLock<Result<Blas, CudaError>> = OnceLock::new();
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

fn blas() -> Result<&'static Blas, CudaError> {
    current()?;
    BLAS.get_or_init(|| {
        use cudarc::cublas::sys as blas;
        // SAFETY: the library is only called once it is known to load.
        unsafe {
            if !blas::is_culib_present() {
                return Err(CudaError::Failed("cuBLAS (libcublas.so) could not be loaded".to_string()));
            }
            let mut handle = std::ptr::null_mut();
            let status = blas::cublasCreate_v2(&mut handle);
            if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Failed(format!("cublasCreate failed: {status:?}")));
            }
            let status = blas::cublasSetStream_v2(handle, stream()? as blas::cudaStream_t);
            if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Failed(format!("cublasSetStream failed: {status:?}")));
            }
            // A workspace of its own, in device memory, for the life of the process (the size
            // NVIDIA recommends for Hopper), so that cuBLAS never allocates one during a product.
            // Without it cuBLAS uses its default, so a refusal is not an error.
            let mut workspace: cu::CUdeviceptr = 0;
            if cu::cuMemAlloc_v2(&mut workspace, BLAS_WORKSPACE_BYTES) == cu::CUresult::CUDA_SUCCESS {
                let _ = blas::cublasSetWorkspace_v2(handle, workspace as usize as *mut c_void, BLAS_WORKSPACE_BYTES);
            }
            Ok(Blas(handle))
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// How a row-major `[rows, columns]` view with `strides` is handed to column-major cuBLAS: its
/// transpose stored with leading dimension `ld` (`false`), or itself stored column-major with
/// leading dimension `ld` (`true`, a transposed view). None for any other layout.
fn blas_layout(rows: i64, columns: i64, strides: [i64; 2]) -> Option<(bool, i64)> {
    if strides[1] == 1 && (strides[0] >= columns || rows == 1) {
        Some((false, strides[0].max(columns).max(1)))
    } else if strides[0] == 1 && (strides[1] >= rows || columns == 1) {
        Some((true, strides[1].max(rows).max(1)))
    } else {
        None
    }
}

/// `C = A B` on cuBLAS for generated code running on the GPU (its C-interface name: the GPU
/// lowering calls `curv_cuda_sgemm` where the CPU code calls `curv_sgemm`): the row-major product
/// is the column-major `C^T = B^T A^T`.
/// It runs on the one stream and is waited for before returning, as the kernels around it are,
/// unless the generated code needs no wait ([`curv_cuda_ordered_launches`]).
///
/// # Safety
///
/// The descriptors describe managed (or device) buffers of the stated sizes and strides.
#[no_mangle]
pub unsafe extern "C" fn _mlir_ciface_curv_cuda_sgemm(
    a: *const curv_runtime::gemm::StridedMemRef2,
    b: *const curv_runtime::gemm::StridedMemRef2,
    c: *mut curv_runtime::gemm::StridedMemRef2,
) {
    use cudarc::cublas::sys as blas_sys;
    let (a, b, c) = (&*a, &*b, &*c);
    let (m, k, n) = (a.sizes[0], a.sizes[1], b.sizes[1]);
    if m == 0 || n == 0 {
        return;
    }
    let handle = match blas() {
        Ok(handle) => handle,
        Err(error) => return record(format!("matrix product: {error}")),
    };
    let (Some((a_transposed, lda)), Some((b_transposed, ldb)), Some((false, ldc))) =
        (blas_layout(m, k, a.strides), blas_layout(k, n, b.strides), blas_layout(m, n, c.strides))
    else {
        return record(format!(
            "matrix product {m}x{k} @ {k}x{n}: strides {:?}, {:?}, {:?} are not a layout cuBLAS takes",
            a.strides, b.strides, c.strides
        ));
    };
    let operation = |transposed: bool| {
        if transposed {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let started = std::time::Instant::now();
    let (b_data, a_data, c_data) =
        (b.aligned.offset(b.offset as isize), a.aligned.offset(a.offset as isize), c.aligned.offset(c.offset as isize));
    let sizes = [n, m, k, ldb, lda, ldc];
    // The 32-bit interface where every size fits (always, for curv's models): the 64-bit one is
    // the suspect of the long host time of each call the GPU check's profile measured.
    let status = if sizes.iter().all(|&size| size <= i32::MAX as i64) {
        blas_sys::cublasSgemm_v2(
            handle.0,
            operation(b_transposed),
            operation(a_transposed),
            n as i32,
            m as i32,
            k as i32,
            &alpha,
            b_data,
            ldb as i32,
            a_data,
            lda as i32,
            &beta,
            c_data,
            ldc as i32,
        )
    } else {
        blas_sys::cublasSgemm_v2_64(
            handle.0,
            operation(b_transposed),
            operation(a_transposed),
            n,
            m,
            k,
            &alpha,
            b_data,
            ldb,
            a_data,
            lda,
            &beta,
            c_data,
            ldc,
        )
    };
    account(Part::MatrixProduct, started);
    if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return record(format!("matrix product {m}x{k} @ {k}x{n}: cublasSgemm failed: {status:?}"));
    }
    if !must_wait() {
        return;
    }
    let started = std::time::Instant::now();
    let result = match stream() {
        Ok(stream) => cu::cuStreamSynchronize(stream),
        Err(_) => cu::cuCtxSynchronize(),
    };
    account(Part::MatrixProductWait, started);
    if result != cu::CUresult::CUDA_SUCCESS {
        record(format!("matrix product {m}x{k} @ {k}x{n} failed while running: {}", result_name(result)));
    }
}

/// The functions generated GPU code calls, by the names it calls them, for an execution engine.
pub fn runtime_symbols() -> Vec<(&'static str, *mut ())> {
    vec![
        ("mgpuModuleLoadJIT", mgpuModuleLoadJIT as *mut ()),
        ("mgpuModuleLoad", mgpuModuleLoad as *mut ()),
        ("mgpuModuleUnload", mgpuModuleUnload as *mut ()),
        ("mgpuModuleGetFunction", mgpuModuleGetFunction as *mut ()),
        ("mgpuLaunchKernel", mgpuLaunchKernel as *mut ()),
        ("mgpuStreamCreate", mgpuStreamCreate as *mut ()),
        ("mgpuStreamSynchronize", mgpuStreamSynchronize as *mut ()),
        ("curv_cuda_ordered_launches", curv_cuda_ordered_launches as *mut ()),
        ("mgpuStreamDestroy", mgpuStreamDestroy as *mut ()),
        ("mgpuMemAlloc", mgpuMemAlloc as *mut ()),
        ("mgpuMemFree", mgpuMemFree as *mut ()),
        ("curv_cuda_free", curv_cuda_free as *mut ()),
        ("_mlir_ciface_curv_cuda_sgemm", _mlir_ciface_curv_cuda_sgemm as *mut ()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_every_entry_point_reports_instead_of_crashing() {
        match probe() {
            Ok(device) => {
                println!("CUDA device: {} ({}, {} MiB)", device.name, device.chip(), device.memory_bytes >> 20);
                return;
            }
            Err(error) => println!("skipped: no CUDA device ({error})"),
        }
        let error = ManagedBuffer::new(64).unwrap_err();
        assert!(error.to_string().starts_with("no CUDA device"), "{error}");
        // Resident tensors' memory and copies say so too.
        let error = ResidentBuffer::copy_of(&[1.0, 2.0]).err().expect("no buffer without a GPU");
        assert!(error.to_string().starts_with("no CUDA device"), "{error}");
        let mut word = [0u8; 8];
        let error = unsafe { copy_device_to_device(word.as_mut_ptr(), word.as_ptr(), 8) }.unwrap_err();
        assert!(error.to_string().starts_with("no CUDA device"), "{error}");
        let error = unsafe { read_device_floats(word.as_ptr(), 2) }.unwrap_err();
        assert!(error.starts_with("no CUDA device"), "{error}");
        take_error();
        unsafe {
            let module = mgpuModuleLoadJIT(c".version 8.0".as_ptr() as *mut c_void, 2);
            assert!(module.is_null());
            let function = mgpuModuleGetFunction(module, c"kernel".as_ptr());
            assert!(function.is_null());
            mgpuLaunchKernel(
                function,
                1,
                1,
                1,
                32,
                1,
                1,
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
            assert!(mgpuMemAlloc(16, std::ptr::null_mut(), true).is_null());
        }
        let first = take_error().expect("an error was kept");
        assert!(first.starts_with("no CUDA device"), "{first}");
        assert_eq!(take_error(), None);
    }

    #[test]
    fn launches_wait_unless_the_generated_code_running_on_the_thread_says_its_host_side_only_launches() {
        assert!(must_wait());
        curv_cuda_ordered_launches();
        // `CURV_CUDA_SYNC=each` keeps every wait.
        assert_eq!(must_wait(), wait_for_each());
        // Another thread's generated code still waits.
        assert!(std::thread::spawn(must_wait).join().unwrap());
        // `call_staged` clears it when the call ends.
        ORDERED_LAUNCHES.with(|ordered| ordered.set(false));
        assert!(must_wait());
    }

    #[test]
    fn a_module_names_its_kernel_and_source_in_its_first_line() {
        let ptx = "// curv kernel loss_and_gradients_kernel_3 at examples/siren.curv:12:5\n//\n.version 8.0\n";
        assert_eq!(kernel_source(ptx).as_deref(), Some("`loss_and_gradients_kernel_3` (examples/siren.curv:12:5)"));
        assert_eq!(kernel_source("//\n// Generated by LLVM NVPTX Back-End\n"), None);
    }

    #[test]
    fn matrix_layouts_map_to_cublas_operations() {
        // A row-major 3x4 matrix: its transpose stored column-major with ld 4.
        assert_eq!(blas_layout(3, 4, [4, 1]), Some((false, 4)));
        // A transposed view of a row-major 4x3 matrix: itself, column-major, ld 3.
        assert_eq!(blas_layout(3, 4, [1, 3]), Some((true, 3)));
        // A row of a wider matrix.
        assert_eq!(blas_layout(1, 4, [10, 1]), Some((false, 10)));
        // Strided in both dimensions: no layout.
        assert_eq!(blas_layout(3, 4, [8, 2]), None);
    }
}
