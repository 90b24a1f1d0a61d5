"""`swm-ray analyze`: calibration -> per-layer HSIC sums on K actors -> CKA matrix + heatmap + stats."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time

import numpy as np

from swm_ray.compute.similarity import cka_from_sums
from swm_ray.config import RunConfig, dump_yaml
from swm_ray.io.artifacts import write_configs, write_json, write_similarity
from swm_ray.io.cache import cache_root
from swm_ray.io.data import Calibration, calibration_for
from swm_ray.io.outputs import atomic_output_dir
from swm_ray.io.probes import check_run_paths
from swm_ray.io.runstate import RunState
from swm_ray.jobs.runtime import actor_dtype


def stats_cache_key(cfg: RunConfig, calib: Calibration) -> str:
    """Statistics depend only on the model's weights, the precision the actors compute in, the exact token ids,
    the minibatches and the stats settings. The weights are named by the resolved folder (a hub revision, an
    S3 object's version) and its files' sizes and times, so a folder rewritten in place is not taken for the
    one the cache saw."""
    from swm_ray.io.checkpoint import weights_stamp
    from swm_ray.io.models import resolve_model_path

    m = cfg.model
    path = resolve_model_path(m.source, m.revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    h = hashlib.sha256()
    h.update(json.dumps([m.source, m.revision, actor_dtype(cfg), cfg.stats.model_dump(), str(path),
                         weights_stamp(path)]).encode())
    h.update(calib.input_ids.tobytes())
    h.update(json.dumps(calib.batches).encode())
    return h.hexdigest()[:24]


def similarity_matrix(cfg: RunConfig, calib: Calibration, pool=None, reuse: bool = True,
                      state=None) -> tuple[np.ndarray, dict]:
    """CKA matrix from the statistics cache (when `reuse`), or computed on the actor pool (started here if
    not given). Every computed matrix is written to the cache, so later selections never recompute it.
    With a `RunState` each minibatch's sums are saved as they arrive and a resumed run computes only the
    minibatches it lacks."""
    from swm_ray.jobs.pool import ActorPool

    cache = cache_root() / "stats" / f"{stats_cache_key(cfg, calib)}.npz"
    if reuse and cache.exists():
        z = np.load(cache)
        info = json.loads(str(z["info"]))
        return z["cka"], {**info, "cached": True}
    own = pool is None
    t0 = time.perf_counter()
    t1 = t0
    try:
        pool = pool or ActorPool(cfg, *calib.input_ids.shape)
        t1 = time.perf_counter()
        done, save = {}, None
        if state is not None:
            done = {b: a for b in range(len(calib.batches)) if (a := state.load_array(f"hsic-{b}.npy")) is not None}
            save = lambda b, sums: state.save_array(f"hsic-{b}.npy", sums)  # noqa: E731
        sums, count, tokens = pool.hsic_sums(calib, cfg.stats.kernel, cfg.stats.skip_first_tokens, done, save)
    finally:
        if own and pool is not None:
            pool.shutdown()
    secs = time.perf_counter() - t1
    cka = cka_from_sums(sums)
    if not np.all(np.isfinite(cka)):
        raise RuntimeError("the CKA matrix has non-finite entries (a layer produced NaN/inf hidden states)")
    info = {
        "samples": int(calib.input_ids.shape[0]), "seq_len": int(calib.input_ids.shape[1]),
        "tokens": tokens, "minibatches": count, "actors": pool.k, "seconds": round(secs, 3),
        "startup_seconds": round(t1 - t0, 3), "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
        "kernel": cfg.stats.kernel, "skip_first_tokens": cfg.stats.skip_first_tokens,
        "modes": sorted({i["mode"] for i in pool.infos}),
        "bos_prepended": calib.bos_prepended, "pretokenized": calib.pretokenized,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}-{secrets.token_hex(3)}.tmp.npz")  # two runs of one key: two files
    np.savez(tmp, cka=cka, sums=sums, info=json.dumps(info))
    os.replace(tmp, cache)
    return cka, {**info, "cached": False}


def run_analyze(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Compute and write the layer-similarity matrix. Returns stats (and `out`)."""
    out = cfg.out or "swm-ray-analyze"
    check_run_paths(out, cfg.overwrite, [cfg.model.source, cfg.data.source])
    path, calib, n_layers = calibration_for(cfg)
    state = RunState.open(out, "analyze", cfg, cfg.resume, dtype=actor_dtype(cfg))
    state.start(calib.input_ids)
    cka, info = similarity_matrix(cfg, calib, reuse=False, state=state)
    if cka.shape != (n_layers + 1, n_layers + 1):
        raise RuntimeError(f"matrix shape {cka.shape} does not match {n_layers} decoder layers")
    skip = cfg.stats.skip_first_tokens
    title = (f"CKA between layer outputs: {cfg.model.source}\n{info['samples']}×{info['seq_len']} tokens of "
             f"{cfg.data.source}, {cfg.stats.kernel} kernel, first {skip} position(s) skipped")
    stats = {"model": cfg.model.source, "model_path": path, "num_layers": n_layers, "data": cfg.data.source, **info}
    if skip == 0:
        stats["note"] = ("first position kept: in real models the attention-sink token can dominate the "
                         "flattened features; --skip-first-tokens 1 gives a graded matrix")
    with atomic_output_dir(out, cfg.overwrite) as folder:
        write_similarity(folder, cka, title)
        write_json(folder / "stats.json", stats)
        write_configs(folder, raw_yaml, dump_yaml(cfg))
    state.clear()
    return {**stats, "out": out}
