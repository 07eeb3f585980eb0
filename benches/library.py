"""Times the optimizer step of a `curv build --lib` library against PyTorch's own, in one run.

For each program (the digits MLP and the 4.7M-parameter `examples/bench/update_4m.curv`), a
library is built with `curv build --lib`, and the same float32 parameter tensors with the same
gradients are stepped by the library's `Optimizer` (the generated Adam through the C ABI) and by
`torch.optim.Adam` (its default foreach implementation, and `fused=True`). Printed: the median
milliseconds per step (after warm-up steps), curv's ratio to each, and the bytes Adam must move per
step (parameter, gradient and two moments read; parameter and moments written) over curv's time.

Not a test: it prints measurements. Run it through scripts/bench-library.sh.
"""

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CURV = os.environ.get("CURV", str(ROOT / "target" / "release" / "curv"))
STEPS = int(os.environ.get("LIBRARY_BENCH_STEPS", "50"))
WARM = 5


def build(source, directory):
    result = subprocess.run([CURV, "build", "--lib", str(source), "-o", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"curv build --lib {source} failed:\n{result.stderr}")
    name = source.stem
    spec = importlib.util.spec_from_file_location(f"curv_bench_{name}", directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameters(context, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in context.shapes:
        tensor = torch.nn.Parameter(torch.randn(*shape, generator=generator) * 0.01)
        tensor.grad = torch.randn(*shape, generator=generator) * 0.01
        tensors.append(tensor)
    return tensors


def median_ms(step):
    for _ in range(WARM):
        step()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {STEPS} steps after {WARM}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, source in (
            ("digits MLP", ROOT / "examples" / "digits_mlp.curv"),
            ("update_4m", ROOT / "examples" / "bench" / "update_4m.curv"),
        ):
            directory = Path(scratch) / source.stem
            directory.mkdir()
            library = build(source, directory)
            ours = library.Optimizer(params := parameters(library.Context(), 0), lr=1e-3)
            count = sum(param.numel() for param in params)
            curv_ms = median_ms(ours.step)
            peers = []
            for peer, options in (("torch Adam (foreach)", {"foreach": True}), ("torch Adam (fused)", {"fused": True})):
                theirs = parameters(library.Context(), 0)
                try:
                    optimizer = torch.optim.Adam(theirs, lr=1e-3, **options)
                    peers.append((peer, median_ms(optimizer.step)))
                except (RuntimeError, TypeError) as error:
                    print(f"{label}: {peer} unavailable: {error}")
            rows.append((label, count, curv_ms, peers))
    print()
    print(f"{'program':<12}{'parameters':>12}{'curv ms':>10}{'curv GB/s':>11}  peers (ms, curv/peer)")
    for label, count, curv_ms, peers in rows:
        moved = 7 * 4 * count  # read p, g, m, v; write p, m, v (float32)
        shown = "  ".join(f"{peer} {ms:.3f} ({curv_ms / ms:.2f})" for peer, ms in peers)
        print(f"{label:<12}{count:>12}{curv_ms:>10.3f}{moved / curv_ms / 1e6:>11.1f}  {shown}")


if __name__ == "__main__":
    main()
