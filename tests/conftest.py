"""Shared fixtures: one local Ray per session (2 CPUs, 2 logical GPUs are NOT declared: CPU actors), tiny
model folders, pre-tokenized data, and an isolated swm-ray cache."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_resources_returned(request):
    """A test on the shared Ray leaves every CPU free when it ends (actors killed, placement groups removed,
    also when the run failed), so a leak fails the test that leaked, not a later one."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 30  # kills and group removals are asynchronous
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    free = ray.available_resources().get("CPU", 0)
    assert free == total, f"{total - free} CPU still held after the test (an actor or placement group leaked)"


@pytest.fixture(autouse=True)
def _isolated_stats_cache(tmp_path, monkeypatch):
    """Each test gets its own statistics cache; converted builtin models stay shared (see below)."""
    shared = Path(os.environ.get("SWM_RAY_CACHE", Path.home() / ".cache" / "swm-ray"))
    cache = tmp_path / "cache"
    (cache).mkdir()
    (shared / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(shared / "models")
    monkeypatch.setenv("SWM_RAY_CACHE", str(cache))


@pytest.fixture
def one_thread():
    """Tiny layers on a shared 2-core machine: one torch thread avoids OpenMP contention (training steps on tiny
    models run up to 50x slower with two threads fighting another process for the cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (6 layers) with a real tokenizer, loadable by path."""
    from tiny_models import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    model, _ = tiny_model("llama", n_layers=6, seed=0)
    model.save_pretrained(d)
    tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokens_parquet(tmp_path_factory) -> Path:
    """Pre-tokenized calibration data: 24 rows of 16 random token ids (vocab 256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    rows = rng.integers(4, 256, size=(24, 16)).tolist()
    path = tmp_path_factory.mktemp("data") / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": rows}), path)
    return path


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """Text rows made of the tiny tokenizer's words, long enough for 16-token crops."""
    import json

    from tiny_models import SENTENCES

    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            words = " ".join(rng.choice(SENTENCES, size=3))
            f.write(json.dumps({"text": words}) + "\n")
    return path


@pytest.fixture(scope="module")
def s3_endpoint():
    """One moto S3 server per test module (each module starts from empty buckets)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A moto S3 endpoint with one bucket, seen by swm-ray through SWM_RAY_S3_ENDPOINT."""
    import s3fs

    from swm_ray.io.remote import s3fs_filesystem

    monkeypatch.setenv("SWM_RAY_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs_filesystem()
    if not fs.exists("bucket"):
        fs.mkdir("bucket")
    return fs

