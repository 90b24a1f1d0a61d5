"""What an interrupted `analyze` or `compress` had finished, kept beside its output so `--resume` continues it.

The state lives in a hidden sibling of the output, `<parent>/.<name>.partial/` (a prefix beside an S3
output), written one small file at a time (each replaced whole), and is removed when the run completes:

- `state.json`: the kind of run and a fingerprint of every setting that decides its result (model, data,
  statistics, selection, merge; not the actor count, which never changes a result);
- `calibration.npy`: the token ids the run calibrates on;
- analyze: `hsic-<minibatch>.npy`, the HSIC sums of each finished minibatch;
- compress: `memo.json`, every candidate score computed so far, keyed by the current layer groups (the search
  replays from it: steps already taken cost no model call) and the windows committed so far.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np

from swm_ray import storage
from swm_ray.errors import UserError

SUFFIX = ".partial"


def fingerprint(cfg) -> str:
    """Hash of the settings that decide a run's result (a RunConfig's model, data, stats, select, merge).

    Only values that differ from their defaults count, so a new setting added at a default that keeps the
    old behaviour leaves the fingerprints of earlier outputs (zoo entries, partial states) valid."""
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    keep = {k: dumped.get(k, {}) for k in ("model", "data", "stats", "select", "merge")}
    keep["model"] = {k: v for k, v in keep["model"].items() if k not in ("device", "max_memory", "stream")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:20]


class RunState:
    """The partial state of one run at `out` (see the module docstring)."""

    def __init__(self, out: str, kind: str, fp: str):
        self.out = out
        self.kind = kind
        self.fp = fp
        self.root = storage.sibling(out, SUFFIX)

    @classmethod
    def open(cls, out: str, kind: str, cfg, resume: bool) -> RunState:
        """The state to continue (`resume`) or a fresh one; one-line errors for a missing or foreign state and
        for a state left behind by a run that was not asked to resume."""
        state = cls(out, kind, fingerprint(cfg))
        saved = state._load_json("state.json")
        if saved is None:
            if resume:
                raise UserError(f"--resume: no interrupted run of {out} to continue (nothing at {state.root}); "
                                f"run without --resume")
            return state
        if not resume:
            raise UserError(f"an interrupted {saved.get('kind', 'run')} of {out} left its state at {state.root}: "
                            f"add --resume to continue it, or remove that folder to start again")
        if saved.get("kind") != kind or saved.get("fingerprint") != state.fp:
            raise UserError(f"--resume: the interrupted run at {state.root} was a {saved.get('kind')} with other "
                            f"settings; run the identical command, or remove that folder to start again")
        return state

    def start(self, calibration: np.ndarray) -> None:
        """Record the run (first call) or check the calibration is the one it started with (resume)."""
        saved = self.load_array("calibration.npy")
        if saved is not None and not np.array_equal(saved, calibration):
            raise UserError(f"--resume: the calibration data differs from the interrupted run's ({self.root}); "
                            f"the data source changed: remove that folder to start again")
        if saved is None:
            self.save_array("calibration.npy", calibration)
        self.save_json("state.json", {"kind": self.kind, "fingerprint": self.fp, "out": self.out,
                                      "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

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
        storage.replace_file(self._path(name), (json.dumps(obj) + "\n").encode())

    def save_array(self, name: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        storage.replace_file(self._path(name), buf.getvalue())

    def load_array(self, name: str) -> np.ndarray | None:
        path = self._path(name)
        if not storage.exists(path):
            return None
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)

    def clear(self) -> None:
        """The run completed: its partial state goes."""
        storage.remove_tree(self.root)
