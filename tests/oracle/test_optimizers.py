"""Oracle tests: 20 float64 steps of curv's optimizer presets against their reference
implementations (torch.optim and pytorch_optimizer), from identical initial parameters and the
same full batch of the digits data. Run by scripts/test.sh in the venv it creates.

Each case writes a small .curv program, runs `curv run --precision f64 --init ...`, trains the
same model in PyTorch, and compares every final parameter within 1e-6 relative error.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
import torch
import pytorch_optimizer
from safetensors.numpy import load_file, save_file

from curv_random import probe

ROOT = pathlib.Path(__file__).resolve().parents[2]
CURV = pathlib.Path(os.environ.get("CURV", ROOT / "target" / "debug" / "curv"))
DIGITS = ROOT / "examples" / "data" / "digits.csv"
STEPS = 20
SEED = 0
SHAPES = {"w1": (64, 16), "b1": (16,), "w2": (16, 10), "b2": (10,)}

PROGRAM = """\
use std.optimizers.{module}

data digits = csv("{data}", label = "label", scale = 0.0625)

model mlp(x: f32[B, 64]) -> f32[B, 10] {{
    param w1: f32[64, 16] = glorot_uniform
    param b1: f32[16] = zeros
    param w2: f32[16, 10] = glorot_uniform
    param b2: f32[10] = zeros
    return tanh(x @ w1 + b1) @ w2 + b2
}}

optimizer oracle {{
    lr {lr}
    * : {rule}
}}

train fit {{
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer oracle
    batch all
    steps {steps}
    seed {seed}
}}
"""


def load_digits():
    table = np.loadtxt(DIGITS, delimiter=",", skiprows=1)
    return table[:, :-1] * 0.0625, table[:, -1].astype(np.int64)


def initial_parameters():
    generator = np.random.default_rng(1234)
    return {name: generator.normal(0.0, 0.3, size=shape) for name, shape in SHAPES.items()}


def train_with_curv(tmp_path, program_text, init, steps):
    """Writes `program_text`, runs it with `curv run --precision f64` from the parameters `init`,
    checks that it completed `steps` steps and returns its final parameters."""
    program = tmp_path / "oracle.curv"
    program.write_text(program_text)
    save_file({name: np.ascontiguousarray(value) for name, value in init.items()}, str(tmp_path / "init.safetensors"))
    out = tmp_path / "out"
    result = subprocess.run(
        [str(CURV), "run", str(program), "--precision", "f64", "--init", str(tmp_path / "init.safetensors"),
         "--out", str(out), "--metrics", str(tmp_path / "metrics.jsonl"), "--quiet"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] is True and lines[-1]["step"] == steps
    return load_file(str(out / "final.safetensors"))


def run_curv(tmp_path, module, rule, lr, init):
    program = PROGRAM.format(module=module, data=DIGITS, lr=lr, rule=rule, steps=STEPS, seed=SEED)
    return train_with_curv(tmp_path, program, init, STEPS)


def run_reference(make_optimizer, init, needs_hessian=False):
    features, labels = load_digits()
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels)
    params = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in init.items()}
    ordered = [params[name] for name in SHAPES]
    optimizer = make_optimizer(ordered)
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        logits = torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward(create_graph=needs_hessian)
        optimizer.step_number = step
        optimizer.step()
    return {name: value.detach().numpy() for name, value in params.items()}


def assert_close(curv, reference):
    for name in SHAPES:
        ours, theirs = curv[name], reference[name]
        assert ours.shape == theirs.shape
        error = np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-300)
        assert error <= 1e-6, f"{name}: relative error {error:.3e}"


CASES = {
    "sgd": ("sgd", "sgd(momentum = 0)", 0.5, lambda p: torch.optim.SGD(p, lr=0.5)),
    "sgd_momentum": ("sgd", "sgd(momentum = 0.9)", 0.1, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd_nesterov": ("sgd", "sgd(momentum = 0.9, nesterov = 1)", 0.1,
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    "sgd_weight_decay": ("sgd", "sgd(momentum = 0.9, weight_decay = 0.01)", 0.1,
                         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adam": ("adam", "adam", 0.01, lambda p: torch.optim.Adam(p, lr=0.01)),
    "adamw": ("adamw", "adamw(weight_decay = 0.05)", 0.01, lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)),
    "adopt": ("adopt", "adopt", 0.01, lambda p: pytorch_optimizer.ADOPT(p, lr=0.01)),
    "adan": ("adan", "adan(weight_decay = 0.02)", 0.01,
             lambda p: pytorch_optimizer.Adan(p, lr=0.01, weight_decay=0.02)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_order_presets_match_their_references(tmp_path, case):
    module, rule, lr, make_optimizer = CASES[case]
    init = initial_parameters()
    assert_close(run_curv(tmp_path, module, rule, lr, init), run_reference(make_optimizer, init))


def test_adahessian_matches_pytorch_optimizer_with_the_same_probes(tmp_path, monkeypatch):
    init = initial_parameters()
    rule = "diagonal(stats = hutchinson, probe = rademacher, b1 = 0.9, ema = 0.999, eps = 1e-4, power = 1)"
    ours = run_curv(tmp_path, "adahessian", rule, 0.1, init)

    # pytorch_optimizer draws each probe with torch.randint_like(p, 0, 2) * 2 - 1, once per
    # parameter in order; hand it curv's probes instead (as 0/1 so the formula maps them back).
    state = {"step": 0, "index": 0}
    original = torch.randint_like

    def curv_probes(tensor, low, high=None, **kwargs):
        if (low, high) != (0, 2):
            return original(tensor, low, high, **kwargs)
        index = state["index"]
        state["index"] += 1
        values = probe(SEED, state["step"], index, tensor.numel())
        return (torch.tensor(values, dtype=tensor.dtype).reshape(tensor.shape) + 1.0) / 2.0

    monkeypatch.setattr(torch, "randint_like", curv_probes)

    def make_optimizer(params):
        optimizer = pytorch_optimizer.AdaHessian(
            params, lr=0.1, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0,
            update_period=1, num_samples=1, hessian_distribution="rademacher",
        )
        step = optimizer.step

        def step_with_probes(*args, **kwargs):
            state["step"] += 1
            state["index"] = 0
            return step(*args, **kwargs)

        optimizer.step = step_with_probes
        return optimizer

    theirs = run_reference(make_optimizer, init, needs_hessian=True)
    assert_close(ours, theirs)


def test_adalomo_matches_pytorch_optimizer(tmp_path, monkeypatch):
    """`factored` (the `adalomo` preset) against pytorch_optimizer's AdaLOMO.

    The reference casts gradients and states to float32 (`grad.to(torch.float32)`); for a float64
    comparison the test points `torch.float32` at float64 while the reference runs, so it executes
    its own code in double precision. Loss scaling is disabled (`loss_scale=0`).
    """
    init = initial_parameters()
    rule = "factored(decay_rate = -0.8, eps1 = 1e-30, eps2 = 1e-3, clip_threshold = 1, relative_step = true)"
    ours = run_curv(tmp_path, "adalomo", rule, 0.05, init)

    features, labels = load_digits()
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels)

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in init.items():
                self.register_parameter(name, torch.nn.Parameter(torch.tensor(value, dtype=torch.float64)))

        def forward(self, inputs):
            return torch.tanh(inputs @ self.w1 + self.b1) @ self.w2 + self.b2

    model = Mlp()
    monkeypatch.setattr(torch, "float32", torch.float64)
    optimizer = pytorch_optimizer.AdaLOMO(model, lr=0.05, loss_scale=0.0, clip_threshold=1.0, decay_rate=-0.8, eps1=1e-30, eps2=1e-3)
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.fused_backward(loss, 0.05)
    monkeypatch.undo()
    assert_close(ours, {name: getattr(model, name).detach().numpy() for name in SHAPES})
