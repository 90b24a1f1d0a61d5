"""The GPU check script runs end to end (tiny shape on the CPU here; the real shape runs on a GPU machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


PEAKS = ("scorer_peak_gib", "swm_candidate_peak_gib", "naive_peak_gib")


def _check(res: dict, rows: int, seq_len: int, batch_size: int) -> None:
    """What the script promises, on any shape and device."""
    assert res["tokens"] == rows * seq_len
    # both passes run the same minibatches (a tail shorter than 4 rows is dropped), and the rates use them
    assert res["stats_tokens"] == res["plain_tokens"] == (rows // batch_size) * batch_size * seq_len
    assert res["stats_tokens_per_s"] == pytest.approx(res["stats_tokens"] / res["stats_s"])
    assert res["stats_over_plain"] == pytest.approx(res["stats_s"] / res["plain_s"])
    # the same pass with one decoder layer resident at a time, read from a safetensors copy
    assert res["stream_stats_tokens_per_s"] == pytest.approx(res["stats_tokens"] / res["stream_stats_s"])
    assert res["stream_over_plain"] == pytest.approx(res["stream_stats_s"] / res["plain_s"])
    # the batched candidate check finds the naive procedure's score for the same window
    windows = [tuple(w) for w in res["windows"]]
    assert len(res["swm_scores"]) == len(windows) and all(-1 <= s <= 1 for s in res["swm_scores"])
    middle = windows.index(tuple(res["windows"][1]))
    assert res["swm_scores"][middle] == pytest.approx(res["naive_score_middle_window"], abs=2e-3)
    assert res["speedup_middle_window"] == pytest.approx(
        res["naive_seconds_per_candidate"] / res["swm_seconds_per_candidate"])
    assert set(PEAKS) <= set(res)


def test_gpu_check_tiny_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--samples", "10",
                          "--seq-len", "16", "--batch-size", "4"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    res = json.loads(out)
    assert res["shape"] == "tiny" and res["device"] == "cpu"
    _check(res, rows=10, seq_len=16, batch_size=4)  # 8 of the 10 rows are run
    assert all(res[k] is None for k in PEAKS)  # no CUDA peak on the CPU


@pytest.mark.gpu
def test_gpu_check_real_shape():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    _check(res, rows=10, seq_len=128, batch_size=5)
    model = res["model_gib"]
    assert model > 0 and all(res[k] >= model for k in PEAKS)  # every side holds the model ...
    assert res["naive_peak_gib"] > res["swm_candidate_peak_gib"]  # ... the naive one a deep copy of it as well
