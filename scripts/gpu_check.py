"""Helpers of scripts/gpu-prepare.sh and scripts/gpu-check.sh (standard library, numpy and, for
`bench`, PyTorch).

  tolerances DIR            from DIR/manifest.tsv and DIR/reference/NAME-{f32,f64}/: write
                            DIR/tolerances.json (per trainer: the loss's and each parameter's)
  compare NAME GPU REF TOL  compare a GPU run's final.safetensors and metrics.jsonl (directory
                            GPU) with the CPU run's (REF); print one line; exit 1 on a mismatch
  bench                     median train-step time of the digits MLP and the SIREN with Adam in
                            PyTorch CUDA eager and torch.compile, and the device-to-device copy
                            bandwidth, as JSON
  library DIR               the optimizer step of DIR/libadam.so (built with --device cuda) on
                            CUDA tensors against torch.optim.Adam; print one line; exit 1 on a
                            mismatch
"""

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np


def read_safetensors(path):
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "F64": np.float64, "I32": np.int32}[entry["dtype"]]
        start, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).astype(np.float64)
    return tensors


def final_loss(directory):
    lines = [line for line in (Path(directory) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(json.loads(lines[-1])["loss"])


def relative_distance(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def tolerances(directory):
    directory = Path(directory)
    out = {}
    for line in (directory / "manifest.tsv").read_text().splitlines():
        name = line.split("\t")[0]
        f32 = directory / "reference" / f"{name}-f32"
        f64 = directory / "reference" / f"{name}-f64"
        loss32, loss64 = final_loss(f32), final_loss(f64)
        loss = max(1e-3, 3.0 * abs(loss32 - loss64) / max(abs(loss64), 1e-12))
        p32, p64 = read_safetensors(f32 / "final.safetensors"), read_safetensors(f64 / "final.safetensors")
        params = {key: max(1e-3, 3.0 * relative_distance(p32[key], p64[key])) for key in p32}
        out[name] = {"loss": loss, "params": params}
    (directory / "tolerances.json").write_text(json.dumps(out, indent=1))
    print(f"[gpu-prepare] tolerances for {len(out)} trainers")


def compare(name, gpu, reference, tolerance_file):
    tolerance = json.loads(Path(tolerance_file).read_text()).get(name, {"loss": 1e-3, "params": {}})
    gpu_loss, cpu_loss = final_loss(gpu), final_loss(reference)
    loss_error = abs(gpu_loss - cpu_loss) / max(abs(cpu_loss), 1e-12)
    worst = ("loss", loss_error, tolerance["loss"])
    ok = loss_error <= tolerance["loss"]
    gpu_params = read_safetensors(Path(gpu) / "final.safetensors")
    cpu_params = read_safetensors(Path(reference) / "final.safetensors")
    for key, expected in cpu_params.items():
        limit = tolerance["params"].get(key, 1e-3)
        error = relative_distance(gpu_params[key], expected)
        if error / limit > worst[1] / worst[2]:
            worst = (key, error, limit)
        ok = ok and error <= limit
    verdict = "ok" if ok else "MISMATCH"
    print(f"{name:<14} {verdict:<8} loss gpu {gpu_loss:.6g} cpu {cpu_loss:.6g}; worst {worst[0]}: {worst[1]:.2e} (tolerance {worst[2]:.1e})")
    return 0 if ok else 1


def bench():
    import time

    import torch

    device = torch.device("cuda")
    results = {}

    def median_ms(step, warm, count):
        for _ in range(warm):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000.0)
        return float(np.median(times))

    class Sine(torch.nn.Module):
        def forward(self, x):
            return torch.sin(30.0 * x)

    problems = {
        "digits": (
            lambda: torch.nn.Sequential(
                torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
            ),
            torch.randn(128, 64, device=device),
            torch.randint(0, 10, (128,), device=device),
            torch.nn.functional.cross_entropy,
        ),
        "siren": (
            lambda: torch.nn.Sequential(
                torch.nn.Linear(2, 256), Sine(), torch.nn.Linear(256, 256), Sine(), torch.nn.Linear(256, 256), Sine(), torch.nn.Linear(256, 1)
            ),
            torch.rand(4096, 2, device=device) * 2 - 1,
            torch.rand(4096, 1, device=device),
            torch.nn.functional.mse_loss,
        ),
    }
    for problem, (make, x, y, loss_function) in problems.items():
        for mode in ("eager", "compile"):
            model = make().to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_function(model(x), y)
                loss.backward()
                optimizer.step()

            step = torch.compile(train_step) if mode == "compile" else train_step
            try:
                results[f"{problem}_{mode}_ms"] = median_ms(step, 20, 100)
            except Exception as error:  # torch.compile may be unavailable (no Triton): say so
                results[f"{problem}_{mode}_ms"] = None
                print(f"[gpu-check] torch {mode} on {problem} failed: {error}", file=sys.stderr)
    source = torch.empty(1 << 26, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), 5, 20)
    results["copy_gbytes_per_second"] = 2 * source.numel() * 4 / (copy_ms / 1000.0) / 1e9
    results["device"] = torch.cuda.get_device_name(0)
    print(json.dumps(results))


def library(directory):
    """The optimizer step of a `curv build --lib --device cuda` library on CUDA tensors: a small
    PyTorch model trained 20 steps with it and with torch.optim.Adam on the GPU, compared."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print("library adam   skipped: no CUDA device")
        return 0
    spec = importlib.util.spec_from_file_location("curv_adam_library", os.path.join(directory, "adam.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()

    ours, reference = model(), model()
    # The library's parameters in its `.curv` file's order and shapes: w1 [64, 64], b1, w2 [64, 10], b2.
    mine = [ours[0].weight, ours[0].bias, ours[2].weight, ours[2].bias]
    theirs = [reference[0].weight, reference[0].bias, reference[2].weight, reference[2].bias]
    shapes = [tuple(shape) for shape in module.Context().shapes]
    views = [parameter.T if parameter.dim() == 2 else parameter for parameter in mine]
    if [tuple(view.shape) for view in views] != shapes:
        print(f"library adam   MISMATCH: shapes {shapes}")
        return 1
    # Transposed weights are not contiguous: keep contiguous copies as the library's parameters.
    parameters = [torch.nn.Parameter(view.detach().contiguous()) for view in views]
    optimizers = (module.Optimizer(parameters), torch.optim.Adam(theirs, lr=1e-3))
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(32, 64, generator=generator).cuda()
        y = torch.randint(0, 10, (32,), generator=generator).cuda()
        logits = torch.tanh(x @ parameters[0] + parameters[1]) @ parameters[2] + parameters[3]
        optimizers[0].zero_grad()
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizers[0].step()
        optimizers[1].zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        optimizers[1].step()
    worst = max(
        ((p - (q.T if q.dim() == 2 else q)).norm() / q.norm()).item() for p, q in zip(parameters, theirs)
    )
    # The state of a rule optimizer stepping CUDA tensors stays on the GPU (the resident step).
    resident = optimizers[0].context.state_resident
    verdict = "ok" if worst <= 1e-5 and resident else "MISMATCH"
    print(f"library adam   {verdict:<8} CUDA tensors, 20 steps against torch.optim.Adam on the GPU: worst relative error {worst:.2e} (tolerance 1e-5), state resident on the GPU: {resident}")
    return 0 if verdict == "ok" else 1


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "library":
        sys.exit(library(sys.argv[2]))
    if command == "tolerances":
        tolerances(sys.argv[2])
    elif command == "compare":
        sys.exit(compare(*sys.argv[2:6]))
    elif command == "bench":
        bench()
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
