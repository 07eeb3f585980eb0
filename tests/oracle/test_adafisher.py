"""Oracle tests for AdaFisher, `kronecker(stats = kfac, function = adafisher)` (docs/language.md
section 12.7): 20 full-batch float64 steps against a float64 numpy transcription of the reference,
as in test_kronecker.py (whose helpers this file reuses), on the bias-free MLP `tanh(x @ w1) @ w2`
and on the MLP with biases of test_kfac_bias.py (biases folded into their layers).

The reference is AtlasAnalyticsLab/AdaFisher's released `optimizers/AdaFisher.py` (class
`AdaFisher`: `_save_input`, `_save_grad_output`, `_get_F_tilde`, `_step`, `step`, with
`Compute_H_D.linear`, `Compute_S_D.linear`, `MinMaxNormalization`, `smart_detect_inf` and
`update_running_avg`), whose update is that of `Image Classification/src/optimizers/AdaFisher.py`
with its `AdaFisher_utils.py` (`update_running_avg(new, current, gammas)`:
`current = (1 - gammas[0]) current + gammas[1] new`; the released file writes it with one
`gamma` as `current = gamma / 10 current + gamma / 100 new`, the same numbers for
`gammas = [1 - gamma / 10, gamma / 100]`). The transcription (`AdaFisher`) works in PyTorch's layout
(`[out, in]`) and transposes to curv's `[in, out]` at the end of each step:

  - at the steps with `steps % TCov == 0` (`steps` counting from 0; the hooks fire during that
    step's forward and backward passes, before its update): `H_new = sum_n a_n^2 / N` over the layer
    inputs (with the ones column when the layer has a bias) and `S_new = sum_n g_n^2 / N` over the
    cotangents `g` of the mean loss (`grad_output`); at step 0 both diagonals start at ones; then
    `D = decay * D + weight * MinMax(D_new)`, `MinMax(v) = (v - min v) / (max v - min v + 1e-6)`
    after replacing infinities;
  - every step: `F = kron(H, S)^T + Lambda` (`[out, in]`), `m = beta m + (1 - beta) grad`,
    `p -= lr / (1 - beta^t) * m / F`.

Deviations: float64 (the reference runs in the model's dtype), no weight decay (the reference's
coupled L2 term `grad + weight_decay * p` needs the parameter, which curv's structures do not see;
AdaFisherW's decoupled decay is curv's `weight_decay` modifier), a single process, Linear layers
only.
"""

import numpy as np
import pytest

import test_kfac_bias as biased
from test_kronecker import (
    MLP2,
    SEED,
    STEPS,
    TOLERANCE,
    PerParameter,
    compare,
    initial_parameters,
    relative_error,
    run_curv,
    train_reference,
)
from test_optimizers import DIGITS, train_with_curv


def min_max(vector, epsilon=1e-6):
    """`MinMaxNormalization` after `smart_detect_inf`."""
    vector = np.where(vector == np.inf, 1.0, np.where(vector == -np.inf, 0.0, vector))
    return (vector - vector.min()) / (vector.max() - vector.min() + epsilon)


class AdaFisher:
    """The reference's AdaFisher for one Linear layer (see the module docstring). `step` takes
    curv's `[in(+1), out]` weight and gradient and the layer's `(inputs, cotangent)`, where `inputs`
    already has the ones column when the layer has a bias and `cotangent` is the cotangent of the
    mean loss (PyTorch's `grad_output`)."""

    def __init__(self, lr, beta=0.9, damping=1e-3, decay=0.08, weight=0.008, tcov=100,
                 per_example_cotangents=False, bias_correction=True, normalise=True):
        self.lr, self.beta, self.damping, self.decay, self.weight, self.tcov = lr, beta, damping, decay, weight, tcov
        # Deliberately wrong variants for the sensitivity test.
        self.per_example_cotangents = per_example_cotangents  # S from n * g instead of g
        self.bias_correction = bias_correction
        self.normalise = normalise  # MinMaxNormalization of the fresh diagonals
        self.h = self.s = self.m = None

    def step(self, t, weight, grad, layer):
        steps = t - 1
        if steps % self.tcov == 0:
            inputs, cotangent = layer
            count = inputs.shape[0]
            if self.per_example_cotangents:
                cotangent = count * cotangent
            h_new = np.einsum("ij,ij->j", inputs, inputs) / count
            s_new = np.einsum("ij,ij->j", cotangent, cotangent) / count
            if steps == 0:
                self.h, self.s = np.ones_like(h_new), np.ones_like(s_new)
            normalise = min_max if self.normalise else (lambda vector: vector)
            self.h = self.decay * self.h + self.weight * normalise(h_new)
            self.s = self.decay * self.s + self.weight * normalise(s_new)
        fisher = np.kron(self.h[:, None], self.s[None, :]).T + self.damping  # [out, in]
        grad_mat = grad.T
        if self.m is None:
            self.m = np.zeros_like(grad_mat)
        self.m = self.beta * self.m + (1 - self.beta) * grad_mat
        step_size = self.lr / (1 - self.beta**t) if self.bias_correction else self.lr
        return (weight.T - step_size * self.m / fisher).T


# --- Cases -------------------------------------------------------------------------------------------

# name: (model, kronecker line, lr, AdaFisher options)
CASES = {
    # The reference's defaults but for the cadence (TCov = 3 instead of 100, so that 20 steps see
    # 7 refreshes).
    "defaults_every_3": (
        "mlp2", "kronecker(stats = kfac, function = adafisher, every = 3)", 1e-3, dict(tcov=3),
    ),
    # Biases folded into their layers; a small damping (so that the Fisher, not Lambda, dominates),
    # the Image Classification file's default `gammas = [0.92, 0.0008]`, another beta.
    "biases_small_damping": (
        "biased",
        "kronecker(stats = kfac, function = adafisher, every = 2, damping = 1e-6, factor_decay = 0.08, factor_weight = 0.0008, b1 = 0.8)",
        1e-6, dict(tcov=2, damping=1e-6, weight=0.0008, beta=0.8),
    ),
    # Refreshed every step, with a standard exponential average (decay 0.9, weight 0.1).
    "every_step_ema": (
        "mlp2",
        "kronecker(stats = kfac, function = adafisher, every = 1, factor_decay = 0.9, factor_weight = 0.1, damping = 1e-4)",
        3e-2, dict(tcov=1, decay=0.9, weight=0.1, damping=1e-4),
    ),
}


def train_biased(lr, options, steps=STEPS):
    """Full-batch training of `tanh(x @ w1 + b1) @ w2 + b2` with `AdaFisher` on the joint `[W; b]`
    (the reference splits `F` into the weight's columns and the bias's last column)."""
    data = biased.Digits()
    params = {name: np.array(value, dtype=np.float64) for name, value in initial_parameters(biased.SHAPES).items()}
    optimizers = {weight: AdaFisher(lr, **options) for weight, _ in biased.LAYERS}
    losses = []
    for t in range(1, steps + 1):
        loss, grads, layers, _ = biased.forward_backward(params, data)
        losses.append(loss)
        for weight, bias in biased.LAYERS:
            inputs, cotangent = layers[weight]
            joint = np.vstack([params[weight], params[bias][None, :]])
            joint_grad = np.vstack([grads[weight], grads[bias][None, :]])
            joint = optimizers[weight].step(t, joint, joint_grad, (biased.with_ones(inputs), cotangent))
            params[weight], params[bias] = joint[:-1], joint[-1]
    return params, losses


def adafisher_reference(case, **overrides):
    model, _, lr, options = CASES[case]
    options = {**options, **overrides}
    if model == "biased":
        return train_biased(lr, options)
    return train_reference(MLP2, initial_parameters(MLP2),
                           lambda names: PerParameter(names, lambda _: AdaFisher(lr, **options)))


def check(case, ours, theirs):
    """`compare` on the final parameters and on the distance each moved from its initial value, so
    that a small error in a small update is not hidden by the size of the initial parameters."""
    compare(ours, theirs)
    init = initial_parameters(biased.SHAPES if CASES[case][0] == "biased" else MLP2)
    compare({name: ours[name] - init[name] for name in theirs}, {name: theirs[name] - init[name] for name in theirs})


def run_case(tmp_path, case):
    model, line, lr, _ = CASES[case]
    if model == "biased":
        program = biased.PROGRAM.format(data=DIGITS, lr=lr, kronecker=line, diagonal="diagonal(stats = gradient_square)",
                                        steps=STEPS, seed=SEED, expression=biased.EXPRESSION)
        return train_with_curv(tmp_path, program, initial_parameters(biased.SHAPES), STEPS)
    return run_curv(tmp_path, MLP2, [f"* : {line}"], lr, initial_parameters(MLP2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_adafisher_matches_the_reference(tmp_path, case):
    theirs, losses = adafisher_reference(case)
    assert losses[-1] < losses[0]
    check(case, run_case(tmp_path, case), theirs)


def sensitivity_cases():
    return {
        "S from the per-example cotangents n * g (curv's captures, not rescaled)": (
            "biases_small_damping", dict(per_example_cotangents=True)),
        "no bias correction of the moment": ("defaults_every_3", dict(bias_correction=False)),
        "the fresh diagonals not min-max normalised": ("every_step_ema", dict(normalise=False)),
        "a standard exponential average (gamma D + (1 - gamma) new)": ("defaults_every_3", dict(decay=0.8, weight=0.2)),
        "refreshed every step instead of every 3": ("defaults_every_3", dict(tcov=1)),
    }


@pytest.mark.parametrize("case", sorted(sensitivity_cases()))
def test_the_reference_detects_the_details_it_checks(case):
    """Each wrong variant moves some final parameter by more than 100 times the tolerance."""
    base, overrides = sensitivity_cases()[case]
    ours, _ = adafisher_reference(base)
    theirs, _ = adafisher_reference(base, **overrides)
    largest = max(relative_error(theirs[name], ours[name]) for name in ours)
    print(f"{case}: {largest:.3e}")
    assert largest > 100 * TOLERANCE, f"{case}: the variant differs by only {largest:.3e}"
