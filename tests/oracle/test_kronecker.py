"""Oracle tests for the `kronecker` and `orthogonalize` structures (docs/language.md sections 12.7
and 12.8): Shampoo, SOAP, K-FAC and Muon, 20 float64 steps each, against float64 transcriptions of
their reference implementations, plus the matrix functions behind them against numpy.linalg.

Each training case writes a small .curv program (the digits data as one full batch, a tanh MLP
without biases, so that every parameter is a matrix that the structure governs), runs
`curv run --precision f64 --init ...` through `train_with_curv`, runs the transcription from the
same initial parameters on the same batch, and compares every final parameter within 1e-6
relative error (Frobenius norm), as the other oracle tests do.

The references are written in numpy, in float64, in curv's layout: a weight `W` is `[in, out]`
and is used as `x @ W`, which is PyTorch's `nn.Linear.weight` transposed. Shampoo, SOAP and the
Newton-Schulz iteration are symmetric under transposition (the left factor of one layout is the
right factor of the other), so the transcriptions apply the reference algorithm to curv's matrix
directly; where the layout matters (Muon's transpose test and scale) the transcription works in
PyTorch's layout and transposes at the end. No reference code is copied: each class is written
from the algorithm as the reference file implements it, and its docstring names that file and every
deviation (all of them float64 where the reference uses float32 or bfloat16).

The gradients come from a hand-written float64 backward pass (`forward_backward`), which also
returns each layer's input and output cotangent for K-FAC; `test_backward_pass_matches_autograd`
checks it against torch.autograd. `test_references_detect_the_details_they_check` shows that each
comparison can fail: plausible wrong variants of every reference move the final parameters by far
more than the tolerance. `test_references_are_insensitive_to_eigensolver_rounding` shows the
converse, that each case is well posed: eigendecompositions that differ only by rounding move the
final parameters by less than a tenth of the tolerance.

Conditioning of the cases. Shampoo's roots and K-FAC's inverses are matrix functions, so they do
not depend on which eigenvectors an eigensolver picks inside a repeated eigenvalue. SOAP's update
does (Adam's elementwise normalisation is not rotation invariant): a factor built from fewer
gradients than its size has a null space of several dimensions in which any orthonormal basis is
an equally valid output of `eigh`, and the next gradient has components there. SOAP is therefore
tested on a model whose SOAP factors are non-singular from the first step, except in null
directions that every gradient avoids exactly (see `SOAP_LAYERS`).
"""

import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from test_optimizers import CURV, DIGITS, load_digits, train_with_curv

STEPS = 20
SEED = 0
TOLERANCE = 1e-6

# The default model: `tanh(x @ w1) @ w2`.
MLP2 = {"w1": (64, 16), "w2": (16, 10)}
# Muon's model: a hidden layer with more outputs than inputs (w2, [16, 32]), so that the
# transposition inside Newton-Schulz and the scale sqrt(max(1, fan_out / fan_in)) = sqrt(2) are
# exercised, next to layers with fewer outputs than inputs.
MLP3 = {"w1": (64, 16), "w2": (16, 32), "w3": (32, 10)}
# SOAP's model. The first layer's gradient x^T g has rank at most 9 while its left factor is
# 64 x 64, so its eigenbasis would be arbitrary in a 55-dimensional null space: it is trained by
# Adam (the `adam` rule of the standard library, checked against torch.optim.Adam elsewhere).
# The 9 x 9 hidden layer has a full-rank gradient, so both of its factors are non-singular from the
# first step. The output layer's gradient has rank 9 (the softmax cotangent's rows sum to zero, so
# G 1 = 0 exactly): its left factor is 9 x 9 and non-singular, and its right factor is singular
# only along the all-ones vector, a one-dimensional null space (a unique basis vector up to sign)
# in which every gradient is zero.
SOAP_LAYERS = {"w1": (64, 9), "w2": (9, 9), "w3": (9, 10)}

PROGRAM = """\
{uses}data digits = csv("{data}", label = "label", scale = 0.0625)

model mlp(x: f32[B, 64]) -> f32[B, 10] {{
{params}
    return {expression}
}}

optimizer oracle {{
    lr {lr}
{lines}
}}

train fit {{
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer oracle
    batch all
    steps {steps}
    seed {seed}
}}
"""


def program_text(shapes, lines, lr, uses=()):
    """The .curv program of a tanh MLP without biases whose weights have `shapes` (in order),
    trained for STEPS full-batch steps with the optimizer lines `lines`."""
    names = list(shapes)
    params = "\n".join(f"    param {name}: f32[{rows}, {cols}] = glorot_uniform" for name, (rows, cols) in shapes.items())
    expression = f"x @ {names[0]}"
    for name in names[1:]:
        expression = f"tanh({expression}) @ {name}"
    return PROGRAM.format(
        uses="".join(f"use {module}\n\n" for module in uses), data=DIGITS, params=params,
        expression=expression, lr=lr, lines="\n".join(f"    {line}" for line in lines), steps=STEPS, seed=SEED,
    )


def initial_parameters(shapes, seed=1234):
    """Deterministic initial weights (normal, standard deviation 0.3), the same on both sides."""
    generator = np.random.default_rng(seed)
    return {name: generator.normal(0.0, 0.3, size=shape) for name, shape in shapes.items()}


def relative_error(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-300))


def compare(curv, reference, tolerance=TOLERANCE):
    """Asserts that every parameter of `reference` is within `tolerance` relative error in `curv`;
    the message lists every parameter's error, so that a failure shows which layer drifts."""
    errors = {}
    for name, theirs in reference.items():
        ours = curv[name]
        assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
        errors[name] = relative_error(ours, theirs)
    report = ", ".join(f"{name}: {error:.3e}" for name, error in errors.items())
    print(f"relative errors: {report}")
    assert all(error <= tolerance for error in errors.values()), f"relative errors {report} (tolerance {tolerance:g})"
    return errors


def run_curv(tmp_path, shapes, lines, lr, init, uses=()):
    return train_with_curv(tmp_path, program_text(shapes, lines, lr, uses), init, STEPS)


# --- The model, in float64 numpy -------------------------------------------------------------------


class Digits:
    """The full batch: features (scaled by 1/16) and one-hot labels."""

    def __init__(self):
        features, labels = load_digits()
        self.x = np.ascontiguousarray(features, dtype=np.float64)
        self.labels = labels
        self.onehot = np.eye(10)[labels]


def forward_backward(weights, data):
    """Mean cross-entropy of `tanh(...tanh(x @ W1)...) @ WL` and its backward pass.

    Returns `(loss, grads, layers)`, where `grads[i]` is the gradient of weight `i` and
    `layers[i] = (a, g)` its layer's input `a` ([N, in]) and the cotangent `g` ([N, out]) of its
    output `a @ W` with respect to the mean loss (so `g` carries the 1/N of the mean, and
    `grads[i] = a^T g`)."""
    activations = [data.x]
    for weight in weights[:-1]:
        activations.append(np.tanh(activations[-1] @ weight))
    logits = activations[-1] @ weights[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    count = data.x.shape[0]
    loss = -float(np.mean(np.sum(log_probabilities * data.onehot, axis=1)))
    cotangent = (np.exp(log_probabilities) - data.onehot) / count
    grads, layers = [None] * len(weights), [None] * len(weights)
    for index in reversed(range(len(weights))):
        inputs = activations[index]
        grads[index] = inputs.T @ cotangent
        layers[index] = (inputs, cotangent)
        if index > 0:
            cotangent = (cotangent @ weights[index].T) * (1.0 - inputs * inputs)
    return loss, grads, layers


def train_reference(shapes, init, make_updates, steps=STEPS):
    """Full-batch training of the MLP with `make_updates(names)`, an object whose
    `step(t, weights, grads, layers)` updates the list `weights` in place at step `t` (1-based).
    Returns the final weights and the losses seen at each step."""
    data = Digits()
    names = list(shapes)
    weights = [np.array(init[name], dtype=np.float64) for name in names]
    optimizer = make_updates(names)
    losses = []
    for t in range(1, steps + 1):
        loss, grads, layers = forward_backward(weights, data)
        losses.append(loss)
        optimizer.step(t, weights, grads, layers)
    return {name: weight for name, weight in zip(names, weights)}, losses


class PerParameter:
    """Applies one transcription per weight (each keeps its own state), chosen by name."""

    def __init__(self, names, factories):
        self.states = [factories(name) for name in names]

    def step(self, t, weights, grads, layers):
        for index, state in enumerate(self.states):
            weights[index] = state.step(t, weights[index], grads[index], layers[index])


class Adam:
    """torch.optim.Adam (and curv's `adam` rule of std/optimizers/adam.curv), no weight decay."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = self.v = None

    def step(self, t, weight, grad, layer):
        if self.m is None:
            self.m, self.v = np.zeros_like(grad), np.zeros_like(grad)
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1**t)
        v_hat = self.v / (1 - self.b2**t)
        return weight - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# --- Shampoo: facebookresearch/optimizers, Distributed Shampoo -------------------------------------


def inverse_root(factor, root, eps):
    """`matrix_inverse_root` with the default `EigenConfig` of facebookresearch/optimizers
    (distributed_shampoo/preconditioner/matrix_functions.py: `matrix_eigendecomposition` adds
    `epsilon * I` before `torch.linalg.eigh` (`perturb_before_computation = True`), then
    `matrix_inverse_root_from_eigendecomposition` shifts the eigenvalues by `-lambda_min` and then
    `+epsilon` when `lambda_min < epsilon`, and returns `Q diag(lambda^(-1/root)) Q^T`). In float64
    (the reference computes in the factor's dtype, float32 by default)."""
    eigenvalues, eigenvectors = np.linalg.eigh(factor + eps * np.eye(factor.shape[0]))
    smallest = eigenvalues.min()
    if smallest < eps:
        eigenvalues = eigenvalues - smallest
        eigenvalues = eigenvalues + eps
    return (eigenvectors * eigenvalues ** (-1.0 / root)) @ eigenvectors.T


def tiles(rows, cols, block):
    """The row-major cut of a `rows x cols` matrix into tiles of at most `block x block` (Distributed
    Shampoo's `max_preconditioner_dim` blocking, dimension by dimension), as slice pairs."""
    return [(slice(r, min(r + block, rows)), slice(c, min(c + block, cols)))
            for r in range(0, rows, block) for c in range(0, cols, block)]


class DistributedShampoo:
    """Distributed Shampoo (facebookresearch/optimizers, distributed_shampoo/distributed_shampoo.py
    `DistributedShampoo.step` / `_compute_search_directions`; preconditioner/
    shampoo_preconditioner_list.py `update_preconditioners` / `amortized_computation`;
    preconditioner/adagrad_preconditioner_list.py for Adam grafting; matrix_functions.py for the
    root), for one parameter, in float64, no weight decay, no momentum, default `beta3 = beta1`.

    Per tile of at most `block x block` and step t:
      - factors: `L <- beta2 L + w G G^T`, `R <- beta2 R + w G^T G`, `w = 1` if `beta2 == 1`
        (AdaGrad sum) else `1 - beta2` (`_update_factor_matrices`);
      - at `t % precondition_frequency == 0` (with `start_preconditioning_step` equal to it, the
        default), the roots of the factors divided by `1 - beta2^t` (when `beta2 < 1`,
        `_bias_correction2`) are recomputed (`amortized_computation`), from the factors that
        already include the current gradient;
      - grafting (`AdamGraftingConfig`): `V <- beta2g V + (1 - beta2g) G^2`;
      - filtered gradient: `M <- lerp(M, G, 1 - beta1)`, `Gbar = M / (1 - beta1^t)`
        (`_compute_filtered_grad_list` with `beta3 = beta1`: `1 - beta3 * beta1^(t-1)`);
      - `P_graft = Gbar / (sqrt(V / (1 - beta2g^t)) + eps_g)`; before `start` the direction is
        `P_graft`, from then on `P = Lroot Gbar Rroot` times `|P_graft| / (|P| + 1e-16)`
        (`_precondition_and_grafting`);
      - `W <- W - lr * direction`.
    The curv layout is the transpose of PyTorch's; the algorithm is symmetric under it.
    Deviation: float64 throughout (the reference's factor matrices default to float32)."""

    def __init__(self, lr, beta1, beta2, eps, root, every, graft_b2=0.999, graft_eps=1e-8, block=1024,
                 start=None, bias_correction=True, root_before_update=False):
        self.lr, self.beta1, self.beta2, self.eps, self.root, self.every = lr, beta1, beta2, eps, root, every
        self.graft_b2, self.graft_eps, self.block = graft_b2, graft_eps, block
        self.start = every if start is None else start
        # Deliberately wrong variants for the sensitivity test: roots of factors that are not
        # bias-corrected, or computed before the factors take the current gradient.
        self.bias_correction, self.root_before_update = bias_correction, root_before_update
        self.tiles = None

    def refresh_roots(self, tile, bias_correction2):
        correction = bias_correction2 if self.bias_correction else 1.0
        tile["Lroot"] = inverse_root(tile["L"] / correction, self.root, self.eps)
        tile["Rroot"] = inverse_root(tile["R"] / correction, self.root, self.eps)

    def step(self, t, weight, grad, layer):
        if self.tiles is None:
            self.tiles = []
            for rows, cols in tiles(*grad.shape, self.block):
                m, n = rows.stop - rows.start, cols.stop - cols.start
                self.tiles.append(dict(rows=rows, cols=cols, L=np.zeros((m, m)), R=np.zeros((n, n)),
                                       Lroot=np.eye(m), Rroot=np.eye(n), M=np.zeros((m, n)), V=np.zeros((m, n))))
        weight = weight.copy()
        weighting = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2
        bias_correction2 = 1.0 - self.beta2**t if self.beta2 < 1.0 else 1.0
        for tile in self.tiles:
            g = grad[tile["rows"], tile["cols"]]
            refresh = t % self.every == 0 and t >= self.start
            if refresh and self.root_before_update:
                self.refresh_roots(tile, bias_correction2)
            tile["L"] = (tile["L"] * self.beta2 if self.beta2 != 1.0 else tile["L"]) + weighting * (g @ g.T)
            tile["R"] = (tile["R"] * self.beta2 if self.beta2 != 1.0 else tile["R"]) + weighting * (g.T @ g)
            if refresh and not self.root_before_update:
                self.refresh_roots(tile, bias_correction2)
            tile["V"] = self.graft_b2 * tile["V"] + (1 - self.graft_b2) * g * g
            if self.beta1 != 0.0:
                tile["M"] = tile["M"] + (1 - self.beta1) * (g - tile["M"])
                filtered = tile["M"] / (1.0 - self.beta1**t)
            else:
                filtered = g
            graft = filtered / (np.sqrt(tile["V"] / (1.0 - self.graft_b2**t)) + self.graft_eps)
            if t < self.start:
                direction = graft
            else:
                shampoo = tile["Lroot"] @ filtered @ tile["Rroot"]
                direction = shampoo * (np.linalg.norm(graft) / (np.linalg.norm(shampoo) + 1e-16))
            weight[tile["rows"], tile["cols"]] -= self.lr * direction
        return weight


# name: (model, optimizer line, lr, keyword arguments of DistributedShampoo)
SHAMPOO_CASES = {
    # AdaGrad-summed factors and Distributed Shampoo's epsilon of 1e-12, roots every 4 steps
    # (recomputed at steps 4, 8, ..., 20), Adam grafting with its defaults. With roots every 3
    # steps, the first root would come from a left factor of rank 48 on w1 (3 gradients of rank
    # 16), whose null eigenvalues (1e-12 plus rounding errors of about 1e-16 |L|) are known only to
    # a few parts in 1e5 while the next gradients have components in that null space, which the
    # root amplifies the most: perturbing the eigensolver's rounding then moves the final w1 by
    # 1.5e-7 relative, too close to the tolerance. From 4 gradients on, the factor is
    # non-singular (apart from the input pixels that are zero in every image, in which all
    # gradients vanish exactly), and rounding moves the result by about 3e-8.
    "adagrad": (
        MLP2,
        "* : kronecker(stats = gradient_outer, ema = 1, eps = 1e-12, root = 4, every = 4, b1 = 0.9) graft adam",
        0.01, dict(beta1=0.9, beta2=1.0, eps=1e-12, root=4, every=4),
    ),
    # Exponentially averaged factors with bias correction (beta2 = 0.99), a second root (root = 2),
    # roots every 2 steps and non-default grafting hyperparameters.
    "ema": (
        MLP2,
        "* : kronecker(stats = gradient_outer, ema = 0.99, eps = 1e-10, root = 2, every = 2, b1 = 0.8) "
        "graft(kind = adam, b2 = 0.95, eps = 1e-6)",
        0.01, dict(beta1=0.8, beta2=0.99, eps=1e-10, root=2, every=2, graft_b2=0.95, graft_eps=1e-6),
    ),
    # Blocks of 8 (Distributed Shampoo's max_preconditioner_dim): w1 is cut into 8 x 2 tiles of
    # 8 x 8, w2 into tiles of 8 x 8 and 8 x 2, each with its own factors, roots and grafting norm;
    # no filtering of the gradient (b1 = 0).
    "blocks": (
        MLP2,
        "* : kronecker(stats = gradient_outer, ema = 1, eps = 1e-12, root = 4, every = 4, b1 = 0, block = 8) graft adam",
        0.01, dict(beta1=0.0, beta2=1.0, eps=1e-12, root=4, every=4, block=8),
    ),
}


def shampoo_reference(case, **overrides):
    shapes, _, lr, hyper = SHAMPOO_CASES[case]
    init = initial_parameters(shapes)
    hyper = {**hyper, **overrides}
    return train_reference(shapes, init, lambda names: PerParameter(names, lambda _: DistributedShampoo(lr, **hyper)))


@pytest.mark.parametrize("case", sorted(SHAMPOO_CASES))
def test_shampoo_matches_distributed_shampoo(tmp_path, case):
    shapes, line, lr, _ = SHAMPOO_CASES[case]
    init = initial_parameters(shapes)
    theirs, losses = shampoo_reference(case)
    assert losses[-1] < losses[0], "the reference does not train: the comparison would be uninformative"
    compare(run_curv(tmp_path, shapes, [line], lr, init), theirs)


# --- SOAP: nikhilvyas/SOAP ---------------------------------------------------------------------------


class Soap:
    """`SOAP.step` of nikhilvyas/SOAP `soap.py` for one 2-D parameter (no dimension above
    `max_precond_dim`, `merge_dims = False`, `normalize_grads = False`, `correct_bias = True`,
    `weight_decay = 0`), in float64, with `shampoo_beta` given separately from `betas[1]`.

      - First call (`'Q' not in state`): `init_preconditioner`, then `update_preconditioner(grad)`:
        `GG[i].lerp_(outer, 1 - shampoo_beta)` from zeros, and `Q = get_orthogonal_matrix(GG)`:
        `eigh(GG[i] + 1e-30 I)` with the columns flipped (eigenvalues descending); then `continue`,
        so the parameter does not move and `state['step']` stays 0.
      - Later calls: `grad_projected = project(grad)` (`Q_0^T G Q_1`), `state['step'] += 1` (s),
        `exp_avg` (kept in the rotated basis) and `exp_avg_sq` updated with it,
        `step_size = lr * sqrt(1 - beta2^s) / (1 - beta1^s)`,
        `p -= step_size * project_back(exp_avg / (sqrt(exp_avg_sq) + eps))`; then
        `update_preconditioner(grad)`: `exp_avg` projected back to the parameter's basis, the factors
        take the current gradient, and when `s % precondition_frequency == 0`,
        `get_orthogonal_matrix_QR`: per factor, `est_eig = diag(Q^T GG Q)`, columns (and
        `exp_avg_sq` along that dimension) sorted by it descending, `Q = qr(GG Q).Q`; finally
        `exp_avg` projected onto the (new) basis.
    The curv layout is the transpose of PyTorch's; SOAP is symmetric under it (the factor of
    dimension 0 of one is that of dimension 1 of the other).
    Deviations: float64 throughout; the reference creates `GG` as float32 (`torch.zeros` without a
    dtype) and casts to float32 before `eigh` and `qr`. The `1e-30 I` of the first `eigh` is kept
    (it is below float64's resolution next to these factors and has no effect)."""

    def __init__(self, lr, beta1, beta2, shampoo_beta, eps, every, update_factors_first=False, refresh_on_t=False):
        self.lr, self.beta1, self.beta2, self.shampoo_beta = lr, beta1, beta2, shampoo_beta
        self.eps, self.every = eps, every
        # A deliberately wrong variant for the sensitivity test: the factors (and the basis) take
        # the current gradient before the step instead of after it.
        self.update_factors_first = update_factors_first
        # Another: the QR refresh counted in steps t = s + 1 instead of in s.
        self.refresh_on_t = refresh_on_t
        self.Q = None
        self.s = 0

    def project(self, matrix):
        return self.Q[0].T @ matrix @ self.Q[1]

    def project_back(self, matrix):
        return self.Q[0] @ matrix @ self.Q[1].T

    def update_preconditioner(self, grad):
        if self.Q is not None:
            self.exp_avg = self.project_back(self.exp_avg)
        for index, outer in enumerate((grad @ grad.T, grad.T @ grad)):
            self.GG[index] = self.GG[index] + (1 - self.shampoo_beta) * (outer - self.GG[index])
        if self.Q is None:
            self.Q = []
            for factor in self.GG:
                _, eigenvectors = np.linalg.eigh(factor + 1e-30 * np.eye(factor.shape[0]))
                self.Q.append(eigenvectors[:, ::-1])
        counter = self.s + 1 if self.refresh_on_t else self.s
        if self.s > 0 and counter % self.every == 0:
            refreshed = []
            for index, (factor, basis) in enumerate(zip(self.GG, self.Q)):
                estimated = np.diag(basis.T @ factor @ basis)
                order = np.argsort(-estimated, kind="stable")
                self.exp_avg_sq = np.take(self.exp_avg_sq, order, axis=index)
                basis = basis[:, order]
                q, _ = np.linalg.qr(factor @ basis)
                refreshed.append(q)
            self.Q = refreshed
        if self.s > 0:
            self.exp_avg = self.project(self.exp_avg)

    def step(self, t, weight, grad, layer):
        if self.Q is None:
            self.exp_avg, self.exp_avg_sq = np.zeros_like(grad), np.zeros_like(grad)
            self.GG = [np.zeros((grad.shape[0],) * 2), np.zeros((grad.shape[1],) * 2)]
            self.update_preconditioner(grad)
            return weight
        if self.update_factors_first:
            self.s += 1
            self.update_preconditioner(grad)
            self.s -= 1
        projected = self.project(grad)
        self.s += 1
        self.exp_avg = self.beta1 * self.exp_avg + (1 - self.beta1) * projected
        self.exp_avg_sq = self.beta2 * self.exp_avg_sq + (1 - self.beta2) * projected**2
        denominator = np.sqrt(self.exp_avg_sq) + self.eps
        step_size = self.lr * (1 - self.beta2**self.s) ** 0.5 / (1 - self.beta1**self.s)
        weight = weight - step_size * self.project_back(self.exp_avg / denominator)
        if not self.update_factors_first:
            self.update_preconditioner(grad)
        return weight


SOAP_LR = 0.01
SOAP_LINE = "w* : kronecker(stats = gradient_outer, function = eigenbasis, ema = 0.9, b1 = 0.9, b2 = 0.95, eps = 1e-6, every = 3)"
SOAP_HYPER = dict(beta1=0.9, beta2=0.95, shampoo_beta=0.9, eps=1e-6, every=3)


def soap_reference(**overrides):
    init = initial_parameters(SOAP_LAYERS)
    hyper = {**SOAP_HYPER, **overrides}

    def factory(name):
        return Adam(SOAP_LR) if name == "w1" else Soap(SOAP_LR, **hyper)

    return train_reference(SOAP_LAYERS, init, lambda names: PerParameter(names, factory))


def test_soap_matches_nikhilvyas_soap(tmp_path):
    """`function = eigenbasis` on the 9 x 9 hidden layer and the 9 x 10 output layer (the first
    layer by Adam, see SOAP_LAYERS), with the factors' decay (`ema = 0.9`) distinct from Adam's
    `b2 = 0.95` and the basis refreshed by QR at s = 3, 6, ..., 18 (steps 4, 7, ..., 19)."""
    init = initial_parameters(SOAP_LAYERS)
    theirs, losses = soap_reference()
    assert losses[-1] < losses[0]
    ours = run_curv(tmp_path, SOAP_LAYERS, ["w1 : adam", SOAP_LINE], SOAP_LR, init, uses=["std.optimizers.adam"])
    compare(ours, theirs)


# --- Muon: KellerJordan/Muon -------------------------------------------------------------------------


def newton_schulz(matrix, steps, a=3.4445, b=-4.7750, c=2.0315):
    """`zeropower_via_newtonschulz5` of KellerJordan/Muon `muon.py` for one matrix (in PyTorch's
    layout), in float64: transpose when `rows > cols`, divide by the Frobenius norm plus 1e-7,
    `steps` times `A = X X^T`, `X <- a X + (b A + c A A) X`, transpose back. The coefficients are
    parameters here (the reference fixes (3.4445, -4.7750, 2.0315)). Deviation: float64 instead of
    the reference's bfloat16."""
    x = np.array(matrix, dtype=np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon:
    """`SingleDeviceMuon.step` / `muon_update` of KellerJordan/Muon `muon.py` for one 2-D
    parameter, in float64, without weight decay: `momentum.lerp_(grad, 1 - beta)`;
    `update = grad.lerp_(momentum, beta)` with Nesterov, else the momentum;
    `zeropower_via_newtonschulz5`; `update *= sqrt(max(1, rows / cols))` of PyTorch's
    `[out, in]` weight; `p -= lr * update`. curv's weight is that weight transposed, so the
    transcription transposes in and out. Deviation: Newton-Schulz in float64 (bfloat16 in the
    reference); `nesterov` is a parameter (the reference's `muon_update` takes it, `step` uses the
    default True)."""

    def __init__(self, lr, momentum, nesterov, steps=5, scale=True):
        self.lr, self.momentum, self.nesterov, self.steps, self.scale = lr, momentum, nesterov, steps, scale
        self.buffer = None

    def step(self, t, weight, grad, layer):
        grad = grad.T  # PyTorch's layout, [out, in]
        if self.buffer is None:
            self.buffer = np.zeros_like(grad)
        self.buffer = self.buffer + (1 - self.momentum) * (grad - self.buffer)
        update = grad + self.momentum * (self.buffer - grad) if self.nesterov else self.buffer
        update = newton_schulz(update, self.steps)
        if self.scale:
            update = update * max(1.0, grad.shape[0] / grad.shape[1]) ** 0.5
        return weight - self.lr * update.T


MUON_CASES = {
    "nesterov": ("* : orthogonalize(steps = 5, a = 3.4445, b = -4.7750, c = 2.0315, momentum = 0.95, nesterov = true)",
                 0.02, dict(momentum=0.95, nesterov=True)),
    "heavy_ball": ("* : orthogonalize(steps = 5, a = 3.4445, b = -4.7750, c = 2.0315, momentum = 0.9, nesterov = false)",
                   0.02, dict(momentum=0.9, nesterov=False)),
}


def muon_reference(case, **overrides):
    _, lr, hyper = MUON_CASES[case]
    init = initial_parameters(MLP3)
    hyper = {**hyper, **overrides}
    return train_reference(MLP3, init, lambda names: PerParameter(names, lambda _: Muon(lr, **hyper)))


@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_muon_matches_kellerjordan_muon(tmp_path, case):
    line, lr, _ = MUON_CASES[case]
    init = initial_parameters(MLP3)
    theirs, losses = muon_reference(case)
    assert losses[-1] < losses[0]
    compare(run_curv(tmp_path, MLP3, [line], lr, init), theirs)


# --- K-FAC: the spec's K-FAC, kfac-jax's damping, kfac-pytorch's EIGEN mode ---------------------------


class Kfac:
    """K-FAC with empirical-Fisher factors as docs/language.md section 12.7 specifies them, for one
    weight used as `x @ W` (curv's layout: rows are inputs), in float64.

    Factors: `A = a^T a / N` from the layer input `a` and `G = d^T d / N` from the per-example
    cotangents `d = N g`, where `g` is the cotangent of the layer output with respect to the mean
    loss (so `G` is the per-example expectation `sum d_i d_i^T / N`, the textbook Fisher factor and
    kfac-jax's `fisher_gradients` normalisation), averaged by `F <- ema F + (1 - ema) X` from zero
    and divided by `1 - ema^k` after `k` updates: kfac-jax's normalised moving average
    (`utils/accumulators.py` `WeightedMovingAverage`). kfac-pytorch instead starts the average at
    the identity (`kfac/layers/base.py` `update_a_factor`: `a_factor = diag(1)` before the first
    EMA) and does not bias-correct; `identity_start = True` gives that variant (used only to show
    the tests see the difference). Factors and inverses are refreshed at steps 1, 1 + every, ...

    The scale of `G` differs between references: gpauloski/kfac-pytorch
    (`kfac/layers/modules.py` `LinearModuleHelper.get_g_factor` with `kfac/layers/utils.py`
    `get_cov` on the mean loss's grad_output) uses `g^T g / N`, N^2 times smaller, and relies on KL
    clipping to tame the resulting step; kfac-jax's `fisher_empirical`
    (curvature_estimator/block_diagonal.py, vjp divided by sqrt(batch_size), then
    kronecker_factored.py's `/ batch_size`) uses `g^T g`. `per_example_cotangents = False` gives
    kfac-pytorch's scale (used only to show the tests see the difference).

    `damped_inverse`: `(A + pi sqrt(gamma) I)^-1 Grad (G + sqrt(gamma) / pi I)^-1` with
    `pi = sqrt((tr A / dim A) / (tr G / dim G))`, google-deepmind/kfac-jax `utils/math.py`
    `pi_adjusted_kronecker_factors` (its `c_k (u_i + d_k I)` factors, whose scalars cancel in the
    Kronecker product of the two), or `pi = 1` (kfac-jax with `pi_adjusted_inverse = False`).
    kfac-pytorch's INVERSE mode (`kfac/layers/inverse.py`) damps each factor by `damping`, not by
    `sqrt(damping)`; the spec follows kfac-jax here.

    `damped_eigen`: kfac-pytorch's EIGEN mode (`kfac/layers/eigen.py` `compute_a_inv`,
    `compute_g_inv` with eigenvalues clamped at zero, `preconditioned_grad`:
    `Q_G [(Q_G^T Grad Q_A) / (d_G d_A^T + damping)] Q_A^T` in PyTorch's `[out, in]` layout, which is
    `Q_A [(Q_A^T Grad Q_G) / (d_A d_G^T + damping)] Q_G^T` in curv's), on the spec's factors.

    The step is `W <- W - lr * direction` (no KL clipping, no momentum). Deviations: float64 (the
    references' factors default to float32, kfac-pytorch inverts in float32); `numpy.linalg.inv`
    stands for the Cholesky or LU inverse (the same matrix up to rounding)."""

    def __init__(self, lr, function, ema, damping, every, pi=True, identity_start=False, factors_every_step=False,
                 per_example_cotangents=True):
        self.lr, self.function, self.ema, self.damping, self.every = lr, function, ema, damping, every
        self.pi, self.identity_start = pi, identity_start
        # A deliberately wrong variant for the sensitivity test: the factors take every step's
        # statistics, and only the inverses follow the cadence.
        self.factors_every_step = factors_every_step
        # `G` from the cotangents of the per-example losses, `N g` (the spec); False gives
        # kfac-pytorch's scale, the mean loss's cotangents, N^2 times smaller.
        self.per_example_cotangents = per_example_cotangents
        self.updates = 0
        self.A = self.G = None

    def refresh(self, inputs, cotangent, invert=True):
        count = inputs.shape[0]
        if self.per_example_cotangents:
            cotangent = cotangent * count
        a_new = inputs.T @ inputs / count
        g_new = cotangent.T @ cotangent / count
        if self.A is None:
            start = np.eye if self.identity_start else (lambda n: np.zeros((n, n)))
            self.A, self.G = start(a_new.shape[0]), start(g_new.shape[0])
        self.A = self.ema * self.A + (1 - self.ema) * a_new
        self.G = self.ema * self.G + (1 - self.ema) * g_new
        self.updates += 1
        if not invert:
            return
        correction = 1.0 if self.identity_start else 1.0 - self.ema**self.updates
        a_hat, g_hat = self.A / correction, self.G / correction
        if self.function == "damped_inverse":
            pi = np.sqrt((np.trace(a_hat) / len(a_hat)) / (np.trace(g_hat) / len(g_hat))) if self.pi else 1.0
            root = np.sqrt(self.damping)
            self.a_inverse = np.linalg.inv(a_hat + pi * root * np.eye(len(a_hat)))
            self.g_inverse = np.linalg.inv(g_hat + root / pi * np.eye(len(g_hat)))
        else:
            d_a, self.q_a = np.linalg.eigh(a_hat)
            d_g, self.q_g = np.linalg.eigh(g_hat)
            self.scale = 1.0 / (np.outer(np.maximum(d_a, 0.0), np.maximum(d_g, 0.0)) + self.damping)

    def step(self, t, weight, grad, layer):
        if (t - 1) % self.every == 0:
            self.refresh(*layer)
        elif self.factors_every_step:
            self.refresh(*layer, invert=False)
        if self.function == "damped_inverse":
            direction = self.a_inverse @ grad @ self.g_inverse
        else:
            direction = self.q_a @ ((self.q_a.T @ grad @ self.q_g) * self.scale) @ self.q_g.T
        return weight - self.lr * direction


KFAC_CASES = {
    "damped_inverse_pi": (
        "* : kronecker(stats = kfac, fisher = empirical, ema = 0.95, damping = 1e-3, every = 2, function = damped_inverse)",
        3e-4, dict(function="damped_inverse", ema=0.95, damping=1e-3, every=2, pi=True),
    ),
    "damped_inverse_no_pi": (
        "* : kronecker(stats = kfac, fisher = empirical, ema = 0.95, damping = 1e-3, every = 2, function = damped_inverse, pi = false)",
        3e-3, dict(function="damped_inverse", ema=0.95, damping=1e-3, every=2, pi=False),
    ),
    "damped_eigen": (
        "* : kronecker(stats = kfac, fisher = empirical, ema = 0.9, damping = 1e-3, every = 3, function = damped_eigen)",
        3e-4, dict(function="damped_eigen", ema=0.9, damping=1e-3, every=3),
    ),
}


def kfac_reference(case, **overrides):
    _, lr, hyper = KFAC_CASES[case]
    init = initial_parameters(MLP2)
    hyper = {**hyper, **overrides}
    return train_reference(MLP2, init, lambda names: PerParameter(names, lambda _: Kfac(lr, **hyper)))


@pytest.mark.parametrize("case", sorted(KFAC_CASES))
def test_kfac_matches_the_specified_kfac(tmp_path, case):
    line, lr, _ = KFAC_CASES[case]
    init = initial_parameters(MLP2)
    theirs, losses = kfac_reference(case)
    assert losses[-1] < losses[0]
    compare(run_curv(tmp_path, MLP2, [line], lr, init), theirs)


class KlClippedKfac:
    """K-FAC as `Kfac` for every layer, then gpauloski/kfac-pytorch's KL clipping
    (`kfac/base_preconditioner.py`, the `kl_clip` step of `step()`): with the preconditioned
    gradients `d_l` of all layers, `nu = min(1, sqrt(kappa / |sum_l lr^2 <d_l, g_l>|))`, every
    `d_l` is multiplied by `nu`, and the wrapped `torch.optim.SGD` with momentum `beta` (no
    dampening, no Nesterov) steps: `b <- beta b + d`, `W <- W - lr b`."""

    def __init__(self, names, lr, kappa, beta, **hyper):
        self.lr, self.kappa, self.beta = lr, kappa, beta
        self.kfac = [Kfac(lr, **hyper) for _ in names]
        self.buffers = [None for _ in names]

    def step(self, t, weights, grads, layers):
        directions = []
        for index, (weight, grad, layer) in enumerate(zip(weights, grads, layers)):
            # `Kfac.step` returns `W - lr d`; the direction is recovered from it.
            directions.append((weight - self.kfac[index].step(t, weight, grad, layer)) / self.lr)
        inner = sum(float(np.sum(d * g)) * self.lr**2 for d, g in zip(directions, grads))
        nu = min(1.0, np.sqrt(self.kappa / abs(inner))) if inner != 0.0 else 1.0
        for index, direction in enumerate(directions):
            buffer = self.buffers[index]
            self.buffers[index] = nu * direction if buffer is None else self.beta * buffer + nu * direction
            weights[index] = weights[index] - self.lr * self.buffers[index]


def kl_clip_reference(kappa):
    init = initial_parameters(MLP2)
    hyper = dict(function="damped_eigen", ema=0.95, damping=1e-3, every=3)
    return train_reference(MLP2, init, lambda names: KlClippedKfac(names, 0.1, kappa, 0.9, **hyper))


def test_kfac_kl_clipping_and_momentum_match_kfac_pytorch(tmp_path):
    """kfac-pytorch's recipe (EIGEN mode, lr 0.1, KL clipping 1e-3, SGD momentum 0.9) with the
    spec's factors: the clipping scale couples the layers, so both must match together."""
    line = ("* : kronecker(stats = kfac, fisher = empirical, ema = 0.95, damping = 1e-3, every = 3, "
            "function = damped_eigen) kl_clip 0.001 momentum 0.9")
    theirs, losses = kl_clip_reference(1e-3)
    assert losses[-1] < losses[0]
    compare(run_curv(tmp_path, MLP2, [line], 0.1, initial_parameters(MLP2)), theirs)
    # The clipping is active in this run: a much larger kappa (no clipping) ends elsewhere.
    unclipped, _ = kl_clip_reference(1e6)
    assert max(relative_error(unclipped[name], theirs[name]) for name in theirs) > 100 * TOLERANCE


# --- The references can fail --------------------------------------------------------------------------


def test_backward_pass_matches_autograd():
    """The hand-written backward pass (gradients and K-FAC's cotangents) against torch.autograd."""
    data = Digits()
    init = initial_parameters(MLP3)
    weights = [init[name] for name in MLP3]
    loss, grads, layers = forward_backward(weights, data)
    tensors = [torch.tensor(weight, requires_grad=True) for weight in weights]
    hidden = torch.tensor(data.x)
    outputs = []
    for index, tensor in enumerate(tensors):
        output = hidden @ tensor
        output.retain_grad()
        outputs.append(output)
        hidden = torch.tanh(output) if index + 1 < len(tensors) else output
    torch_loss = torch.nn.functional.cross_entropy(hidden, torch.tensor(data.labels))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) <= 1e-14 * abs(loss)
    for grad, tensor, (_, cotangent), output in zip(grads, tensors, layers, outputs):
        assert relative_error(grad, tensor.grad.numpy()) <= 1e-13
        assert relative_error(cotangent, output.grad.numpy()) <= 1e-13


def sensitivity_cases():
    """(name, correct reference, wrong variant): each wrong variant is a plausible misreading of the
    spec or the reference that the matching test must reject."""
    return {
        "shampoo: roots computed before the factors take the current gradient": (
            lambda: shampoo_reference("adagrad"), lambda: shampoo_reference("adagrad", root_before_update=True)),
        "shampoo: factors not bias-corrected": (
            lambda: shampoo_reference("ema"), lambda: shampoo_reference("ema", bias_correction=False)),
        "shampoo: one tile instead of blocks of 8": (
            lambda: shampoo_reference("blocks"), lambda: shampoo_reference("blocks", block=1024)),
        "shampoo: no grafting before the first root": (
            lambda: shampoo_reference("adagrad"), lambda: shampoo_reference("adagrad", start=1)),
        "soap: factors take the current gradient before the step": (
            lambda: soap_reference(), lambda: soap_reference(update_factors_first=True)),
        "soap: factor decay equal to b2 (the reference's default shampoo_beta)": (
            lambda: soap_reference(), lambda: soap_reference(shampoo_beta=0.95)),
        "soap: QR refresh counted in steps t instead of s = t - 1": (
            lambda: soap_reference(), lambda: soap_reference(refresh_on_t=True)),
        "muon: no scale for fan_out > fan_in": (
            lambda: muon_reference("nesterov"), lambda: muon_reference("nesterov", scale=False)),
        "muon: heavy ball instead of Nesterov": (
            lambda: muon_reference("nesterov"), lambda: muon_reference("nesterov", nesterov=False)),
        "kfac: no pi adjustment": (
            lambda: kfac_reference("damped_inverse_pi"), lambda: kfac_reference("damped_inverse_pi", pi=False)),
        "kfac: kfac-pytorch's identity start without bias correction": (
            lambda: kfac_reference("damped_inverse_pi"), lambda: kfac_reference("damped_inverse_pi", identity_start=True)),
        "kfac: factors updated at every step, only the inverses at the cadence": (
            lambda: kfac_reference("damped_inverse_no_pi"), lambda: kfac_reference("damped_inverse_no_pi", factors_every_step=True)),
        "kfac: G from the mean loss's cotangents (kfac-pytorch's scale), N^2 times smaller": (
            lambda: kfac_reference("damped_inverse_pi"), lambda: kfac_reference("damped_inverse_pi", per_example_cotangents=False)),
        "kfac eigen: kfac-pytorch's identity start without bias correction": (
            lambda: kfac_reference("damped_eigen"), lambda: kfac_reference("damped_eigen", identity_start=True)),
    }


@pytest.mark.parametrize("case", sorted(sensitivity_cases()))
def test_references_detect_the_details_they_check(case):
    """Each wrong variant moves some final parameter by more than 100 times the tolerance, so the
    comparisons above would catch an implementation that made that mistake."""
    correct, wrong = sensitivity_cases()[case]
    ours, _ = correct()
    theirs, _ = wrong()
    largest = max(relative_error(theirs[name], ours[name]) for name in ours)
    assert largest > 100 * TOLERANCE, f"{case}: the variant differs by only {largest:.3e}"


def permuted_eigh(seed):
    """`numpy.linalg.eigh` computed on a randomly permuted copy of the matrix and permuted back: an
    equally valid decomposition with different rounding errors (and a different choice of basis
    inside any repeated eigenvalue), as another eigensolver would give."""
    generator = np.random.default_rng(seed)
    original = np.linalg.eigh

    def eigh(matrix):
        order = generator.permutation(len(matrix))
        eigenvalues, eigenvectors = original(matrix[np.ix_(order, order)])
        restored = np.empty_like(eigenvectors)
        restored[order] = eigenvectors
        return eigenvalues, restored

    return eigh


def eigensolver_cases():
    cases = {f"shampoo {case}": (lambda case=case: shampoo_reference(case)) for case in SHAMPOO_CASES}
    cases["soap"] = soap_reference
    cases.update({f"kfac {case}": (lambda case=case: kfac_reference(case)) for case in KFAC_CASES})
    return cases


@pytest.mark.parametrize("case", sorted(eigensolver_cases()))
def test_references_are_insensitive_to_eigensolver_rounding(case, monkeypatch):
    """The cases are well posed: re-running a reference with eigendecompositions that differ only
    by rounding (and by the basis chosen inside repeated eigenvalues) moves every final parameter by
    less than a tenth of the tolerance, so a correct implementation with its own eigensolver can
    pass. (Shampoo's `adagrad` case measures about 3e-8, SOAP about 5e-9, the others less.)"""
    run = eigensolver_cases()[case]
    ours, _ = run()
    worst = 0.0
    for seed in range(3):
        monkeypatch.setattr(np.linalg, "eigh", permuted_eigh(seed))
        theirs, _ = run()
        monkeypatch.undo()
        worst = max(worst, max(relative_error(theirs[name], ours[name]) for name in ours))
    print(f"{case}: {worst:.3e}")
    assert worst <= TOLERANCE / 10, f"{case}: rounding in the eigensolver alone moves the result by {worst:.3e}"


# --- Matrix functions: `curv matrix-function` against numpy.linalg ------------------------------------


def spd_matrix(n, condition, seed):
    """A random symmetric positive definite matrix with eigenvalues spread log-uniformly from 1 down
    to 1 / condition (both ends included), in a random orthogonal basis."""
    generator = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(generator.normal(size=(n, n)))
    eigenvalues = np.logspace(0.0, -np.log10(condition), n)
    matrix = (basis * eigenvalues) @ basis.T
    return (matrix + matrix.T) / 2


def curv_matrix_function(tmp_path, name, matrix, **options):
    """Runs `curv matrix-function NAME INPUT OUTPUT [--root R] [--eps E] [--damping D] [--steps S]`
    on `matrix` (a float64 tensor named `a`) and returns the float64 tensor `result`."""
    source, target = tmp_path / "a.safetensors", tmp_path / "result.safetensors"
    save_file({"a": np.ascontiguousarray(matrix, dtype=np.float64)}, str(source))
    flags = []
    for key, value in options.items():
        flags += [f"--{key}", repr(value)]
    result = subprocess.run([str(CURV), "matrix-function", name, str(source), str(target), *flags],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output = load_file(str(target))["result"]
    assert output.dtype == np.float64
    return output


# Tolerances. A well-conditioned input (condition 10) is compared within 1e-8. For a condition
# number of 1e10, backward-stable algorithms (Householder tridiagonalisation and QR iteration, or
# Cholesky) give eigenvalues and inverses with relative errors up to about condition * unit
# roundoff = 1e10 * 1.1e-16 ~ 1e-6 in the directions of the smallest eigenvalues, which dominate
# both `A^(-1/r)` and `A^-1`; two such algorithms (numpy's LAPACK and curv's own) can therefore
# disagree by that much even when both are correct. The inverse root attenuates it by 1/r, so the
# ill-conditioned cases allow 1e-5 (about 10 n u condition / r for n = 24); the damped inverse with
# damping above the smallest eigenvalue is well conditioned again and keeps 1e-8.
MATRIX_FUNCTION_CASES = {
    # name: (function, matrix builder, options, tolerance)
    "inverse_root_4_well_conditioned": ("inverse_root", lambda: spd_matrix(24, 10.0, 1), dict(root=4, eps=1e-12), 1e-8),
    "inverse_root_2_well_conditioned": ("inverse_root", lambda: spd_matrix(17, 10.0, 2), dict(root=2, eps=1e-6), 1e-8),
    "inverse_root_4_ill_conditioned": ("inverse_root", lambda: spd_matrix(24, 1e10, 3), dict(root=4, eps=1e-12), 1e-5),
    # The epsilon (1e-8) is larger than the smallest eigenvalues (down to 1e-10): it dominates there.
    "inverse_root_4_eps_dominates": ("inverse_root", lambda: spd_matrix(24, 1e10, 4), dict(root=4, eps=1e-8), 1e-8),
    # An indefinite matrix (eigenvalues from 1 down to -0.01): the minimum-eigenvalue shift applies.
    "inverse_root_4_shifted": ("inverse_root", lambda: spd_matrix(20, 10.0, 5) - 0.11 * np.eye(20), dict(root=4, eps=1e-6), 1e-8),
    # A singular positive semi-definite matrix (rank 6 of 16): only epsilon keeps it invertible.
    "inverse_root_4_singular": ("inverse_root", lambda: low_rank(16, 6, 6), dict(root=4, eps=1e-3), 1e-8),
    "damped_inverse_well_conditioned": ("damped_inverse", lambda: spd_matrix(24, 10.0, 7), dict(damping=1e-3), 1e-8),
    "damped_inverse_ill_conditioned": ("damped_inverse", lambda: spd_matrix(24, 1e10, 8), dict(damping=1e-3), 1e-8),
    # Without effective damping (1e-12 against eigenvalues down to 1e-10) the inverse is as
    # ill-conditioned as the matrix: 1e-5 as for the inverse root (here without the 1/r).
    "damped_inverse_undamped_ill_conditioned": ("damped_inverse", lambda: spd_matrix(24, 1e10, 9), dict(damping=1e-12), 1e-4),
    # Coupled Newton (Distributed Shampoo's `_matrix_inverse_root_newton`) stops once
    # max |M - I| <= 1e-6; its quadratic convergence leaves the root far closer than that, but the
    # stopping rule is all it promises, so the tolerance is 1e-6.
    "inverse_root_newton_4_well_conditioned": ("inverse_root_newton", lambda: spd_matrix(24, 10.0, 14), dict(root=4, eps=1e-12), 1e-6),
    "inverse_root_newton_2_condition_1e4": ("inverse_root_newton", lambda: spd_matrix(16, 1e4, 15), dict(root=2, eps=1e-6), 1e-6),
    "newton_schulz_wide": ("newton_schulz", lambda: np.random.default_rng(10).normal(size=(12, 30)), dict(steps=5), 1e-8),
    "newton_schulz_tall": ("newton_schulz", lambda: np.random.default_rng(11).normal(size=(30, 12)), dict(steps=5), 1e-8),
    "newton_schulz_square_ten_steps": ("newton_schulz", lambda: np.random.default_rng(12).normal(size=(16, 16)), dict(steps=10), 1e-8),
    "newton_schulz_ill_conditioned": ("newton_schulz", lambda: spd_matrix(20, 1e10, 13)[:, :14], dict(steps=5), 1e-8),
}


def low_rank(n, rank, seed):
    factor = np.random.default_rng(seed).normal(size=(n, rank))
    return factor @ factor.T


def numpy_matrix_function(name, matrix, root=4, eps=1e-12, damping=1e-3, steps=5):
    if name in ("inverse_root", "inverse_root_newton"):
        return inverse_root(matrix, root, eps)
    if name == "damped_inverse":
        return np.linalg.inv(matrix + damping * np.eye(len(matrix)))
    return newton_schulz(matrix, steps)


@pytest.mark.parametrize("case", sorted(MATRIX_FUNCTION_CASES))
def test_matrix_function_matches_numpy(tmp_path, case):
    name, build, options, tolerance = MATRIX_FUNCTION_CASES[case]
    matrix = build()
    expected = numpy_matrix_function(name, matrix, **options)
    ours = curv_matrix_function(tmp_path, name, matrix, **options)
    assert ours.shape == expected.shape
    error = relative_error(ours, expected)
    print(f"{case}: relative error {error:.3e}")
    assert error <= tolerance, f"{case}: relative error {error:.3e} (tolerance {tolerance:g})"
