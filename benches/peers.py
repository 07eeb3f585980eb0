"""Peer benchmark: curv (MLIR backend) against PyTorch eager and JAX `jit` on the same machine,
in one run, on the problems of issue 4: the digits MLP (64-256-256-10, tanh, batch 128) and the
SIREN (2-256-256-256-1 on the 64x64 image, full batch), with Adam, AdaHessian and Sophia-H.

Prints the median step time of each implementation and curv's ratio to each, plus the floor: the
step's matrix-product FLOPs at the float32 GEMM rate numpy (OpenBLAS) reaches here. Run with
scripts/bench-peers.sh, which builds curv in release mode first.
"""

import json
import warnings
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CURV = pathlib.Path(os.environ.get("CURV", ROOT / "target" / "release" / "curv"))
DIGITS_STEPS = int(os.environ.get("DIGITS_STEPS", "200"))
SIREN_STEPS = int(os.environ.get("SIREN_STEPS", "15"))


def median_ms(times):
    return float(np.median(np.array(times) * 1000.0))


def curv_step_ms(example, optimizer, steps):
    with tempfile.TemporaryDirectory() as directory:
        metrics = pathlib.Path(directory) / "metrics.jsonl"
        subprocess.run([str(CURV), "run", str(ROOT / "examples" / example), "--optimizer", optimizer, "--steps", str(steps),
                        "--metrics", str(metrics), "--quiet"], check=True)
        return json.loads(metrics.read_text().splitlines()[-1])["step_ms_median"]


def digits_data():
    table = np.loadtxt(ROOT / "examples" / "data" / "digits.csv", delimiter=",", skiprows=1, dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


def siren_data():
    from PIL import Image  # noqa: PLC0415
    image = np.asarray(Image.open(ROOT / "examples" / "data" / "camera_64.png"), dtype=np.float32) / 255.0 * 2.0 - 1.0
    height, width = image.shape
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    return coords, image.reshape(-1, 1)


def torch_problem(problem):
    """The problem's PyTorch model (`nn.Sequential` of `Linear` layers and activations), loss and
    batch function (step index to inputs and targets)."""
    import torch  # noqa: PLC0415
    torch.manual_seed(0)
    if problem == "digits":
        features, labels = digits_data()
        layers = [torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)]
        model = torch.nn.Sequential(*layers)
        x_all, y_all = torch.tensor(features), torch.tensor(labels)
        loss_fn = torch.nn.functional.cross_entropy

        def batch(step):
            index = (step * 128) % (len(x_all) - 128)
            return x_all[index:index + 128], y_all[index:index + 128]
    else:
        coords, values = siren_data()

        class Sine(torch.nn.Module):
            def forward(self, x):
                return torch.sin(30.0 * x)

        model = torch.nn.Sequential(torch.nn.Linear(2, 256), Sine(), torch.nn.Linear(256, 256), Sine(), torch.nn.Linear(256, 256), Sine(), torch.nn.Linear(256, 1))
        x, y = torch.tensor(coords), torch.tensor(values)
        loss_fn = torch.nn.functional.mse_loss

        def batch(step):
            return x, y
    return model, loss_fn, batch


def torch_step_ms(problem, optimizer_name, steps):
    import torch  # noqa: PLC0415
    # `backward(create_graph=True)` warns about a reference cycle; the benchmark clears gradients
    # every step, as the Hessian-based optimizers' documentation asks.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    import pytorch_optimizer  # noqa: PLC0415
    model, loss_fn, batch = torch_problem(problem)
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif optimizer_name == "sophia_h":
        # pytorch_optimizer's SophiaH (its own variant of the update, same cost): a Hutchinson
        # estimate every 10 steps, as curv's `sophia_h` preset, so the double-backward graph is
        # built only on those steps (the optimizer's step counter starts at 0).
        optimizer = pytorch_optimizer.SophiaH(model.parameters(), lr=1e-3, update_period=10)
    else:
        optimizer = pytorch_optimizer.AdaHessian(model.parameters(), lr=0.15)
    times = []
    for step in range(steps):
        inputs, targets = batch(step)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        hessian = optimizer_name == "adahessian" or (optimizer_name == "sophia_h" and step % 10 == 0)
        loss.backward(create_graph=hessian)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return median_ms(times[2:])


def jax_step_ms(problem, optimizer_name, steps):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    key = jax.random.PRNGKey(0)
    if problem == "digits":
        features, labels = digits_data()
        sizes, activation = [64, 256, 256, 10], jnp.tanh

        def loss_fn(params, x, y):
            h = x
            for index, (w, b) in enumerate(params):
                h = h @ w + b
                if index < len(params) - 1:
                    h = activation(h)
            return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

        def batch(step):
            index = (step * 128) % (len(features) - 128)
            return jnp.asarray(features[index:index + 128]), jnp.asarray(labels[index:index + 128])
    else:
        coords, values = siren_data()
        sizes = [2, 256, 256, 256, 1]

        def loss_fn(params, x, y):
            h = x
            for index, (w, b) in enumerate(params):
                h = h @ w + b
                if index < len(params) - 1:
                    h = jnp.sin(30.0 * h)
            return jnp.mean((h - y) ** 2)

        def batch(step):
            return jnp.asarray(coords), jnp.asarray(values)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, subkey = jax.random.split(key)
        params.append((jax.random.uniform(subkey, (fan_in, fan_out), minval=-0.05, maxval=0.05), jnp.zeros(fan_out)))
    if optimizer_name == "adam":
        optimizer = optax.adam(1e-3)

        @jax.jit
        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss
    else:
        optimizer = optax.contrib.sophia(1e-3)

        @jax.jit
        def step(params, state, x, y):
            objective = lambda p: loss_fn(p, x, y)  # noqa: E731
            loss, grads = jax.value_and_grad(objective)(params)
            updates, state = optimizer.update(grads, state, params, obj_fn=objective)
            return optax.apply_updates(params, updates), state, loss
    state = optimizer.init(params)
    times = []
    for index in range(steps):
        x, y = batch(index)
        start = time.perf_counter()
        params, state, loss = step(params, state, x, y)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return median_ms(times[3:])


def gemm_gflops(size=512):
    """numpy's float32 GEMM rate (OpenBLAS), best of several runs; 512 is the floor's rate."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def matmul_flops(problem):
    # Forward products plus the two backward products per layer (the first layer's input
    # gradient is not needed, but counting it keeps the floor conservative).
    if problem == "digits":
        batch, sizes = 128, [64, 256, 256, 10]
    else:
        batch, sizes = 4096, [2, 256, 256, 256, 1]
    forward = sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return 3 * forward


def main():
    rate = gemm_gflops()
    print(f"numpy float32 GEMM at 512: {rate:.1f} GFLOP/s (threads: OPENBLAS default)")
    rows = []
    cases = [
        ("digits", "adam", "digits_mlp.curv", DIGITS_STEPS),
        ("digits", "adahessian", "digits_mlp.curv", DIGITS_STEPS),
        ("digits", "sophia_h", "digits_mlp.curv", DIGITS_STEPS),
        ("siren", "adam", "siren.curv", SIREN_STEPS),
        ("siren", "adahessian", "siren.curv", SIREN_STEPS),
        ("siren", "sophia_h", "siren.curv", SIREN_STEPS),
    ]
    for problem, optimizer, example, steps in cases:
        curv_ms = curv_step_ms(example, optimizer, steps)
        torch_ms = torch_step_ms(problem, optimizer, steps)
        jax_ms = jax_step_ms(problem, "sophia" if optimizer == "sophia_h" else optimizer, steps) if optimizer != "adahessian" else float("nan")
        floor_ms = matmul_flops(problem) / (rate * 1e9) * 1000.0
        if optimizer == "adahessian":
            # A Hessian-vector product every step costs about two more gradient passes. Sophia-H
            # takes one every 10 steps, which the median step does not include.
            floor_ms *= 3.0
        rows.append((problem, optimizer, curv_ms, torch_ms, jax_ms, floor_ms))
    kernels = json.loads(subprocess.run([str(CURV), "bench-kernels"], check=True, capture_output=True, text=True).stdout)
    print()
    print(f"{'GEMM':<8}{'curv GFLOP/s':>14}{'numpy GFLOP/s':>15}{'ratio':>8}")
    for size in (256, 512, 1024):
        ours, theirs = kernels[f"gemm_{size}_gflops"], gemm_gflops(size)
        print(f"{size:<8}{ours:>14.1f}{theirs:>15.1f}{ours / theirs:>8.2f}")
    update, copy = kernels["adam_update_gbytes_per_second"], kernels["copy_gbytes_per_second"]
    print(f"fused Adam update over 4M parameters: {update:.1f} GB/s, memory copy {copy:.1f} GB/s, ratio {update / copy:.2f}")
    print()
    print(f"{'problem':<8}{'optimizer':<12}{'curv ms':>10}{'torch ms':>10}{'jax ms':>10}{'floor ms':>10}{'curv/torch':>12}{'curv/jax':>10}{'curv/floor':>12}")
    for problem, optimizer, curv_ms, torch_ms, jax_ms, floor_ms in rows:
        print(f"{problem:<8}{optimizer:<12}{curv_ms:>10.3f}{torch_ms:>10.3f}{jax_ms:>10.3f}{floor_ms:>10.3f}"
              f"{curv_ms / torch_ms:>12.2f}{curv_ms / jax_ms:>10.2f}{curv_ms / floor_ms:>12.2f}")


if __name__ == "__main__":
    sys.exit(main())
