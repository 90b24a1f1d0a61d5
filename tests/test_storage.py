"""Local and S3 storage against a real S3 endpoint on loopback (moto's threaded server)."""

import json

import numpy as np
import pytest

from swm_ray import storage
from swm_ray.errors import UserError


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import s3fs

    monkeypatch.setenv("SWM_RAY_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = storage.s3fs_filesystem()
    if not fs.exists("bucket"):
        fs.mkdir("bucket")
    return fs


def test_parquet_calibration_from_s3(s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from swm_ray.data import load_rows

    rows = np.arange(40).reshape(5, 8).tolist()
    with s3.open("bucket/data/tokens.parquet", "wb") as f:
        pq.write_table(pa.table({"input_ids": rows}), f)
    assert load_rows("s3://bucket/data/tokens.parquet") == rows
    with s3.open("bucket/data/text.jsonl", "wb") as f:
        f.write(b'{"text": "hello"}\n{"text": "world"}\n')
    assert load_rows("s3://bucket/data/text.jsonl") == ["hello", "world"]


def test_atomic_output_to_s3_and_refusals(s3):
    with storage.atomic_output_dir("s3://bucket/out/run1") as d:
        (d / "a.json").write_text(json.dumps({"x": 1}))
    assert json.loads(s3.cat("bucket/out/run1/a.json")) == {"x": 1}
    assert s3.exists(f"bucket/out/run1/{storage.OWNER_MARK}")
    with pytest.raises(UserError, match="--overwrite"):
        storage.check_output_path("s3://bucket/out/run1")
    with pytest.raises(RuntimeError):
        with storage.atomic_output_dir("s3://bucket/out/run2") as d:
            (d / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not s3.exists("bucket/out/run2")
    s3.pipe("bucket/foreign/file.txt", b"keep")
    with pytest.raises(UserError, match="not written by swm-ray"):
        storage.check_output_path("s3://bucket/foreign")


def test_model_folder_from_s3_is_cached(s3, tiny_llama_dir):
    from swm_ray.models import resolve_model_path

    s3.put(str(tiny_llama_dir) + "/", "bucket/models/tiny/", recursive=True)
    local = resolve_model_path("s3://bucket/models/tiny")
    assert (storage.Path(local) / "config.json").exists()
    assert resolve_model_path("s3://bucket/models/tiny") == local  # second time: from the cache
    with pytest.raises(UserError, match="not found on S3"):
        resolve_model_path("s3://bucket/models/missing")


def test_local_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError):
        with storage.atomic_output_dir(str(out)) as d:
            (d / "x").write_text("partial")
            raise ValueError("fail")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "cache"]
