"""Oracle tests for PSGD-Kron, the `kronecker` structure with `stats = psgd, function = lie_group`
(docs/language.md section 12.7): 20 float64 full-batch steps against a float64 numpy transcription
of lixilinx/psgd_torch `psgd.py`, class `KronWhiten`, with its default geometry
`dQ = "Q0.5EQ1.5"`, from identical initial parameters, fed the same random numbers.

The reference draws random numbers with `torch.rand` and `torch.randn`: one coin per step that
decides whether the preconditioners are updated, and per parameter the gradient's damping noise,
the probe vectors of `norm_lower_bound_spd` and `norm_lower_bound_skh` (32 rows each, for every
dense factor, the second inside `procrustes_step2`) and the coin of `balance_kron_precond`. curv
draws all of them from its counter-based generator on the `Preconditioner` stream (6): the step's
coin from the key `step * 65536 + 65535`, a parameter's draws, in the reference's order, from the
key `step * 65536 + index`. The transcription draws them the same way through `curv_random`, so the
comparison is exact up to rounding, within 1e-6 relative error as the other oracle tests.

`transcription_matches_psgd_torch` checks the transcription itself against the real `psgd.py`
(with its `torch.rand`/`torch.randn` replaced by the same draws). It is not part of the test run,
because that file is not on PyPI in this version (the `psgd-torch` package there is an older API)
and the project does not copy reference code: run it by hand with
`PSGD_TORCH=/path/to/psgd.py .venv/bin/python tests/oracle/test_psgd.py` (measured: agreement to
about 2e-16 on both cases, lixilinx/psgd_torch commit a8616f1).
"""

import importlib.util
import os
import types

import numpy as np
import pytest
import torch

from curv_random import normal, preconditioner_random
from test_kronecker import (
    MLP2, MLP3, SEED, STEPS, TOLERANCE, Digits, PerParameter, compare, forward_backward, initial_parameters,
    relative_error, run_curv, train_reference,
)

SMALLEST_NORMAL = np.finfo(np.float64).smallest_normal
EPSILON = np.finfo(np.float64).eps
SHARED_COIN_INDEX = 65535


def normals(random, count):
    return np.array([normal(random) for _ in range(count)])


def norm_lower_bound(a, random, symmetric, k=32, half_iters=2):
    """`norm_lower_bound_spd` (`symmetric`) and `norm_lower_bound_skh` of psgd.py for a real matrix:
    scaled by its largest diagonal element (SPD) or largest absolute element (skew), the `k` probe
    rows `V = A[j] + sign(<A[j], V_r>) V_r` started from the row of largest norm `j`, `half_iters`
    times `V <- V A`, rows normalised, `V <- V A`; the largest row norm times the scale."""
    factor = (np.max(np.diagonal(a)) if symmetric else np.max(np.abs(a))) + SMALLEST_NORMAL
    a = a / factor
    j = int(np.argmax(np.linalg.norm(a, axis=1)))
    v = normals(random, k * a.shape[1]).reshape(k, a.shape[1])
    v = a[j] + np.sign(np.sum(a[j] * v, axis=1, keepdims=True)) * v
    for _ in range(half_iters):
        v = v @ a
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + SMALLEST_NORMAL)
        v = v @ a
    return factor * np.max(np.linalg.norm(v, axis=1))


def procrustes_step2(q, random, max_step_size=1 / 8):
    """`procrustes_step2` of psgd.py: `R = Q^T - Q` normalised by its norm bound, `a = min(-tr(RQ) /
    tr(RRQ), 1/8)` if `tr(RRQ) < 0` else 1/8, `Q <- Q + a (RQ + a RRQ / 2)`."""
    r = q.T - q
    r = r / (norm_lower_bound(r, random, symmetric=False) + SMALLEST_NORMAL)
    rq = r @ q
    rrq = r @ rq
    tr_rq, tr_rrq = np.trace(rq), np.trace(rrq)
    a = min(-tr_rq / tr_rrq, max_step_size) if tr_rrq < 0 else max_step_size
    return q + a * (rq + 0.5 * a * rrq)


class KronWhiten:
    """`KronWhiten` of lixilinx/psgd_torch `psgd.py` (with `update_precond_kron_whiten_q0p5eq1p5`,
    `precond_grad_kron`, `procrustes_step2`, `norm_lower_bound_spd/skh`, `balance_kron_precond` and
    `init_kron`) for one 2-D parameter, in float64, whitening the gradient
    (`whiten_grad = True`) and updating the preconditioner first (`update_preconditioner_first =
    True`), both the reference's defaults. Per step t:
      - momentum (when > 0): `beta = min(k / (k + 1), momentum)`, `m <- beta m + (1 - beta) g`;
      - with probability `update_probability` (one coin for all parameters):
        `U = P (g + (damping + eps |g|) n)`, `n` normal; for each factor `i` (rows, then columns),
        `T_i` the contraction of `U U` over the other dimension, `c_i = numel / size_i`:
        dense: `ell = norm_lower_bound_spd(T_i) + c_i`, `L_i <- max(betaL L_i + (1 - betaL) ell,
        ell)`, `Q_i <- Q_i - lr_p / L_i (T_i Q_i - c_i Q_i)`, `procrustes_step2(Q_i)`;
        diagonal: `ell = max T_i + c_i`, `q_i <- q_i (1 - lr_p / L_i (T_i - c_i))`;
        then with probability 0.01 `balance_kron_precond`;
      - `h = P m` (or `P g`), `P = Q_L^T Q_L (.) Q_R^T Q_R`; `h *= 2 / rms(h)` when `rms(h) > 2`;
        `h = clamp(h, -10, 10)`; `W <- W - lr h`.
    Factor `i` is dense when `size_i <= max_size` and `size_i^2 <= max_skew * numel`.
    Deviations: float64 (the reference runs in the parameter's dtype); the transcription works in
    curv's layout `[in, out]` (the algorithm is symmetric under transposition; the random numbers
    are drawn in this layout's order, rows' factor first); the initial scale, when unset, is
    `(mean g^4 + damping^4)^(-1/8)` of this parameter's first gradient where the reference takes the
    largest `mean g^4` over all parameters; the coins and the noise come from curv's generator.

    The keyword arguments after `max_abs` select deliberately wrong variants for the sensitivity
    test."""

    def __init__(self, lr, index, lr_precond=0.1, update_probability=1.0, max_size=np.inf, max_skew=1.0,
                 init_scale=None, lipschitz_ema=0.9, damping=1e-9, momentum=0.0, max_rms=2.0, max_abs=10.0,
                 procrustes=True, lipschitz_max=True, update_first=True, coin_per_parameter=False):
        self.lr, self.index = lr, index
        self.lr_precond, self.update_probability = lr_precond, update_probability
        self.max_size, self.max_skew, self.init_scale = max_size, max_skew, init_scale
        self.lipschitz_ema, self.damping, self.momentum = lipschitz_ema, damping, momentum
        self.max_rms, self.max_abs = max_rms, max_abs
        self.procrustes, self.lipschitz_max = procrustes, lipschitz_max
        self.update_first, self.coin_per_parameter = update_first, coin_per_parameter
        self.q = None
        self.balanced = 0

    def initialise(self, grad):
        scale = self.init_scale
        if scale is None:
            scale = (np.mean(np.abs(grad) ** 4) + self.damping**4) ** (-1 / 8)
        scale = scale ** (1 / grad.ndim)
        self.q, self.dense = [], []
        for size in grad.shape:
            dense = not (size <= 1 or size > self.max_size or size**2 > self.max_skew * grad.size)
            self.dense.append(dense)
            self.q.append(scale * np.eye(size) if dense else scale * np.ones(size))
        self.lipschitz = [0.0] * grad.ndim
        self.m, self.count = np.zeros_like(grad), 0

    def factor_preconditioner(self, i):
        q = self.q[i]
        return q.T @ q if self.dense[i] else q * q

    def precondition(self, g):
        """`precond_grad_kron`: `Q_i^T Q_i` applied along every dimension."""
        left, right = self.factor_preconditioner(0), self.factor_preconditioner(1)
        g = left @ g if self.dense[0] else left[:, None] * g
        return g @ right if self.dense[1] else g * right[None, :]

    def update_preconditioner(self, grad, random):
        numel = grad.size
        noisy = grad + (self.damping + EPSILON * np.abs(grad)) * normals(random, numel).reshape(grad.shape)
        pg = self.precondition(noisy)
        for i, q in enumerate(self.q):
            other = 1 - i
            term2 = numel / q.shape[0]
            if self.dense[i]:
                term1 = pg @ pg.T if i == 0 else pg.T @ pg
                ell = norm_lower_bound(term1, random, symmetric=True) + term2
            else:
                term1 = np.sum(pg * pg, axis=other)
                ell = np.max(term1) + term2
            smoothed = self.lipschitz_ema * self.lipschitz[i] + (1 - self.lipschitz_ema) * ell
            self.lipschitz[i] = max(smoothed, ell) if self.lipschitz_max else smoothed
            rate = self.lr_precond / self.lipschitz[i]
            if self.dense[i]:
                q = q - rate * (term1 @ q - term2 * q)
                self.q[i] = procrustes_step2(q, random) if self.procrustes else q
            else:
                self.q[i] = q * (1 - rate * (term1 - term2))
        if random.uniform() < 0.01:  # balance_kron_precond
            self.balanced += 1
            norms = [np.max(np.abs(q)) for q in self.q]
            mean = np.prod(norms) ** (1 / len(norms))
            self.q = [q * (mean / norm) for q, norm in zip(self.q, norms)]

    def step(self, t, weight, grad, layer):
        if self.q is None:
            self.initialise(grad)
        target = grad
        if self.momentum > 0:
            beta = min(self.count / (1 + self.count), self.momentum)
            self.count += 1
            self.m = beta * self.m + (1 - beta) * grad
            target = self.m
        coin_index = 1000 + self.index if self.coin_per_parameter else SHARED_COIN_INDEX
        update = preconditioner_random(SEED, t, coin_index).uniform() < self.update_probability
        random = preconditioner_random(SEED, t, self.index)
        if update and self.update_first:
            self.update_preconditioner(grad, random)
        h = self.precondition(target)
        if update and not self.update_first:
            self.update_preconditioner(grad, random)
        rms = np.sqrt(np.mean(h * h))
        if rms > self.max_rms:
            h = h * (self.max_rms / rms)
        h = np.clip(h, -self.max_abs, self.max_abs)
        return weight - self.lr * h


# name: (model, optimizer line, lr, keyword arguments of KronWhiten)
PSGD_CASES = {
    # The defaults. On the MLP2 layers, max_skew = 1 gives w1 (64 x 16) a diagonal row factor and a
    # dense 16 x 16 column factor, w2 (16 x 10) a diagonal row factor and a dense 10 x 10 one.
    # lr 0.01 moves the clipped update (RMS 2) visibly in 20 steps.
    "defaults": (MLP2, "* : kronecker(stats = psgd, function = lie_group)", 0.01, {}),
    # Every factor dense (64 x 64 included), momentum, a given initial scale, a coin that skips
    # about half of the preconditioner updates, a faster Lipschitz average, a larger damping.
    "dense_momentum": (
        MLP3,
        "* : kronecker(stats = psgd, function = lie_group, max_skew = 1000, momentum = 0.9, init_scale = 0.5, "
        "update_probability = 0.5, lipschitz_ema = 0.5, noise_damping = 1e-6, lr_precond = 0.2)",
        0.02,
        dict(max_skew=1000.0, momentum=0.9, init_scale=0.5, update_probability=0.5, lipschitz_ema=0.5,
             damping=1e-6, lr_precond=0.2),
    ),
    # max_size = 12: every factor of w1 and w2's rows diagonal, w2's 10 x 10 and w3's dense; tight
    # clipping so that both the RMS and the elementwise clamp act.
    "max_size_clipping": (
        MLP3,
        "* : kronecker(stats = psgd, function = lie_group, max_size = 12, max_skew = 1000, max_rms = 0.5, "
        "max_abs = 0.8)",
        0.05,
        dict(max_size=12, max_skew=1000.0, max_rms=0.5, max_abs=0.8),
    ),
}


def psgd_reference(case, **overrides):
    shapes, _, lr, hyper = PSGD_CASES[case]
    init = initial_parameters(shapes)
    hyper = {**hyper, **overrides}
    names = list(shapes)
    optimizer = PerParameter(names, lambda name: KronWhiten(lr, names.index(name), **hyper))
    result, losses = train_reference(shapes, init, lambda _: optimizer)
    return result, losses, optimizer


def global_init_scale(shapes, damping=1e-9):
    """KronWhiten's on-the-fly initial scale, `(max over parameters of mean g^4 + damping^4)^(-1/8)`
    from the first gradients (curv takes each parameter's own)."""
    init = initial_parameters(shapes)
    _, grads, _ = forward_backward([init[name] for name in shapes], Digits())
    return (max(np.mean(np.abs(grad) ** 4) for grad in grads) + damping**4) ** (-1 / 8)


@pytest.mark.parametrize("case", sorted(PSGD_CASES))
def test_psgd_kron_matches_the_reference(tmp_path, case):
    shapes, line, lr, _ = PSGD_CASES[case]
    init = initial_parameters(shapes)
    theirs, losses, _ = psgd_reference(case)
    assert losses[-1] < losses[0], "the reference does not train: the comparison would be uninformative"
    compare(run_curv(tmp_path, shapes, [line], lr, init), theirs)


def test_the_cases_exercise_balancing_and_skipped_updates():
    """Over the cases, the rebalancing coin (probability 1/100) comes up at least once, and the
    update coin of `dense_momentum` skips some steps, so both paths are compared above."""
    balanced = 0
    for case in PSGD_CASES:
        _, _, optimizer = psgd_reference(case)
        balanced += sum(state.balanced for state in optimizer.states)
    skipped = [t for t in range(1, STEPS + 1) if preconditioner_random(SEED, t, SHARED_COIN_INDEX).uniform() >= 0.5]
    assert skipped and len(skipped) < STEPS
    assert balanced > 0, "no case rebalances its factors: choose other cases"


def sensitivity_cases():
    """(name, correct reference, wrong variant): plausible misreadings of the reference."""
    return {
        "no procrustes step": (lambda: psgd_reference("defaults"), lambda: psgd_reference("defaults", procrustes=False)),
        "Lipschitz constant without the max": (
            lambda: psgd_reference("dense_momentum"), lambda: psgd_reference("dense_momentum", lipschitz_max=False)),
        "preconditioner updated after preconditioning": (
            lambda: psgd_reference("defaults"), lambda: psgd_reference("defaults", update_first=False)),
        "one update coin per parameter instead of one per step": (
            lambda: psgd_reference("dense_momentum"), lambda: psgd_reference("dense_momentum", coin_per_parameter=True)),
        "the reference's initial scale from the largest mean g^4 over all parameters": (
            lambda: psgd_reference("defaults"), lambda: psgd_reference("defaults", init_scale=global_init_scale(MLP2))),
        "no clipping": (
            lambda: psgd_reference("max_size_clipping"),
            lambda: psgd_reference("max_size_clipping", max_rms=np.inf, max_abs=np.inf)),
        "max_skew ignored (all factors dense)": (
            lambda: psgd_reference("defaults"), lambda: psgd_reference("defaults", max_skew=1000.0)),
    }


@pytest.mark.parametrize("case", sorted(sensitivity_cases()))
def test_reference_detects_the_details_it_checks(case):
    """Each wrong variant moves some final parameter by more than 100 times the tolerance."""
    correct, wrong = sensitivity_cases()[case]
    ours, _, _ = correct()
    theirs, _, _ = wrong()
    largest = max(relative_error(theirs[name], ours[name]) for name in ours)
    print(f"{case}: {largest:.3e}")
    assert largest > 100 * TOLERANCE, f"{case}: the variant differs by only {largest:.3e}"


# --- The transcription against psgd.py itself ----------------------------------------------------------


class CurvDraws(types.SimpleNamespace):
    """Stands in for `torch` inside psgd.py: `torch.rand([])` and `torch.randn(...)` /
    `torch.randn_like(...)` return curv's draws for the step (the first `rand` of a step is the
    shared coin; each `randn_like` starts the next parameter's generator), everything else is
    torch's."""

    def __init__(self, seed):
        super().__init__()
        self.seed, self.step, self.param, self.random = seed, 0, -1, None

    def start_step(self, step):
        self.step, self.param, self.random = step, -1, None

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, *args, **kwargs):
        if self.random is None:
            value = preconditioner_random(self.seed, self.step, SHARED_COIN_INDEX).uniform()
        else:
            value = self.random.uniform()
        return torch.tensor(value, dtype=torch.float64)

    def randn(self, *shape, dtype=None, device=None):
        count = int(np.prod(shape))
        return torch.tensor(normals(self.random, count).reshape(shape), dtype=dtype or torch.float64)

    def randn_like(self, tensor):
        self.param += 1
        self.random = preconditioner_random(self.seed, self.step, self.param)
        return torch.tensor(normals(self.random, tensor.numel()).reshape(tensor.shape), dtype=tensor.dtype)


def transcription_matches_psgd_torch(case):
    """The numpy transcription against `psgd.KronWhiten` itself, in float64, on curv's layout, fed
    the same draws, with the initial scale given (the reference's on-the-fly scale is global)."""
    spec = importlib.util.spec_from_file_location("psgd_reference_module", os.environ["PSGD_TORCH"])
    psgd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(psgd)
    draws = CurvDraws(SEED)
    psgd.torch = draws
    shapes, _, lr, hyper = PSGD_CASES[case]
    hyper = {"init_scale": 0.7, **hyper}
    init = initial_parameters(shapes)
    data = Digits()
    params = [torch.tensor(init[name], dtype=torch.float64, requires_grad=True) for name in shapes]
    optimizer = psgd.KronWhiten(
        params, preconditioner_max_size=hyper.get("max_size", float("inf")),
        preconditioner_max_skew=hyper.get("max_skew", 1.0), preconditioner_init_scale=hyper["init_scale"],
        lr_params=lr, lr_preconditioner=hyper.get("lr_precond", 0.1), betaL=hyper.get("lipschitz_ema", 0.9),
        damping=hyper.get("damping", 1e-9), momentum=hyper.get("momentum", 0.0),
        grad_clip_max_amps=(hyper.get("max_rms", 2.0), hyper.get("max_abs", 10.0)),
        preconditioner_update_probability=hyper.get("update_probability", 1.0))
    x, labels = torch.tensor(data.x), torch.tensor(data.labels)

    def closure():
        hidden = x
        for index, param in enumerate(params):
            hidden = hidden @ param
            if index + 1 < len(params):
                hidden = torch.tanh(hidden)
        return torch.nn.functional.cross_entropy(hidden, labels)

    for t in range(1, STEPS + 1):
        draws.start_step(t)
        optimizer.step(closure)
    theirs = {name: param.detach().numpy() for name, param in zip(shapes, params)}
    names = list(shapes)
    ours, _ = train_reference(
        shapes, init, lambda _: PerParameter(names, lambda name: KronWhiten(lr, names.index(name), **hyper)))
    compare(ours, theirs, tolerance=1e-10)


if __name__ == "__main__":
    for case in ["defaults", "dense_momentum"]:
        transcription_matches_psgd_torch(case)
        print(f"{case}: the transcription matches psgd.py")
