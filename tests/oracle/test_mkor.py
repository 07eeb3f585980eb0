"""Oracle tests for MKOR, `kronecker(stats = kfac, function = sherman_morrison)` (docs/language.md
section 12.7): 20 full-batch float64 steps against a float64 numpy transcription of the reference,
as in test_kronecker.py (whose helpers this file reuses), on the bias-free MLP `tanh(x @ w1) @ w2`
and on the MLP with biases of test_kfac_bias.py (biases folded into their layers).

The reference is the `mkor` package of Mohammad-Mozaffari/mkor, `mkor/mkor.py` (identical to
`build/lib/mkor/mkor.py`) and `mkor/utils/factors.py`, class `MKOR`, methods `_save_input`,
`_save_grad_output`, `low_rank_approx`, `_update_inv_factors`, `_invert_factor`, `_reset_factors`,
`_set_reset_factor_flags`, `_dense_precondition`, `_update_grad`, `step`, and `sm_inverse`; the
transcription (`Mkor`) works in PyTorch's layout (`[out, in]` gradients, `GG_inv @ grad @ AA_inv`)
and transposes to curv's `[in, out]` at the end of each step. At the steps with
`steps % inv_freq == 0` (`steps` counting from 0): the layer inputs (with a ones column for a bias)
and `n * grad_output` (ComputeG.linear) are clamped to `[-clipping_value, clipping_value]` and
averaged over the batch; each inverse is then set to the identity if its reset flag is up (all flags
start up; the `stabilization_factor` branch of `_reset_factors` is unreachable, since `module not in`
a list of tensors is always true) or else replaced by `sm_inverse(0.95 * inv + 0.05 * I, v)`, after
which an entry above 2 in magnitude raises both flags of the layer; the input factor is done before
the gradient factor. Every step the gradient is preconditioned, rescaled by
`(|grad_W| + |grad_b|) / (|upd_W| + |upd_b|)` (skipped when NaN) and handed to `torch.optim.SGD`
with momentum (dampening 0, no weight decay).

Deviations of the transcription (and of curv) from the reference: float64 everywhere (the reference
stores the captures and inverses in float16 by default, `half_precision = True`); no gradient
accumulation (`grad_accum_steps = 1`), no loss scaling (`grad_scale = 1`), no warm-up
(`warmup_steps = 0`, the package default; curv's captures come only at steps 1, 1 + every, ...),
a single process. The identity blend `0.95` is the option `ema` (a constant in the reference), the
clipping value and the reset threshold are the options `capture_clip` and `reset_threshold`.
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


def sherman_morrison(inverse, vector):
    """`sm_inverse(prev_inv, rank_1)` with `rank_1` a column: `P - (P v)(v^T P) / (1 + v^T P v)`."""
    column = inverse @ vector
    row = vector.T @ inverse
    return inverse - (1.0 / (1.0 + row @ vector)) * column @ row


class Mkor:
    """The reference's MKOR for one layer (see the module docstring), with `torch.optim.SGD`'s
    momentum as the inner optimizer. `step` takes curv's `[in(+1), out]` weight and gradient and the
    layer's `(inputs, cotangent)`, where `inputs` already has the ones column when `bias` is set and
    `cotangent` is the cotangent of the mean loss (what PyTorch's backward hook sees)."""

    def __init__(self, lr, momentum=0.9, inv_freq=10, decay=0.95, clip=100.0, threshold=2.0, bias=False,
                 joint_norm=False, mean_loss_cotangents=False, own_flag_only=False, reset_blends=False):
        self.lr, self.momentum, self.inv_freq, self.decay = lr, momentum, inv_freq, decay
        self.clip, self.threshold, self.bias = clip, threshold, bias
        # Deliberately wrong variants for the sensitivity test.
        self.joint_norm = joint_norm  # one Frobenius norm of [W; b] instead of |W| + |b|
        self.mean_loss_cotangents = mean_loss_cotangents  # g instead of n * g
        self.own_flag_only = own_flag_only  # a large entry resets only its own factor
        self.reset_blends = reset_blends  # the `stabilization_factor` branch of `_reset_factors`
        self.reset = {"a": True, "g": True}
        self.inverse = {"a": None, "g": None}
        self.buffer = None
        self.resets = 0

    def update_inverse(self, which, vector):
        size = len(vector)
        column = vector[:, None]
        if self.reset[which]:
            if self.reset_blends and self.inverse[which] is not None:
                self.inverse[which] = 0.9 * self.inverse[which] + 0.1 * np.eye(size)
            else:
                self.inverse[which] = np.eye(size)
            self.reset[which] = False
            self.resets += 1
            return
        blended = self.decay * self.inverse[which] + (1.0 - self.decay) * np.eye(size)
        self.inverse[which] = sherman_morrison(blended, column)
        if np.abs(self.inverse[which]).max() > self.threshold:
            if self.own_flag_only:
                self.reset[which] = True
            else:
                self.reset["a"] = self.reset["g"] = True

    def step(self, t, weight, grad, layer):
        steps = t - 1
        if steps % self.inv_freq == 0:
            inputs, cotangent = layer
            scaled = cotangent if self.mean_loss_cotangents else cotangent.shape[0] * cotangent
            self.update_inverse("a", np.clip(inputs, -self.clip, self.clip).mean(axis=0))
            self.update_inverse("g", np.clip(scaled, -self.clip, self.clip).mean(axis=0))
        grad_mat = grad.T  # [out, in(+1)]
        update = self.inverse["g"] @ grad_mat @ self.inverse["a"]
        if self.bias and not self.joint_norm:
            grad_norm = np.linalg.norm(grad_mat[:, :-1]) + np.linalg.norm(grad_mat[:, -1])
            update_norm = np.linalg.norm(update[:, :-1]) + np.linalg.norm(update[:, -1])
        else:
            grad_norm, update_norm = np.linalg.norm(grad_mat), np.linalg.norm(update)
        with np.errstate(invalid="ignore", divide="ignore"):
            fixer = grad_norm / update_norm
        direction = grad_mat if np.isnan(fixer) else update * fixer
        self.buffer = direction.copy() if self.buffer is None else self.momentum * self.buffer + direction
        return weight - self.lr * self.buffer.T


# --- Cases -------------------------------------------------------------------------------------------

# name: (model, kronecker line, lr, Mkor options)
CASES = {
    # The defaults but for the cadence (every 3 steps, so that 20 steps see 7 updates).
    "defaults_every_3": (
        "mlp2", "kronecker(stats = kfac, function = sherman_morrison, every = 3) momentum 0.9",
        0.05, dict(momentum=0.9, inv_freq=3),
    ),
    # A reset threshold below 1 (the inverses stay contractions, so 2 is never reached): resets
    # happen, and a reset asked by the left factor already applies to the right one.
    "resets": (
        "mlp2",
        "kronecker(stats = kfac, function = sherman_morrison, every = 2, ema = 0.9, reset_threshold = 0.97) momentum 0.5",
        0.05, dict(momentum=0.5, inv_freq=2, decay=0.9, threshold=0.97),
    ),
    # Biases folded into their layers (the rescaling adds the weight and bias norms) and a clipping
    # value that clamps inputs and cotangents.
    "biases_clipped": (
        "biased",
        "kronecker(stats = kfac, function = sherman_morrison, every = 3, capture_clip = 0.5) momentum 0.9",
        0.05, dict(momentum=0.9, inv_freq=3, clip=0.5, bias=True),
    ),
    # Inverses every step, no momentum.
    "every_step_sgd": (
        "mlp2", "kronecker(stats = kfac, function = sherman_morrison, every = 1)",
        0.1, dict(momentum=0.0, inv_freq=1),
    ),
}


def train_biased(lr, options, steps=STEPS):
    """Full-batch training of `tanh(x @ w1 + b1) @ w2 + b2` with `Mkor` on the joint `[W; b]`."""
    data = biased.Digits()
    params = {name: np.array(value, dtype=np.float64) for name, value in initial_parameters(biased.SHAPES).items()}
    layers_optimizers = {weight: Mkor(lr, **options) for weight, _ in biased.LAYERS}
    losses = []
    for t in range(1, steps + 1):
        loss, grads, layers, _ = biased.forward_backward(params, data)
        losses.append(loss)
        for weight, bias in biased.LAYERS:
            inputs, cotangent = layers[weight]
            joint = np.vstack([params[weight], params[bias][None, :]])
            joint_grad = np.vstack([grads[weight], grads[bias][None, :]])
            joint = layers_optimizers[weight].step(t, joint, joint_grad, (biased.with_ones(inputs), cotangent))
            params[weight], params[bias] = joint[:-1], joint[-1]
    return params, losses, layers_optimizers


def mkor_reference(case, **overrides):
    model, _, lr, options = CASES[case]
    options = {**options, **overrides}
    if model == "biased":
        params, losses, optimizers = train_biased(lr, options)
        return params, losses, sum(optimizer.resets for optimizer in optimizers.values())
    made = []

    def factory(_):
        made.append(Mkor(lr, **options))
        return made[-1]

    params, losses = train_reference(MLP2, initial_parameters(MLP2), lambda names: PerParameter(names, factory))
    return params, losses, sum(optimizer.resets for optimizer in made)


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
def test_mkor_matches_the_reference(tmp_path, case):
    theirs, losses, resets = mkor_reference(case)
    assert losses[-1] < losses[0]
    if case == "resets":
        # Two initial resets per layer, and more from the threshold.
        assert resets > 4, resets
    check(case, run_case(tmp_path, case), theirs)


def sensitivity_cases():
    return {
        "the rescaling uses one norm of [W; b] instead of |W| + |b|": ("biases_clipped", dict(joint_norm=True)),
        "the cotangents of the mean loss instead of n * grad_output": ("defaults_every_3", dict(mean_loss_cotangents=True)),
        "no blend with the identity before the rank-1 update": ("defaults_every_3", dict(decay=1.0)),
        "a large entry resets only its own factor": ("resets", dict(own_flag_only=True)),
        "a reset blends the old inverse with the identity (the unreachable branch)": ("resets", dict(reset_blends=True)),
        "no clamping of the captures": ("biases_clipped", dict(clip=100.0)),
        "inverses updated every step instead of every 3": ("defaults_every_3", dict(inv_freq=1)),
    }


@pytest.mark.parametrize("case", sorted(sensitivity_cases()))
def test_the_reference_detects_the_details_it_checks(case):
    """Each wrong variant moves some final parameter by more than 100 times the tolerance."""
    base, overrides = sensitivity_cases()[case]
    ours, _, _ = mkor_reference(base)
    theirs, _, _ = mkor_reference(base, **overrides)
    largest = max(relative_error(theirs[name], ours[name]) for name in ours)
    print(f"{case}: {largest:.3e}")
    assert largest > 100 * TOLERANCE, f"{case}: the variant differs by only {largest:.3e}"


def test_the_transcription_inverts_rank_one_updates():
    """`sherman_morrison` against numpy's inverse of `M + v v^T`."""
    generator = np.random.default_rng(3)
    x = generator.normal(size=(7, 9))
    matrix = x @ x.T + np.eye(7)
    vector = generator.normal(size=(7, 1))
    expected = np.linalg.inv(matrix + vector @ vector.T)
    assert relative_error(sherman_morrison(np.linalg.inv(matrix), vector), expected) < 1e-12
