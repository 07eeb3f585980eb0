"""The comparison scripts/gpu-check.sh makes between a GPU run and a CPU run (scripts/gpu_check.py
compare), on files written here: equal runs pass, a parameter off by more than its tolerance or a
different loss fails, and the tolerance file gpu-prepare writes is honoured."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def write_run(directory, loss, params):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": loss}) + "\n")
    header, body, offset = {}, b"", 0
    for name, values in params.items():
        data = np.asarray(values, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [offset, offset + len(data)]}
        body += data
        offset += len(data)
    encoded = json.dumps(header).encode()
    (directory / "final.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def compare(tmp_path, gpu_loss, gpu_w, tolerance=None):
    write_run(tmp_path / "cpu", 0.5, {"w": [1.0, 2.0, 3.0]})
    write_run(tmp_path / "gpu", gpu_loss, {"w": gpu_w})
    tolerances = tmp_path / "tolerances.json"
    tolerances.write_text(json.dumps({"adam": tolerance or {"loss": 1e-3, "params": {"w": 1e-3}}}))
    return subprocess.run(
        [sys.executable, str(SCRIPT), "compare", "adam", str(tmp_path / "gpu"), str(tmp_path / "cpu"), str(tolerances)],
        capture_output=True,
        text=True,
    )


def test_equal_runs_pass(tmp_path):
    result = compare(tmp_path, 0.5, [1.0, 2.0, 3.0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert " ok " in result.stdout


def test_a_parameter_beyond_its_tolerance_fails(tmp_path):
    result = compare(tmp_path, 0.5, [1.0, 2.0, 3.1])
    assert result.returncode == 1
    assert "MISMATCH" in result.stdout and "worst w" in result.stdout


def test_a_different_loss_fails_and_a_wider_tolerance_is_honoured(tmp_path):
    assert compare(tmp_path, 0.51, [1.0, 2.0, 3.0]).returncode == 1
    wide = {"loss": 0.05, "params": {"w": 0.05}}
    assert compare(tmp_path, 0.51, [1.0, 2.0, 3.1], wide).returncode == 0
