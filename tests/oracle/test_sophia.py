"""Oracle tests for the Sophia presets (std/optimizers/sophia.curv): 30 float64 steps with the
curvature estimate refreshed every 10 steps, so that three refreshes (Sophia-H: steps 1, 11, 21)
or two (Sophia-G: before steps 11 and 21) reach the final parameters.

Sophia-G has no installable reference, so the test carries a float64 transcription of the
official code (Liuhong99/Sophia: `sophia.py` and the training loop of `train_sophiag.py`).
Sophia-H runs `optax.contrib.sophia` itself in float64 (JAX with x64 enabled). Both sides are
fed curv's random draws (sampled labels, Rademacher probes), transcribed in curv_random.py.
"""

import numpy as np
import torch

from curv_random import probe, sampled_labels
from test_optimizers import DIGITS, PROGRAM, SEED, SHAPES, assert_close, initial_parameters, load_digits, train_with_curv

STEPS = 30
INTERVAL = 10


def run_curv(tmp_path, rule, lr, init):
    """Trains the oracle model with `std.optimizers.sophia`'s `rule` for STEPS full-batch steps."""
    program = PROGRAM.format(module="sophia", data=DIGITS, lr=lr, rule=rule, steps=STEPS, seed=SEED)
    return train_with_curv(tmp_path, program, init, STEPS)


def logits_of(params, x):
    return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


# --- Sophia-G: a float64 transcription of Liuhong99/Sophia --------------------------------------


class SophiaG:
    """`SophiaG` of Liuhong99/Sophia `sophia.py` (non-capturable path), in float64.

    `step(bs)` is `SophiaG.step` + `_single_tensor_sophiag`; `update_hessian()` is
    `SophiaG.update_hessian`. State is created lazily as in the reference (zeros)."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1):
        self.params = params
        self.lr, self.betas, self.rho, self.weight_decay = lr, betas, rho, weight_decay
        self.state = {}

    def _state(self, p):
        state = self.state.setdefault(id(p), {})
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self):
        beta1, beta2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            state = self._state(p)
            state["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs=5120):
        beta1, beta2 = self.betas
        lr, rho, weight_decay = self.lr, self.rho, self.weight_decay
        for param in self.params:
            if param.grad is None:
                continue
            grad = param.grad
            state = self._state(param)
            exp_avg, hess, step_t = state["exp_avg"], state["hessian"], state["step"]
            # update step
            step_t += 1
            # Perform stepweight decay
            param.mul_(1 - lr * weight_decay)
            # Decay the first and second moment running average coefficient
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            step_size_neg = -lr
            ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
            param.addcmul_(exp_avg.sign(), ratio, value=step_size_neg)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def train_sophiag_reference(init, lr, betas, rho, weight_decay, hess_interval=INTERVAL):
    """The training loop of Liuhong99/Sophia `train_sophiag.py` on one full batch.

    Per iteration (0-based `iter_num`): forward/backward on (X, Y), `optimizer.step(bs=...)`; when
    `iter_num % hess_interval == hess_interval - 1`, additionally a forward pass on the next batch,
    labels `y_sample` drawn from `Categorical(logits=logits)`, backward of the cross-entropy with
    them and `optimizer.update_hessian()`. With one full batch, "the next batch" is the same data,
    and the refresh after 1-based step 10 is the one curv computes at the start of step 11 (from
    the same parameters), so the labels are curv's draws for step `iter_num + 2`.

    `bs` is `total_bs * block_size`, the number of predictions (tokens) whose mean loss gives the
    gradients: here the number of examples in the batch. The loop's global gradient clipping
    (`grad_clip`) is disabled, as curv's preset has none. Returns the final parameters and the
    fraction of unclipped coordinates (the reference's "win rate") at the last step.
    """
    features, labels = load_digits()
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels)
    params = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in init.items()}
    optimizer = SophiaG([params[name] for name in SHAPES], lr=lr, betas=betas, rho=rho, weight_decay=weight_decay)
    bs = x.shape[0]
    for iter_num in range(STEPS):
        loss = torch.nn.functional.cross_entropy(logits_of(params, x), y)
        loss.backward()
        optimizer.step(bs=bs)
        optimizer.zero_grad()
        if iter_num % hess_interval == hess_interval - 1:
            logits = logits_of(params, x)
            # samp_dist = torch.distributions.Categorical(logits=logits); y_sample = samp_dist.sample()
            y_sample = torch.tensor(sampled_labels(SEED, iter_num + 2, logits.detach().numpy()))
            loss = torch.nn.functional.cross_entropy(logits, y_sample)
            loss.backward()
            optimizer.update_hessian()
            optimizer.zero_grad()
    unclipped = total = 0
    for p in optimizer.params:
        state = optimizer._state(p)
        unclipped += int((state["exp_avg"].abs() < rho * bs * state["hessian"]).sum())
        total += p.numel()
    return {name: value.detach().numpy() for name, value in params.items()}, unclipped / total


def test_sophia_g_matches_the_official_code_with_the_same_sampled_labels(tmp_path):
    """`sophia_g` (the `sophia` preset's rule) against a float64 transcription of Liuhong99/Sophia
    (`sophia.py`: SophiaG, _single_tensor_sophiag, update_hessian; `train_sophiag.py`: the GNB
    refresh every `hess_interval` steps after the update, with labels sampled from the model),
    with curv's sampled labels and the betas and weight decay of train_sophiag.py (0.9/0.95, 0.1).
    rho is raised from its 0.03 to 3 so that on this small batch some coordinates are clipped
    after the refreshes and others are not (the reference's "win rate" is checked to lie between),
    so both branches of the step are compared."""
    init = initial_parameters()
    lr = 0.01
    rule = "sophia_g(b1 = 0.9, b2 = 0.95, rho = 3, weight_decay = 0.1)"
    ours = run_curv(tmp_path, rule, lr, init)
    theirs, win_rate = train_sophiag_reference(init, lr, betas=(0.9, 0.95), rho=3, weight_decay=0.1)
    assert 0.05 < win_rate < 0.95, f"win rate {win_rate}: the test would not exercise both branches"
    assert_close(ours, theirs)


# --- Sophia-H: optax.contrib.sophia --------------------------------------------------------------


def train_optax_sophia(init, monkeypatch, lr, b1, b2, eps, gamma, clip_threshold, weight_decay):
    """Runs `optax.contrib.sophia` (scale_by_sophia with hutchinson_estimator_diag_hessian, then
    add_decayed_weights and scale_by_learning_rate) on the full batch; the caller enables x64.

    optax draws its probe with `optax.tree.random_like(subkey, params, jax.random.rademacher)`;
    the test replaces that function (while optax runs) with one returning curv's probes for the
    current step, leaf by leaf. The parameters are a list in curv's declaration order
    (w1, b1, w2, b2), so leaf i is curv's parameter index i. `lax.cond` traces the refresh
    branch at every update, so the replacement is called at every step and only used at steps
    1, 11, 21, where optax refreshes (count % update_interval == 0, before incrementing).
    Returns the final parameters and the fraction of coordinates whose last step was not
    clipped."""
    import jax
    import jax.numpy as jnp
    import optax
    import optax.contrib

    features, labels = load_digits()
    x = jnp.asarray(features, dtype=jnp.float64)
    y = jnp.asarray(labels)
    names = list(SHAPES)
    params = [jnp.asarray(init[name], dtype=jnp.float64) for name in names]

    def loss_fn(params):
        w1, b1_, w2, b2_ = params
        logits = jnp.tanh(x @ w1 + b1_) @ w2 + b2_
        log_probabilities = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probabilities, y[:, None], axis=-1))

    current = {"step": 0, "draws": 0}
    original = optax.tree.random_like

    def curv_probes(rng_key, target_tree, sampler=jax.random.normal, dtype=None):
        assert sampler is jax.random.rademacher
        leaves, structure = jax.tree.flatten(target_tree)
        assert [leaf.shape for leaf in leaves] == [SHAPES[name] for name in names]
        current["draws"] += 1
        probes = [
            jnp.asarray(np.reshape(probe(SEED, current["step"], index, leaf.size), leaf.shape), dtype=dtype)
            for index, leaf in enumerate(leaves)
        ]
        return jax.tree.unflatten(structure, probes)

    monkeypatch.setattr(optax.tree, "random_like", curv_probes)
    optimizer = optax.contrib.sophia(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, gamma=gamma,
        clip_threshold=clip_threshold, update_interval=INTERVAL,
    )
    state = optimizer.init(params)
    for step in range(1, STEPS + 1):
        current["step"] = step
        grads = jax.grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params, obj_fn=loss_fn)
        params = optax.apply_updates(params, updates)
    monkeypatch.setattr(optax.tree, "random_like", original)
    assert all(value.dtype == jnp.float64 for value in params)
    assert current["draws"] >= 3, "optax never asked for a probe: the replacement is not in effect"
    sophia_state = state[0]
    correction = 1 - b1 ** int(sophia_state.count)
    ratios = [np.abs(np.asarray(m) / correction / np.maximum(gamma * np.asarray(h), eps))
              for m, h in zip(sophia_state.mu, sophia_state.nu)]
    win_rate = sum(int((ratio < clip_threshold).sum()) for ratio in ratios) / sum(ratio.size for ratio in ratios)
    return {name: np.asarray(value) for name, value in zip(names, params)}, win_rate


def test_sophia_h_matches_optax_with_the_same_probes(tmp_path, monkeypatch):
    """`sophia_h` against `optax.contrib.sophia` (optax/contrib/_sophia.py) in float64, with
    curv's Rademacher probes: bias-corrected momentum, the step m_hat / max(gamma * h, eps)
    clipped to the threshold with the h of the previous refreshes, then h refreshed from v * Hv at
    the step's (pre-update) parameters at steps 1, 11, 21, plus decoupled weight decay added
    before the learning rate. Non-default hyperparameters on both sides; gamma and the threshold
    are chosen so that some coordinates' steps are clipped and others are not (checked)."""
    import jax

    init = initial_parameters()
    lr = 0.01
    hyper = dict(b1=0.9, b2=0.95, eps=1e-6, gamma=0.5, clip_threshold=0.5, weight_decay=0.02)
    rule = "sophia_h(b1 = 0.9, b2 = 0.95, eps = 1e-6, gamma = 0.5, threshold = 0.5, weight_decay = 0.02)"
    ours = run_curv(tmp_path, rule, lr, init)
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        theirs, win_rate = train_optax_sophia(init, monkeypatch, lr, **hyper)
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert 0.05 < win_rate < 0.95, f"win rate {win_rate}: the test would not exercise both branches"
    assert_close(ours, theirs)
