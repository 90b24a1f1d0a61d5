"""What an interrupted `analyze` or `compress` had finished, kept beside its output so `--resume` continues it.

The state lives in a hidden sibling of the output, `<parent>/.<name>.partial/` (a prefix beside an S3
output), written one small file at a time (each replaced whole), and is removed when the run completes:

- `state.json`: the kind of run, a fingerprint of every setting that decides its result (model, data,
  statistics, selection, merge; not how or where it runs: actors, GPUs per actor, memory budget, layer
  streaming, device, `ray.*`) and the precision the actors compute in (`dtype`: `model.dtype=auto` is float32
  on CPU and bfloat16 on GPU, so a run resumed on other hardware would mix scores of two precisions);
- `calibration.npy`: the token ids the run calibrates on;
- analyze: `hsic-<minibatch>.npy`, the HSIC sums of each finished minibatch;
- compress: `memo.json`, every candidate score computed so far, keyed by the current layer groups (the search
  replays from it: steps already taken cost no model call) and the windows committed so far.

Nothing is written until the run holds work worth resuming (its first finished minibatch of statistics, its
first candidate score): a run that fails before, when its actors cannot start for one, leaves no state behind,
and the corrected command runs without --resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np

from swm_ray.errors import UserError
from swm_ray.io import fs as storage

SUFFIX = ".partial"


RUN_ONLY = ("device", "max_memory", "stream")
"""Model settings that decide how and where a run computes, not its result (`ray.*` is left out whole)."""


def _settings(cfg) -> dict:
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    keep = {k: dumped.get(k, {}) for k in ("model", "data", "stats", "select", "merge")}
    keep["model"] = {k: v for k, v in keep["model"].items() if k not in RUN_ONLY}
    return keep


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def fingerprint(cfg) -> str:
    """Hash of the settings that decide a run's result (a RunConfig's model, data, stats, select, merge).

    Only values that differ from their defaults count, so a new setting added at a default that keeps the
    old behaviour leaves the fingerprints of earlier outputs (zoo entries, partial states) valid."""
    return _hash(_settings(cfg))


def resume_fingerprint(cfg) -> str:
    """`fingerprint` without `model.dtype`: a resume compares the precision the actors compute in instead (the
    state's `dtype`), so `auto` and the dtype it resolves to continue each other."""
    settings = _settings(cfg)
    settings["model"] = {k: v for k, v in settings["model"].items() if k != "dtype"}
    return _hash(settings)


def compute_dtype(model_cfg, gpus: bool | None = None) -> str:
    """The dtype a model runs in (e.g. 'float32'): `model.dtype`, or for `auto` bfloat16 on a GPU and float32
    on the CPU (`models.pick_dtype`). The device is `model.device`, or for `auto` a GPU when `gpus` (where the
    actors get GPUs; None: this machine has CUDA)."""
    from swm_ray.io.models import pick_dtype

    device = model_cfg.device
    if device == "auto":
        if gpus is None:
            import torch

            gpus = torch.cuda.is_available()
        device = "cuda" if gpus else "cpu"
    return str(pick_dtype(model_cfg.dtype, device)).removeprefix("torch.")


class RunState:
    """The partial state of one run at `out` (see the module docstring)."""

    def __init__(self, out: str, kind: str, fp: str, dtype: str | None = None, weights: str | None = None):
        self.out = out
        self.kind = kind
        self.fp = fp
        self.dtype = dtype
        self.weights = weights
        self.root = storage.sibling(out, SUFFIX)
        self._unsaved: np.ndarray | None = None  # a fresh run's calibration, written with its first work

    @classmethod
    def open(cls, out: str, kind: str, cfg, resume: bool, dtype: str | None = None) -> RunState:
        """The state to continue (`resume`) or a fresh one; one-line errors for a missing or foreign state and
        for a state left behind by a run that was not asked to resume. `dtype`: the precision the actors will
        compute in (default `compute_dtype` on this machine). A model given as a local folder is also named by
        its files (`local_weights_identity`): a folder rewritten in place since the run started is refused."""
        from swm_ray.io.checkpoint import local_weights_identity

        state = cls(out, kind, resume_fingerprint(cfg), dtype or compute_dtype(cfg.model),
                    local_weights_identity(cfg.model.source))
        saved = state._load_json("state.json")
        if saved is None:
            if resume:
                raise UserError(f"--resume: no interrupted run of {out} to continue (nothing at {state.root}); "
                                f"run without --resume")
            storage.remove_tree(state.root)  # files of a run that failed before its state was complete
            return state
        if not resume:
            raise UserError(f"an interrupted {saved.get('kind', 'run')} of {out} left its state at {state.root}: "
                            f"add --resume to continue it, or remove that folder to start again")
        was = saved.get("dtype")  # None: written by a release that recorded no dtype (and hashed model.dtype)
        same = saved.get("fingerprint") == (state.fp if was is not None else fingerprint(cfg))
        if saved.get("kind") != kind or not same:
            raise UserError(f"--resume: the interrupted run at {state.root} was a {saved.get('kind')} with other "
                            f"settings; run the identical command, or remove that folder to start again")
        if saved.get("weights") is not None and saved["weights"] != state.weights:
            raise UserError(f"--resume: the model folder {cfg.model.source} was rewritten since the interrupted run "
                            f"started (its weight files differ); remove {state.root} to start again")
        if was is not None and was != state.dtype:
            raise UserError(f"--resume: the interrupted run computed in {was}, this one would compute in "
                            f"{state.dtype}: pass --set model.dtype={was} to continue it, or remove {state.root} "
                            f"to start again")
        return state

    def start(self, calibration: np.ndarray) -> None:
        """Check the calibration is the one the interrupted run started with (resume), or keep it to be written
        with the run's first work (a fresh run: until then there is nothing worth resuming)."""
        saved = self.load_array("calibration.npy")
        if saved is None:
            self._unsaved = np.asarray(calibration)
            return
        if not np.array_equal(saved, calibration):
            raise UserError(f"--resume: the calibration data differs from the interrupted run's ({self.root}); "
                            f"the data source changed: remove that folder to start again")
        self._save_state()

    def _save_state(self) -> None:
        self._replace("state.json", _json_bytes({"kind": self.kind, "fingerprint": self.fp, "dtype": self.dtype,
                                                 "weights": self.weights, "out": self.out,
                                                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    # -- files ---------------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _load_json(self, name: str):
        path = self._path(name)
        if not storage.exists(path):
            return None
        return json.loads(storage.read_bytes(path))

    def load_json(self, name: str):
        return self._load_json(name)

    def save_json(self, name: str, obj) -> None:
        self._save_work(name, _json_bytes(obj))

    def save_array(self, name: str, arr: np.ndarray) -> None:
        self._save_work(name, _npy_bytes(arr))

    def _save_work(self, name: str, data: bytes) -> None:
        """Write one file of work; a fresh run's first also writes, before it, its calibration and then
        `state.json` (the mark that a state exists). In that order a run killed at any point either left no
        mark (and nothing worth resuming) or left one, so the next run is told to --resume and never silently
        removes finished work."""
        if self._unsaved is not None:
            self._replace("calibration.npy", _npy_bytes(self._unsaved))
            self._save_state()
            self._unsaved = None
        self._replace(name, data)

    def _replace(self, name: str, data: bytes) -> None:
        storage.replace_file(self._path(name), data)

    def load_array(self, name: str) -> np.ndarray | None:
        path = self._path(name)
        if not storage.exists(path):
            return None
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)

    def clear(self) -> None:
        """The run completed: its partial state goes."""
        storage.remove_tree(self.root)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
