"""The compression plan: which windows of original layers were merged, and how (plain data, JSON round-trip).

Windows are inclusive [low, high] pairs of 0-based ORIGINAL decoder-layer indices, listed TOP window first
(the order a top-down search finds them); `similarities[i]` is the score that accepted `windows[i]`. A plan
names its source (model, revision, the checksum of its weights), the merge method and the attention rule:
`swm-ray apply` replays it on that source and gets the same folder. A plan with `compensation` (version 3)
carries fitted matrices in a side file beside its JSON, `<name>.tensors` (`plan.json` -> `plan.tensors`; the
safetensors format, named so that weight loaders that take every `*.safetensors` of a model folder do not
take it for weights), read and written with it. Version 1 and 2 plans (without the source fields, or
without compensation) still load.

A plan with `width` (version 4, `width.py`) also says which attention heads (whole KV groups) and MLP channels
every decoder layer keeps; its indices refer to the layers AFTER the depth windows are applied (positions
0..num_layers_after-1), so depth and width combine in one plan: merge first, then slice. FLAP's bias
compensation lies in the same side file (`width.<pos>.<bias name>`). Plans without it are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from swm_ray.errors import UserError

PLAN_VERSION = 3
WIDTH_PLAN_VERSION = 4  # plans with a width entry


def removed_from_windows(windows: Iterable[Sequence[int]]) -> list[int]:
    """Sorted original indices deleted by `windows`: every index of a window except its bottom one.

    The merged layer sits at the bottom index's position (for keep-last it carries the top layer's weights,
    but it still takes the bottom's position).
    """
    return sorted({i for low, high in windows for i in range(int(low) + 1, int(high) + 1)})


@dataclasses.dataclass
class Plan:
    """What a compression run did, enough to reproduce the edited model from its source."""

    windows: list[list[int]]
    num_layers_before: int
    merge: str
    source_model: str = ""
    source_revision: str | None = None
    source_checksum: str | None = None  # `checkpoint.WeightHasher` of the weights the plan was applied to
    method: str = "swm"
    attention: str = "global"  # the attention-type rule of merged windows (`windows.anchor_layer`)
    criterion: str = ""
    search: str = ""
    threshold: float | None = None
    similarities: list[float] = dataclasses.field(default_factory=list)
    params_before: int | None = None
    params_after: int | None = None
    removed_layers: list[int] = dataclasses.field(default_factory=list)
    num_layers_after: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    compensation: dict[str, Any] | None = None  # `compensation.Compensation.record()`; the tensors: `.tensors`
    version: int = PLAN_VERSION
    width: dict[str, Any] | None = None  # `width.width_record()`: heads and channels kept per layer after depth

    def __post_init__(self) -> None:
        self.windows = [[int(low), int(high)] for low, high in self.windows]
        self.num_layers_before = int(self.num_layers_before)
        self.similarities = [float(s) for s in self.similarities]
        for name in ("compensation", "width", "extra"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a JSON object, not {type(value).__name__}")
        # what is removed follows from the windows, which are what a replay applies: a hand-edited window with
        # stale counts beside it is described by its windows
        self.removed_layers = removed_from_windows(self.windows)
        self.num_layers_after = self.num_layers_before - len(self.removed_layers)
        self.tensors: dict[str, Any] = {}  # compensation name -> torch tensor (not part of the JSON)
        if self.width and self.version < WIDTH_PLAN_VERSION:
            self.version = WIDTH_PLAN_VERSION

    @property
    def compensated(self) -> bool:
        return bool(self.compensation) and self.compensation.get("method") not in (None, "none")

    @property
    def kept_layers(self) -> list[int]:
        """Original index at each new position (a window's bottom index stands for the merged layer)."""
        removed = set(self.removed_layers)
        return [i for i in range(self.num_layers_before) if i not in removed]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"plan has unknown keys {unknown}: was it written by a newer swm-ray?")
        missing = [k for k in ("windows", "num_layers_before", "merge") if k not in data]
        if missing:
            raise UserError(f"plan is missing {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:  # a hand-edited value of the wrong kind (null similarity, text window)
            raise UserError(f"plan has a value of the wrong kind ({e}): correct the plan's JSON") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to a LOCAL path (parents created), and its compensation tensors beside it when
        it has them; returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if (self.compensated or self.width) and self.tensors:
            side = tensors_path(p)
            for record in (self.compensation if self.compensated else None, self.width):
                if record is not None:
                    record["tensors_file"] = side.name
            side.write_bytes(self.tensors_bytes())
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan JSON from a local path or s3:// URL."""
        from swm_ray.io import fs as storage

        raw = storage.read_bytes(str(path))
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"plan {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise UserError(f"plan {path} is not a text file: give the plan.json a run wrote") from None
        if not isinstance(data, dict):
            raise UserError(f"plan {path}: expected a JSON object")
        plan = cls.from_dict(data)
        if plan.compensated or (plan.width or {}).get("tensors_file"):
            plan.tensors = _load_tensors(str(path))
        return plan

    def tensors_bytes(self) -> bytes:
        """The compensation tensors in the side file's format (safetensors), names sorted."""
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in sorted(self.tensors.items())})


def tensors_path(plan_path: str | Path) -> Path:
    """The side file of a plan's compensation tensors: `x.json` -> `x.tensors` (safetensors format)."""
    p = Path(plan_path)
    return p.with_name(p.name.removesuffix(".json") + ".tensors")


def _load_tensors(plan_path: str) -> dict[str, Any]:
    from safetensors.torch import load

    from swm_ray.io import fs as storage

    where = plan_path.removesuffix(".json") + ".tensors"
    try:
        raw = storage.read_bytes(where)
    except (FileNotFoundError, UserError):
        raise UserError(f"plan {plan_path} is compensated: its fitted matrices must lie beside it as {where} "
                        f"(copy them with the plan)") from None
    return load(raw)
