"""Oracle test for the `innaprop` preset: 20 float64 steps against a transcription of the reference
INNAprop optimizer, from the same initial parameters and the same full batch of the digits data as
test_optimizers.py.

No installable package carries INNAprop, so the reference is transcribed here, in torch float64,
from `classification/optimizers/innaprop.py` of the authors' repository `innaprop/innaprop`
(Bolte, Castera, Pauwels et al., "A second-order-like optimizer with adaptive gradient scaling for
deep learning", 2024): `INNAprop.step` and `_single_tensor_innaprop`, the non-capturable branch
(the capturable branch computes the same update on a tensor step counter).
"""

import math

import pytest
import torch

from test_optimizers import assert_close, initial_parameters, run_curv, run_reference


class ReferenceINNAprop(torch.optim.Optimizer):
    """`INNAprop` of innaprop/innaprop's classification/optimizers/innaprop.py, statement by
    statement (real parameters, maximize=False, capturable=False)."""

    def __init__(self, params, lr=0.001, alpha=0.1, beta=0.9, sigma=0.999, eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, alpha=alpha, beta=beta, sigma=sigma, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            alpha, beta = group["alpha"], group["beta"]
            sigma = group["sigma"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                # State initialization
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["psi"] = (1 - alpha * beta) * torch.clone(param, memory_format=torch.preserve_format)
                step_t, psi, exp_avg_sq = state["step"], state["psi"], state["exp_avg_sq"]

                # update step
                step_t += 1
                # Perform stepweight decay
                param.mul_(1 - lr * weight_decay)
                # Decay the first and second moment running average coefficient
                exp_avg_sq.mul_(sigma).addcmul_(grad, grad, value=1 - sigma)

                inv_beta = 1.0 / beta
                step = step_t.item()
                scalar1 = (lr * (1 - beta * alpha)) / (beta - lr)
                scalar2 = lr / (beta - lr)
                bias_correction = 1 - sigma**step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction)).add_(eps)

                psi.mul_(1 - (lr / beta)).add_(param, alpha=lr * (inv_beta - alpha))
                param.mul_(1 + scalar1).sub_(psi, alpha=scalar2).addcdiv_(grad, denom, value=-lr * beta)


# rule written in the .curv program, learning rate, keyword arguments of the reference.
CASES = {
    "defaults": ("innaprop", 0.01, {}),
    # Every hyperparameter away from its default: a larger weight decay, alpha * beta != 0.09,
    # a shorter second-moment average (so the bias correction matters for longer), and an eps
    # that is not negligible against sqrt(v) for the small gradients of the biases.
    "tuned": (
        "innaprop(alpha = 0.5, beta = 1.5, sigma = 0.95, eps = 1e-4, weight_decay = 0.1)",
        0.02,
        dict(alpha=0.5, beta=1.5, sigma=0.95, eps=1e-4, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_innaprop_matches_the_reference_transcription(tmp_path, case):
    rule, lr, hyper = CASES[case]
    init = initial_parameters()
    ours = run_curv(tmp_path, "innaprop", rule, lr, init)
    theirs = run_reference(lambda params: ReferenceINNAprop(params, lr=lr, **hyper), init)
    assert_close(ours, theirs)
