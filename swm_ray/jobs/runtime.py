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
    want_cpus = max(os.cpu_count() or 1, int((actors or cfg.actors or 1) * (cfg.cpus_per_actor or 1) + 0.999))
    # address="local": always a fresh embedded instance, never some other cluster running on this machine
    ray.init(address="local", num_cpus=want_cpus, include_dashboard=False, log_to_driver=True)


def actor_count(cfg: RayConfig, rows: int | None = None) -> int:
    """`--actors` if given, else one per `gpus_per_actor` GPUs of the Ray cluster (of this machine before Ray
    starts), at most one per calibration row when `rows` is given, and at least 1."""
    import ray

    if cfg.actors:
        return cfg.actors
    if ray.is_initialized():
        gpus = int(ray.cluster_resources().get("GPU", 0))
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = max(1, gpus // cfg.gpus_per_actor)
    return min(n, rows) if rows else n


def joined_cluster(cfg: RayConfig) -> bool:
    """True when this run uses a Ray cluster it did not start (an address, or inside a Ray job)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def actor_cpus(cfg: RayConfig, actors: int) -> float:
    """CPUs one actor reserves: `cpus_per_actor` if set; on a cluster 1; on the embedded local Ray the local
    Ray's CPUs shared among the `actors` (so one actor on a laptop uses all its cores, four share them)."""
    import ray

    if cfg.cpus_per_actor:
        return cfg.cpus_per_actor
    if joined_cluster(cfg) or not ray.is_initialized():
        return 1.0
    return max(0.01, float(ray.cluster_resources().get("CPU", 1)) / max(1, actors))


def actor_options(cfg: RayConfig, actors: int = 1) -> dict:
    """Resources of one model-holding actor: `gpus_per_actor` GPUs where the cluster has GPUs, and its CPUs
    (see `actor_cpus`)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    opts: dict = {"num_cpus": actor_cpus(cfg, actors)}
    if gpus >= 1:
        opts["num_gpus"] = cfg.gpus_per_actor
    return opts


def actors_get_gpus(cfg: RayConfig) -> bool:
    """Whether the model-holding actors get GPUs (`actor_options`): the Ray cluster has some (a cluster to join is
    joined to ask it), or, before an embedded Ray starts, this machine has CUDA."""
    import ray

    if not ray.is_initialized() and joined_cluster(cfg):
        init_ray(cfg)
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    import torch

    return torch.cuda.is_available()


def actor_dtype(cfg) -> str:
    """The dtype the model-holding actors compute in (a RunConfig's `model.dtype`, `auto` resolved on the device
    they get), e.g. 'bfloat16': recorded by a resumable run, used for budget checks made before they start."""
    from swm_ray.io.runstate import compute_dtype

    return compute_dtype(cfg.model, actors_get_gpus(cfg.ray))


def threads_per_actor(cfg: RayConfig, actors: int) -> int:
    """Torch threads inside one actor: `threads_per_actor` if set, else the CPUs it reserves (`actor_cpus`),
    at least 1."""
    if cfg.threads_per_actor:
        return cfg.threads_per_actor
    return max(1, int(actor_cpus(cfg, actors)))
