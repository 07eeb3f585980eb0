"""The Python side of a library `curv build --lib` wrote (`lib@NAME@.so` next to this file): a
thin ctypes binding of its C ABI (`@NAME@.h`) and a `torch.optim.Optimizer` whose step is the
optimizer of the `.curv` file, compiled; for JAX the same optimizer and train step as `jax.ffi`
calls.

    import @NAME@
    optimizer = @NAME@.Optimizer(model_parameters, lr=1e-3)   # in the .curv file's order
    loss.backward(); optimizer.step()

    optimizer = @NAME@.JaxOptimizer(lr=1e-3)                   # JAX: new parameters returned
    params = optimizer.step(params, grads)

Parameters are passed to the library as DLPack tensors and updated in place (float32 tensors run
the compiled kernels, float64 tensors the interpreter); the library checks every tensor (device,
dtype, shape, contiguity) and raises `CurvError` with its message instead of crashing.
"""

import ctypes
import os

_LIBRARY = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib@NAME@.so"))

OK, INVALID_ARGUMENT, RUNTIME_ERROR, CONTEXT_ERROR = 0, 1, 2, 3

_LIBRARY.curv_config_new.restype = ctypes.c_void_p
_LIBRARY.curv_config_free.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_config_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_double]
_LIBRARY.curv_config_set.restype = ctypes.c_int
_LIBRARY.curv_context_new.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_context_new.restype = ctypes.c_void_p
_LIBRARY.curv_context_free.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_context_error.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_context_error.restype = ctypes.c_char_p
_LIBRARY.curv_context_error_code.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_context_error_code.restype = ctypes.c_int
_LIBRARY.curv_param_count.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_param_count.restype = ctypes.c_int64
_LIBRARY.curv_param_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_LIBRARY.curv_param_name.restype = ctypes.c_char_p
_LIBRARY.curv_param_shape.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
_LIBRARY.curv_param_shape.restype = ctypes.c_int64
_LIBRARY.curv_optimizer_steps.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_optimizer_steps.restype = ctypes.c_int64
_LIBRARY.curv_optimizer_reset.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_optimizer_reset.restype = ctypes.c_int
_LIBRARY.curv_optimizer_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
_LIBRARY.curv_optimizer_step.restype = ctypes.c_int
_LIBRARY.curv_state_save.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_LIBRARY.curv_state_save.restype = ctypes.c_int
_LIBRARY.curv_state_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_LIBRARY.curv_state_load.restype = ctypes.c_int
_LIBRARY.curv_state_resident.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_state_resident.restype = ctypes.c_int
_LIBRARY.curv_input_count.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_input_count.restype = ctypes.c_int64
_LIBRARY.curv_input_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_LIBRARY.curv_input_name.restype = ctypes.c_char_p
_LIBRARY.curv_input_shape.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
_LIBRARY.curv_input_shape.restype = ctypes.c_int64
_LIBRARY.curv_train_step.argtypes = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_double)
]
_LIBRARY.curv_train_step.restype = ctypes.c_int

_LIBRARY.curv_model_input_count.argtypes = [ctypes.c_void_p]
_LIBRARY.curv_model_input_count.restype = ctypes.c_int64
_LIBRARY.curv_model_input_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_LIBRARY.curv_model_input_name.restype = ctypes.c_char_p
_LIBRARY.curv_model_output_shape.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
_LIBRARY.curv_model_output_shape.restype = ctypes.c_int64
_LIBRARY.curv_model_forward.argtypes = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p
]
_LIBRARY.curv_model_forward.restype = ctypes.c_int
_LIBRARY.curv_model_backward.argtypes = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
]
_LIBRARY.curv_model_backward.restype = ctypes.c_int

_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_GetPointer.restype = ctypes.c_void_p


def _pointer(capsule):
    return None if capsule is None else _PyCapsule_GetPointer(capsule, b"dltensor")


def _pointers(capsules):
    return (ctypes.c_void_p * max(len(capsules), 1))(*[_pointer(capsule) for capsule in capsules])


class CurvError(RuntimeError):
    """A call of the library failed; `code` is its error code (CURV_*), `stable_code` the stable
    code of docs/errors.md that the message starts with (such as "E0502"), or None."""

    def __init__(self, code, message, stable_code=None):
        super().__init__(message)
        self.code = code
        self.stable_code = stable_code


def _stable_code(context):
    """The stable code of the context's last error ("E0502"), or None."""
    number = _LIBRARY.curv_context_error_code(context)
    return f"E{number:04d}" if number > 0 else None


class Context:
    """A context of the library (the C ABI's `curv_context`), with its optimizer state."""

    def __init__(self, lr=None):
        config = _LIBRARY.curv_config_new()
        try:
            if lr is not None and _LIBRARY.curv_config_set(config, b"lr", float(lr)) != OK:
                raise CurvError(INVALID_ARGUMENT, f"lr must be finite and positive, not {lr!r}")
            self._context = _LIBRARY.curv_context_new(config)
        finally:
            _LIBRARY.curv_config_free(config)
        count = _LIBRARY.curv_param_count(self._context)
        message = _LIBRARY.curv_context_error(self._context)
        if message is not None:
            raise CurvError(CONTEXT_ERROR, message.decode(), _stable_code(self._context))
        self.names = [_LIBRARY.curv_param_name(self._context, index).decode() for index in range(count)]
        self.shapes = []
        for index in range(count):
            dims = (ctypes.c_int64 * 8)()
            rank = _LIBRARY.curv_param_shape(self._context, index, dims, 8)
            self.shapes.append(tuple(dims[axis] for axis in range(rank)))
        # The train step's inputs: name, batch shape, whether int32 (labels).
        self.inputs = []
        for index in range(_LIBRARY.curv_input_count(self._context)):
            dims = (ctypes.c_int64 * 8)()
            integer = ctypes.c_int(0)
            rank = _LIBRARY.curv_input_shape(self._context, index, dims, 8, ctypes.byref(integer))
            name = _LIBRARY.curv_input_name(self._context, index).decode()
            self.inputs.append((name, tuple(dims[axis] for axis in range(rank)), bool(integer.value)))
        # The model on its own: its inputs (by name, shapes as above) and output shape, if any.
        count = _LIBRARY.curv_model_input_count(self._context)
        self.model_inputs = [_LIBRARY.curv_model_input_name(self._context, index).decode() for index in range(max(count, 0))]
        dims = (ctypes.c_int64 * 8)()
        rank = _LIBRARY.curv_model_output_shape(self._context, dims, 8)
        self.model_output_shape = tuple(dims[axis] for axis in range(rank)) if rank >= 0 else None

    def __del__(self):
        context = getattr(self, "_context", None)
        if context:
            _LIBRARY.curv_context_free(context)
            self._context = None

    def _check(self, code):
        if code != OK:
            message = _LIBRARY.curv_context_error(self._context)
            raise CurvError(code, message.decode() if message else f"error code {code}", _stable_code(self._context))

    @property
    def steps(self):
        return _LIBRARY.curv_optimizer_steps(self._context)

    def step_dlpack(self, params, grads):
        """One step over DLPack capsules (or None, passed as a null pointer)."""
        keep = list(params) + list(grads)

        def pointer(capsule):
            return None if capsule is None else _PyCapsule_GetPointer(capsule, b"dltensor")

        param_pointers = (ctypes.c_void_p * len(params))(*[pointer(capsule) for capsule in params])
        grad_pointers = (ctypes.c_void_p * len(grads))(*[pointer(capsule) for capsule in grads])
        count = len(params)
        code = _LIBRARY.curv_optimizer_step(self._context, count, param_pointers, grad_pointers)
        del keep
        self._check(code)

    def train_step_dlpack(self, params, inputs):
        """One train step over DLPack capsules; returns the batch's loss."""
        keep = list(params) + list(inputs)

        def pointer(capsule):
            return None if capsule is None else _PyCapsule_GetPointer(capsule, b"dltensor")

        param_pointers = (ctypes.c_void_p * len(params))(*[pointer(capsule) for capsule in params])
        input_pointers = (ctypes.c_void_p * len(inputs))(*[pointer(capsule) for capsule in inputs])
        loss = ctypes.c_double(float("nan"))
        code = _LIBRARY.curv_train_step(self._context, len(params), param_pointers, len(inputs), input_pointers, ctypes.byref(loss))
        del keep
        self._check(code)
        return loss.value

    def model_forward_dlpack(self, params, inputs, output):
        keep = list(params) + list(inputs) + [output]
        code = _LIBRARY.curv_model_forward(
            self._context, len(params), _pointers(params), len(inputs), _pointers(inputs), _pointer(output)
        )
        del keep
        self._check(code)

    def model_backward_dlpack(self, params, inputs, cotangent, param_grads, input_grads):
        keep = list(params) + list(inputs) + [cotangent] + list(param_grads) + list(input_grads)
        code = _LIBRARY.curv_model_backward(
            self._context, len(params), _pointers(params), len(inputs), _pointers(inputs), _pointer(cotangent),
            _pointers(param_grads), _pointers(input_grads),
        )
        del keep
        self._check(code)

    def reset(self):
        """No state and step 0 again."""
        self._check(_LIBRARY.curv_optimizer_reset(self._context))

    @property
    def state_resident(self):
        """Whether the optimizer state is kept where the kernels run between steps (on the GPU
        for a CUDA library)."""
        return _LIBRARY.curv_state_resident(self._context) == 1

    def save(self, path):
        self._check(_LIBRARY.curv_state_save(self._context, os.fsencode(path)))

    def load(self, path):
        self._check(_LIBRARY.curv_state_load(self._context, os.fsencode(path)))


try:
    import torch

    class Optimizer(torch.optim.Optimizer):
        """The `.curv` file's optimizer over `params` (in the file's parameter order, with its
        shapes): `step()` updates them in place through the library."""

        def __init__(self, params, lr=None):
            params = list(params)
            self.context = Context(lr=lr)
            super().__init__(params, {"lr": lr})
            if len(params) != len(self.context.names):
                raise CurvError(
                    INVALID_ARGUMENT,
                    f"{len(params)} parameters given where the optimizer has {len(self.context.names)} ({', '.join(self.context.names)})",
                )

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            params = [param for group in self.param_groups for param in group["params"]]
            grads = []
            for param, name in zip(params, self.context.names):
                if param.grad is None:
                    raise CurvError(INVALID_ARGUMENT, f"`{name}` has no gradient")
                grads.append(param.grad)
            self.context.step_dlpack(
                [torch.utils.dlpack.to_dlpack(param.detach()) for param in params],
                [torch.utils.dlpack.to_dlpack(grad.detach()) for grad in grads],
            )
            return loss

        def state_dict_path(self, path):
            self.context.save(path)

        def load_state_path(self, path):
            self.context.load(path)

    class TrainStep:
        """The `.curv` file's whole train step (forward, backward, curvature statistics, update)
        on batches from PyTorch: `loss = step(params, x, y)` updates `params` in place. Labels
        are converted to int32; float inputs to the parameters' dtype."""

        def __init__(self, lr=None):
            self.context = Context(lr=lr)

        @torch.no_grad()
        def __call__(self, params, *inputs):
            params = [param.detach() for param in params]
            converted = []
            for tensor, (name, shape, integer) in zip(inputs, self.context.inputs):
                tensor = tensor.detach()
                tensor = tensor.to(torch.int32) if integer else tensor.to(params[0].dtype)
                converted.append(tensor.contiguous())
            if len(inputs) != len(self.context.inputs):
                raise CurvError(INVALID_ARGUMENT, f"{len(inputs)} inputs given where the step reads {len(self.context.inputs)}")
            return self.context.train_step_dlpack(
                [torch.utils.dlpack.to_dlpack(param) for param in params],
                [torch.utils.dlpack.to_dlpack(tensor) for tensor in converted],
            )

    _MODEL_CONTEXT = None

    def _model_context():
        global _MODEL_CONTEXT
        if _MODEL_CONTEXT is None:
            _MODEL_CONTEXT = Context()
        return _MODEL_CONTEXT

    @torch.library.custom_op("curv_@NAME@::model", mutates_args=())
    def model(params: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
        """The `.curv` model's forward pass as a PyTorch operator (its backward is the library's
        generated vector-Jacobian product): `model(list(params), [x])`."""
        context = _model_context()
        if context.model_output_shape is None:
            raise CurvError(CONTEXT_ERROR, "the loss has no `logits` or `prediction` output: there is no model on its own")
        params = [param.detach().contiguous() for param in params]
        inputs = [tensor.detach().contiguous() for tensor in inputs]
        output = torch.empty(context.model_output_shape, dtype=params[0].dtype)
        context.model_forward_dlpack(
            [torch.utils.dlpack.to_dlpack(param) for param in params],
            [torch.utils.dlpack.to_dlpack(tensor) for tensor in inputs],
            torch.utils.dlpack.to_dlpack(output),
        )
        return output

    @model.register_fake
    def _model_fake(params, inputs):
        shape = _model_context().model_output_shape
        return params[0].new_empty(shape)

    @torch.library.custom_op("curv_@NAME@::model_backward", mutates_args=())
    def model_backward(params: list[torch.Tensor], inputs: list[torch.Tensor], cotangent: torch.Tensor) -> list[torch.Tensor]:
        context = _model_context()
        params = [param.detach().contiguous() for param in params]
        inputs = [tensor.detach().contiguous() for tensor in inputs]
        param_grads = [torch.empty_like(param) for param in params]
        input_grads = [torch.zeros_like(tensor) if tensor.is_floating_point() else torch.zeros(0) for tensor in inputs]
        context.model_backward_dlpack(
            [torch.utils.dlpack.to_dlpack(param) for param in params],
            [torch.utils.dlpack.to_dlpack(tensor) for tensor in inputs],
            torch.utils.dlpack.to_dlpack(cotangent.detach().contiguous()),
            [torch.utils.dlpack.to_dlpack(grad) for grad in param_grads],
            [torch.utils.dlpack.to_dlpack(grad) if tensor.is_floating_point() else None for grad, tensor in zip(input_grads, inputs)],
        )
        return param_grads + input_grads

    @model_backward.register_fake
    def _model_backward_fake(params, inputs, cotangent):
        return [param.new_empty(param.shape) for param in params] + [
            tensor.new_empty(tensor.shape) if tensor.is_floating_point() else tensor.new_empty(0, dtype=params[0].dtype) for tensor in inputs
        ]

    def _setup_context(ctx, inputs, output):
        params, model_inputs = inputs
        ctx.count = len(params)
        ctx.save_for_backward(*params, *model_inputs)

    def _backward(ctx, grad):
        saved = ctx.saved_tensors
        params, inputs = list(saved[: ctx.count]), list(saved[ctx.count :])
        grads = model_backward(params, inputs, grad)
        input_grads = [g if tensor.is_floating_point() else None for g, tensor in zip(grads[ctx.count :], inputs)]
        return list(grads[: ctx.count]), input_grads

    model.register_autograd(_backward, setup_context=_setup_context)

except ImportError:  # the C binding works without PyTorch
    pass


try:
    import jax
    import jax.numpy as jnp

    import numpy as _np

    # One name per loaded copy of the library (XLA refuses a name registered twice).
    _XLA_FORWARD = f"curv_@NAME@_{id(_LIBRARY):x}_model_forward"
    _XLA_BACKWARD = f"curv_@NAME@_{id(_LIBRARY):x}_model_backward"
    _XLA_OPTIMIZER_STEP = f"curv_@NAME@_{id(_LIBRARY):x}_optimizer_step"
    _XLA_TRAIN_STEP = f"curv_@NAME@_{id(_LIBRARY):x}_train_step"
    _XLA_REGISTERED = False

    def _register_xla_targets():
        global _XLA_REGISTERED
        if not _XLA_REGISTERED:
            for name, handler in (
                (_XLA_FORWARD, _LIBRARY.curv_xla_model_forward),
                (_XLA_BACKWARD, _LIBRARY.curv_xla_model_backward),
                (_XLA_OPTIMIZER_STEP, _LIBRARY.curv_xla_optimizer_step),
                (_XLA_TRAIN_STEP, _LIBRARY.curv_xla_train_step),
            ):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
            _XLA_REGISTERED = True

    def _model_layout():
        _register_xla_targets()
        context = _jax_context()
        if context.model_output_shape is None:
            raise CurvError(CONTEXT_ERROR, "the loss has no `logits` or `prediction` output: there is no model on its own")
        return context

    _JAX_CONTEXT = None

    def _jax_context():
        global _JAX_CONTEXT
        if _JAX_CONTEXT is None:
            _JAX_CONTEXT = Context()
        return _JAX_CONTEXT

    @jax.custom_vjp
    def jax_model(params, inputs):
        """The `.curv` model's forward pass in JAX (a `jax.ffi` call of the library), differentiable
        through the library's generated vector-Jacobian product: `jax_model(tuple(params), (x,))`."""
        context = _model_layout()
        result = jax.ShapeDtypeStruct(context.model_output_shape, params[0].dtype)
        return jax.ffi.ffi_call(_XLA_FORWARD, result)(*params, *inputs)

    def _jax_forward(params, inputs):
        return jax_model(params, inputs), (params, inputs)

    def _jax_backward(saved, cotangent):
        params, inputs = saved
        float_inputs = [x for x in inputs if jnp.issubdtype(x.dtype, jnp.floating)]
        results = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params] + [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in float_inputs]
        grads = jax.ffi.ffi_call(_XLA_BACKWARD, results)(*params, *inputs, cotangent)
        param_grads = tuple(grads[: len(params)])
        rest = iter(grads[len(params) :])
        input_grads = tuple(
            next(rest) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, dtype=jax.dtypes.float0) for x in inputs
        )
        return param_grads, input_grads

    jax_model.defvjp(_jax_forward, _jax_backward)

    class JaxOptimizer:
        """The `.curv` file's optimizer for JAX: `params = optimizer.step(params, grads)` returns
        the new parameters (a tuple, in the file's parameter order) and keeps the optimizer's
        state in the library. The step is a `jax.ffi` call of the library (side-effecting, so
        `jax.jit` keeps every call and its order); the new parameters alias the old ones, so
        under `jax.jit(..., donate_argnums=...)` XLA updates them in place. Float32 parameters run
        the compiled kernels, float64 ones (with `jax_enable_x64`) the interpreter."""

        def __init__(self, lr=None):
            _register_xla_targets()
            self.context = Context(lr=lr)

        @property
        def steps(self):
            return self.context.steps

        def step(self, params, grads):
            params, grads = tuple(params), tuple(grads)
            names = self.context.names
            if len(params) != len(names) or len(grads) != len(names):
                raise CurvError(
                    INVALID_ARGUMENT,
                    f"{len(params)} parameters and {len(grads)} gradients given where the optimizer has {len(names)} ({', '.join(names)})",
                )
            count = len(params)
            call = jax.ffi.ffi_call(
                _XLA_OPTIMIZER_STEP,
                tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params),
                has_side_effect=True,
                input_output_aliases={index: index for index in range(count)},
            )
            return tuple(call(*params, *grads, context=_np.uint64(self.context._context)))

        def reset(self):
            self.context.reset()

        def save(self, path):
            self.context.save(path)

        def load(self, path):
            self.context.load(path)

    class JaxTrainStep:
        """The `.curv` file's whole train step (forward, backward, curvature statistics, update)
        for JAX: `params, loss = step(params, *inputs)`, the inputs in the order of
        `step.context.inputs` (labels int32, the rest in the parameters' dtype). A side-effecting
        `jax.ffi` call, usable under `jax.jit`; the state stays in the library."""

        def __init__(self, lr=None):
            _register_xla_targets()
            self.context = Context(lr=lr)

        def __call__(self, params, *inputs):
            params = tuple(params)
            if len(params) != len(self.context.names):
                raise CurvError(INVALID_ARGUMENT, f"{len(params)} parameters given where the train step has {len(self.context.names)}")
            if len(inputs) != len(self.context.inputs):
                raise CurvError(INVALID_ARGUMENT, f"{len(inputs)} inputs given where the step reads {len(self.context.inputs)}")
            dtype = params[0].dtype
            inputs = tuple(
                jnp.asarray(x, dtype=jnp.int32 if integer else dtype) for x, (_, _, integer) in zip(inputs, self.context.inputs)
            )
            count = len(params)
            call = jax.ffi.ffi_call(
                _XLA_TRAIN_STEP,
                tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params) + (jax.ShapeDtypeStruct((), dtype),),
                has_side_effect=True,
                input_output_aliases={index: index for index in range(count)},
            )
            results = call(*params, *inputs, context=_np.uint64(self.context._context))
            return tuple(results[:count]), results[count]

except ImportError:  # the C binding works without JAX
    pass
