"""A JAX training loop around curv's compiled model and optimizer.

    curv build --lib examples/optimizers/adam.curv -o build/adam
    python examples/integration/jax_mlp.py build/adam [steps]

`adam.jax_model` is the model of examples/optimizers/adam.curv (a tanh MLP) as a `jax.ffi` call of
the library, differentiable through curv's generated backward pass (a `jax.custom_vjp`). JAX
computes the loss around it and takes gradients; the update is curv's Adam, `adam.JaxOptimizer`
(another `jax.ffi` call, which keeps the optimizer's state in the library), inside the same
`jax.jit` with the parameters donated, so XLA updates them in place.
"""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(directory, name):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(directory) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "build/adam"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    adam = load(directory, "adam")
    context = adam.Context()
    batch = dict((name, shape) for name, shape, _ in context.inputs)["digits.x"][0]
    table = np.loadtxt(ROOT / "examples" / "data" / "digits.csv", delimiter=",", skiprows=1)
    x_all = jnp.asarray(table[:, :64] / 16.0, dtype=jnp.float32)
    y_all = jnp.asarray(table[:, 64], dtype=jnp.int32)
    rng = np.random.default_rng(0)
    params = tuple(
        jnp.asarray(rng.normal(0.0, (2.0 / sum(shape)) ** 0.5, shape) if len(shape) == 2 else np.zeros(shape), dtype=jnp.float32)
        for shape in context.shapes
    )

    def loss(params, x, y):
        logits = adam.jax_model(params, (x,))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    optimizer = adam.JaxOptimizer(lr=1e-2)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return optimizer.step(params, grads), value

    for index in range(1, steps + 1):
        rows = rng.integers(0, x_all.shape[0], batch)
        params, value = step(params, x_all[rows], y_all[rows])
        if index % 100 == 0 or index == steps:
            print(f"step {index:4d}  loss {float(value):.4f}")


if __name__ == "__main__":
    main()
