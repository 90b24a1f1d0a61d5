"""Starting or joining Ray, and sizing the actor pool."""

from __future__ import annotations

import os

from swm_ray.config import RayConfig


def init_ray(cfg: RayConfig, actors: int | None = None) -> None:
    """Join `cfg.address` (a cluster, or the one a Ray job runs in) or start an embedded local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    want_cpus = max(os.cpu_count() or 1, int((actors or cfg.actors or 1) * cfg.cpus_per_actor + 0.999))
    # address="local": always a fresh embedded instance, never some other cluster running on this machine
    ray.init(address="local", num_cpus=want_cpus, include_dashboard=False, log_to_driver=True)


def actor_count(cfg: RayConfig) -> int:
    """`--actors` if given, else one per GPU of the Ray cluster (of this machine before Ray starts), else 1."""
    import ray

    if cfg.actors:
        return cfg.actors
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    import torch

    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def actor_options(cfg: RayConfig) -> dict:
    """Resources of one model-holding actor: a whole GPU where there are GPUs, else `cpus_per_actor` CPUs."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    opts: dict = {"num_cpus": cfg.cpus_per_actor}
    if gpus >= 1:
        opts["num_gpus"] = 1
    return opts


def threads_per_actor(cfg: RayConfig, actors: int) -> int:
    if cfg.threads_per_actor:
        return cfg.threads_per_actor
    return max(1, (os.cpu_count() or 1) // max(1, actors))
