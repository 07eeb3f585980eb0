"""Peer benchmark: curv (MLIR backend) against PyTorch eager and JAX `jit` on the same machine,
in one run, on the problems of issue 4: the digits MLP (64-256-256-10, tanh, batch 128) and the
SIREN (2-256-256-256-1 on the 64x64 image, full batch), with Adam, AdaHessian and Sophia-H.

Prints the median step time of each implementation and curv's ratio to each, plus the floor: the
step's matrix-product FLOPs at the float32 GEMM rate numpy (OpenBLAS) reaches here. Run with
scripts/bench-peers.sh, which builds curv in release mode first.

`--only kronecker` runs the Kronecker family instead (Shampoo, SOAP, K-FAC, Muon, PSGD-Kron, and
MKOR, AdaFisher and 4-bit Shampoo once curv executes them; a preset curv reports as "not executable
yet" is skipped with a note) on the same two problems, against the fastest peer implementation of
each algorithm (pytorch_optimizer, heavyball and kfac-jax where installed, torch.optim, optax, and
hand-written PyTorch versions of curv's specification): the AMORTISED step time, the mean over a
window of steps that holds several preconditioner refreshes, for curv and peers alike.
`--only diagonal` runs the first part alone; the default runs both.
"""

import argparse
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


# ---------------------------------------------------------------------------------------------
# Kronecker family (`--only kronecker`): Shampoo, SOAP, K-FAC and Muon (and PSGD-Kron, MKOR,
# AdaFisher and 4-bit Shampoo once curv executes them) against the fastest peer implementation of
# the same algorithm. These optimizers do periodic work (a root, basis or inverse refresh every
# `every` steps), so the statistic is the AMORTISED step time: the mean over a window of steps
# after a warm-up, wall clock from the end of step WARM to the end of step WARM + WINDOW, the same
# statistic for curv (from the `elapsed_ms` of its metrics records) and for every peer.

KRON_PRESETS = ["shampoo", "soap", "kfac", "muon", "psgd_kron", "mkor", "adafisher", "shampoo4bit"]
# (warm-up steps, window steps): windows are multiples of every preset's `every` (10 or 5), so
# each holds a whole number of refreshes (digits: 20 of Shampoo's, 40 of K-FAC's; SIREN: 10, 20).
KRON_WINDOWS = {
    "digits": (int(os.environ.get("KRON_DIGITS_WARM", "20")), int(os.environ.get("KRON_DIGITS_STEPS", "200"))),
    "siren": (int(os.environ.get("KRON_SIREN_WARM", "10")), int(os.environ.get("KRON_SIREN_STEPS", "100"))),
}
KRON_EXAMPLES = {"digits": "digits_mlp.curv", "siren": "siren.curv"}
# AdaFisher refreshes every 100 steps and 4-bit Shampoo its statistics every 100 and its roots every
# 500: longer windows (SIREN's 4-bit Shampoo window holds one root refresh and five statistics ones).
KRON_LONG_WINDOWS = {
    "adafisher": {"digits": (20, 500), "siren": (10, 200)},
    "shampoo4bit": {"digits": (20, 1000), "siren": (10, 500)},
}
# Each implementation runs REPEATS consecutive windows and reports the fastest window's mean, which
# filters out the worst of other processes' interference on a shared machine.
KRON_REPEATS = int(os.environ.get("KRON_REPEATS", "2"))


def kron_window(preset, problem):
    return KRON_LONG_WINDOWS.get(preset, {}).get(problem, KRON_WINDOWS[problem])


class NotExecutable(Exception):
    pass


def curv_mean_step_ms(example, optimizer, warm, window):
    """curv's mean step time over a window of steps after `warm`: the example is copied with a log
    record every `warm` steps and no evaluation, runs warm + REPEATS * window steps, and the
    difference of the records' `elapsed_ms` at the ends of each window is divided by the window
    (compilation happens in the first steps); the fastest window counts."""
    assert window % warm == 0
    source = (ROOT / "examples" / example).read_text()
    lines = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("eval "):
            continue
        if stripped.startswith("log "):
            line = f"    log loss every {warm}"
        lines.append(line)
    with tempfile.TemporaryDirectory() as directory:
        directory = pathlib.Path(directory)
        (directory / "data").symlink_to(ROOT / "examples" / "data")
        path = directory / example
        path.write_text("\n".join(lines) + "\n")
        metrics = directory / "metrics.jsonl"
        result = subprocess.run([str(CURV), "run", str(path), "--optimizer", optimizer, "--steps", str(warm + KRON_REPEATS * window),
                                 "--metrics", str(metrics), "--quiet"], capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            if "not executable yet" in message:
                raise NotExecutable(message)
            raise RuntimeError(f"curv run {example} --optimizer {optimizer}: {message}")
        elapsed = {}
        for record in map(json.loads, metrics.read_text().splitlines()):
            if "elapsed_ms" in record:
                elapsed[record["step"]] = record["elapsed_ms"]
        ends = [warm + index * window for index in range(KRON_REPEATS + 1)]
        return min((elapsed[b] - elapsed[a]) / window for a, b in zip(ends, ends[1:]))


def torch_mean_step_ms(problem, make_step, warm, window):
    """Mean wall-clock time of a training step over a window of steps after `warm`, the fastest of
    REPEATS consecutive windows; eager CPU PyTorch has finished every operation when a step returns."""
    model, loss_fn, batch = torch_problem(problem)
    step = make_step(model, loss_fn)
    for index in range(warm):
        step(*batch(index))
    best = float("inf")
    for repeat in range(KRON_REPEATS):
        start = time.perf_counter()
        for index in range(warm + repeat * window, warm + (repeat + 1) * window):
            step(*batch(index))
        best = min(best, (time.perf_counter() - start) / window * 1000.0)
    return best


def split_params(model):
    weights = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    return weights, vectors


def optimizer_step(optimizers):
    """A training step for optimizers that need only the gradient."""
    def make(model, loss_fn):
        opts = optimizers(model)

        def step(x, y):
            for opt in opts:
                opt.zero_grad()
            loss_fn(model(x), y).backward()
            for opt in opts:
                opt.step()
        return step
    return make


def handwritten_shampoo(model, loss_fn):
    """Shampoo with Distributed Shampoo's numerics as curv's `shampoo` preset (spec 12.7), PyTorch
    eager, float32: summed factors L = sum G G^T and R = sum G^T G every step, inverse 4th roots by
    `eigh` of F + eps I every 10 steps, b1 = 0.9 filtered gradient, Adam grafting (b2 = 0.999) per
    matrix from step 10; vectors use torch.optim.Adam."""
    import torch  # noqa: PLC0415
    weights, vectors = split_params(model)
    adam = torch.optim.Adam(vectors, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    lr, b1, b2, eps, every = 1e-3, 0.9, 0.999, 1e-12, 10
    state = []
    for w in weights:
        rows, cols = w.shape
        state.append({"L": torch.zeros(rows, rows), "R": torch.zeros(cols, cols), "Lr": torch.eye(rows), "Rr": torch.eye(cols),
                      "M": torch.zeros_like(w), "V": torch.zeros_like(w)})
    t = [0]

    def root(factor):
        values, vectors_ = torch.linalg.eigh(factor + eps * torch.eye(len(factor)))
        low = values.min()
        if low < eps:
            values = values - low + eps
        return (vectors_ * values.pow(-0.25)) @ vectors_.T

    def step(x, y):
        t[0] += 1
        step_ = t[0]
        model.zero_grad()
        loss_fn(model(x), y).backward()
        adam.step()
        with torch.no_grad():
            for w, s in zip(weights, state):
                g = w.grad
                s["L"].addmm_(g, g.T)
                s["R"].addmm_(g.T, g)
                if step_ % every == 0:
                    s["Lr"], s["Rr"] = root(s["L"]), root(s["R"])
                s["M"].mul_(b1).add_(g, alpha=1 - b1)
                gbar = s["M"] / (1 - b1 ** step_)
                s["V"].mul_(b2).addcmul_(g, g, value=1 - b2)
                graft = gbar / ((s["V"] / (1 - b2 ** step_)).sqrt() + eps)
                if step_ >= every:
                    p = s["Lr"] @ gbar @ s["Rr"]
                    direction = p * (graft.norm() / (p.norm() + 1e-16))
                else:
                    direction = graft
                w.add_(direction, alpha=-lr)
    return step


def handwritten_kfac(model, loss_fn):
    """K-FAC as curv's `kfac` preset (spec 12.7), PyTorch eager, float32: at steps 1, 6, 11, ... a
    second backward pass with labels sampled from the model (categorical for cross-entropy, a
    unit-variance Gaussian around the output for MSE) gives the cotangents of each Linear's output;
    A = x^T x / N and G = (N g)^T (N g) / N enter bias-corrected averages (ema 0.95), and the
    pi-adjusted damped inverses (damping 1e-3) are recomputed by Cholesky; every step the weight
    moves by lr * Ginv grad Ainv (lr 1e-2). Biases use torch.optim.Adam."""
    import torch  # noqa: PLC0415
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in linears]
    adam = torch.optim.Adam(biases, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    lr, ema, damping, every = 1e-2, 0.95, 1e-3, 5
    state = [{"A": torch.zeros(m.in_features, m.in_features), "G": torch.zeros(m.out_features, m.out_features)} for m in linears]
    t, k = [0], [0]
    cross_entropy = loss_fn is torch.nn.functional.cross_entropy

    def inverse(matrix, shift):
        chol = torch.linalg.cholesky(matrix + shift * torch.eye(len(matrix)))
        return torch.cholesky_inverse(chol)

    def step(x, y):
        t[0] += 1
        refresh = (t[0] - 1) % every == 0
        model.zero_grad()
        inputs, outputs, h = [], [], x
        for module in model:
            if isinstance(module, torch.nn.Linear):
                inputs.append(h)
                h = module(h)
                outputs.append(h)
            else:
                h = module(h)
        loss = loss_fn(h, y)
        if refresh:
            with torch.no_grad():
                if cross_entropy:
                    sampled = torch.multinomial(torch.softmax(h, dim=1), 1).squeeze(1)
                else:
                    sampled = h + torch.randn_like(h)
            cotangents = torch.autograd.grad(loss_fn(h, sampled), outputs, retain_graph=True)
        loss.backward()
        adam.step()
        with torch.no_grad():
            if refresh:
                k[0] += 1
                correction = 1 - ema ** k[0]
                for s, a, g in zip(state, inputs, cotangents):
                    n = a.shape[0]
                    s["A"].mul_(ema).addmm_(a.T, a, alpha=(1 - ema) / n)
                    s["G"].mul_(ema).addmm_(g.T, g, alpha=(1 - ema) * n)
                    big_a, big_g = s["A"] / correction, s["G"] / correction
                    pi = torch.sqrt((big_a.trace() / len(big_a)) / (big_g.trace() / len(big_g)))
                    s["Ai"] = inverse(big_a, pi * damping ** 0.5)
                    s["Gi"] = inverse(big_g, damping ** 0.5 / pi)
            for m, s in zip(linears, state):
                m.weight.add_(s["Gi"] @ m.weight.grad @ s["Ai"], alpha=-lr)
    return step


def fold_bias_grad(module):
    """The Linear layer's gradient with the bias folded in as the last column ([out, in + 1])."""
    import torch  # noqa: PLC0415
    return torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)


def captured_step(model, loss_fn, x, y, capture):
    """Forward and backward of the training loss; with `capture`, also the inputs of each Linear
    layer (with a ones column, the folded bias) and the cotangents of its output (of the mean loss)."""
    import torch  # noqa: PLC0415
    inputs, outputs, h = [], [], x
    for module in model:
        if isinstance(module, torch.nn.Linear) and capture:
            inputs.append(torch.cat([h.detach(), torch.ones(h.shape[0], 1)], dim=1))
            h = module(h)
            h.retain_grad()
            outputs.append(h)
        else:
            h = module(h)
    loss_fn(h, y).backward()
    return inputs, [o.grad for o in outputs]


def handwritten_mkor(model, loss_fn):
    """MKOR as curv's `mkor` preset (language.md, `function = sherman_morrison`), PyTorch eager,
    float32, biases folded into their layer: at steps 1, 11, 21, ... the batch means of the clamped
    (100) layer inputs and per-example output cotangents (empirical Fisher, no second backward) update
    the factor inverses by Sherman-Morrison after blending 0.95 with the identity (reset to I when an
    entry exceeds 2); every step the gradient is preconditioned, Ginv grad Ainv, rescaled to the
    gradient's norm and handed to SGD (lr 0.1, momentum 0.9)."""
    import torch  # noqa: PLC0415
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    every, ema, clip, threshold = 10, 0.95, 100.0, 2.0
    state = [{"Ai": torch.eye(m.in_features + 1), "Gi": torch.eye(m.out_features), "pending": True} for m in linears]
    t = [0]

    def sherman_morrison(inverse, v):
        p = ema * inverse + (1 - ema) * torch.eye(len(inverse))
        pv = p @ v
        return p - torch.outer(pv, pv) / (1 + v @ pv)

    def step(x, y):
        t[0] += 1
        capture = (t[0] - 1) % every == 0
        sgd.zero_grad()
        inputs, cotangents = captured_step(model, loss_fn, x, y, capture)
        with torch.no_grad():
            for index, (m, s) in enumerate(zip(linears, state)):
                if capture:
                    n = inputs[index].shape[0]
                    a = inputs[index].clamp(-clip, clip).mean(0)
                    g = (cotangents[index] * n).clamp(-clip, clip).mean(0)
                    if s["pending"]:
                        s["Ai"], s["Gi"], s["pending"] = torch.eye(len(a)), torch.eye(len(g)), False
                    else:
                        s["Ai"] = sherman_morrison(s["Ai"], a)
                        s["Gi"] = sherman_morrison(s["Gi"], g)
                        s["pending"] = bool((s["Ai"].abs() > threshold).any() or (s["Gi"].abs() > threshold).any())
                grad = fold_bias_grad(m)
                p = s["Gi"] @ grad @ s["Ai"]
                scale = (grad[:, :-1].norm() + grad[:, -1].norm()) / (p[:, :-1].norm() + p[:, -1].norm())
                if torch.isfinite(scale):
                    m.weight.grad.copy_(p[:, :-1] * scale)
                    m.bias.grad.copy_(p[:, -1] * scale)
        sgd.step()
    return step


def handwritten_adafisher(model, loss_fn):
    """AdaFisher as curv's `adafisher` preset (language.md, `function = adafisher`), PyTorch eager,
    float32, biases folded into their layer: at steps 1, 101, ... the diagonals of the K-FAC factors
    from the training backward pass (sum x^2 / N and sum g^2 / N), min-max normalised, update
    D <- 0.08 D + 0.008 new (from ones); every step m <- 0.9 m + 0.1 grad and the weight moves by
    lr * m / (1 - 0.9^t) / (s h^T + 1e-3), lr 1e-3."""
    import torch  # noqa: PLC0415
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    lr, b1, damping, every, decay, weight = 1e-3, 0.9, 1e-3, 100, 0.08, 0.008
    state = [{"h": torch.ones(m.in_features + 1), "s": torch.ones(m.out_features),
              "m": torch.zeros(m.out_features, m.in_features + 1)} for m in linears]
    t = [0]

    def min_max(v):
        v = torch.nan_to_num(v, posinf=1.0, neginf=0.0)
        return (v - v.min()) / (v.max() - v.min() + 1e-6)

    def step(x, y):
        t[0] += 1
        capture = (t[0] - 1) % every == 0
        model.zero_grad()
        inputs, cotangents = captured_step(model, loss_fn, x, y, capture)
        with torch.no_grad():
            for index, (m, s) in enumerate(zip(linears, state)):
                if capture:
                    n = inputs[index].shape[0]
                    s["h"].mul_(decay).add_(min_max(inputs[index].square().sum(0) / n), alpha=weight)
                    s["s"].mul_(decay).add_(min_max(cotangents[index].square().sum(0) / n), alpha=weight)
                s["m"].mul_(b1).add_(fold_bias_grad(m), alpha=1 - b1)
                direction = s["m"] / (1 - b1 ** t[0]) / (torch.outer(s["s"], s["h"]) + damping)
                m.weight.add_(direction[:, :-1], alpha=-lr)
                m.bias.add_(direction[:, -1], alpha=-lr)
    return step


def jax_problem(problem):
    """The problem in JAX: parameters (list of (w, b)), forward(params, x), loss(output, y), batch."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    key = jax.random.PRNGKey(0)
    if problem == "digits":
        features, labels = digits_data()
        sizes, activation = [64, 256, 256, 10], jnp.tanh

        def loss(out, y):
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        def batch(step):
            index = (step * 128) % (len(features) - 128)
            return jnp.asarray(features[index:index + 128]), jnp.asarray(labels[index:index + 128])
    else:
        coords, values = siren_data()
        sizes = [2, 256, 256, 256, 1]

        def activation(h):
            return jnp.sin(30.0 * h)

        def loss(out, y):
            return jnp.mean((out - y) ** 2)
        x_all, y_all = jnp.asarray(coords), jnp.asarray(values)

        def batch(step):
            return x_all, y_all

    def forward(params, x):
        h = x
        for index, (w, b) in enumerate(params):
            h = h @ w + b
            if index < len(params) - 1:
                h = activation(h)
        return h
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, subkey = jax.random.split(key)
        bound = (6.0 / (fan_in + fan_out)) ** 0.5 if problem == "digits" else (6.0 / fan_in) ** 0.5 / 30.0
        params.append((jax.random.uniform(subkey, (fan_in, fan_out), minval=-bound, maxval=bound), jnp.zeros(fan_out)))
    return params, forward, loss, batch


def jax_timed(step, state, batch, warm, window):
    best = float("inf")
    for index in range(warm):
        state = step(state, *batch(index))
    for repeat in range(KRON_REPEATS):
        start = time.perf_counter()
        for index in range(warm + repeat * window, warm + (repeat + 1) * window):
            state = step(state, *batch(index))
        best = min(best, (time.perf_counter() - start) / window * 1000.0)
    return best


def optax_muon_ms(problem, warm, window):
    """optax.contrib.muon (jit): Nesterov momentum 0.95, 5 Newton-Schulz steps with the same
    coefficients on the matrices, Adam (b1 0.9, b2 0.95, eps 1e-10) on the vectors."""
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415
    params, forward, loss, batch = jax_problem(problem)
    optimizer = optax.contrib.muon(0.02, ns_coeffs=(3.4445, -4.7750, 2.0315), ns_steps=5, beta=0.95, eps=1e-7, nesterov=True,
                                   adam_b1=0.9, adam_b2=0.95, consistent_rms=None)

    @jax.jit
    def update(params, opt_state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss(forward(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def step(state, x, y):
        params, opt_state = state
        params, opt_state, value = update(params, opt_state, x, y)
        value.block_until_ready()
        return params, opt_state
    return jax_timed(step, (params, optimizer.init(params)), batch, warm, window)


def kfac_jax_ms(problem, warm, window):
    """kfac-jax's Optimizer (jit), configured as curv's `kfac`: sampled-label Fisher
    ("fisher_gradients"), factor EMA 0.95 refreshed every 5 steps, inverses every 5 steps, fixed
    damping 1e-3, learning rate 1e-2, no momentum, no adaptive rules."""
    import jax  # noqa: PLC0415
    import kfac_jax  # noqa: PLC0415
    from kfac_jax._src import tag_graph_matcher  # noqa: PLC0415
    from jax import extend as jex  # noqa: PLC0415

    def eval_jaxpr_eqn(eqn, in_values):
        # kfac-jax 0.0.8 unpacks `get_bind_params` as (subfuns, params); JAX 0.10 returns params only.
        bind = eqn.primitive.get_bind_params(eqn.params)
        subfuns, bind = bind if isinstance(bind, tuple) else ((), bind)
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **bind)
        return output if isinstance(output, list) else [output]
    tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
    params, forward, loss, batch = jax_problem(problem)

    def objective(params, data):
        x, y = data
        out = forward(params, x)
        if problem == "digits":
            kfac_jax.register_softmax_cross_entropy_loss(out, y)
        else:
            kfac_jax.register_squared_error_loss(out, y)
        return loss(out, y)
    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(objective), l2_reg=0.0, use_adaptive_learning_rate=False,
        learning_rate_schedule=lambda _: 1e-2, use_adaptive_momentum=False, momentum_schedule=lambda _: 0.0,
        use_adaptive_damping=False, damping_schedule=lambda _: 1e-3, estimation_mode="fisher_gradients",
        curvature_ema=0.95, curvature_update_period=5, inverse_update_period=5, num_burnin_steps=0, multi_device=False)
    rng = jax.random.PRNGKey(1)
    opt_state = optimizer.init(params, rng, batch(0))
    counter = [0]

    def step(state, x, y):
        params, opt_state, rng = state
        rng, key = jax.random.split(rng)
        params, opt_state, stats = optimizer.step(params, opt_state, key, batch=(x, y), global_step_int=counter[0])
        counter[0] += 1
        stats["loss"].block_until_ready()
        return params, opt_state, rng
    return jax_timed(step, (params, opt_state, rng), batch, warm, window)


def kronecker_peers(preset):
    """(label, function(problem, warm, window) -> ms) for each peer of a preset, with a note on
    how it differs from curv's preset where it does."""
    import torch  # noqa: PLC0415
    import pytorch_optimizer as po  # noqa: PLC0415
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting  # noqa: PLC0415
    try:
        import heavyball  # noqa: PLC0415
        # Eager: heavyball's default torch.compile (max-autotune) takes minutes on this CPU.
        heavyball.utils.compile_mode = None
    except ImportError:
        heavyball = None
    try:
        import kfac_jax  # noqa: F401, PLC0415
        have_kfac_jax = True
    except ImportError:
        have_kfac_jax = False

    def torch_peer(make):
        return lambda problem, warm, window: torch_mean_step_ms(problem, make, warm, window)

    peers = []
    if preset == "shampoo":
        # pytorch_optimizer.Shampoo runs without momentum: its momentum buffer holds the
        # preconditioned direction and is fed back through the preconditioner, which diverges.
        peers.append(("torch hand-written Distributed-Shampoo numerics", torch_peer(handwritten_shampoo)))
        peers.append(("pytorch_optimizer.Shampoo + Adam (no grafting or momentum, SVD roots, eps 1e-6)", torch_peer(optimizer_step(lambda m: [
            po.Shampoo(split_params(m)[0], lr=1e-3, momentum=0.0, preconditioning_compute_steps=10),
            torch.optim.Adam(split_params(m)[1], lr=1e-3)]))))
        peers.append(("pytorch_optimizer.ScalableShampoo + Adam (RMSprop graft, Newton roots)", torch_peer(optimizer_step(lambda m: [
            po.ScalableShampoo(split_params(m)[0], lr=1e-3, betas=(0.9, 0.999), moving_average_for_momentum=True,
                               start_preconditioning_step=10, preconditioning_compute_steps=10, statistics_compute_steps=1,
                               block_size=1024, nesterov=False, graft_type=LayerWiseGrafting.RMSPROP),
            torch.optim.Adam(split_params(m)[1], lr=1e-3)]))))
    elif preset == "soap":
        peers.append(("pytorch_optimizer.SOAP", torch_peer(optimizer_step(lambda m: [
            po.SOAP(m.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.0, precondition_frequency=10,
                    max_precondition_dim=10000, merge_dims=False, precondition_1d=False, eps=1e-8)]))))
        if heavyball is not None:
            peers.append(("heavyball.SOAP (eager)", torch_peer(optimizer_step(lambda m: [
                heavyball.SOAP(m.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.0,
                               precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                               use_precond_schedule=False, eps=1e-8, compile_step=False)]))))
    elif preset == "kfac":
        peers.append(("torch hand-written K-FAC (spec factors/cadence/damping)", torch_peer(handwritten_kfac)))
        if have_kfac_jax:
            peers.append(("kfac-jax Optimizer (jit; bias inside the factors)", kfac_jax_ms))
    elif preset == "muon":
        peers.append(("torch.optim.Muon + Adam", torch_peer(optimizer_step(lambda m: [
            torch.optim.Muon(split_params(m)[0], lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                             ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5, adjust_lr_fn="original"),
            torch.optim.Adam(split_params(m)[1], lr=0.02, betas=(0.9, 0.95), eps=1e-10)]))))
        peers.append(("pytorch_optimizer.Muon", torch_peer(optimizer_step(lambda m: [
            po.Muon([dict(params=split_params(m)[0], use_muon=True), dict(params=split_params(m)[1], use_muon=False, lr=0.02)],
                    lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, adamw_betas=(0.9, 0.95), adamw_eps=1e-10)]))))
        if heavyball is not None:
            peers.append(("heavyball.Muon (eager; its own momentum)", torch_peer(optimizer_step(lambda m: [
                heavyball.Muon(split_params(m)[0], lr=0.02, betas=(0.95, 0.95), nesterov=True, compile_step=False),
                torch.optim.Adam(split_params(m)[1], lr=0.02, betas=(0.9, 0.95), eps=1e-10)]))))
        peers.append(("optax.contrib.muon (jax jit)", optax_muon_ms))
    elif preset == "mkor":
        peers.append(("torch hand-written MKOR (spec)", torch_peer(handwritten_mkor)))
    elif preset == "adafisher":
        peers.append(("torch hand-written AdaFisher (spec)", torch_peer(handwritten_adafisher)))
    elif preset == "psgd_kron":
        # Both fit Q with kron_torch's triangular dQ = E Q update (curv: psgd_torch's Q^0.5 E Q^1.5
        # with the Procrustes step); preconditioner updated every step, no momentum, as curv's preset.
        peers.append(("pytorch_optimizer.Kron + Adam", torch_peer(optimizer_step(lambda m: [
            po.Kron(split_params(m)[0], lr=1e-3, momentum=0.0, pre_conditioner_update_probability=1.0, max_size_triangular=8192),
            torch.optim.Adam(split_params(m)[1], lr=1e-3)]))))
        if heavyball is not None:
            peers.append(("heavyball.PSGDKron + Adam (eager)", torch_peer(optimizer_step(lambda m: [
                heavyball.PSGDKron(split_params(m)[0], lr=1e-3, beta=0.0, preconditioner_update_probability=1.0,
                                   max_size_triangular=8192, precond_lr=0.1, compile_step=False),
                torch.optim.Adam(split_params(m)[1], lr=1e-3)]))))
    return peers


def kronecker_main(presets):
    warnings.filterwarnings("ignore")
    print("Kronecker family: AMORTISED step time = MEAN wall-clock ms per step over a window of steps after a")
    print(f"warm-up, the fastest of {KRON_REPEATS} consecutive windows (the same statistic for curv and every peer;")
    print("each window holds a whole number of refreshes):")
    for problem, (warm, window) in KRON_WINDOWS.items():
        print(f"  {problem}: warm-up {warm} steps, windows of {window} steps")
    for preset, windows in KRON_LONG_WINDOWS.items():
        print(f"  {preset}: " + ", ".join(f"{problem} warm-up {warm}, windows of {window}" for problem, (warm, window) in windows.items()))
    rows, notes = [], []
    for package, pip_name in (("heavyball", "heavyball"), ("kfac_jax", "kfac-jax")):
        try:
            __import__(package)
        except ImportError:
            notes.append(f"{pip_name} is not installed: its peers are left out (.venv/bin/pip install {pip_name})")
    # Other processes on the machine distort every number (PyTorch's threads most): say how busy it was.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    for preset in presets:
        for problem in KRON_WINDOWS:
            warm, window = kron_window(preset, problem)
            started = time.perf_counter()
            try:
                curv_ms = curv_mean_step_ms(KRON_EXAMPLES[problem], preset, warm, window)
            except NotExecutable as error:
                notes.append(f"skipped {preset}: {error}".replace("\n", " "))
                print(notes[-1], flush=True)
                break
            peers = []
            for label, measure in kronecker_peers(preset):
                try:
                    peers.append((label, measure(problem, warm, window)))
                except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    notes.append(f"{problem} {preset}: peer {label} failed: {type(error).__name__}: {error}".splitlines()[0])
                    print(notes[-1], flush=True)
            rows.append((problem, preset, curv_ms, peers))
            print(f"  measured {problem} {preset} in {time.perf_counter() - started:.0f} s", flush=True)
    # The floor is a lower bound on any implementation's step: the model's forward and backward
    # matrix products alone (not the optimizer's own matrix work) at numpy's GEMM rate, measured now.
    rate = gemm_gflops()
    floors = {problem: matmul_flops(problem) / (rate * 1e9) * 1000.0 for problem in KRON_WINDOWS}
    print()
    print(f"numpy float32 GEMM at 512: {rate:.1f} GFLOP/s; floor = the model's forward and backward products at that rate")
    print(f"{'problem':<8}{'preset':<12}{'curv ms':>10}{'fastest ms':>12}{'curv/fastest':>14}{'0.5 fastest':>13}{'floor ms':>10}  fastest peer (target: curv/fastest <= 0.5)")
    for problem, preset, curv_ms, peers in rows:
        if peers:
            label, best = min(peers, key=lambda peer: peer[1])
            below = "  (0.5 fastest is below the floor)" if 0.5 * best < floors[problem] else ""
            print(f"{problem:<8}{preset:<12}{curv_ms:>10.3f}{best:>12.3f}{curv_ms / best:>14.2f}{0.5 * best:>13.3f}{floors[problem]:>10.3f}  {label}{below}")
        else:
            print(f"{problem:<8}{preset:<12}{curv_ms:>10.3f}{'-':>12}{'-':>14}{'-':>13}{floors[problem]:>10.3f}  (no peer implementation)")
    print()
    print("All peers (mean ms per step, and curv's ratio to each):")
    for problem, preset, curv_ms, peers in rows:
        for label, ms in peers:
            print(f"  {problem:<8}{preset:<12}{ms:>10.3f}{curv_ms / ms:>8.2f}  {label}")
    for note in notes:
        print(note)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["all", "diagonal", "kronecker"], default="all",
                        help="diagonal: Adam, AdaHessian, Sophia-H and the kernels; kronecker: the Kronecker family")
    parser.add_argument("--presets", default=",".join(KRON_PRESETS),
                        help="with --only kronecker: comma-separated presets to time (default: all of them)")
    arguments = parser.parse_args()
    only = arguments.only
    if only in ("all", "diagonal"):
        diagonal_main()
    if only in ("all", "kronecker"):
        if only == "all":
            print()
        kronecker_main(arguments.presets.split(","))


def diagonal_main():
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
