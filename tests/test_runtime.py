"""Sizing the actor pool: the default actor count with and without a cluster's GPUs, torch threads per actor."""

import json
import os
import subprocess
import sys

import pytest

from swm_ray.config import RayConfig
from swm_ray.jobs.runtime import actor_count, threads_per_actor


def test_threads_per_actor_is_the_actors_cpu_share(monkeypatch):
    import ray

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the driver's machine does not matter
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert threads_per_actor(RayConfig(), 1) == 8  # embedded local Ray: its CPUs shared among the actors
    assert threads_per_actor(RayConfig(), 4) == 2
    assert threads_per_actor(RayConfig(), 16) == 1  # at least 1
    assert threads_per_actor(RayConfig(address="auto"), 1) == 1  # on a cluster: 1 unless cpus_per_actor says
    assert threads_per_actor(RayConfig(cpus_per_actor=3), 1) == 3
    assert threads_per_actor(RayConfig(cpus_per_actor=3), 8) == 3  # nor the number of actors
    assert threads_per_actor(RayConfig(cpus_per_actor=0.5), 2) == 1  # at least 1
    assert threads_per_actor(RayConfig(cpus_per_actor=2, threads_per_actor=5), 2) == 5  # explicit setting


def test_actor_count_before_ray_starts_counts_this_machines_gpus(monkeypatch):
    import ray
    import torch

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert actor_count(RayConfig()) == 4
    assert actor_count(RayConfig(actors=2)) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert actor_count(RayConfig()) == 1


SCRIPT = """
import json, ray
from swm_ray.config import RayConfig
from swm_ray.jobs.runtime import actor_count
out = {}
for gpus in (2, 0):  # logical GPUs of a started local Ray
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    out[f"default_{gpus}"] = actor_count(RayConfig())
    out[f"given_{gpus}"] = actor_count(RayConfig(actors=3))
    ray.shutdown()
print("RESULT=" + json.dumps(out))
"""


def test_actor_count_on_a_started_ray_counts_the_clusters_gpus():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT=")), None)
    if line is None:
        pytest.fail(f"the Ray script failed ({res.returncode}): {res.stderr[-3000:]}")
    out = json.loads(line.removeprefix("RESULT="))
    assert out == {"default_2": 2, "given_2": 3, "default_0": 1, "given_0": 3}
