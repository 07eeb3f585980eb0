"""AdaHessian's spatial averaging on a convolution kernel, against a float64 transcription of the
reference update.

The reference is amirgholami/adahessian, `image_classification/optim_adahessian.py` (commit
85ebc00): `get_trace` takes `|Hv|` for tensors of rank <= 2 and, for a 4-D convolution kernel,
its mean over the two spatial dimensions (`torch.mean(hv.abs(), dim=[2, 3], keepdim=True)`);
`step` keeps `m = b1 m + (1 - b1) g` and `s = b2 s + (1 - b2) D * D`, and moves by
`lr * (m / (1 - b1^t)) / ((sqrt(s) / sqrt(1 - b2^t))^k + eps)`. pytorch_optimizer's AdaHessian
does not average spatially, hence this transcription (the autograd calls are PyTorch's; the
update is written out here). Both sides use curv's Rademacher probes, and the model is a small
convolutional network on the digits data, trained for 20 full-batch steps from the same initial
parameters.
"""

import numpy as np
import torch

from curv_random import probe
from test_optimizers import DIGITS, train_with_curv

STEPS = 20
SEED = 0
LR = 0.05
B1, B2, EPS, POWER = 0.9, 0.999, 1e-4, 1.0
SHAPES = {"k": (4, 1, 3, 3), "w": (256, 10), "b": (10,)}

PROGRAM = """\
use std.optimizers.adahessian

data digits = csv("{data}", label = "label", scale = 0.0625)

model net(x: f32[B, 64]) -> f32[B, 10] {{
    param k: f32[4, 1, 3, 3] = glorot_uniform
    param w: f32[256, 10] = glorot_uniform
    param b: f32[10] = zeros
    let h = tanh(conv2d(reshape(x, [B, 1, 8, 8]), k, padding = 1))
    return reshape(h, [B, 256]) @ w + b
}}

optimizer oracle {{
    lr {lr}
    * : diagonal(stats = hutchinson, probe = rademacher, b1 = {b1}, ema = {b2}, eps = {eps}, power = {power}, spatial = {spatial})
}}

train fit {{
    loss cross_entropy(net(digits.x), digits.y)
    optimizer oracle
    batch all
    steps {steps}
    seed {seed}
}}
"""


def initial_parameters():
    generator = np.random.default_rng(4321)
    return {name: generator.normal(0.0, 0.3, size=shape) for name, shape in SHAPES.items()}


def run_curv(tmp_path, init, spatial):
    program = PROGRAM.format(data=DIGITS, lr=LR, b1=B1, b2=B2, eps=EPS, power=POWER,
                             spatial="true" if spatial else "false", steps=STEPS, seed=SEED)
    return train_with_curv(tmp_path, program, init, STEPS)


def run_reference(init):
    table = np.loadtxt(DIGITS, delimiter=",", skiprows=1)
    x = torch.tensor(table[:, :-1] * 0.0625, dtype=torch.float64)
    y = torch.tensor(table[:, -1].astype(np.int64))
    params = [torch.tensor(init[name], dtype=torch.float64, requires_grad=True) for name in SHAPES]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_hessian_diag_sq = [torch.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        k, w, b = params
        h = torch.tanh(torch.nn.functional.conv2d(x.reshape(-1, 1, 8, 8), k, padding=1))
        loss = torch.nn.functional.cross_entropy(h.reshape(-1, 256) @ w + b, y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.tensor(probe(SEED, step, index, p.numel()), dtype=torch.float64).reshape(p.shape)
              for index, p in enumerate(params)]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs)
        traces = [torch.mean(hv.abs(), dim=[2, 3], keepdim=True) if hv.dim() == 4 else hv.abs() for hv in hvs]
        with torch.no_grad():
            for p, g, m, s, d in zip(params, grads, exp_avg, exp_hessian_diag_sq, traces):
                m.mul_(B1).add_(g, alpha=1 - B1)
                s.mul_(B2).addcmul_(d, d, value=1 - B2)
                bias_correction1 = 1 - B1 ** step
                bias_correction2 = 1 - B2 ** step
                denom = (s.sqrt() ** POWER) / (bias_correction2 ** 0.5) ** POWER + EPS
                p.sub_(LR * (m / bias_correction1 / denom))
    return {name: p.detach().numpy() for name, p in zip(SHAPES, params)}


def relative_error(ours, theirs):
    return np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-300)


def test_adahessian_spatial_averaging_matches_the_reference(tmp_path):
    init = initial_parameters()
    ours = run_curv(tmp_path, init, spatial=True)
    theirs = run_reference(init)
    for name in SHAPES:
        assert ours[name].shape == theirs[name].shape
        error = relative_error(ours[name], theirs[name])
        assert error <= 1e-6, f"{name}: relative error {error:.3e}"


def test_without_spatial_averaging_the_kernel_differs(tmp_path):
    # The comparison above can fail: without `spatial = true` curv's kernel update is that of
    # plain |Hv|, which the reference does not compute for a 4-D tensor.
    init = initial_parameters()
    ours = run_curv(tmp_path, init, spatial=False)
    theirs = run_reference(init)
    assert relative_error(ours["k"], theirs["k"]) > 1e-4
