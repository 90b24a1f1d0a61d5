"""The GPU check script runs end to end (tiny shape on the CPU here; the real shape runs on a GPU machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--samples", "8",
                          "--seq-len", "16", "--batch-size", "4"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    res = json.loads(out)
    assert res["shape"] == "tiny" and res["tokens"] == 128
    for key in ("stats_over_plain", "swm_seconds_per_candidate", "naive_seconds_per_candidate"):
        assert res[key] > 0


@pytest.mark.gpu
def test_gpu_check_real_shape():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["stats_over_plain"] > 0
