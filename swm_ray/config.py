"""The one validated config tree (floor 0: pydantic only, no torch, no I/O beyond reading YAML text).

Precedence: defaults < YAML file (`--config`) < CLI flags (each flag is a shortcut for a config path)
< `--set a.b=value`. Every model is frozen and rejects unknown keys.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swm_ray.errors import UserError

DEFAULT_MODEL = "builtin:smollm2-135m"
DEFAULT_DATA = "builtin:lambada"
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    source: str = Field(DEFAULT_MODEL, description="builtin:NAME, a local HF folder, a hub id, or s3://...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    allow_pickle: bool = False  # load .bin/.pt weights (pickle) only when asked
    trust_remote_code: bool = False
    revision: str | None = None


class DataConfig(_Section):
    source: str = Field(DEFAULT_DATA, description="builtin:lambada | builtin:boolq-passages | file | s3://")
    samples: int = Field(10, ge=1, description="number of calibration sequences (the paper: 10)")
    seq_len: int = Field(128, ge=2, description="tokens per sequence (the paper: 128)")
    seed: int = 1234
    mode: Literal["crops", "packed"] = "crops"  # crops: the paper's sampler; packed: concatenate then cut
    bos: Literal["auto", "always", "never"] = "auto"
    batch_size: int = Field(5, description="sequences per minibatch (>= 4 for unbiased HSIC)")
    text_column: str = "text"

    @field_validator("batch_size")
    @classmethod
    def _b(cls, v: int) -> int:
        if v < 4:
            raise ValueError("batch size must be at least 4 (unbiased HSIC divides by b(b-3))")
        return v


class StatsConfig(_Section):
    kernel: Literal["linear", "rbf"] = "linear"
    skip_first_tokens: int = Field(1, ge=0, description="positions left out of the features (attention sink)")


class RayConfig(_Section):
    actors: int | None = Field(None, ge=1, description="default: one per visible GPU, else 1")
    address: str | None = None  # None: embedded local Ray; "auto" or ray://... to join a cluster
    cpus_per_actor: float = Field(1.0, gt=0)
    threads_per_actor: int | None = None  # torch threads inside an actor (default: cpus_per_actor, min 1)


class SelectConfig(_Section):
    criterion: Literal["output", "cka", "kl", "nll"] = "output"
    search: Literal["best-first", "top-down"] = "best-first"
    threshold: float | None = None
    ratio: float | None = Field(None, gt=0, lt=1)
    layers: int | None = Field(None, ge=1)
    paper_loop: bool = True  # top-down only: reproduce the authors' loop exactly (False applies the fixes)
    protect_last: bool = True  # never merge the last decoder layer (the paper's rule)
    protected_layers: tuple[int, ...] = ()  # 0-based original indices that are never merged away
    max_steps: int = Field(10_000, ge=1)  # guard against an endless top-down loop

    @model_validator(mode="after")
    def _one_target(self) -> SelectConfig:
        given = [n for n in ("threshold", "ratio", "layers") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of threshold, ratio, layers (got {', '.join(given)})")
        return self


class MergeConfig(_Section):
    method: Literal["reference", "paper", "mean", "keep-first", "keep-last"] = "reference"


class EvalConfig(_Section):
    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = Field(None, description="items per task (quick runs)")
    batch_size: int = Field(16, ge=1)
    ppl_data: str | None = "builtin:boolq-passages"
    ppl_chunk: int = Field(128, ge=2)
    ppl_max_tokens: int | None = 16384
    ppl_bos: Literal["stream", "chunk", "none"] = "stream"
    ppl_batch_size: int = Field(8, ge=1)
    latency: bool = False
    latency_runs: int = Field(20, ge=1)
    latency_warmup: int = Field(10, ge=0)
    latency_new_tokens: int = Field(128, ge=1)
    offline: bool | None = None  # None: offline when the hub is unreachable
    baseline: str | None = None
    enabled: bool = False  # `compress --eval`

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("limit must be at least 1")
        return v


Criterion = Literal["output", "cka", "kl", "nll"]
Search = Literal["best-first", "top-down"]
MergeMethod = Literal["reference", "paper", "mean", "keep-first", "keep-last"]


class GridConfig(_Section):
    """`swm-ray grid`: every combination of model × criterion × search × merge method, each taken to every
    target (layer counts, parameter ratios or thresholds), next to baseline pruners and the original model.
    The other sections (data, eval, select.paper_loop, ...) apply to every trial."""

    models: tuple[str, ...] = ()  # default: model.source
    criteria: tuple[Criterion, ...] = ("output",)
    searches: tuple[Search, ...] = ("best-first",)
    merges: tuple[MergeMethod, ...] = ("reference",)
    layers: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()
    thresholds: tuple[float, ...] = ()
    baselines: tuple[Literal["shortgpt", "sleb"], ...] = ("shortgpt",)
    concurrency: int | None = Field(None, ge=1, description="trials at once (default: as resources allow)")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    tune_storage: str | None = Field(None, description="where Tune keeps its experiment (default: inside OUT; "
                                     "give s3://... when trials run on several nodes)")

    @model_validator(mode="after")
    def _targets(self) -> GridConfig:
        given = [n for n in ("layers", "ratios", "thresholds") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give only one kind of target: layers, ratios or thresholds (got {', '.join(given)})")
        if any(n < 1 for n in self.layers):
            raise ValueError("layer counts must be at least 1")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError("ratios must lie in (0, 1)")
        return self

    def target_kind(self) -> str | None:
        return next((n for n in ("layers", "ratios", "thresholds") if getattr(self, n)), None)

    def targets(self) -> tuple:
        kind = self.target_kind()
        return getattr(self, kind) if kind else ()


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stats: StatsConfig = StatsConfig()
    ray: RayConfig = RayConfig()
    select: SelectConfig = SelectConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()
    grid: GridConfig = GridConfig()
    out: str | None = None
    overwrite: bool = False


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"config key {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> {"a.b": 1, "c": "x"}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.samples=32")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml_text(path: str) -> tuple[str, dict]:
    """Read a YAML config file (local or s3://); returns (raw text, mapping)."""
    from swm_ray import storage

    raw = storage.read_bytes(path).decode("utf-8")
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return raw, data


def build_config(
    yaml_data: dict | None = None,
    flags: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge defaults < YAML < flags (dotted paths, None = not given) < --set, and validate."""
    tree: dict = _deepcopy(yaml_data or {})
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, dotted, value)
    for dotted, value in (sets or {}).items():
        _set_path(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see `swm-ray config` for the valid ones)"
        raise UserError(f"config {where}: {msg}") from None


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
