"""Multi-node runs simulated on this machine (`ray.cluster_utils.Cluster`: several raylets, one per "node"),
with the model on S3 (moto on loopback): actors spread over the nodes, one download per node, the windows of
a single-node run; and the shipped KubeRay job's entrypoint, run as written on a simulated 4-GPU cluster.

Marked `cluster`: each test starts its own Ray; run them alone (`make test` does)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server, and the environment every process (driver, raylets, workers) needs to reach it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"SWM_RAY_S3_ENDPOINT": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _upload_tiny(url: str, tmp: Path) -> None:
    from swm_ray.io.remote import s3fs_filesystem

    model, tok = tiny_model("llama", n_layers=6, seed=5)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    fs = s3fs_filesystem()
    bucket = url[len("s3://"):].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(tmp) + "/", url.rstrip("/") + "/", recursive=True)


def _cluster(nodes: list[dict]):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=nodes[0])
    for args in nodes[1:]:
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    return cluster


def _downloads(cache: Path) -> list[str]:
    log = cache / "downloads.log"
    return log.read_text().splitlines() if log.exists() else []


def test_two_nodes_spread_download_once_each_same_windows(s3_env, tmp_path, monkeypatch):
    import ray

    from swm_ray.config import build_config
    from swm_ray.jobs.compress import run_compress

    model_url = "s3://models/tiny-two-node"
    _upload_tiny(model_url, tmp_path / "src")
    caches = [tmp_path / "cache-head", tmp_path / "cache-worker"]
    driver_cache = tmp_path / "cache-driver"
    monkeypatch.setenv("SWM_RAY_CACHE", str(driver_cache))
    cluster = _cluster([{"num_cpus": 2, "env_vars": {"SWM_RAY_CACHE": str(caches[0])}},
                        {"num_cpus": 2, "env_vars": {"SWM_RAY_CACHE": str(caches[1])}}])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        common = {"model.source": model_url, "data.source": "builtin:lambada", "select.layers": 2,
                  "ray.address": cluster.address, "select.method": "swm"}
        spread = run_compress(build_config(flags={**common, "ray.actors": 4, "out": str(tmp_path / "spread")}))
        single = run_compress(build_config(flags={**common, "ray.actors": 1, "out": str(tmp_path / "single")}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert spread["plan"]["windows"] == single["plan"]["windows"]
    assert spread["plan"]["similarities"] == single["plan"]["similarities"]
    # four actors over two nodes: both nodes ran actors, and each downloaded the model once (two actors raced
    # on each node); the driver fetched its own copy once
    assert [len(_downloads(c)) for c in caches] == [1, 1]
    assert len(_downloads(driver_cache)) == 1


def test_kuberay_job_entrypoint_runs_as_written(s3_env, tmp_path, monkeypatch):
    """The shipped RayJob's entrypoint, run unchanged against a simulated cluster shaped like its spec (a CPU
    head and GPU workers, 4 GPUs in all, logical here), with the model it names on (loopback) S3: the actor
    count it asks for fits the default calibration, and the output lands where it says."""
    import ray
    from typer.testing import CliRunner

    from swm_ray.cli import app
    from swm_ray.io import fs as storage
    from swm_ray.io.remote import s3fs_filesystem

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "swm-ray"
    model_url = next(a for a in argv if a.startswith("s3://models/"))
    out_url = argv[argv.index("--out") + 1]
    _upload_tiny(model_url, tmp_path / "src")
    fs = s3fs_filesystem()
    bucket = out_url[len("s3://"):].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["replicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"])
    assert gpus == 4
    monkeypatch.setenv("SWM_RAY_CACHE", str(tmp_path / "cache"))
    cluster = _cluster([{"num_cpus": 1}, {"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 2, "num_gpus": 2}])
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what a RayJob's driver finds in its environment
    try:
        res = CliRunner().invoke(app, argv[1:])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert res.exit_code == 0, res.output[-3000:]
    assert fs.exists(f"{out_url}/{storage.OWNER_MARK}")
    plan = json.loads(fs.cat(f"{out_url}/plan.json"))
    assert plan["num_layers_before"] == 6 and plan["num_layers_after"] < 6
    assert plan["extra"]["actor_modes"] == ["memory"]
