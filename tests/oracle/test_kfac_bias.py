"""Oracle tests for K-FAC's bias folding and its sampled Fisher (docs/language.md section 12.7):
20 full-batch float64 steps of an MLP with biases, `tanh(x @ w1 + b1) @ w2 + b2`, against a float64
transcription, as in test_kronecker.py (whose `Kfac`, `Adam`, `compare`, ... this file reuses).

Bias folding (kfac-pytorch's handling of `nn.Linear(bias=True)`: `kfac/layers/modules.py`
`LinearModuleHelper`, whose `get_a_factor` appends a ones column to the input and whose
`get_grad` / `set_grad` stack the bias gradient as the last column of PyTorch's weight, i.e. the
last row in curv's `[in, out]` layout): when a K-FAC weight `W`'s product `x @ W` is used only as
`x @ W + b` with a vector parameter `b` used nowhere else, the joint matrix `[W; b]` (`[in + 1, out]`)
is preconditioned as one, with `A` built from `[x, 1]`, and `b`'s own optimizer line is not used.
`bias = false` on the kronecker line turns the folding off; `b` then follows its own line (here the
`diagonal` line, curv's Adam: docs/language.md section 12.5).

`fisher = sampled`: the factors come from a second backward pass with labels drawn from
`softmax(logits)` at each refresh step, with curv's draw (`curv_random.sampled_labels`, keyed by the
step at which the refresh happens, as Sophia-G's test uses it); the step itself uses the
true-label gradient.
"""

import numpy as np
import pytest

from curv_random import sampled_labels
from test_kronecker import (
    SEED,
    STEPS,
    TOLERANCE,
    Adam,
    Digits,
    Kfac,
    compare,
    initial_parameters,
    relative_error,
)
from test_optimizers import DIGITS, train_with_curv

SHAPES = {"w1": (64, 16), "b1": (16,), "w2": (16, 10), "b2": (10,)}
LAYERS = [("w1", "b1"), ("w2", "b2")]
# Large enough that the parameters move by O(1) of their norm (the loss falls from 2.62 to about
# 0.47 in 20 steps), so that the comparison of the final parameters is a comparison of the updates.
LR = 0.03
HYPER = dict(function="damped_inverse", ema=0.95, damping=1e-3, every=2, pi=True)
ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)

KRONECKER = "kronecker(stats = kfac, fisher = {fisher}, ema = 0.95, damping = 1e-3, every = 2, function = damped_inverse{extra})"
DIAGONAL = "diagonal(stats = gradient_square, b1 = 0.9, ema = 0.999, eps = 1e-8)"

PROGRAM = """\
data digits = csv("{data}", label = "label", scale = 0.0625)

model mlp(x: f32[B, 64]) -> f32[B, 10] {{
    param w1: f32[64, 16] = glorot_uniform
    param b1: f32[16] = zeros
    param w2: f32[16, 10] = glorot_uniform
    param b2: f32[10] = zeros
    return {expression}
}}

optimizer oracle {{
    lr {lr}
    * : {kronecker}
    * : {diagonal}
}}

train fit {{
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer oracle
    batch all
    steps {steps}
    seed {seed}
}}
"""


EXPRESSION = "tanh(x @ w1 + b1) @ w2 + b2"
# b2 used twice: `x @ w2` is still used only as `x @ w2 + b2`, but b2 is used elsewhere as well, so
# it is not folded (b1 still is).
EXPRESSION_B2_TWICE = "tanh(x @ w1 + b1) @ w2 + b2 + b2"


def run_curv(tmp_path, fisher="empirical", bias=None, lr=LR, init=None, diagonal=DIAGONAL, expression=EXPRESSION):
    extra = "" if bias is None else f", bias = {'true' if bias else 'false'}"
    program = PROGRAM.format(data=DIGITS, lr=lr, kronecker=KRONECKER.format(fisher=fisher, extra=extra),
                             diagonal=diagonal, steps=STEPS, seed=SEED, expression=expression)
    return train_with_curv(tmp_path, program, initial_parameters(SHAPES) if init is None else init, STEPS)


# --- The model with biases, in float64 numpy ---------------------------------------------------------


def forward(params, data, b2_uses=1):
    hidden = np.tanh(data.x @ params["w1"] + params["b1"])
    return hidden, hidden @ params["w2"] + b2_uses * params["b2"]


def forward_backward(params, data, labels=None, b2_uses=1):
    """Mean cross-entropy of `tanh(x @ w1 + b1) @ w2 + b2` against `labels` (the training labels by
    default) and its backward pass: `(loss, grads, layers, logits)`, where `grads` maps every
    parameter to its gradient and `layers[weight] = (a, g)` holds the layer's input `a` ([N, in])
    and the cotangent `g` ([N, out]) of its output `a @ W + b` (equal to that of `a @ W`) with
    respect to the mean loss (so `grads[W] = a^T g` and `grads[b] = sum of g's rows`).
    `b2_uses = 2` gives the model `... @ w2 + b2 + b2`."""
    onehot = data.onehot if labels is None else np.eye(10)[np.asarray(labels)]
    hidden, logits = forward(params, data, b2_uses)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    count = data.x.shape[0]
    loss = -float(np.mean(np.sum(log_probabilities * onehot, axis=1)))
    g2 = (np.exp(log_probabilities) - onehot) / count
    g1 = (g2 @ params["w2"].T) * (1.0 - hidden * hidden)
    grads = {"w1": data.x.T @ g1, "b1": g1.sum(axis=0), "w2": hidden.T @ g2, "b2": b2_uses * g2.sum(axis=0)}
    layers = {"w1": (data.x, g1), "w2": (hidden, g2)}
    return loss, grads, layers, logits


def with_ones(inputs):
    return np.hstack([inputs, np.ones((inputs.shape[0], 1))])


class KfacWithBiases:
    """The spec's K-FAC (test_kronecker.Kfac) for w1 and w2, and for b1, b2 either folded into their
    layers (`fold = True`: `Kfac` applied to `[W; b]` with the gradient `[a, 1]^T g` and the input
    `[a, 1]`) or updated by Adam (`fold = False`, curv's `diagonal(stats = gradient_square)`).

    `fisher = "sampled"`: at the refresh steps (1, 1 + every, ...) the factors take the layer inputs
    and cotangents of a backward pass with curv's labels drawn from softmax(logits) at that step;
    the step itself always uses the true-label gradient."""

    def __init__(self, lr=LR, fold=True, fisher="empirical", unfolded=(), **overrides):
        hyper = {**HYPER, **overrides}
        self.fold, self.fisher, self.every = fold, fisher, hyper["every"]
        # The biases that are not folded even when `fold` is set (used elsewhere in the model).
        self.unfolded = set(unfolded)
        self.kfac = {weight: Kfac(lr, **hyper) for weight, _ in LAYERS}
        self.adam = {bias: Adam(lr, **ADAM) for _, bias in LAYERS}

    def step(self, t, params, grads, layers, sampled_layers, exact_layers=None):
        if self.fisher == "sampled" and (t - 1) % self.every == 0:
            layers = sampled_layers()
        if self.fisher == "exact" and (t - 1) % self.every == 0:
            layers = exact_layers()
        for weight, bias in LAYERS:
            inputs, cotangent = layers[weight]
            if self.fold and bias not in self.unfolded:
                joint = np.vstack([params[weight], params[bias][None, :]])
                joint_grad = np.vstack([grads[weight], grads[bias][None, :]])
                joint = self.kfac[weight].step(t, joint, joint_grad, (with_ones(inputs), cotangent))
                params[weight], params[bias] = joint[:-1], joint[-1]
            else:
                params[weight] = self.kfac[weight].step(t, params[weight], grads[weight], (inputs, cotangent))
                params[bias] = self.adam[bias].step(t, params[bias], grads[bias], None)


def train_reference(init=None, steps=STEPS, b2_uses=1, **options):
    """Full-batch training with `KfacWithBiases(**options)`; returns the final parameters and the
    loss at each step."""
    data = Digits()
    params = {name: np.array(value, dtype=np.float64)
              for name, value in (initial_parameters(SHAPES) if init is None else init).items()}
    optimizer = KfacWithBiases(**options)
    losses = []
    for t in range(1, steps + 1):
        loss, grads, layers, logits = forward_backward(params, data, b2_uses=b2_uses)
        losses.append(loss)

        def sampled_layers(t=t, logits=logits):
            return forward_backward(params, data, sampled_labels(SEED, t, logits), b2_uses)[2]

        def exact_layers(logits=logits):
            """The exact Fisher: the expectation over labels c ~ softmax(logits) of the sampled
            statistic, as one backward pass per class whose cotangent rows are weighted by
            sqrt(p_c) and stacked (the layer inputs do not depend on the labels)."""
            shifted = logits - logits.max(axis=1, keepdims=True)
            probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
            stacked = {}
            for c in range(10):
                passes = forward_backward(params, data, np.full(len(logits), c), b2_uses)[2]
                for weight, (inputs, cotangent) in passes.items():
                    weighted = cotangent * np.sqrt(probabilities[:, c])[:, None]
                    previous = stacked.get(weight, (inputs, np.zeros((0, cotangent.shape[1]))))[1]
                    stacked[weight] = (inputs, np.vstack([previous, weighted]))
            return stacked

        optimizer.step(t, params, grads, layers, sampled_layers, exact_layers)
    return params, losses


def check(ours, theirs, tolerance=TOLERANCE):
    """`compare` on the final parameters, and the same on the distance each moved from the initial
    parameters (relative error of `final - init`), so that a small error in a small update is
    not hidden by the size of the initial parameters."""
    compare(ours, theirs, tolerance)
    init = initial_parameters(SHAPES)
    moved = {name: ours[name] - init[name] for name in theirs}
    compare(moved, {name: theirs[name] - init[name] for name in theirs}, tolerance)


def final_loss(params):
    return forward_backward(params, Digits())[0]


# --- The tests ---------------------------------------------------------------------------------------


def test_backward_pass_with_biases_matches_autograd():
    import torch

    data = Digits()
    init = initial_parameters(SHAPES)
    loss, grads, layers, _ = forward_backward(init, data)
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in init.items()}
    z1 = torch.tensor(data.x) @ tensors["w1"] + tensors["b1"]
    z1.retain_grad()
    logits = torch.tanh(z1) @ tensors["w2"] + tensors["b2"]
    logits.retain_grad()
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(data.labels))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) <= 1e-14 * abs(loss)
    for name, tensor in tensors.items():
        assert relative_error(grads[name], tensor.grad.numpy()) <= 1e-13, name
    assert relative_error(layers["w1"][1], z1.grad.numpy()) <= 1e-13
    assert relative_error(layers["w2"][1], logits.grad.numpy()) <= 1e-13


def test_kfac_folds_biases_into_their_layers(tmp_path):
    """Default (`bias` unset, i.e. true): b1 and b2 follow their layers' joint K-FAC update."""
    theirs, losses = train_reference(fold=True)
    assert losses[-1] < 0.5 * losses[0]
    check(run_curv(tmp_path), theirs)


def test_kfac_bias_true_is_the_default(tmp_path):
    theirs, _ = train_reference(fold=True)
    check(run_curv(tmp_path, bias=True), theirs)


def test_folded_biases_ignore_their_own_line(tmp_path):
    """With folding, the vectors' `diagonal` line governs b1 and b2 only nominally: other
    hyperparameters on it change nothing."""
    theirs, _ = train_reference(fold=True)
    check(run_curv(tmp_path, diagonal="diagonal(stats = gradient_square, b1 = 0.5, ema = 0.9, eps = 1e-3)"), theirs)


def test_a_bias_used_elsewhere_is_not_folded(tmp_path):
    """`tanh(x @ w1 + b1) @ w2 + b2 + b2`: b1 is folded into w1's layer; b2 is used twice, so it
    follows the `diagonal` (Adam) line and w2 is preconditioned on its input alone."""
    theirs, losses = train_reference(fold=True, unfolded={"b2"}, b2_uses=2)
    assert losses[-1] < 0.5 * losses[0]
    check(run_curv(tmp_path, expression=EXPRESSION_B2_TWICE), theirs)


def test_kfac_without_bias_folding_leaves_biases_to_their_line(tmp_path):
    """`bias = false`: W by K-FAC on `x` alone, b1 and b2 by the `diagonal` (Adam) line."""
    theirs, losses = train_reference(fold=False)
    assert losses[-1] < 0.5 * losses[0]
    check(run_curv(tmp_path, bias=False), theirs)


def test_kfac_sampled_fisher_trains(tmp_path):
    """`fisher = sampled`: 20 steps stay finite and lower the loss."""
    ours = run_curv(tmp_path, fisher="sampled")
    assert all(np.all(np.isfinite(value)) for value in ours.values())
    start, end = final_loss(initial_parameters(SHAPES)), final_loss(ours)
    print(f"sampled fisher: loss {start:.6f} -> {end:.6f}")
    assert end < 0.5 * start


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_sampled_fisher_matches_with_curvs_labels(tmp_path, bias):
    """`fisher = sampled` against the transcription fed curv's label draws (curv_random)."""
    theirs, losses = train_reference(fold=bias, fisher="sampled")
    assert losses[-1] < 0.5 * losses[0]
    check(run_curv(tmp_path, fisher="sampled", bias=bias), theirs)


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_exact_fisher_matches_the_expectation_over_labels(tmp_path, bias):
    """`fisher = exact`: one backward pass per class, weighted by the model's probabilities, against
    the transcription's expectation of the sampled statistic."""
    theirs, losses = train_reference(fold=bias, fisher="exact")
    assert losses[-1] < losses[0]
    check(run_curv(tmp_path, fisher="exact", bias=bias), theirs)


def sensitivity_cases():
    return {
        "folding vs not": (lambda: train_reference(fold=True), lambda: train_reference(fold=False)),
        "folded, but A from x without the ones column (b preconditioned by G only)": (
            lambda: train_reference(fold=True), lambda: train_reference_unfolded_a()),
        "b2 used twice, folded anyway": (
            lambda: train_reference(fold=True, unfolded={"b2"}, b2_uses=2),
            lambda: train_reference(fold=True, b2_uses=2)),
        "sampled vs empirical Fisher": (
            lambda: train_reference(fisher="sampled"), lambda: train_reference(fisher="empirical")),
        "sampled vs exact Fisher": (
            lambda: train_reference(fisher="exact"), lambda: train_reference(fisher="sampled")),
        "sampled labels drawn one step off": (
            lambda: train_reference(fisher="sampled"), lambda: train_reference_shifted_labels()),
    }


def train_reference_unfolded_a():
    """A wrong variant: the bias gets its own K-FAC block with A = [1] (the ones column alone)
    instead of being part of the layer's joint A."""
    data = Digits()
    params = {name: np.array(value) for name, value in initial_parameters(SHAPES).items()}
    kfac = {name: Kfac(LR, **HYPER) for name in SHAPES}
    losses = []
    for t in range(1, STEPS + 1):
        loss, grads, layers, _ = forward_backward(params, data)
        losses.append(loss)
        for weight, bias in LAYERS:
            inputs, cotangent = layers[weight]
            params[weight] = kfac[weight].step(t, params[weight], grads[weight], (inputs, cotangent))
            ones = np.ones((inputs.shape[0], 1))
            params[bias] = kfac[bias].step(t, params[bias][None, :], grads[bias][None, :], (ones, cotangent))[0]
    return params, losses


def train_reference_shifted_labels():
    import curv_random

    original = curv_random.sampled_labels
    globals()["sampled_labels"] = lambda seed, step, logits: original(seed, step + 1, logits)
    try:
        return train_reference(fisher="sampled")
    finally:
        globals()["sampled_labels"] = original


@pytest.mark.parametrize("case", sorted(sensitivity_cases()))
def test_references_detect_the_details_they_check(case):
    """Each wrong variant moves some final parameter (biases included) by more than 100 times the
    tolerance, so the comparisons above would catch an implementation that made that mistake."""
    correct, wrong = sensitivity_cases()[case]
    ours, _ = correct()
    theirs, _ = wrong()
    errors = {name: relative_error(theirs[name], ours[name]) for name in ours}
    print(f"{case}: " + ", ".join(f"{name}: {error:.3e}" for name, error in errors.items()))
    assert max(errors.values()) > 100 * TOLERANCE, f"{case}: the variant differs by only {max(errors.values()):.3e}"
    assert max(errors["b1"], errors["b2"]) > 100 * TOLERANCE or case.startswith("sampled"), \
        f"{case}: the biases differ by only {max(errors['b1'], errors['b2']):.3e}"
