"""A PyTorch model trained with curv's Shampoo.

    curv build --lib examples/optimizers/shampoo.curv -o build/shampoo
    python examples/integration/torch_shampoo.py build/shampoo [steps]

The library holds the optimizer of examples/optimizers/shampoo.curv (Shampoo on the weight
matrices, Adam grafting, as that file declares it), compiled; PyTorch keeps the model, the data
loop and autograd. The model's parameters have the shapes the .curv file declares (`x @ w` with
`w: [in, out]`), in its order.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(directory, name):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(directory) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits():
    table = np.loadtxt(ROOT / "examples" / "data" / "digits.csv", delimiter=",", skiprows=1)
    return torch.tensor(table[:, :64] / 16.0, dtype=torch.float32), torch.tensor(table[:, 64], dtype=torch.long)


class Mlp(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(*shape, generator=generator) * (2.0 / sum(shape)) ** 0.5 if len(shape) == 2 else torch.zeros(*shape)) for shape in shapes]
        )

    def forward(self, x):
        w1, b1, w2, b2 = self.weights
        return torch.tanh(x @ w1 + b1) @ w2 + b2


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "build/shampoo"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    shampoo = load(directory, "shampoo")
    shapes = shampoo.Context().shapes
    model = Mlp(shapes)
    optimizer = shampoo.Optimizer(model.parameters())
    x, y = digits()
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
