//! Calling compiled functions from the trainer: symbolic sizes read from the inputs, the kernel
//! key, and the marshalling of inputs into memref descriptors and of outputs back into values,
//! following `curv_ir::abi`. The JIT of `curv-mlir` and the standalone trainers of `curv build`
//! both call through here.

use crate::backend::Output;
use curv_interp::{DeviceStorage, InputRef, Inputs, Resident, Slot, Storage, Tensor, Value};
use curv_ir::abi::Signature;
use curv_ir::{DType, Dim, Function, Op};
use std::collections::HashMap;

/// Sizes of the function's symbolic dimensions, read from the inputs that carry them.
pub fn bindings_from_inputs(function: &Function, inputs: &Inputs<f32>) -> HashMap<String, i64> {
    let mut bindings = HashMap::new();
    for inst in &function.insts {
        let shape: Option<Vec<usize>> = match &inst.op {
            Op::Input { index, .. } if inputs.resident(&Slot::Input(*index)).is_some() => {
                inputs.resident(&Slot::Input(*index)).map(|resident| resident.shape.clone())
            }
            Op::Param { index } if inputs.resident(&Slot::Param(*index)).is_some() => {
                inputs.resident(&Slot::Param(*index)).map(|resident| resident.shape.clone())
            }
            Op::Input { index, .. } => inputs.input(*index).map(|input| match input {
                InputRef::Value(value) => value.shape().to_vec(),
                InputRef::Lent(lent) => lent.shape.clone(),
            }),
            Op::Param { index } => inputs.params.get(*index).map(|tensor| tensor.shape.clone()),
            _ => None,
        };
        if let Some(shape) = shape {
            for (dim, size) in inst.ty.shape.iter().zip(shape) {
                if let Dim::Symbol(name) = dim {
                    bindings.entry(name.clone()).or_insert(size as i64);
                }
            }
        }
    }
    bindings
}

enum Owned {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl Owned {
    fn pointer(&mut self) -> *mut u8 {
        match self {
            Owned::F32(values) => values.as_mut_ptr() as *mut u8,
            Owned::I32(values) => values.as_mut_ptr() as *mut u8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Owned::F32(values) => values.len(),
            Owned::I32(values) => values.len(),
        }
    }
}

/// An argument of a compiled function: a tensor of the inputs, passed without a copy, or a small
/// value made for the call (a hyperparameter, the step).
enum ArgumentData<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
    Made(Owned),
    /// A resident tensor in device memory: its address and element count.
    Device(*mut u8, usize),
}

impl ArgumentData<'_> {
    /// The address the descriptor points at. Generated code only reads its arguments: the lowering
    /// turns each into a tensor with `bufferization.to_tensor ... restrict` and no `writable`, so
    /// bufferisation never writes into it (it copies first if it must), and the pointer made from
    /// a shared slice is never written through.
    fn pointer(&mut self) -> *mut u8 {
        match self {
            ArgumentData::F32(values) => values.as_ptr() as *mut u8,
            ArgumentData::I32(values) => values.as_ptr() as *mut u8,
            ArgumentData::Made(owned) => owned.pointer(),
            ArgumentData::Device(address, _) => *address,
        }
    }

    fn len(&self) -> usize {
        match self {
            ArgumentData::F32(values) => values.len(),
            ArgumentData::I32(values) => values.len(),
            ArgumentData::Made(owned) => owned.len(),
            ArgumentData::Device(_, count) => *count,
        }
    }
}

fn argument_data<'a>(op: &Op, inputs: &'a Inputs<'a, f32>) -> Result<ArgumentData<'a>, String> {
    let value = |value: Option<&'a Value<f32>>, what: String| -> Result<ArgumentData<'a>, String> {
        match value {
            Some(Value::Real(tensor)) => Ok(ArgumentData::F32(&tensor.data)),
            Some(Value::Int(tensor)) => Ok(ArgumentData::I32(&tensor.data)),
            None => Err(format!("{what} was not provided")),
        }
    };
    let slot = match op {
        Op::Input { index, .. } => Some(Slot::Input(*index)),
        Op::Param { index } => Some(Slot::Param(*index)),
        Op::Data { source, field } => Some(Slot::Data(source.clone(), field.clone())),
        _ => None,
    };
    // A resident tensor is read where the backend keeps it.
    if let Some(resident) = slot.and_then(|slot| inputs.resident(&slot)) {
        if resident.shape.iter().product::<usize>() != resident.tensor.len() {
            return Err(format!("a view of shape {:?} of {} elements", resident.shape, resident.tensor.len()));
        }
        return Ok(match &resident.tensor.storage {
            Storage::Host(data) => ArgumentData::F32(data),
            Storage::Device(device) if device.on_device() => ArgumentData::Device(device.address(), device.len()),
            // Host memory lent in this form is read where it is, as a tensor's data is.
            Storage::Device(device) => ArgumentData::F32(
                // SAFETY: the storage's memory holds `len` floats and outlives the call.
                unsafe { std::slice::from_raw_parts(device.address() as *const f32, device.len()) },
            ),
        });
    }
    match op {
        Op::Input { index, name } => match inputs.input(*index) {
            // A lent tensor is read where its owner keeps it.
            Some(InputRef::Lent(lent)) => Ok(ArgumentData::F32(lent.data)),
            Some(InputRef::Value(input)) => value(Some(input), format!("input `{name}`")),
            None => value(None, format!("input `{name}`")),
        },
        Op::Param { index } => inputs
            .params
            .get(*index)
            .map(|tensor| ArgumentData::F32(&tensor.data))
            .ok_or_else(|| format!("parameter #{index} was not provided")),
        Op::Data { source, field } => {
            value(inputs.data.get(&(source.clone(), field.clone())), format!("data `{source}.{field}`"))
        }
        Op::Hyper { name } => inputs
            .hyperparameters
            .get(name)
            .map(|value| ArgumentData::Made(Owned::F32(vec![*value as f32])))
            .ok_or_else(|| format!("hyperparameter `{name}` was not provided")),
        Op::Step => Ok(ArgumentData::Made(Owned::F32(vec![inputs.step as f32]))),
        Op::Statistic { kind } => inputs
            .statistics
            .get(kind)
            .map(|tensor| ArgumentData::F32(&tensor.data))
            .ok_or_else(|| format!("statistic `{kind}` was not provided")),
        other => Err(format!("`{}` is not an argument", other.name())),
    }
}

/// A rank-N strided memref descriptor as the C interface lays it out:
/// `{allocated, aligned, offset, sizes[N], strides[N]}` in 64-bit words.
pub fn descriptor(pointer: *mut u8, shape: &[i64]) -> Vec<i64> {
    let mut words = vec![pointer as i64, pointer as i64, 0];
    words.extend_from_slice(shape);
    let mut stride = 1i64;
    let mut strides = vec![0i64; shape.len()];
    for axis in (0..shape.len()).rev() {
        strides[axis] = stride;
        stride *= shape[axis];
    }
    words.extend(strides);
    words
}

/// Calls the compiled code on packed arguments (one pointer per argument then per output, each
/// pointing at the pointer to its memref descriptor), with a flag per buffer that says whether it
/// is in device memory already.
pub type Invoke<'a> = dyn FnMut(&mut [*mut ()], &[bool]) -> Result<(), String> + 'a;

/// Where a compiled call puts an output the caller keeps resident: `None` for host memory (a CPU
/// backend), or a GPU backend's allocation of device memory for so many `f32` elements.
pub type DeviceAllocator<'a> = Option<&'a dyn Fn(usize) -> Result<Box<dyn DeviceStorage<f32>>, String>>;

/// Calls a compiled function with `inputs`: points descriptors at the argument tensors (no copy; see
/// `ArgumentData::pointer`), allocates the outputs, and hands `invoke` the packed arguments (one
/// pointer per argument, each pointing at the pointer to its memref descriptor), then collects the
/// outputs by name.
pub fn call_compiled(
    signature: &Signature,
    inputs: &Inputs<f32>,
    invoke: &mut Invoke,
) -> Result<Vec<(String, Value<f32>)>, String> {
    crate::backend::host_outputs(call_compiled_keeping(signature, inputs, &|_| false, None, invoke)?)
}

/// [`call_compiled`] with resident tensors among the inputs (`Inputs::resident`) and the `f32`
/// outputs that `keep` names kept resident: in host memory, or, with a `device` allocator, in
/// device memory that the call writes where it is. `invoke` gets, with the packed arguments, one
/// flag per argument and output saying whether it is in device memory already (a GPU call stages
/// the others through the device, and leaves these where they are).
pub fn call_compiled_keeping(
    signature: &Signature,
    inputs: &Inputs<f32>,
    keep: &dyn Fn(&str) -> bool,
    device: DeviceAllocator,
    invoke: &mut Invoke,
) -> Result<Vec<(String, Output<f32>)>, String> {
    let mut arguments: Vec<ArgumentData> = Vec::with_capacity(signature.arguments.len());
    for argument in &signature.arguments {
        let data = argument_data(&argument.op, inputs)?;
        let count: i64 = argument.shape.iter().product();
        if data.len() as i64 != count {
            return Err(format!("an argument of {} elements where {count} are expected", data.len()));
        }
        arguments.push(data);
    }
    /// Where an output is written.
    enum OutputData {
        Host(Owned),
        Device(Box<dyn DeviceStorage<f32>>),
    }
    let mut outputs: Vec<(OutputData, bool)> = Vec::with_capacity(signature.outputs.len());
    for (name, shape, dtype) in &signature.outputs {
        let count = shape.iter().product::<i64>() as usize;
        let kept = *dtype != DType::I32 && keep(name);
        outputs.push(match (*dtype, kept, device) {
            (DType::I32, _, _) => (OutputData::Host(Owned::I32(vec![0; count])), false),
            (_, true, Some(allocate)) => (OutputData::Device(allocate(count)?), true),
            (_, kept, _) => (OutputData::Host(Owned::F32(output_buffer(count))), kept),
        });
    }
    let on_device: Vec<bool> = arguments
        .iter()
        .map(|data| matches!(data, ArgumentData::Device(..)))
        .chain(outputs.iter().map(|(data, _)| matches!(data, OutputData::Device(_))))
        .collect();
    let mut descriptors: Vec<Vec<i64>> = arguments
        .iter_mut()
        .zip(&signature.arguments)
        .map(|(data, argument)| descriptor(data.pointer(), &argument.shape))
        .chain(outputs.iter_mut().zip(&signature.outputs).map(|((data, _), (_, shape, _))| {
            let pointer = match data {
                OutputData::Host(owned) => owned.pointer(),
                OutputData::Device(storage) => storage.address(),
            };
            descriptor(pointer, shape)
        }))
        .collect();
    let mut descriptor_pointers: Vec<*mut i64> = descriptors.iter_mut().map(|words| words.as_mut_ptr()).collect();
    let mut slots: Vec<*mut ()> =
        descriptor_pointers.iter_mut().map(|pointer| pointer as *mut *mut i64 as *mut ()).collect();
    invoke(&mut slots, &on_device)?;
    let mut results = Vec::with_capacity(signature.outputs.len());
    for ((name, shape, _), (data, kept)) in signature.outputs.iter().zip(outputs) {
        let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
        results.push((
            name.clone(),
            match data {
                OutputData::Host(Owned::F32(values)) if kept => Output::Resident(Resident::host(shape, values)),
                OutputData::Host(Owned::F32(values)) => Output::Value(Value::Real(Tensor::new(shape, values))),
                OutputData::Host(Owned::I32(values)) => Output::Value(Value::Int(Tensor::new(shape, values))),
                OutputData::Device(storage) => Output::Resident(Resident { shape, storage: Storage::Device(storage) }),
            },
        ));
    }
    Ok(results)
}

/// Buffers at least this large (in elements) are worth keeping for reuse.
const RECYCLED_MINIMUM: usize = 8192;
/// How many spare buffers a thread keeps at most.
const RECYCLED_COUNT: usize = 32;

thread_local! {
    /// Spare output buffers ([`recycle`]), reused by the next calls whose outputs have their sizes.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer for an output of `count` elements: a spare one of that size if there is one (its old
/// contents are overwritten whole by the call), otherwise a new one.
fn output_buffer(count: usize) -> Vec<f32> {
    if count >= RECYCLED_MINIMUM {
        let spare = SPARE_BUFFERS.with(|spare| {
            let mut spare = spare.borrow_mut();
            spare.iter().position(|buffer| buffer.len() == count).map(|index| spare.swap_remove(index))
        });
        if let Some(buffer) = spare {
            return buffer;
        }
    }
    vec![0.0; count]
}

/// Gives back a buffer a compiled call returned (an output the caller is done with), so that a
/// later call's output of the same size reuses it instead of allocating and zeroing a new one:
/// a library's optimizer step, which hands back its outputs once they are committed, then
/// allocates nothing for its large tensors after its first steps. Small buffers are dropped, and
/// a thread keeps at most [`RECYCLED_COUNT`] spare ones.
pub fn recycle(buffer: Vec<f32>) {
    if buffer.len() >= RECYCLED_MINIMUM {
        SPARE_BUFFERS.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < RECYCLED_COUNT {
                spare.push(buffer);
            }
        });
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(parameter: i32, value: i32) -> i32;
}

/// Compiled kernels allocate their temporaries with `malloc` on every call. glibc serves blocks
/// above 128 KiB with fresh `mmap`s, so every step would fault in and zero its temporaries again;
/// raising the thresholds keeps those blocks in the heap for reuse.
pub fn keep_large_allocations_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        mallopt(M_MMAP_THRESHOLD, 1 << 30);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_buffer_given_back_is_reused_for_the_next_output_of_its_size_and_small_ones_are_not_kept() {
        let buffer = vec![1.0f32; RECYCLED_MINIMUM];
        let address = buffer.as_ptr();
        recycle(buffer);
        let other_size = output_buffer(RECYCLED_MINIMUM + 1);
        assert_ne!(other_size.as_ptr(), address, "a buffer of another size is not handed out");
        let reused = output_buffer(RECYCLED_MINIMUM);
        assert_eq!(reused.as_ptr(), address);
        let fresh = output_buffer(RECYCLED_MINIMUM);
        assert_ne!(fresh.as_ptr(), address, "a spare buffer is handed out once");
        recycle(vec![0.0f32; 16]);
        SPARE_BUFFERS.with(|spare| assert!(spare.borrow().is_empty()));
        for _ in 0..RECYCLED_COUNT + 4 {
            recycle(vec![0.0f32; RECYCLED_MINIMUM]);
        }
        SPARE_BUFFERS.with(|spare| assert_eq!(spare.borrow().len(), RECYCLED_COUNT));
    }
}
