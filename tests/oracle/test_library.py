"""`curv build --lib`: the C ABI and the PyTorch optimizer over it (issue 7's first part).

A library is built from examples/optimizers/adam.curv and examples/optimizers/shampoo.curv; a
PyTorch model with the same parameters is trained 20 steps with the library's optimizer and with
torch.optim.Adam (float32 through the compiled kernels, float64 through the interpreter), the
optimizer state survives a save and load, and every kind of ABI misuse returns an error code with
a message instead of crashing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CURV = os.environ.get("CURV", str(ROOT / "target" / "debug" / "curv"))


def build(example, directory, *options):
    result = subprocess.run(
        [CURV, "build", "--lib", *options, str(ROOT / "examples" / "optimizers" / f"{example}.curv"), "-o", str(directory)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in (f"lib{example}.so", f"{example}.h", f"{example}.py"):
        assert (directory / name).is_file(), name
    spec = importlib.util.spec_from_file_location(f"curv_{example}_{id(directory)}", directory / f"{example}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    return build("adam", tmp_path_factory.mktemp("adam"))


class Mlp(torch.nn.Module):
    """The model of examples/optimizers/adam.curv, written in PyTorch with the same parameters."""

    def __init__(self, dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(64, 64, generator=generator, dtype=dtype) / 8)
        self.b1 = torch.nn.Parameter(torch.zeros(64, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.randn(64, 10, generator=generator, dtype=dtype) / 8)
        self.b2 = torch.nn.Parameter(torch.zeros(10, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


def train(model, optimizer, dtype, steps=20):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=generator, dtype=dtype)
        y = torch.randint(0, 10, (32,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_a_pytorch_model_trains_with_the_generated_adam_as_with_torch_adam(adam, dtype, tolerance):
    ours = Mlp(dtype)
    reference = Mlp(dtype)
    ours_final = train(ours, adam.Optimizer(ours.parameters()), dtype)
    reference_final = train(reference, torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8), dtype)
    for mine, theirs in zip(ours_final, reference_final):
        error = ((mine - theirs).norm() / theirs.norm()).item()
        assert error <= tolerance, error


def test_a_library_built_for_cuda_steps_cuda_tensors_as_torch_adam_does_or_says_there_is_no_gpu(tmp_path):
    library = build("adam", tmp_path, "--device", "cuda")
    if not torch.cuda.is_available():
        # Without a GPU the library loads and refuses to make a context, saying why.
        with pytest.raises(library.CurvError) as error:
            library.Context()
        assert error.value.code == library.CONTEXT_ERROR
        assert "built for CUDA" in str(error.value) and "no CUDA device" in str(error.value), str(error.value)
        return
    # On a GPU (scripts/gpu-check.sh runs this file there): CUDA tensors step as with torch's Adam.
    ours, reference = Mlp(torch.float32).cuda(), Mlp(torch.float32).cuda()
    generator = torch.Generator().manual_seed(1)
    optimizers = (library.Optimizer(ours.parameters()), torch.optim.Adam(reference.parameters(), lr=1e-3))
    for _ in range(20):
        x = torch.randn(32, 64, generator=generator).cuda()
        y = torch.randint(0, 10, (32,), generator=generator).cuda()
        for model, optimizer in zip((ours, reference), optimizers):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        error = ((mine - theirs).norm() / theirs.norm()).item()
        assert mine.is_cuda and error <= 1e-5, error
    # CUDA tensors step with the state kept on the GPU (never staged through the host).
    assert optimizers[0].context.state_resident


def test_resident_steps_match_host_steps_bit_for_bit_and_keep_the_state_resident(adam, tmp_path, monkeypatch):
    # CURV_RESIDENT=on takes, on CPU tensors, the path a CUDA library takes on CUDA tensors: the
    # state stays where the kernels run, the caller's tensors are read where they are, the new
    # parameters are checked for non-finite values by a kernel and copied in at the commit.
    def run(resident, save_at=None):
        monkeypatch.setenv("CURV_RESIDENT", "on" if resident else "off")
        model = Mlp(torch.float32)
        optimizer = adam.Optimizer(model.parameters())
        generator = torch.Generator().manual_seed(3)
        for step in range(12):
            if step == save_at:
                optimizer.state_dict_path(tmp_path / "resident.safetensors")
                optimizer = adam.Optimizer(model.parameters())
                optimizer.load_state_path(tmp_path / "resident.safetensors")
            x = torch.randn(32, 64, generator=generator)
            y = torch.randint(0, 10, (32,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            assert optimizer.context.state_resident == resident
        return [parameter.detach().clone() for parameter in model.parameters()]

    host = run(False)
    for mine, theirs in zip(run(True), host):
        assert torch.equal(mine, theirs)
    # The state saved from the device (here host memory) and loaded back goes on identically.
    for mine, theirs in zip(run(True, save_at=5), host):
        assert torch.equal(mine, theirs)


def test_the_state_survives_save_and_load(adam, tmp_path):
    straight = Mlp(torch.float64)
    straight_final = train(straight, adam.Optimizer(straight.parameters()), torch.float64, steps=20)
    resumed = Mlp(torch.float64)
    optimizer = adam.Optimizer(resumed.parameters())
    generator = torch.Generator().manual_seed(1)
    for step in range(20):
        if step == 10:
            optimizer.state_dict_path(tmp_path / "state.safetensors")
            optimizer = adam.Optimizer(resumed.parameters())
            optimizer.load_state_path(tmp_path / "state.safetensors")
            assert optimizer.context.steps == 10
        x = torch.randn(32, 64, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (32,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(resumed(x), y).backward()
        optimizer.step()
    for mine, theirs in zip(resumed.parameters(), straight_final):
        assert torch.equal(mine.detach(), theirs)
    # After a reset the optimizer starts over: the same 20 steps from the same start end equal.
    again = Mlp(torch.float64)
    optimizer = adam.Optimizer(again.parameters())
    train(again, optimizer, torch.float64, steps=7)
    optimizer.context.reset()
    assert optimizer.context.steps == 0
    with torch.no_grad():
        for parameter, initial in zip(again.parameters(), Mlp(torch.float64).parameters()):
            parameter.copy_(initial)
    for mine, theirs in zip(train(again, optimizer, torch.float64, steps=20), straight_final):
        assert torch.equal(mine, theirs)


def test_a_damaged_truncated_or_unchecked_state_file_is_refused_naming_the_tensor(adam, tmp_path):
    # curv_state_save stores a CRC-32 of every tensor and of the metadata; curv_state_load verifies
    # them, so a flipped byte is an error naming the file and the tensor (E0601), a truncated file
    # one naming the file (E0600), and a file without checksums is refused (E0603). A failed load
    # leaves the context as it was.
    model = Mlp(torch.float64)
    optimizer = adam.Optimizer(model.parameters())
    train(model, optimizer, torch.float64, steps=3)
    path = tmp_path / "state.safetensors"
    optimizer.state_dict_path(path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8:8 + header])
    name = sorted(key for key in entries if key != "__metadata__")[0]
    start, end = entries[name]["data_offsets"]

    def refused(contents, code):
        damaged = tmp_path / f"damaged-{code}.safetensors"
        damaged.write_bytes(contents)
        fresh = adam.Optimizer(Mlp(torch.float64).parameters())
        with pytest.raises(adam.CurvError) as error:
            fresh.load_state_path(damaged)
        assert error.value.code == adam.INVALID_ARGUMENT
        assert f"[{code}] {damaged}" in str(error.value), str(error.value)
        assert fresh.context.steps == 0
        return str(error.value)

    flipped = bytearray(data)
    flipped[8 + header + (start + end) // 2] ^= 0x10
    assert f"tensor `{name}` is damaged" in refused(bytes(flipped), "E0601")
    refused(data[:-9], "E0600")
    unchecked = {key: value for key, value in entries.items() if key != "__metadata__"}
    unchecked["__metadata__"] = {"step": "3"}
    text = json.dumps(unchecked).encode()
    text += b" " * (-len(text) % 8)
    assert "no curv checksums" in refused(len(text).to_bytes(8, "little") + text + data[8 + header:], "E0603")
    # The undamaged file loads.
    loaded = adam.Optimizer(Mlp(torch.float64).parameters())
    loaded.load_state_path(path)
    assert loaded.context.steps == 3


def capsules(tensors):
    return [None if tensor is None else torch.utils.dlpack.to_dlpack(tensor) for tensor in tensors]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda params, grads: (params[:2], grads[:2]), "2 tensors given where the optimizer has 4 parameters"),
        (lambda params, grads: (params, grads[:1] + [torch.zeros(63)] + grads[2:]), "has shape [63] where [64] is needed"),
        (lambda params, grads: ([p.to(torch.int32) for p in params], grads), "float32 or float64 is needed"),
        (lambda params, grads: ([torch.zeros(128, 64)[::2]] + params[1:], grads), "is not contiguous"),
        (lambda params, grads: (params, [None] + grads[1:]), "gradient 0 (`w1`) is a null pointer"),
        (lambda params, grads: (params, [g.double() for g in grads]), "one dtype"),
        (lambda params, grads: ([params[0]] + params[1:], [params[0]] + grads[1:]), "overlap"),
    ],
)
def test_abi_misuse_is_an_error_code_with_a_message(adam, change, message):
    context = adam.Context()
    params = [torch.zeros(*shape) for shape in context.shapes]
    grads = [torch.ones(*shape) for shape in context.shapes]
    before = [p.clone() for p in params]
    bad_params, bad_grads = change(params, grads)
    with pytest.raises(adam.CurvError) as error:
        context.step_dlpack(capsules(bad_params), capsules(bad_grads))
    assert error.value.code == adam.INVALID_ARGUMENT
    assert message in str(error.value)
    # Nothing was written and no step was counted.
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert context.steps == 0


@pytest.mark.parametrize("example", ["adam", "shampoo"])
@pytest.mark.parametrize("bad_index", [0, -1])
@pytest.mark.parametrize("resident", [False, True])
def test_a_step_that_fails_changes_neither_parameters_nor_state(tmp_path, monkeypatch, example, bad_index, resident):
    """A step whose update turns non-finite (an infinite gradient element) is refused with its
    message, and afterwards the context steps exactly as a twin that never saw it: every
    parameter's state (a rule's, a `kronecker` structure's, a `diagonal` one's) was put back. In
    float64 on the host path; in float32 with CURV_RESIDENT=on, on the resident path for the rule
    (adam), whose non-finite check is a kernel."""
    monkeypatch.setenv("CURV_RESIDENT", "on" if resident else "off")
    dtype = torch.float32 if resident else torch.float64
    library = build(example, tmp_path)
    ours, twin = library.Context(), library.Context()
    generator = torch.Generator().manual_seed(9)
    params = [torch.randn(*shape, generator=generator, dtype=dtype) for shape in ours.shapes]
    twin_params = [param.clone() for param in params]
    for step in range(6):
        grads = [torch.randn(*shape, generator=generator, dtype=dtype) for shape in ours.shapes]
        if step == 3:
            bad = [grad.clone() for grad in grads]
            bad[bad_index].view(-1)[0] = float("inf")
            before = [param.clone() for param in params]
            with pytest.raises(library.CurvError) as error:
                ours.step_dlpack(capsules(params), capsules(bad))
            assert error.value.code == library.RUNTIME_ERROR, str(error.value)
            assert "non-finite" in str(error.value), str(error.value)
            # A non-finite update (E0501) or a structure that fails on the infinite entry (E0502),
            # the stable code the message starts with.
            assert error.value.stable_code in ("E0501", "E0502"), str(error.value)
            assert str(error.value).startswith(f"[{error.value.stable_code}] parameter `"), str(error.value)
            assert all(torch.equal(param, old) for param, old in zip(params, before))
            assert ours.steps == 3
            assert ours.state_resident == (resident and example == "adam")
        ours.step_dlpack(capsules(params), capsules(grads))
        twin.step_dlpack(capsules(twin_params), capsules(grads))
    assert ours.steps == twin.steps == 6
    assert all(torch.equal(param, other) for param, other in zip(params, twin_params))


def test_null_lists_contexts_and_options_are_errors(adam):
    library = adam._LIBRARY
    context = adam.Context()
    assert library.curv_optimizer_step(context._context, 4, None, None) == adam.INVALID_ARGUMENT
    assert b"null pointer" in library.curv_context_error(context._context)
    assert library.curv_context_error_code(context._context) == 0
    assert library.curv_optimizer_step(None, 0, None, None) == adam.INVALID_ARGUMENT
    config = library.curv_config_new()
    assert library.curv_config_set(config, b"lr", -1.0) == adam.INVALID_ARGUMENT
    assert library.curv_config_set(config, b"momentum", 0.9) == adam.INVALID_ARGUMENT
    assert library.curv_config_set(config, None, 0.9) == adam.INVALID_ARGUMENT
    library.curv_config_free(config)
    with pytest.raises(adam.CurvError):
        adam.Context(lr=float("nan"))


def test_a_kronecker_optimizer_runs_behind_the_same_abi(tmp_path):
    shampoo = build("shampoo", tmp_path)
    context = shampoo.Context()
    generator = torch.Generator().manual_seed(2)
    params = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in context.shapes]
    start = [p.clone() for p in params]
    for _ in range(5):
        grads = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in context.shapes]
        context.step_dlpack(capsules(params), capsules(grads))
    assert context.steps == 5
    assert all(torch.isfinite(p).all() and not torch.equal(p, s) for p, s in zip(params, start))


def test_the_c_example_links_and_steps(tmp_path):
    build("adam", tmp_path)
    program = tmp_path / "step"
    compiled = subprocess.run(
        ["cc", "-I", str(tmp_path), str(ROOT / "examples" / "integration" / "step.c"), "-L", str(tmp_path), "-ladam",
         f"-Wl,-rpath,{tmp_path}", "-o", str(program)],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    result = subprocess.run([str(program)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Adam with lr 0.01 from 0 towards 1: after 300 steps the parameter is close to 1.
    value = float(lines[0].split(": ")[1])
    assert lines[0].startswith("w1[0] after 300 steps") and abs(value - 1.0) < 0.05, lines[0]
    assert lines[1].startswith("a short list: code 1 (3 tensors given where the optimizer has 4 parameters)"), lines[1]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_the_train_step_computes_gradients_and_updates_as_pytorch_does(adam, dtype, tolerance):
    """The whole step in the library (curv's forward and backward of the .curv model, then Adam)
    against PyTorch's autograd and torch.optim.Adam on the same batches."""
    step = adam.TrainStep()
    assert [name for name, _, _ in step.context.inputs] == ["digits.x", "digits.y"]
    batch = step.context.inputs[0][1][0]
    ours = Mlp(dtype)
    reference = Mlp(dtype)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.rand(batch, 64, generator=generator, dtype=dtype)
        y = torch.randint(0, 10, (batch,), generator=generator)
        loss = step(list(ours.parameters()), x, y)
        optimizer.zero_grad()
        reference_loss = torch.nn.functional.cross_entropy(reference(x), y)
        reference_loss.backward()
        optimizer.step()
        assert abs(loss - reference_loss.item()) <= tolerance * abs(reference_loss.item()), (loss, reference_loss.item())
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        error = ((mine - theirs).norm() / theirs.norm()).item()
        assert error <= tolerance, error


def test_a_label_outside_the_classes_is_refused_before_the_step_and_changes_nothing(adam):
    """E0403: the train step checks each batch's labels against the 10 classes of the loss, as
    `curv run` checks the data set before step 1, and refuses the batch with the input and the
    index instead of training on it; a good batch then steps as usual."""
    step = adam.TrainStep()
    batch = step.context.inputs[0][1][0]
    model = Mlp(torch.float32)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(batch, 64, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    for bad in (12, -1):
        y[5] = bad
        with pytest.raises(adam.CurvError) as error:
            step(list(model.parameters()), x, y)
        assert error.value.code == adam.INVALID_ARGUMENT
        expected = f"[E0403] input `digits.y`, index [5]: label {bad} is outside 0..10 (the 10 classes of the loss)"
        assert expected in str(error.value), str(error.value)
        assert all(torch.equal(parameter, old) for parameter, old in zip(model.parameters(), before))
    y[5] = 9
    step(list(model.parameters()), x, y)
    assert not all(torch.equal(parameter, old) for parameter, old in zip(model.parameters(), before))


def test_k_fac_needs_the_train_step_and_trains_through_it(tmp_path):
    kfac = build("kfac", tmp_path)
    context = kfac.Context()
    params = [torch.zeros(*shape) for shape in context.shapes]
    with pytest.raises(kfac.CurvError) as error:
        context.step_dlpack(capsules(params), capsules(params))
    assert error.value.code == kfac.CONTEXT_ERROR and "use the train step" in str(error.value)
    assert error.value.stable_code == "E0500", str(error.value)
    step = kfac.TrainStep()
    generator = torch.Generator().manual_seed(4)
    params = [torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.1 for shape in step.context.shapes]
    shapes = {name: shape for name, shape, _ in step.context.inputs}
    x = torch.rand(*shapes["digits.x"], generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, shapes["digits.y"], generator=generator)
    losses = [step(params, x, y) for _ in range(20)]
    assert all(torch.isfinite(p).all() for p in params)
    assert losses[-1] < 0.5 * losses[0], losses
    # A batch of the wrong size is refused before anything changes.
    before = [p.clone() for p in params]
    with pytest.raises(kfac.CurvError) as error:
        step(params, x[:-1], y[:-1])
    assert error.value.code == kfac.INVALID_ARGUMENT and "input 0 (`digits.x`) has shape" in str(error.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_the_model_is_a_pytorch_operator_with_the_generated_backward(adam):
    """`NAME.model` runs the .curv model's forward and its generated vector-Jacobian product; it
    agrees with the same model in PyTorch, passes torch.library.opcheck and gradcheck."""
    context = adam.Context()
    assert context.model_inputs == ["digits.x"] and context.model_output_shape == (64, 10)
    generator = torch.Generator().manual_seed(5)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        params = [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in context.shapes]
        x = torch.rand(64, 64, generator=generator, dtype=dtype).requires_grad_()
        output = adam.model(params, [x])
        w1, b1, w2, b2 = params
        reference = torch.tanh(x @ w1 + b1) @ w2 + b2
        assert ((output - reference).norm() / reference.norm()).item() <= tolerance
        cotangent = torch.randn(output.shape, generator=generator, dtype=dtype)
        ours = torch.autograd.grad(output, params + [x], cotangent)
        theirs = torch.autograd.grad(reference, params + [x], cotangent)
        for mine, expected in zip(ours, theirs):
            assert ((mine - expected).norm() / expected.norm()).item() <= tolerance
    params = [torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in context.shapes]
    x = torch.rand(64, 64, generator=generator, dtype=torch.float64).requires_grad_()
    result = torch.library.opcheck(adam.model, (params, [x]))
    assert all(outcome == "SUCCESS" for outcome in result.values()), result
    assert torch.autograd.gradcheck(lambda *tensors: adam.model(list(tensors[:4]), [tensors[4]]), (*params, x), fast_mode=True)


def test_the_model_is_a_jax_ffi_target_with_a_custom_vjp(adam):
    """`NAME.jax_model` calls the library's XLA FFI handlers (jax.ffi), under jit too, and its
    gradients are the generated vector-Jacobian product: jax.test_util.check_grads passes and it
    agrees with the same model in jax.numpy; a wrong shape is an XLA error with curv's message."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np
    from jax.test_util import check_grads

    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        check_the_jax_model(adam, jax, jnp, np, check_grads)
    finally:
        jax.config.update("jax_enable_x64", x64)


def check_the_jax_model(adam, jax, jnp, np, check_grads):
    context = adam.Context()
    rng = np.random.default_rng(6)
    params = tuple(jnp.asarray(rng.standard_normal(shape)) for shape in context.shapes)
    x = jnp.asarray(rng.random((64, 64)))

    def reference(p, x):
        return jnp.tanh(x @ p[0] + p[1]) @ p[2] + p[3]

    output = jax.jit(lambda p, x: adam.jax_model(p, (x,)))(params, x)
    assert float(jnp.linalg.norm(output - reference(params, x)) / jnp.linalg.norm(reference(params, x))) < 1e-12
    ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(adam.jax_model(p, (x,)))), argnums=(0, 1))(params, x)
    theirs = jax.grad(lambda p, x: jnp.sum(jnp.sin(reference(p, x))), argnums=(0, 1))(params, x)
    for mine, expected in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert float(jnp.linalg.norm(mine - expected) / jnp.linalg.norm(expected)) < 1e-12
    check_grads(lambda p, x: adam.jax_model(p, (x,)), (params, x), order=1, modes=["rev"])
    with pytest.raises(Exception, match=r"input `digits.x` has shape \[32, 64\] where \[64, 64\] is needed"):
        adam.jax_model(params, (x[:32],))


def library_for_program(tmp_path, name, text):
    """Builds a library from .curv text and imports its Python module."""
    source = tmp_path / f"{name}.curv"
    source.write_text(text)
    result = subprocess.run([CURV, "build", "--lib", str(source), "-o", str(tmp_path / "lib")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    spec = importlib.util.spec_from_file_location(f"curv_{name}_{id(tmp_path)}", tmp_path / "lib" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kronecker_cases():
    import test_kronecker as k

    shampoo_shapes, shampoo_line, shampoo_lr, _ = k.SHAMPOO_CASES["adagrad"]
    muon_line, muon_lr, _ = k.MUON_CASES["nesterov"]
    return {
        "shampoo": (shampoo_shapes, [shampoo_line], shampoo_lr, (), lambda: k.shampoo_reference("adagrad")),
        "soap": (k.SOAP_LAYERS, ["w1 : adam", k.SOAP_LINE], k.SOAP_LR, ["std.optimizers.adam"], k.soap_reference),
        "muon": (k.MLP3, [muon_line], muon_lr, (), lambda: k.muon_reference("nesterov")),
    }


@pytest.mark.parametrize("case", ["shampoo", "soap", "muon"])
def test_the_library_optimizer_step_matches_the_kronecker_references(tmp_path, case):
    """Shampoo, SOAP and Muon through the library's optimizer step, fed the gradients of the
    float64 numpy model of test_kronecker.py, against the float64 transcriptions of Distributed
    Shampoo, nikhilvyas/SOAP and KellerJordan/Muon on the same gradients: 20 steps, 1e-6."""
    import test_kronecker as k

    shapes, lines, lr, uses, reference = kronecker_cases()[case]
    library = library_for_program(tmp_path, f"oracle_{case}", k.program_text(shapes, lines, lr, uses))
    context = library.Context()
    assert context.names == list(shapes)
    init = k.initial_parameters(shapes)
    weights = [np.array(init[name], dtype=np.float64) for name in shapes]
    data = k.Digits()
    for _ in range(k.STEPS):
        _, grads, _ = k.forward_backward(weights, data)
        tensors = [torch.from_numpy(weight) for weight in weights]
        context.step_dlpack(capsules(tensors), capsules([torch.from_numpy(np.ascontiguousarray(g)) for g in grads]))
    theirs, _ = reference()
    k.compare(dict(zip(shapes, weights)), theirs)


@pytest.mark.parametrize("script, example, steps", [("torch_shampoo.py", "shampoo", 100), ("jax_mlp.py", "adam", 100)])
def test_the_integration_examples_train(tmp_path, script, example, steps):
    build(example, tmp_path / example)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "integration" / script), str(tmp_path / example), str(steps)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(line.split("loss ")[1].split()[0]) for line in result.stdout.splitlines() if "loss " in line]
    assert losses and losses[-1] < 1.0, result.stdout


@pytest.fixture
def jax_x64():
    """JAX with float64 enabled for the test (restored afterwards)."""
    jax = pytest.importorskip("jax")
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", x64)


def jax_mlp_loss(p, x, y):
    """The mean cross-entropy of the model of examples/optimizers/adam.curv, in jax.numpy."""
    import jax
    import jax.numpy as jnp

    logits = jnp.tanh(x @ p[0] + p[1]) @ p[2] + p[3]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-6), ("float32", 1e-5)])
def test_a_jax_model_trains_with_the_generated_adam_as_with_optax_adam(adam, jax_x64, dtype, tolerance):
    """`NAME.JaxOptimizer` under `jax.jit` with the parameters donated, fed the gradients of a JAX
    model, against optax.adam on the same model and batches: 20 steps."""
    jax = jax_x64
    import jax.numpy as jnp
    import optax

    optimizer = adam.JaxOptimizer()
    rng = np.random.default_rng(7)
    initial = [rng.standard_normal(shape) / 8 for shape in optimizer.context.shapes]
    ours = tuple(jnp.asarray(value, dtype=dtype) for value in initial)
    theirs = tuple(jnp.asarray(value, dtype=dtype) for value in initial)
    transform = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    state = transform.init(theirs)

    gradient = jax.jit(jax.grad(jax_mlp_loss))
    step = jax.jit(optimizer.step, donate_argnums=0)
    for _ in range(20):
        x = jnp.asarray(rng.standard_normal((32, 64)), dtype=dtype)
        y = jnp.asarray(rng.integers(0, 10, 32), dtype=jnp.int32)
        ours = step(ours, gradient(ours, x, y))
        updates, state = transform.update(gradient(theirs, x, y), state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    assert optimizer.steps == 20
    for mine, expected in zip(ours, theirs):
        assert mine.dtype == expected.dtype
        error = float(jnp.linalg.norm(mine - expected) / jnp.linalg.norm(expected))
        assert error <= tolerance, error


@pytest.mark.parametrize("case", ["shampoo", "soap", "muon"])
def test_the_jax_optimizer_step_matches_the_kronecker_references(tmp_path, jax_x64, case):
    """Shampoo, SOAP and Muon through `NAME.JaxOptimizer` (jit, float64), fed the gradients of the
    float64 numpy model of test_kronecker.py, against the float64 transcriptions of Distributed
    Shampoo, nikhilvyas/SOAP and KellerJordan/Muon: 20 steps, 1e-6."""
    import jax.numpy as jnp
    import test_kronecker as k

    shapes, lines, lr, uses, reference = kronecker_cases()[case]
    library = library_for_program(tmp_path, f"jax_{case}", k.program_text(shapes, lines, lr, uses))
    optimizer = library.JaxOptimizer()
    step = jax_x64.jit(optimizer.step)
    init = k.initial_parameters(shapes)
    weights = [np.array(init[name], dtype=np.float64) for name in shapes]
    data = k.Digits()
    for _ in range(k.STEPS):
        _, grads, _ = k.forward_backward(weights, data)
        new = step(tuple(jnp.asarray(w) for w in weights), tuple(jnp.asarray(g) for g in grads))
        weights = [np.array(w) for w in new]
    theirs, _ = reference()
    k.compare(dict(zip(shapes, weights)), theirs)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_the_jax_train_step_computes_gradients_and_updates_as_jax_and_optax_do(adam, jax_x64, dtype, tolerance):
    """`NAME.JaxTrainStep` (curv's forward, backward and Adam in one XLA call, under jit) against
    jax.grad of the same model and optax.adam on the same batches: losses and parameters."""
    jax = jax_x64
    import jax.numpy as jnp
    import optax

    step = adam.JaxTrainStep()
    assert [name for name, _, _ in step.context.inputs] == ["digits.x", "digits.y"]
    batch = step.context.inputs[0][1][0]
    rng = np.random.default_rng(8)
    initial = [rng.standard_normal(shape) / 8 for shape in step.context.shapes]
    ours = tuple(jnp.asarray(value, dtype=dtype) for value in initial)
    theirs = tuple(jnp.asarray(value, dtype=dtype) for value in initial)
    transform = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    state = transform.init(theirs)

    run = jax.jit(step)
    for _ in range(20):
        x = jnp.asarray(rng.random((batch, 64)), dtype=dtype)
        y = jnp.asarray(rng.integers(0, 10, batch), dtype=jnp.int32)
        ours, our_loss = run(ours, x, y)
        their_loss, grads = jax.value_and_grad(jax_mlp_loss)(theirs, x, y)
        updates, state = transform.update(grads, state, theirs)
        theirs = optax.apply_updates(theirs, updates)
        assert abs(float(our_loss) - float(their_loss)) <= tolerance * abs(float(their_loss))
    for mine, expected in zip(ours, theirs):
        error = float(jnp.linalg.norm(mine - expected) / jnp.linalg.norm(expected))
        assert error <= tolerance, error


def test_jax_step_misuse_is_an_xla_error_with_curvs_message(adam, tmp_path, jax_x64):
    """Wrong shapes, mixed dtypes, a freed context and a K-FAC optimizer step: each is an XLA
    error carrying curv's message, and nothing is stepped."""
    import jax.numpy as jnp

    optimizer = adam.JaxOptimizer()
    params = tuple(jnp.zeros(shape) for shape in optimizer.context.shapes)
    grads = tuple(jnp.ones(shape) for shape in optimizer.context.shapes)
    with pytest.raises(Exception, match=r"the gradient of `w2` has shape \[10, 64\] where \[64, 10\] is needed"):
        optimizer.step(params, grads[:2] + (jnp.ones((10, 64)),) + grads[3:])
    with pytest.raises(Exception, match=r"the gradient of `w1` is F32 where F64 is needed"):
        optimizer.step(params, (grads[0].astype(jnp.float32),) + grads[1:])
    with pytest.raises(adam.CurvError, match="3 parameters and 4 gradients given"):
        optimizer.step(params[:3], grads)
    assert optimizer.steps == 0
    new = optimizer.step(params, grads)
    assert optimizer.steps == 1 and all(not bool(jnp.array_equal(a, b)) for a, b in zip(new, params))
    address = optimizer.context._context
    optimizer.context.__del__()
    optimizer.context._context = address
    with pytest.raises(Exception, match="is not a live curv context"):
        optimizer.step(params, grads)
    optimizer.context._context = None
    kfac = build("kfac", tmp_path)
    kfac_optimizer = kfac.JaxOptimizer()
    params = tuple(jnp.zeros(shape) for shape in kfac_optimizer.context.shapes)
    with pytest.raises(Exception, match="use the train step"):
        kfac_optimizer.step(params, params)
