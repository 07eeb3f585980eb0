//! The MLIR backend of the training runtime: each IR function the trainer evaluates is lowered,
//! compiled once per key (and parameter size) for the CPU or a CUDA GPU, and then called on the
//! trainer's buffers.

use crate::jit::{compile, compile_for_cuda, CompiledFunction};
use crate::lower::{lower_function_for_gpu, lower_function_with_locations};
use curv_interp::{Inputs, Resident, Tensor, Value};
use curv_ir::Function;
use curv_runtime::backend::{host_outputs, keep_outputs, Output};
use curv_runtime::compiled::{bindings_from_inputs, call_compiled_keeping, DeviceAllocator};
use curv_runtime::Backend;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A compiled function, or the reason it runs on the interpreter instead.
enum Entry {
    /// A compiled function, shared by every key whose lowered module is the same text (the
    /// update groups of one rule over parameters of the same sizes), and the key's signature,
    /// which says which of the key's inputs go in which slot.
    Compiled(Rc<CompiledFunction>, curv_ir::abi::Signature),
    Cached(crate::cache::CachedKernel, curv_ir::abi::Signature),
    Interpreted,
}

/// Compiles functions on first use and keeps them. A function with an op the lowering does not
/// handle yet runs on the reference interpreter, with a note on standard error the first time.
pub struct MlirBackend {
    optimization_level: usize,
    compiled: RefCell<HashMap<String, Entry>>,
    /// The CPU functions compiled so far, by the SHA-256 of their module's text: 10^5
    /// parameters made 782 update groups of 128 with one text, each compiled on its own.
    by_text: RefCell<HashMap<[u8; 32], Rc<CompiledFunction>>>,
    compile_seconds: std::cell::Cell<f64>,
    /// The artifact cache, when the environment allows one (see `crate::cache`).
    cache: Option<crate::cache::KernelCache>,
    /// The GPU the functions run on; none for the CPU.
    gpu: Option<crate::gpu::GpuTarget>,
    /// Where a function's code is in the sources: a GPU kernel's PTX names it, for its errors.
    locate: Option<curv_runtime::backend::SourceLocator>,
}

impl MlirBackend {
    pub fn new(optimization_level: usize) -> MlirBackend {
        curv_runtime::compiled::keep_large_allocations_in_the_heap();
        MlirBackend {
            optimization_level,
            compiled: RefCell::new(HashMap::new()),
            by_text: RefCell::new(HashMap::new()),
            compile_seconds: std::cell::Cell::new(0.0),
            cache: crate::cache::KernelCache::from_environment(),
            gpu: None,
            locate: None,
        }
    }

    /// A backend whose functions run on the CUDA GPU `curv_cuda::probe` finds, with PTX for its
    /// chip (`sm_90` from compute capability 9.0 on, `sm_80` for 8.x, which the driver's JIT
    /// also runs on 8.6 and 8.9). Without a usable GPU, the reason.
    pub fn for_cuda(optimization_level: usize) -> Result<MlirBackend, String> {
        let target = gpu_target(&curv_cuda::probe().map_err(|error| error.to_string())?)?;
        let mut backend = MlirBackend::new(optimization_level);
        // Kernels for the GPU are compiled in the process each run (the cache holds CPU code).
        backend.cache = None;
        backend.gpu = Some(target);
        Ok(backend)
    }
}

/// The PTX target for a device.
pub fn gpu_target(device: &curv_cuda::DeviceInfo) -> Result<crate::gpu::GpuTarget, String> {
    match device.compute_capability {
        (major, _) if major >= 9 => Ok(crate::gpu::GpuTarget::Sm90),
        (8, _) => Ok(crate::gpu::GpuTarget::Sm80),
        _ => Err(format!(
            "the GPU {} ({}) is older than curv supports: it generates PTX for sm_80 and sm_90",
            device.name,
            device.chip()
        )),
    }
}

impl Backend<f32> for MlirBackend {
    fn name(&self) -> &'static str {
        "mlir"
    }

    fn compile_seconds(&self) -> f64 {
        self.compile_seconds.get()
    }

    fn locate_sources(&mut self, locate: curv_runtime::backend::SourceLocator) {
        self.locate = Some(locate);
    }

    fn outputs(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<f32>,
    ) -> Result<Vec<(String, Value<f32>)>, String> {
        host_outputs(self.outputs_keeping(key, function, inputs, &|_| false)?)
    }

    fn keeps_resident(&self) -> bool {
        self.gpu.is_some()
    }

    fn outputs_keeping(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<f32>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Output<f32>)>, String> {
        let bindings = bindings_from_inputs(function, inputs);
        let cache_key = curv_ir::abi::kernel_key(key, &bindings);
        let mut compiled = self.compiled.borrow_mut();
        if !compiled.contains_key(&cache_key) {
            let entry = self.compile_entry(key, function, &bindings, compiled.len())?;
            compiled.insert(cache_key.clone(), entry);
        }
        let device: DeviceAllocator = self.gpu.is_some().then_some(&curv_cuda::allocate_resident as _);
        match &compiled[&cache_key] {
            Entry::Compiled(function, signature) => {
                call_compiled_keeping(signature, inputs, keep, device, &mut |slots, on_device| {
                    function.call_packed_resident(slots, on_device).map_err(|error| error.message)
                })
            }
            Entry::Cached(kernel, signature) => {
                call_compiled_keeping(signature, inputs, keep, None, &mut |slots, on_device| {
                    if on_device.iter().any(|&resident| resident) {
                        return Err("a CPU kernel cannot read device memory".to_string());
                    }
                    kernel.call_packed(slots);
                    Ok(())
                })
            }
            Entry::Interpreted => {
                // The interpreter reads resident tensors through host copies; the kept outputs
                // are uploaded back.
                keep_outputs(self, curv_runtime::Interpreter.outputs(key, function, inputs)?, keep)
            }
        }
    }

    fn upload(&self, tensor: Tensor<f32>) -> Result<Resident<f32>, String> {
        match self.gpu {
            Some(_) => curv_cuda::upload(tensor),
            None => Ok(Resident::host(tensor.shape, tensor.data)),
        }
    }
}

impl MlirBackend {
    /// Lowers and compiles `function` for the call of `key` with `bindings` (the `count`-th
    /// function of the backend), or picks the interpreter for it.
    fn compile_entry(
        &self,
        key: &str,
        function: &Function,
        bindings: &HashMap<String, i64>,
        count: usize,
    ) -> Result<Entry, String> {
        let started = std::time::Instant::now();
        // CPU functions live in their own engines or shared objects and share one name, so that
        // functions that differ only by key have the same text.
        let name = if self.gpu.is_none() { crate::cache::KERNEL_NAME.to_string() } else { format!("kernel_{count}") };
        // On the GPU the kernels carry their source locations, which their PTX keeps.
        let locate =
            |span: curv_grammar::Span| self.locate.as_ref().map_or(String::new(), |locate| locate(key, span.start));
        let located =
            (self.gpu.is_some() && self.locate.is_some()).then_some(&locate as &dyn Fn(curv_grammar::Span) -> String);
        let lowered = if self.gpu.is_some() {
            lower_function_for_gpu(function, &name, bindings, located)
        } else {
            lower_function_with_locations(function, &name, bindings, located)
        };
        let entry = match lowered {
            Ok((text, signature)) if self.gpu.is_some() => Entry::Compiled(
                Rc::new(
                    compile_for_cuda(
                        &text,
                        &name,
                        signature.clone(),
                        self.gpu.unwrap_or(crate::gpu::GpuTarget::Sm90),
                        self.optimization_level,
                    )
                    .map_err(|error| error.message)?,
                ),
                signature,
            ),
            Ok((text, signature)) => {
                let digest: [u8; 32] = {
                    use sha2::Digest;
                    sha2::Sha256::digest(text.as_bytes()).into()
                };
                let shared = self.by_text.borrow().get(&digest).cloned();
                let cached = match shared {
                    Some(_) => None,
                    None => {
                        self.cache.as_ref().and_then(|cache| cache.load_or_build(&text, self.optimization_level).ok())
                    }
                };
                match (shared, cached) {
                    (Some(function), _) => Entry::Compiled(function, signature),
                    (None, Some((kernel, _))) => Entry::Cached(kernel, signature),
                    (None, None) => {
                        let function = Rc::new(
                            compile(&text, &name, signature.clone(), self.optimization_level)
                                .map_err(|error| error.message)?,
                        );
                        self.by_text.borrow_mut().insert(digest, function.clone());
                        Entry::Compiled(function, signature)
                    }
                }
            }
            Err(error) => {
                eprintln!("note: {}; `{key}` runs on the reference interpreter", error.message);
                Entry::Interpreted
            }
        };
        self.compile_seconds.set(self.compile_seconds.get() + started.elapsed().as_secs_f64());
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curv_ir::{BinaryOp, DType, Op, TensorType};

    /// `y = x * x` over the parameter `index`, `f32[4]`.
    fn square(index: usize) -> Function {
        let mut function = Function::new("f");
        let ty = TensorType::known(DType::F32, &[4]);
        let x = function.push(Op::Param { index }, vec![], ty.clone(), Default::default());
        let y = function.push(Op::Binary(BinaryOp::Mul), vec![x, x], ty, Default::default());
        function.outputs.push(("y".into(), y));
        function
    }

    #[test]
    fn keys_whose_functions_have_one_text_share_one_compiled_function_and_keep_their_inputs() {
        let mut backend = MlirBackend::new(2);
        backend.cache = None;
        let inputs = Inputs::<f32> {
            params: vec![Tensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0]), Tensor::new(vec![4], vec![5.0; 4])],
            ..Default::default()
        };
        // The functions read different parameters (their signatures differ), with one text.
        let first = backend.outputs("group0", &square(0), &inputs).unwrap();
        let second = backend.outputs("group1", &square(1), &inputs).unwrap();
        assert_eq!(backend.by_text.borrow().len(), 1, "one function compiled for both keys");
        assert_eq!(backend.compiled.borrow().len(), 2);
        let values = |outputs: &[(String, Value<f32>)]| match &outputs[0].1 {
            Value::Real(tensor) => tensor.data.clone(),
            Value::Int(_) => panic!("an integer output"),
        };
        assert_eq!(values(&first), [1.0, 4.0, 9.0, 16.0]);
        assert_eq!(values(&second), [25.0; 4]);
    }
}
