"""Oracle tests for the `lowrank` structure (docs/language.md section 12.9): M-FAC against float64
transcriptions of IST-DASLab/M-FAC `optim.py` (its dynamic algorithm `HInvFastUpMulti` and its
dense reference `HInvSlow`), and PSGD's low-rank preconditioner against a float64 transcription
of lixilinx/psgd_torch `psgd.py` (`LRAWhiten`), 20 full-batch steps each from identical initial
parameters on the digits data, within 1e-6 relative error, as the other oracle tests.

No reference code is copied: each class is written from the algorithm as the reference file
implements it, and its docstring names that file and every deviation.

Per-parameter curvature. Both references precondition the concatenation of all parameters as one
vector; curv keeps one window (one preconditioner) per parameter, the block-diagonal variant. The
single-matrix model (`x @ w`, softmax regression) makes the two identical, so it is compared
against the reference optimizer class itself; the two-layer cases compare against one reference
instance per parameter.
"""

import functools

import numpy as np
import pytest
import torch

from curv_random import normal, preconditioner_random
from test_optimizers import load_digits, train_with_curv
from test_kronecker import (
    MLP2, SEED, Digits, PerParameter, compare, forward_backward, initial_parameters, relative_error, run_curv,
    train_reference,
)

LINEAR = {"w": (64, 10)}
SHARED_COIN_INDEX = 65535


# --- M-FAC: IST-DASLab/M-FAC optim.py ---------------------------------------------------------------


def lu_without_pivoting(a):
    """The packed LU factorisation of `a` without pivoting (`torch.lu(a, pivot=False)[0]`): the
    strictly lower part holds L (unit diagonal), the upper part U."""
    lu = a.copy()
    n = lu.shape[0]
    for k in range(n - 1):
        lu[k + 1:, k] /= lu[k, k]
        lu[k + 1:, k + 1:] -= np.outer(lu[k + 1:, k], lu[k, k + 1:])
    return lu


class HInvFast:
    """`HInvFastUpMulti` of IST-DASLab/M-FAC `optim.py` on one device without the CUDA kernel: the
    window `G` (m x d, zeros at first), its Gram matrix `dots = G G^T`, the ring position `last`;
    `setup` factors `lambda dots + m I` without pivoting (lambda = 1 / damp), keeps `D = triu(LU) -
    m I` (`giHig`), `denom = m + diag(D)` and the coefficients `B` (`coef`, rows from `max(last, 1)`
    recomputed by `B[i, :i] = tmp[i, :i] B[:i, :i]` with `tmp = -D^T / denom`); `mul(x)` runs the
    forward recursion on `lambda G x` and returns `lambda x - G^T ((giHix / denom) B)`."""

    def __init__(self, m, d, damp):
        self.m, self.lambd = m, 1.0 / damp
        self.grads = np.zeros((m, d))
        self.dots = np.zeros((m, m))
        self.last = 0
        self.coef = self.lambd * np.eye(m)
        self.setup()

    def setup(self):
        m = self.m
        lu = lu_without_pivoting(self.lambd * self.dots + m * np.eye(m))
        self.giHig = np.triu(lu - m * np.eye(m))
        self.denom = m + np.diagonal(self.giHig)
        tmp = -self.giHig.T / self.denom.reshape(1, -1)
        for i in range(max(self.last, 1), m):
            self.coef[i, :i] = tmp[i, :i] @ self.coef[:i, :i]

    def mul(self, x, dots=None):
        if dots is None:
            dots = self.grads @ x
        gihix = self.lambd * dots
        for i in range(1, self.m):
            gihix[i:] = gihix[i:] - self.giHig[i - 1, i:] * (gihix[i - 1] / self.denom[i - 1])
        return self.lambd * x - self.grads.T @ ((gihix / self.denom) @ self.coef)

    def update(self, g):
        self.grads[self.last] = g
        tmp = self.grads @ g
        self.dots[self.last, :] = tmp
        self.dots[:, self.last] = tmp
        self.setup()
        self.last = (self.last + 1) % self.m
        return tmp

    def update_mul(self, g):
        self.grads[self.last] = g
        tmp = self.grads @ g
        self.dots[self.last, :] = tmp
        self.dots[:, self.last] = tmp
        self.setup()
        result = self.mul(g, tmp)
        self.last = (self.last + 1) % self.m
        return result


class HInvSlow:
    """`HInvSlow` of `optim.py`, the dense reference: `H = I / damp`, then for each row `g` of the
    window `H <- H - (H g)(H g)^T / (m + g^T H g)`."""

    def __init__(self, grads, damp):
        m, d = grads.shape
        self.h = np.eye(d) / damp
        for g in grads:
            hg = self.h @ g
            self.h -= np.outer(hg, hg) / (m + g @ hg)

    def mul(self, x):
        return self.h @ x


class Mfac:
    """The `MFAC` optimizer of `optim.py` (no weight decay, not sparse) for one parameter vector:
    `d = hinv.update_mul(g)`; with `momentum > 0`, `v <- momentum v + (1 - momentum) d` and `d = v`;
    `p <- p - lr d`. Extension for curv's `every`: at steps that do not refresh the window (all but
    1, 1 + every, ...) the product is `hinv.mul(g)` without inserting `g`."""

    def __init__(self, lr, window, damp, momentum=0.0, every=1):
        self.lr, self.window, self.damp, self.momentum, self.every = lr, window, damp, momentum, every
        self.hinv = self.v = None

    def step(self, t, weight, grad, layer):
        g = grad.reshape(-1)
        if self.hinv is None:
            self.hinv = HInvFast(self.window, g.size, self.damp)
            self.v = np.zeros_like(g)
        d = self.hinv.update_mul(g) if (t - 1) % self.every == 0 else self.hinv.mul(g)
        if self.momentum > 0:
            self.v = self.momentum * self.v + (1 - self.momentum) * d
            d = self.v
        return weight - self.lr * d.reshape(weight.shape)


def test_fast_and_slow_references_agree():
    """The check of `optim.py`'s `__main__`: after inserting m random gradients, the dynamic
    algorithm's product equals the dense Woodbury reference (and so does the explicit inverse)."""
    generator = np.random.default_rng(0)
    m, d, damp = 8, 60, 1e-2
    grads = generator.normal(size=(m, d))
    x = generator.normal(size=d)
    fast = HInvFast(m, d, damp)
    for g in grads:
        fast.update(g)
    slow = HInvSlow(grads, damp)
    dense = np.linalg.solve(damp * np.eye(d) + grads.T @ grads / m, x)
    assert relative_error(fast.mul(x), slow.mul(x)) < 1e-10
    assert relative_error(slow.mul(x), dense) < 1e-10


MFAC_CASES = {
    # One parameter: identical to the MFAC optimizer on the whole model. The window (8) fills in
    # 8 steps and then slides for 12 more.
    "linear": (LINEAR, "w : lowrank(stats = gradient_window, window = 8, damping = 1e-4)", 1e-3, dict(window=8, damp=1e-4)),
    # Two layers (one window each), M-FAC's momentum, and a window refreshed every second step.
    "mlp_momentum_every": (
        MLP2,
        "* : lowrank(stats = gradient_window, window = 4, damping = 1e-3, momentum = 0.5, every = 2)",
        1e-3,
        dict(window=4, damp=1e-3, momentum=0.5, every=2),
    ),
}


@pytest.mark.parametrize("case", sorted(MFAC_CASES))
def test_mfac_matches_ist_daslab_m_fac(tmp_path, case):
    shapes, line, lr, options = MFAC_CASES[case]
    init = initial_parameters(shapes)
    ours = run_curv(tmp_path, shapes, [line], lr, init)
    reference, losses = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: Mfac(lr, **options)))
    assert losses[-1] < losses[0]
    compare(ours, reference)


def test_mfac_reference_detects_its_normalisation():
    """A Fisher normalised by the number of gradients seen (instead of the window size m, which
    counts the zero rows of a window not yet full) moves the result by far more than the tolerance,
    so the comparison above checks the normalisation."""
    shapes, _, lr, options = MFAC_CASES["linear"]
    init = initial_parameters(shapes)
    right, _ = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: Mfac(lr, **options)))

    class Counted(Mfac):
        def step(self, t, weight, grad, layer):
            g = grad.reshape(-1)
            if t == 1:
                self.grads = np.zeros((self.window, g.size))
            self.grads[(t - 1) % self.window] = g
            filled = min(t, self.window)
            fisher = self.damp * np.eye(g.size) + self.grads.T @ self.grads / filled
            return weight - self.lr * np.linalg.solve(fisher, g).reshape(weight.shape)

    wrong, _ = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: Counted(lr, **options)))
    assert relative_error(wrong["w"], right["w"]) > 1e-3


# --- PSGD LRA: lixilinx/psgd_torch psgd.py ----------------------------------------------------------


class LraWhiten:
    """`LRAWhiten` of lixilinx/psgd_torch `psgd.py` (with `update_precond_lra_whiten`,
    `update_precond_lra`, `precond_grad_lra`, `IpUVtmatvec`) for one parameter vector, whitening the
    gradient (`whiten_grad = True`, the default), in float64. Per step t:
      - on the first step, `d = (mean g^4 + damping^4)^(-1/8)` (`preconditioner_init_scale = None`),
        or `init_scale`;
      - momentum `m <- beta m + (1 - beta) g`, `beta = min(k / (1 + k), momentum)`, k counted from 0;
      - with probability `update_probability`: `v` normal, `h = g + (damping + eps |g|) v`; balance U and V
        (`rho = (tr U^T U / tr V^T V)^(1/4)`, `E = 0.1 (U^T U / rho^2 - V^T V rho^2) / (...)`,
        `U <- U/rho - U/rho (E - E^2/2)`, `V <- V rho + V rho (E + E^2/2)`), then the Lie-group
        steps on `d` and, by a fair coin, on U or V, normalised by the Lipschitz estimates;
      - `pre = Q^T Q m` (or `Q^T Q g`), its RMS clipped at `max_amp` and its elements at
        `max_element` (`grad_clip_max_amps`); `p <- p - lr pre`.
    The reference is psgd.py at lixilinx/psgd_torch commit a8616f1, as for PSGD-Kron, with
    `update_preconditioner_first = True` (its default).
    U and V start as normal matrices scaled to a Frobenius norm of sqrt(0.1).
    Random numbers: the reference calls `torch.randn` for U and V at construction, `torch.rand` for
    the update coin, `torch.randn_like` for v and `torch.rand` for the U-or-V coin; here they come
    from curv's counter-based generator as curv draws them (module docstring of
    runtime/curv-runtime/src/lowrank.rs): U then V from key `index` of step 0, the coin from the
    shared key of step t, then v's normals and the U-or-V coin from key `index` of step t.
    Deviation: `lift2single` and `lu_factor`/`lu_solve` become `np.linalg.solve` in float64."""

    def __init__(self, index, rank, lr, lr_precond=0.1, beta=0.9, damping=1e-9, momentum=0.0,
                 max_amp=float("inf"), max_element=float("inf"), update_probability=1.0, init_scale=None):
        self.index, self.rank, self.lr, self.lr_precond, self.beta = index, rank, lr, lr_precond, beta
        self.damping, self.momentum, self.max_amp, self.max_element = damping, momentum, max_amp, max_element
        self.update_probability, self.init_scale = update_probability, init_scale
        self.u = self.v = self.d = self.m = None
        self.lipschitz = [0.0, 0.0, 0.0]
        self.count = 0

    def normals(self, random, count):
        return np.array([normal(random) for _ in range(count)])

    def fit(self, v, h, update_u):
        u, vv, d, lr, beta = self.u, self.v, self.d, self.lr_precond, self.beta
        utu, vtv = u.T @ u, vv.T @ vv
        tr_u, tr_v = np.trace(utu), np.trace(vtv)
        rho = (tr_u / tr_v) ** 0.25
        rho2 = rho * rho
        e = 0.1 * (utu / rho2 - vtv * rho2) / (tr_u / rho2 + tr_v * rho2)
        e2 = 0.5 * e @ e
        u = u / rho
        vv = vv * rho
        u = u - u @ (e - e2)
        vv = vv + vv @ (e + e2)
        qh = d * h + u @ (vv.T @ (d * h))
        ph = d * (qh + vv @ (u.T @ qh))
        ipvtu = vv.T @ u + np.eye(self.rank)
        inv_qt_v = v / d
        inv_qt_v = inv_qt_v - vv @ np.linalg.solve(ipvtu.T, u.T @ inv_qt_v)
        inv_p_v = (inv_qt_v - u @ np.linalg.solve(ipvtu, vv.T @ inv_qt_v)) / d
        phh, v_inv_p_v = ph * h, v * inv_p_v
        ell = np.max(np.abs(phh)) + np.max(np.abs(v_inv_p_v))
        self.lipschitz[2] = max(beta * self.lipschitz[2] + (1 - beta) * ell, ell)
        d = d - lr / self.lipschitz[2] * (phh - v_inv_p_v) * d
        a, b = qh.reshape(-1, 1), inv_qt_v.reshape(-1, 1)
        if update_u:
            at_v, bt_v = a.T @ vv, b.T @ vv
            ell = np.linalg.norm(a) * np.linalg.norm(at_v @ vv.T) + np.linalg.norm(b) * np.linalg.norm(bt_v @ vv.T)
            self.lipschitz[0] = max(beta * self.lipschitz[0] + (1 - beta) * ell, ell)
            u = u - lr / self.lipschitz[0] * (a @ (at_v @ ipvtu) - b @ (bt_v @ ipvtu))
        else:
            at_u, bt_u = a.T @ u, b.T @ u
            ell = np.linalg.norm(a) * np.linalg.norm(u @ at_u.T) + np.linalg.norm(b) * np.linalg.norm(u @ bt_u.T)
            self.lipschitz[1] = max(beta * self.lipschitz[1] + (1 - beta) * ell, ell)
            vv = vv - lr / self.lipschitz[1] * ((a + vv @ at_u.T) @ at_u - (b + vv @ bt_u.T) @ bt_u)
        self.u, self.v, self.d = u, vv, d

    def precondition(self, g):
        q = self.d * g + self.u @ (self.v.T @ (self.d * g))
        return self.d * (q + self.v @ (self.u.T @ q))

    def step(self, t, weight, grad, layer):
        g = grad.reshape(-1)
        n = g.size
        if self.u is None:
            random = preconditioner_random(SEED, 0, self.index)
            self.u = self.normals(random, n * self.rank).reshape(n, self.rank)
            self.u *= 0.1**0.5 / np.linalg.norm(self.u)
            self.v = self.normals(random, n * self.rank).reshape(n, self.rank)
            self.v *= 0.1**0.5 / np.linalg.norm(self.v)
            scale = self.init_scale if self.init_scale is not None else (np.mean(g**4) + self.damping**4) ** (-1 / 8)
            self.d = scale * np.ones(n)
        if self.momentum > 0:
            beta = min(self.count / (1 + self.count), self.momentum)
            self.count += 1
            self.m = (np.zeros_like(g) if self.m is None else self.m) * beta + (1 - beta) * g
        if preconditioner_random(SEED, t, SHARED_COIN_INDEX).uniform() < self.update_probability:
            random = preconditioner_random(SEED, t, self.index)
            v = self.normals(random, n)
            update_u = random.uniform() < 0.5
            self.fit(v, g + (self.damping + np.finfo(np.float64).eps * np.abs(g)) * v, update_u)
        pre = self.precondition(self.m if self.momentum > 0 else g)
        amp = np.sqrt(np.mean(pre * pre))
        if amp > self.max_amp:
            pre = pre * (self.max_amp / amp)
        pre = np.clip(pre, -self.max_element, self.max_element)
        return weight - self.lr * pre.reshape(weight.shape)


PSGD_CASES = {
    # One parameter (identical to LRAWhiten on the whole model), rank 4, d set from the first
    # gradient, the preconditioner fitted every step.
    "linear": (LINEAR, "w : lowrank(stats = psgd, rank = 4)", 0.01, dict(rank=4)),
    # Two layers, momentum whitened-gradient preconditioning, RMS clipping, a preconditioner
    # fitted with probability 1/2, a given initial scale and a non-default step size.
    "mlp_momentum_clip": (
        MLP2,
        "* : lowrank(stats = psgd, rank = 3, momentum = 0.9, max_rms = 1, max_abs = 0.05, update_probability = 0.5, init_scale = 2, lr_precond = 0.2, lipschitz_ema = 0.95)",
        0.005,
        dict(rank=3, momentum=0.9, max_amp=1.0, max_element=0.05, update_probability=0.5, init_scale=2.0,
             lr_precond=0.2, beta=0.95),
    ),
}


@pytest.mark.parametrize("case", sorted(PSGD_CASES))
def test_psgd_lra_matches_psgd_torch(tmp_path, case):
    shapes, line, lr, options = PSGD_CASES[case]
    init = initial_parameters(shapes)
    ours = run_curv(tmp_path, shapes, [line], lr, init)
    reference, losses = train_reference(
        shapes, init, lambda names: PerParameter(names, lambda name: LraWhiten(names.index(name), lr=lr, **options)),
    )
    assert losses[-1] < losses[0]
    compare(ours, reference)


def test_psgd_lra_reference_detects_the_u_or_v_coin():
    """Updating V where the coin says U (and the reverse) moves the result by far more than the
    tolerance, so the comparison checks which factor each step fits."""
    shapes, _, lr, options = PSGD_CASES["linear"]
    init = initial_parameters(shapes)
    right, _ = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: LraWhiten(0, lr=lr, **options)))

    class Swapped(LraWhiten):
        def fit(self, v, h, update_u):
            super().fit(v, h, not update_u)

    wrong, _ = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: Swapped(0, lr=lr, **options)))
    assert relative_error(wrong["w"], right["w"]) > 1e-4


# --- FOSI: hsivan/fosi torch_optim --------------------------------------------------------------------


@functools.cache
def full_batch():
    data = Digits()
    return torch.tensor(data.x), torch.tensor(data.labels)


def block_hvp(weights, index, vector):
    """The Hessian-vector product of the full-batch mean cross-entropy of the tanh MLP with respect
    to weight `index` alone (the other weights fixed), in float64, by double backward in torch."""
    x, y = full_batch()
    params = [torch.tensor(weight, requires_grad=(i == index)) for i, weight in enumerate(weights)]
    h = x
    for weight in params[:-1]:
        h = torch.tanh(h @ weight)
    loss = torch.nn.functional.cross_entropy(h @ params[-1], y)
    (grad,) = torch.autograd.grad(loss, params[index], create_graph=True)
    (product,) = torch.autograd.grad(grad, params[index], grad_outputs=torch.tensor(vector.reshape(grad.shape)))
    return product.detach().numpy().reshape(-1)


def lanczos(hvp, n, order, k, start):
    """`lanczos_alg` of hsivan/fosi `torch_optim/lanczos_algorithm.py`: `order` iterations with full
    reorthogonalisation (twice, against all stored vectors), `eigh` of the tridiagonal matrix, the
    top `k` Ritz pairs (eigenvalues ascending). Deviations: the start vector is curv's draw (the
    reference draws `torch.normal`); the Hessian-vector products are float64 (the reference casts
    the vector to float32 by default)."""
    vecs = np.zeros((order, n))
    tridiag = np.zeros((order, order))
    vecs[0] = start / np.linalg.norm(start)
    for i in range(order):
        w = hvp(vecs[i])
        tridiag[i, i] = w @ vecs[i]
        if i + 1 < order:
            w = w - vecs.T @ (vecs @ w)
            w = w - vecs.T @ (vecs @ w)
            beta = np.linalg.norm(w)
            tridiag[i, i + 1] = tridiag[i + 1, i] = beta
            vecs[i + 1] = w / beta
    values, vectors = np.linalg.eigh(tridiag)
    return values[order - k:], vectors.T[order - k:] @ vecs


class Fosi:
    """`scale_by_fosi` of hsivan/fosi `torch_optim/fosi_optimizer.py` with `approx_l = 0` for one
    parameter, through `fosi_adam` (velocity `(1 - decay) g1 + decay v`, `learning_rate_clip = 1`,
    base `torchopt.adam`) or `fosi_momentum` (velocity `g1 + decay v`, clip 3, base `torchopt.sgd`
    with momentum). At steps `count + 1 >= warmup` with `(count + 1 - warmup) % every == 0` the
    extreme spectrum estimation (Lanczos of order 4k on this parameter's Hessian block at the
    current weights, on the full batch, as the reference's static batch) gives the eigenvectors,
    `lr_i = |1 / lambda_i|` and `scaling = clip(lr_0 / lr_{k-1}, 1, clip)`; each step `g1 = V^T V g`,
    `g2 = g - g1`, `newton = V^T (lr * (V velocity))`, base deltas of `g2` orthogonalised against V,
    and `w <- w + scaling * deltas - alpha * newton`."""

    def __init__(self, index, names, lr, k, every, base="adam", decay=0.9, alpha=0.1, momentum=0.9,
                 b1=0.9, b2=0.999, eps=1e-8, warmup=None, damping=0.0):
        self.index, self.lr, self.k, self.every, self.base = index, lr, k, every, base
        self.decay, self.alpha, self.momentum, self.b1, self.b2, self.eps = decay, alpha, momentum, b1, b2, eps
        self.warmup = every if warmup is None else warmup
        self.clip = 1.0 if base == "adam" else 3.0
        # curv's addition (0, the reference's behaviour, unless given): lr_i = 1 / (|lambda_i| + damping).
        self.damping = damping
        self.vectors = self.rates = None
        self.scaling = 1.0
        self.state = None

    def step_all(self, t, weights, grad):
        g = grad.reshape(-1)
        n = g.size
        if self.state is None:
            self.state = dict(velocity=np.zeros(n), m=np.zeros(n), v=np.zeros(n), buffer=np.zeros(n))
            self.vectors = np.zeros((self.k, n))
            self.rates = np.zeros(self.k)
        if t >= self.warmup and (t - self.warmup) % self.every == 0:
            random = preconditioner_random(SEED, t, self.index)
            start = np.array([normal(random) for _ in range(n)])
            values, self.vectors = lanczos(lambda v: block_hvp(weights, self.index, v), n, 4 * self.k, self.k, start)
            self.rates = 1.0 / (np.abs(values) + self.damping)
            self.scaling = float(np.clip(self.rates[0] / self.rates[-1], 1.0, self.clip))
        V, s = self.vectors, self.state
        g1 = V.T @ (V @ g)
        g2 = g - g1
        if self.base == "adam":
            s["velocity"] = (1 - self.decay) * g1 + self.decay * s["velocity"]
        else:
            s["velocity"] = g1 + self.decay * s["velocity"]
        newton = V.T @ (self.rates * (V @ s["velocity"]))
        if self.base == "adam":
            s["m"] = self.b1 * s["m"] + (1 - self.b1) * g2
            s["v"] = self.b2 * s["v"] + (1 - self.b2) * g2 * g2
            m_hat, v_hat = s["m"] / (1 - self.b1**t), s["v"] / (1 - self.b2**t)
            deltas = -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        else:
            s["buffer"] = self.momentum * s["buffer"] + g2
            deltas = -self.lr * s["buffer"]
        deltas = deltas - V.T @ (V @ deltas)
        return (self.scaling * deltas - self.alpha * newton).reshape(grad.shape)


class FosiAll:
    """One `Fosi` per weight, all of them reading the weights before this step's updates."""

    def __init__(self, names, factory):
        self.states = [factory(index) for index in range(len(names))]

    def step(self, t, weights, grads, layers):
        current = [weight.copy() for weight in weights]
        for index, state in enumerate(self.states):
            weights[index] = weights[index] + state.step_all(t, current, grads[index])


FOSI_CASES = {
    # One parameter: the reference on the whole model. Four eigenpairs refreshed at steps 5, 10,
    # 15 and 20, Adam as the base.
    "linear_adam": (LINEAR, "w : lowrank(stats = lanczos, rank = 4, every = 5)", 0.01, dict(k=4, every=5)),
    # Two layers, heavy-ball base with its learning-rate clip of 3, eigenpairs from step 3 every 4.
    "mlp_momentum": (
        MLP2,
        "* : lowrank(stats = lanczos, rank = 3, every = 4, warmup = 3, base = momentum, momentum = 0.8, decay = 0.7, alpha = 0.2, damping = 0.05)",
        0.05,
        dict(k=3, every=4, warmup=3, base="momentum", momentum=0.8, decay=0.7, alpha=0.2, damping=0.05),
    ),
}


@pytest.mark.parametrize("case", sorted(FOSI_CASES))
def test_fosi_matches_hsivan_fosi(tmp_path, case):
    shapes, line, lr, options = FOSI_CASES[case]
    init = initial_parameters(shapes)
    ours = run_curv(tmp_path, shapes, [line], lr, init)
    names = list(shapes)
    reference, losses = train_reference(
        shapes, init, lambda names: FosiAll(names, lambda index: Fosi(index, names, lr, **options)),
    )
    assert losses[-1] < losses[0]
    compare(ours, reference)


def test_block_hvp_matches_finite_differences():
    """The reference's Hessian-vector products (torch double backward) agree with central
    differences of the gradient, so the FOSI and Newton references use the right Hessian."""
    init = initial_parameters(MLP2)
    weights = [init[name] for name in MLP2]
    generator = np.random.default_rng(3)
    vector = generator.normal(size=weights[1].size)
    product = block_hvp(weights, 1, vector)
    step = 1e-5
    plus = [w.copy() for w in weights]
    minus = [w.copy() for w in weights]
    plus[1] = plus[1] + step * vector.reshape(weights[1].shape)
    minus[1] = minus[1] - step * vector.reshape(weights[1].shape)
    data = Digits()
    difference = (forward_backward(plus, data)[1][1] - forward_backward(minus, data)[1][1]).reshape(-1) / (2 * step)
    assert relative_error(product, difference) < 1e-6


# --- Lazy Newton: Doikov, Chayti and Jaggi (2023) -------------------------------------------------------


class LazyNewton:
    """Newton's method with lazy Hessians (Doikov, Chayti and Jaggi, ICML 2023, Algorithm 1 with
    the cubic step of Nesterov and Polyak, or the gradient-regularised step of Mishchenko 2023),
    for one parameter: every `every` steps from step 1 the block Hessian (columns from
    Hessian-vector products with unit vectors), otherwise the stale one; the step
    `h = -(H + tau I)^-1 g` with, for `cubic`, `tau >= max(0, -lambda_min) + damping` solving
    `tau = M |h| / 2` (scipy's root finder on the monotone residual), for `quadratic`,
    `tau = sqrt(M |g|) + max(0, -lambda_min) + damping`; `w <- w + step_size h`."""

    def __init__(self, index, every, lipschitz, damping, regularization="cubic", step_size=1.0):
        self.index, self.every, self.lipschitz, self.damping = index, every, lipschitz, damping
        self.regularization, self.step_size = regularization, step_size
        self.hessian = None

    def step_all(self, t, weights, grad):
        g = grad.reshape(-1)
        n = g.size
        if (t - 1) % self.every == 0:
            columns = [block_hvp(weights, self.index, np.eye(n)[j]) for j in range(n)]
            hessian = np.stack(columns, axis=1)
            self.hessian = 0.5 * (hessian + hessian.T)
        values, vectors = np.linalg.eigh(self.hessian)
        coordinates = vectors.T @ g
        shift = max(0.0, -values.min())

        def norm_of_step(tau):
            return np.linalg.norm(coordinates / (values + tau))

        if self.regularization == "quadratic":
            tau = np.sqrt(self.lipschitz * np.linalg.norm(g)) + shift + self.damping
        else:
            from scipy.optimize import brentq
            low = shift + self.damping
            residual = lambda tau: tau - 0.5 * self.lipschitz * norm_of_step(tau)
            if residual(low) >= 0:
                tau = low
            else:
                high = max(low, 1e-12)
                while residual(high) < 0:
                    high *= 2
                tau = brentq(residual, low, high, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
        h = -vectors @ (coordinates / (values + tau))
        return (self.step_size * h).reshape(grad.shape)


NEWTON_CASES = {
    # A small two-layer model (64 x 4 and 4 x 10 weights: Hessian blocks of 256 and 40), its
    # Hessians refreshed at steps 1, 6, 11 and 16.
    "cubic": ({"w1": (64, 4), "w2": (4, 10)},
              "* : dense(stats = hessian, every = 5, regularization = cubic, hessian_lipschitz = 2, damping = 1e-4)",
              dict(every=5, lipschitz=2.0, damping=1e-4)),
    "quadratic": ({"w1": (64, 4), "w2": (4, 10)},
                  "* : dense(stats = hessian, every = 6, regularization = quadratic, hessian_lipschitz = 0.5, damping = 1e-3, step_size = 0.5)",
                  dict(every=6, lipschitz=0.5, damping=1e-3, regularization="quadratic", step_size=0.5)),
}


@pytest.mark.parametrize("case", sorted(NEWTON_CASES))
def test_lazy_newton_matches_the_algorithm(tmp_path, case):
    shapes, line, options = NEWTON_CASES[case]
    init = initial_parameters(shapes)
    ours = run_curv(tmp_path, shapes, [line], 1.0, init)
    reference, losses = train_reference(
        shapes, init, lambda names: FosiAll(names, lambda index: LazyNewton(index, **options)),
    )
    assert losses[-1] < losses[0]
    compare(ours, reference)


# --- SINGD: f-dangel/singd ------------------------------------------------------------------------------


def block_mask(n, block):
    """The pattern of `Block{block}DiagonalMatrix.from_dense`: blocks of `block` rows from the top,
    then one smaller last block."""
    index = np.arange(n) // block
    return (index[:, None] == index[None, :]).astype(float)


class Singd:
    """`SINGD` of f-dangel/singd `singd/optim/optimizer.py` for one `nn.Linear` without bias, in
    float64, `kfac_like = False`, `normalize_lr_cov = False`, no weight decay, with the structure
    classes `DenseMatrix` or a block-diagonal `BlockDiagonalMatrixTemplate` (`BLOCK_DIM = block`).
    In PyTorch's layout (`W` is `[out, in]`, curv's transposed): at steps with `steps % T == 0`
    (from 0), with `a = x / sqrt(B)` and `g = grad_output sqrt(B)` (`process_input`,
    `process_grad_output`), `H_K = K.from_inner(a^T)`, `H_C = C.from_inner(g^T)`, `m_K = alpha1 m_K +
    (H_K avgtr(H_C) + damping avgtr(C^T C) K^T K - I) / 2` (and `m_C` symmetrically), `K <- K -
    lr_cov K m_K`, `C <- C - lr_cov C m_C`; every step the natural gradient `C C^T (W_grad K K^T)`,
    the momentum `b <- momentum b + natural`, `W <- W - lr b`. `from_inner(X)` is
    `S(rmatmat(X) rmatmat(X)^T)` with `rmatmat(X) = K^T X` for a dense matrix and `K X` for a
    block-diagonal one (that class uses its blocks as if symmetric); `from_inner()` uses `X = I`."""

    def __init__(self, lr, every, lr_cov, damping, alpha1, momentum, block=None):
        self.lr, self.every, self.lr_cov, self.damping = lr, every, lr_cov, damping
        self.alpha1, self.momentum, self.block = alpha1, momentum, block
        self.k = self.c = self.m_k = self.m_c = self.buffer = None
        self.steps = 0

    def structure(self, matrix):
        return matrix if self.block is None else matrix * block_mask(matrix.shape[0], self.block)

    def rmatmat(self, factor, x):
        return (factor.T if self.block is None else factor) @ x

    def from_inner(self, factor, x=None):
        s = self.rmatmat(factor, np.eye(factor.shape[0]) if x is None else x)
        return self.structure(s @ s.T)

    def step(self, t, weight, grad, layer):
        inputs, cotangent = layer
        w_grad = grad.T  # PyTorch's [out, in]
        out_dim, in_dim = w_grad.shape
        if self.k is None:
            self.k, self.c = np.eye(in_dim), np.eye(out_dim)
            self.m_k, self.m_c = np.zeros((in_dim, in_dim)), np.zeros((out_dim, out_dim))
            self.buffer = np.zeros_like(w_grad)
        if self.steps % self.every == 0:
            batch = inputs.shape[0]
            a = inputs / np.sqrt(batch)
            g = cotangent * np.sqrt(batch)  # cotangent is d(mean loss)/d(output)
            h_k, h_c = self.from_inner(self.k, a.T), self.from_inner(self.c, g.T)
            k_tk, c_tc = self.from_inner(self.k), self.from_inner(self.c)
            average = lambda m: np.trace(m) / m.shape[0]
            new_m_k = 0.5 * (h_k * average(h_c) + self.damping * average(c_tc) * k_tk - np.eye(in_dim))
            new_m_c = 0.5 * (h_c * average(h_k) + self.damping * average(k_tk) * c_tc - np.eye(out_dim))
            if self.alpha1 != 0.0:
                new_m_k = new_m_k + self.alpha1 * self.m_k
                new_m_c = new_m_c + self.alpha1 * self.m_c
                self.m_k, self.m_c = new_m_k, new_m_c
            self.k = self.k - self.lr_cov * (self.k @ new_m_k)
            self.c = self.c - self.lr_cov * (self.c @ new_m_c)
        natural = (self.k @ self.rmatmat(self.k, w_grad.T)).T
        natural = self.c @ self.rmatmat(self.c, natural)
        self.buffer = self.momentum * self.buffer + natural
        self.steps += 1
        return weight - self.lr * self.buffer.T


SINGD_CASES = {
    # Dense factors with the reference's defaults, refreshed every 3 steps.
    "dense": ("* : kronecker(stats = kfac, function = singd, every = 3, lr_precond = 0.01, damping = 0.001, riemannian_momentum = 0.5, momentum = 0.9)",
              dict(every=3, lr_cov=0.01, damping=0.001, alpha1=0.5, momentum=0.9)),
    # Block-diagonal factors with blocks of 5 (the 64- and 16-dimensional factors have a smaller
    # last block), a larger factor step, no Riemannian momentum, refreshed every step.
    "block_diagonal": ("* : kronecker(stats = kfac, function = singd, every = 1, lr_precond = 0.05, damping = 0.01, riemannian_momentum = 0, momentum = 0.5, factor_structure = block_diagonal, factor_block = 5)",
                       dict(every=1, lr_cov=0.05, damping=0.01, alpha1=0.0, momentum=0.5, block=5)),
}


@pytest.mark.parametrize("case", sorted(SINGD_CASES))
def test_singd_matches_f_dangel_singd(tmp_path, case):
    line, options = SINGD_CASES[case]
    lr = 0.05
    init = initial_parameters(MLP2)
    ours = run_curv(tmp_path, MLP2, [line], lr, init)
    reference, losses = train_reference(MLP2, init, lambda names: PerParameter(names, lambda name: Singd(lr, **options)))
    assert losses[-1] < losses[0]
    compare(ours, reference)


def test_singd_reference_detects_the_block_structure():
    """Dense factors where the case asks for blocks of 5 move the result by far more than the
    tolerance, so the block-diagonal comparison checks the structure."""
    _, options = SINGD_CASES["block_diagonal"]
    init = initial_parameters(MLP2)
    blocked, _ = train_reference(MLP2, init, lambda names: PerParameter(names, lambda name: Singd(0.05, **options)))
    dense_options = dict(options, block=None)
    dense, _ = train_reference(MLP2, init, lambda names: PerParameter(names, lambda name: Singd(0.05, **dense_options)))
    assert relative_error(dense["w1"], blocked["w1"]) > 1e-4


# --- EGN: cor3bit/somax -----------------------------------------------------------------------------------

EGN_EXAMPLES = 16

EGN_PROGRAM = """\
data digits = csv("{data}", label = "label", scale = 0.0625)

model mlp(x: f32[B, 64]) -> f32[B, 10] {{
    param w1: f32[64, 16] = glorot_uniform
    param w2: f32[16, 10] = glorot_uniform
    return tanh(x @ w1) @ w2
}}

optimizer egn {{
    lr {lr}
    * : dense(stats = ggn, damping = {damping}{momentum})
}}

train fit {{
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer egn
    batch all
    steps {steps}
    seed {seed}
}}
"""


class Egn:
    """`EGN` of cor3bit/somax `somax/gn/egn.py` for cross-entropy (`calculate_direction_ce`) with a
    constant step (`line_search = False`, the default) and `adaptive_lambda = False` (its adaptive
    regularisation is not implemented there), over all parameters as one vector, in float64:
    `J` the Jacobian of the batch's logits (`b c` rows, `jax.jacrev` there, torch's here),
    `Q = blockdiag(diag(p_i) - p_i p_i^T)`, `r = onehot - p`, the direction
    `J^T solve(b lambda I + Q J J^T, r)`; with `momentum > 0`, `m <- momentum m + (1 - momentum) d`
    and `d = m / (1 - momentum^t)`; `params <- params + lr d`."""

    def __init__(self, x, labels, lr, damping, momentum=0.0, line_search=False, adaptive_damping=False):
        self.x, self.labels, self.lr, self.damping, self.momentum = x, labels, lr, damping, momentum
        self.line_search, self.adaptive_damping = line_search, adaptive_damping
        self.velocity = None
        self.stepsize = lr

    def step(self, t, weights):
        shapes = [w.shape for w in weights]
        flat = np.concatenate([w.reshape(-1) for w in weights])

        def logits_of(vector):
            w1 = vector[: shapes[0][0] * shapes[0][1]].reshape(shapes[0])
            w2 = vector[shapes[0][0] * shapes[0][1]:].reshape(shapes[1])
            return torch.tanh(torch.tensor(self.x) @ w1) @ w2

        vector = torch.tensor(flat)
        logits = logits_of(vector).detach().numpy()
        jacobian = torch.autograd.functional.jacobian(logits_of, vector).numpy()
        b, c = logits.shape
        J = jacobian.reshape(b * c, -1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        Q = np.zeros((b * c, b * c))
        for i in range(b):
            Q[i * c:(i + 1) * c, i * c:(i + 1) * c] = np.diag(probs[i]) - np.outer(probs[i], probs[i])
        r = (np.eye(c)[self.labels] - probs).reshape(-1)
        direction = J.T @ np.linalg.solve(b * self.damping * np.eye(b * c) + Q @ (J @ J.T), r)
        if self.momentum > 0:
            self.velocity = np.zeros_like(direction) if self.velocity is None else self.velocity
            self.velocity = self.momentum * self.velocity + (1 - self.momentum) * direction
            direction = self.velocity / (1 - self.momentum**t)
        first = shapes[0][0] * shapes[0][1]
        split = lambda vector: [vector[:first].reshape(shapes[0]), vector[first:].reshape(shapes[1])]
        stepsize = self.search(flat, direction, J, r, b, split) if self.line_search else self.lr
        if self.adaptive_damping:
            # The Levenberg-Marquardt rule as the disabled code of `EGN.update` writes it.
            f_cur, f_next = self.loss(split(flat)), self.loss(split(flat + stepsize * direction))
            delta_w = stepsize * direction
            mvp = J @ delta_w
            denom = (-J.T @ r / b) @ delta_w + 0.5 * mvp @ Q @ mvp / b
            rho = (f_next - f_cur) / denom
            self.damping = 1.01 * self.damping if rho < 0.25 else (0.99 * self.damping if rho > 0.75 else self.damping)
        return split(flat + stepsize * direction)

    def search(self, flat, direction, J, r, b, split):
        # `armijo_line_search` with `reset_option = "increase"`: coef 1 - 0.9, decrease 0.8,
        # increase 1.5, maxls 15, the loop of jaxopt's `while_loop` (check, then shrink).
        stepsize = min(self.stepsize * 1.5, self.lr)
        f_cur = self.loss(split(flat))
        grad_loss = -J.T @ r / b
        slope = grad_loss @ direction
        f_next = self.loss(split(flat + stepsize * direction))
        violated, trials = True, 0
        while violated and trials < 15:
            violated = -stepsize * 0.1 * slope > f_cur - f_next + np.finfo(np.float64).eps
            if violated:
                stepsize = min(stepsize * 0.8, self.lr)
                f_next = self.loss(split(flat + stepsize * direction))
            trials += 1
        self.stepsize = stepsize
        return stepsize

    def loss(self, weights):
        logits = np.tanh(self.x @ weights[0]) @ weights[1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -float(np.mean(log_probs[np.arange(len(self.labels)), self.labels]))


EGN_CASES = {
    "constant_step": dict(lr=0.5, damping=1.0),
    "momentum_small_damping": dict(lr=0.2, damping=0.1, momentum=0.9),
    # The preset's settings: a large maximal step that the Armijo search must shrink.
    "line_search": dict(lr=40.0, damping=0.1, momentum=0.9, line_search=True),
    # The adaptive regularisation, with and without the search.
    "adaptive": dict(lr=0.5, damping=0.5, adaptive_damping=True),
    "adaptive_line_search": dict(lr=40.0, damping=0.1, momentum=0.9, line_search=True, adaptive_damping=True),
}


@pytest.mark.parametrize("case", sorted(EGN_CASES))
def test_egn_matches_cor3bit_somax(tmp_path, case):
    options = EGN_CASES[case]
    steps = 10
    features, labels = load_digits()
    features, labels = features[:EGN_EXAMPLES], labels[:EGN_EXAMPLES]
    data = tmp_path / "digits16.csv"
    header = ",".join([f"p{index}" for index in range(64)] + ["label"])
    rows = [",".join(str(int(round(value * 16))) for value in row) + f",{label}" for row, label in zip(features, labels)]
    data.write_text(header + "\n" + "\n".join(rows) + "\n")
    momentum = f", momentum = {options['momentum']}" if "momentum" in options else ""
    if options.get("line_search"):
        momentum += ", line_search = true"
    if options.get("adaptive_damping"):
        momentum += ", adaptive_damping = true"
    program = EGN_PROGRAM.format(data=data, lr=options["lr"], damping=options["damping"], momentum=momentum,
                                 steps=steps, seed=SEED)
    init = initial_parameters({"w1": (64, 16), "w2": (16, 10)})
    ours = train_with_curv(tmp_path, program, init, steps)
    reference = Egn(features, labels, **options)
    weights = [init["w1"], init["w2"]]
    first = reference.loss(weights)
    steps_taken = []
    for t in range(1, steps + 1):
        weights = reference.step(t, weights)
        steps_taken.append(reference.stepsize)
    assert reference.loss(weights) < first
    if options.get("line_search"):
        # The search did shrink some steps below the maximum.
        assert min(steps_taken) < options["lr"], steps_taken
    if options.get("adaptive_damping"):
        # The regularisation did move.
        assert reference.damping != options["damping"]
    compare(ours, {"w1": weights[0], "w2": weights[1]})


# --- By hand: the PSGD LRA transcription against psgd.py itself ----------------------------------------


def lra_transcription_matches_psgd_torch(case):
    """The numpy `LraWhiten` against `psgd.LRAWhiten` itself (lixilinx/psgd_torch `psgd.py`), in
    float64, on one parameter, fed the same draws: `torch.randn` at construction (U, then V) from
    the key of step 0, then per step the shared coin (`torch.rand([])`), `randn_like` (v) and the
    U-or-V coin from the parameter's generator. Not part of the test run, because that file is not
    on PyPI in this version and the project does not copy reference code: run it by hand with
    `PSGD_TORCH=/path/to/psgd.py .venv/bin/python tests/oracle/test_lowrank.py`."""
    import importlib.util
    import os
    import types

    spec = importlib.util.spec_from_file_location("psgd_reference_module", os.environ["PSGD_TORCH"])
    psgd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(psgd)

    class Draws(types.SimpleNamespace):
        def __init__(self):
            super().__init__()
            self.step, self.random = 0, preconditioner_random(SEED, 0, 0)

        def start_step(self, step):
            self.step, self.random = step, None

        def __getattr__(self, name):
            return getattr(torch, name)

        def rand(self, *args, **kwargs):
            if self.random is None:
                return torch.tensor(preconditioner_random(SEED, self.step, SHARED_COIN_INDEX).uniform())
            return torch.tensor(self.random.uniform())

        def randn(self, *shape, dtype=None, device=None):
            count = int(np.prod(shape))
            return torch.tensor(np.array([normal(self.random) for _ in range(count)]).reshape(shape), dtype=dtype)

        def randn_like(self, tensor):
            self.random = preconditioner_random(SEED, self.step, 0)
            values = np.array([normal(self.random) for _ in range(tensor.numel())])
            return torch.tensor(values.reshape(tensor.shape), dtype=tensor.dtype)

    draws = Draws()
    psgd.torch = draws
    shapes, _, lr, options = PSGD_CASES[case]
    shapes = LINEAR
    init = initial_parameters(shapes)
    param = torch.tensor(init["w"], dtype=torch.float64, requires_grad=True)
    optimizer = psgd.LRAWhiten(
        [param], rank_of_approximation=options["rank"], preconditioner_init_scale=options.get("init_scale"),
        lr_params=lr, lr_preconditioner=options.get("lr_precond", 0.1), betaL=options.get("beta", 0.9),
        damping=1e-9, momentum=options.get("momentum", 0.0),
        grad_clip_max_amps=(options.get("max_amp", float("inf")), options.get("max_element", float("inf"))),
        preconditioner_update_probability=options.get("update_probability", 1.0))
    data = Digits()
    x, labels = torch.tensor(data.x), torch.tensor(data.labels)
    for t in range(1, 21):
        draws.start_step(t)
        optimizer.step(lambda: torch.nn.functional.cross_entropy(x @ param, labels))
    ours, _ = train_reference(shapes, init, lambda names: PerParameter(names, lambda name: LraWhiten(0, lr=lr, **options)))
    return compare(ours, {"w": param.detach().numpy()}, tolerance=1e-10)


if __name__ == "__main__":
    for case in sorted(PSGD_CASES):
        errors = lra_transcription_matches_psgd_torch(case)
        print(f"{case}: the transcription matches psgd.py ({errors})")
