"""`swm-ray zoo ZOO.yaml --out PREFIX`: compress a list of models, each as a Ray task, into one folder each.

ZOO.yaml:

    defaults:              # any config sections (select, merge, data, eval, model options, ...)
      select: {layers: 6}
      eval: {enabled: true, tasks: [piqa, arc_easy], limit: 100}
    concurrency: 2         # optional: models at once (default: as the cluster's resources allow)
    gpu_memory_gb: 80      # optional: memory of one GPU, to size each model's GPUs from its weights
    models:
      - source: builtin:smollm2-135m          # local folder, hub id, s3:// or builtin:
        name: smollm2-swm                      # optional: the output folder's name
        revision: main                         # optional (hub ids)
        select: {method: swm}                  # optional: the entry's own settings over the defaults
        merge: {compensate: lstsq}             #   (any section: here a least-squares compensation)

Each entry runs `pipeline.compress_here` (the planners, writer and evaluation of `compress`) in one Ray task
that asks for the resources the model needs (GPUs from its size where the cluster has GPUs). Outputs go to
PREFIX/NAME; `manifest.parquet` (and .csv, .md) at PREFIX gets a row per model as each finishes. A model that
fails becomes an error row and the others go on. A rerun keeps every model whose output is complete with
unchanged settings and, when the evaluation is on, holds the numbers of the current evaluation settings
(`metrics.json` records them); one whose model settings are unchanged but whose evaluation settings differ (or
whose evaluation never finished) is evaluated again in its folder, not recompressed; the others are rebuilt.
A kept model's row is made from its folder's files (plan.json, metrics.json), not copied from the manifest.
`--retry-failed` reruns only the models whose manifest row is an error. `heal.after_compress` is refused:
heal the outputs afterwards with `swm-ray heal`.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass

import yaml

from swm_ray.config import RunConfig, build_config
from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.faults import storage_errors
from swm_ray.io.probes import check_run_paths
from swm_ray.io.remote import is_remote, s3fs_filesystem
from swm_ray.jobs.console import console

MANIFEST_KEYS = ("name", "source", "revision", "output", "method", "merge", "compensate", "windows", "layers_before",
                 "layers_after", "layers_removed", "params_removed", "ppl", "zeroshot_mean", "seconds", "status",
                 "error")
ENTRY_KEYS = {"source", "name", "revision"}


@dataclass
class Entry:
    name: str
    cfg: RunConfig
    raw: str  # the entry's settings as YAML, written into its output


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-") or "model"


def load_zoo(path: str, prefix: str) -> tuple[list[Entry], dict]:
    """Every entry's validated config (one-line errors name the entry), and the file's zoo options."""
    from swm_ray.config import load_yaml_text
    from swm_ray.recipes.preflight import check_settings

    _, data = load_yaml_text(path)
    unknown = set(data) - {"defaults", "models", "concurrency", "gpu_memory_gb"}
    if unknown:
        raise UserError(f"zoo {path}: unknown top-level keys {sorted(unknown)}: use defaults, models, concurrency, "
                        f"gpu_memory_gb")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"zoo {path}: defaults must be a mapping of config sections (defaults: {{select: ...}}), "
                        f"not a {type(defaults).__name__}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"zoo {path}: give a list of models (models: [{{source: ...}}, ...])")
    entries, names = [], set()
    for i, item in enumerate(models, 1):
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not item.get("source"):
            raise UserError(f"zoo {path}: model {i} has no source")
        sections = {k: v for k, v in item.items() if k not in ENTRY_KEYS}
        tree = _merge({"eval": {"enabled": True}}, _merge(defaults, sections))
        tree = _merge(tree, {"model": {"source": str(item["source"]), "revision": item.get("revision")}})
        try:
            cfg = build_config(tree)
            check_settings(cfg)  # what the entry's compress would refuse, before any entry runs
        except UserError as e:
            raise UserError(f"zoo {path}: model {i} ({item['source']}): {e}") from None
        name = _slug(str(item.get("name") or _default_name(cfg)))
        if cfg.heal.after_compress is not None:
            raise UserError(f"zoo {path}: model {i} ({name}): heal.after_compress is not supported in a zoo (the "
                            f"entry would be written unhealed): remove it and heal the output afterwards with "
                            f"`swm-ray heal {prefix.rstrip('/')}/{name} --mode {cfg.heal.after_compress} --out ...`")
        if name in names:
            raise UserError(f"zoo {path}: two models would write {prefix.rstrip('/')}/{name}: give them distinct "
                            f"names (name: ...)")
        names.add(name)
        cfg = cfg.model_copy(update={"out": f"{prefix.rstrip('/')}/{name}", "overwrite": True})
        entries.append(Entry(name, cfg, yaml.safe_dump({"zoo": path, **item}, sort_keys=False)))
    conc = data.get("concurrency")
    gpu_gb = 80 if data.get("gpu_memory_gb") is None else data["gpu_memory_gb"]
    if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
        raise UserError(f"zoo {path}: concurrency must be a whole number of models of at least 1, not {conc!r}")
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)) or gpu_gb <= 0:
        raise UserError(f"zoo {path}: gpu_memory_gb must be a positive number (GB of one GPU), not {gpu_gb!r}")
    opts = {"concurrency": conc, "gpu_memory_gb": float(gpu_gb)}
    return entries, opts


def _default_name(cfg: RunConfig) -> str:
    from swm_ray.recipes.specs import model_label

    s = cfg.select
    target = (f"L{s.layers}" if s.layers is not None else f"r{s.ratio}" if s.ratio is not None
              else f"t{s.threshold}")
    return f"{model_label(cfg.model.source).split(':')[-1].split('/')[-1]}-{s.method}-{target}"


# -- the manifest ---------------------------------------------------------------------------------------------
def read_manifest(prefix: str) -> dict[str, dict]:
    path = f"{prefix.rstrip('/')}/manifest.json"
    if not storage.exists(path):
        return {}
    return {r["name"]: r for r in json.loads(storage.read_bytes(path))}


def write_manifest(prefix: str, rows: dict[str, dict], order: list[str]) -> None:
    """manifest.json / .parquet / .csv / .md at PREFIX, each replaced whole (as each model finishes)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    listed = [{k: rows[n].get(k) for k in MANIFEST_KEYS} for n in order if n in rows]
    base = prefix.rstrip("/")
    storage.replace_file(f"{base}/manifest.json", (json.dumps(listed, indent=1, default=str) + "\n").encode())
    table = pa.Table.from_pylist(listed)
    for name, writer in (("manifest.parquet", pq.write_table), ("manifest.csv", pacsv.write_csv)):
        buf = io.BytesIO()
        writer(table, buf)
        storage.replace_file(f"{base}/{name}", buf.getvalue())
    storage.replace_file(f"{base}/manifest.md", markdown_manifest(listed).encode())


def markdown_manifest(rows: list[dict]) -> str:
    head = "| model | source | method | windows | layers | params removed | PPL | zero-shot | seconds | status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        layers = f"{r['layers_before']} → {r['layers_after']}" if r.get("layers_after") is not None else ""
        removed = f"{100 * r['params_removed']:.1f}%" if r.get("params_removed") is not None else ""
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else ""
        zs = f"{r['zeroshot_mean']:.3f}" if r.get("zeroshot_mean") is not None else ""
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['name']} | {r['source']} | {r.get('method') or ''} | {r.get('windows') or ''} | {layers} "
                     f"| {removed} | {ppl} | {zs} | {r.get('seconds') or ''} | {status} |")
    return "\n".join(lines) + "\n"


def _row(entry: Entry, result: dict | None, error: str | None, seconds: float) -> dict:
    cfg = entry.cfg
    row = {"name": entry.name, "source": cfg.model.source, "revision": cfg.model.revision, "output": cfg.out,
           "method": cfg.select.method, "seconds": round(seconds, 1), "status": "error" if error else "ok",
           "error": error}
    if result:
        p, metrics = result["plan"], result.get("metrics") or {}
        row.update(merge=p["merge"], compensate=(p.get("compensation") or {}).get("method") or "none",
                   windows=json.dumps(p["windows"]), layers_before=p["num_layers_before"],
                   layers_after=p["num_layers_after"],
                   layers_removed=p["num_layers_before"] - p["num_layers_after"],
                   params_removed=1 - p["params_after"] / p["params_before"] if p.get("params_before") else None,
                   ppl=(metrics.get("ppl") or {}).get("ppl"), zeroshot_mean=metrics.get("mean"))
    return row


KEEP, EVALUATE, BUILD = "keep", "evaluate", "build"


def _state(entry: Entry) -> tuple[str, str, dict | None]:
    """What a rerun does with the entry, why, and what its folder holds ({"plan", "metrics"}):

    - KEEP: the output is complete (its mark), made with the same settings, and when the evaluation is on its
      `metrics.json` records the current evaluation settings;
    - EVALUATE: complete with the same model settings, but its evaluation differs or never finished;
    - BUILD: anything else (no complete output, other settings, an unreadable plan.json)."""
    from swm_ray.io.checkpoint import local_weights_identity
    from swm_ray.io.runstate import fingerprint
    from swm_ray.recipes.pipeline import EVAL_RECORD, eval_record

    out = entry.cfg.out.rstrip("/")
    if not storage.exists(f"{out}/{storage.OWNER_MARK}") or not storage.exists(f"{out}/plan.json"):
        return BUILD, "no complete output", None
    plan = _read_json(f"{out}/plan.json")
    if not isinstance(plan, dict) or not isinstance(plan.get("extra"), dict):
        return BUILD, "unreadable plan.json", None
    if plan["extra"].get("settings") != fingerprint(entry.cfg):
        return BUILD, "settings changed", None
    ident = local_weights_identity(entry.cfg.model.source)
    if ident is not None and plan["extra"].get("source_weights") != ident:
        return BUILD, "model folder rewritten", None
    if not entry.cfg.eval.enabled:
        return KEEP, "complete, evaluation off", {"plan": plan, "metrics": None}
    metrics = _read_json(f"{out}/metrics.json") if storage.exists(f"{out}/metrics.json") else None
    if not isinstance(metrics, dict):
        return EVALUATE, "never evaluated", {"plan": plan, "metrics": None}
    if metrics.get(EVAL_RECORD) != eval_record(entry.cfg):
        return EVALUATE, "evaluation settings changed", {"plan": plan, "metrics": None}
    return KEEP, "complete", {"plan": plan, "metrics": metrics}


def _read_json(path: str):
    try:
        return json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError):
        return None


def _kept_row(entry: Entry, found: dict, before: dict | None) -> dict:
    """A kept entry's row from its folder's files; only the seconds come from the previous row, and only when
    that row agrees with the folder."""
    row = _row(entry, found, None, 0.0)
    agrees = before is not None and all(before.get(k) == row[k] for k in MANIFEST_KEYS if k != "seconds")
    return {**row, "seconds": before.get("seconds") if agrees else None}


# -- running ----------------------------------------------------------------------------------------------------
def _task(cfg_json: dict, raw: str, threads: int, evaluate_only: bool = False) -> dict:
    """One zoo entry in a Ray worker: the whole compress pipeline on this task's resources, or only the
    evaluation of its existing folder (`evaluate_only`)."""
    import transformers

    from swm_ray.io.models import set_threads
    from swm_ray.recipes.pipeline import compress_here, evaluate_here

    set_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    run = evaluate_here if evaluate_only else compress_here
    return run(RunConfig.model_validate(cfg_json), raw)


def _resources(entry: Entry, has_gpus: bool, gpu_memory_gb: float, cpus: float) -> dict:
    """CPUs, and GPUs from the model's size where the cluster has GPUs (at least one)."""
    if not has_gpus:
        return {"num_cpus": cpus, "num_gpus": 0}
    weights = _weights_bytes(entry.cfg.model.source)
    gpus = max(1, math.ceil(weights * 1.2 / (gpu_memory_gb * 1e9))) if weights else 1
    return {"num_cpus": cpus, "num_gpus": gpus}


def _weights_bytes(source: str) -> int | None:
    """Size of a model's weights from its files without downloading them (None when unknown: a hub id)."""
    from pathlib import Path

    if is_remote(source):
        fs = s3fs_filesystem()
        with storage_errors(source, "sizing"):
            return sum(fs.du(f) for f in fs.glob(source.rstrip("/") + "/*.safetensors")) or None
    p = Path(source).expanduser()
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors")) or None
    return None


def run_zoo(zoo_path: str, prefix: str, *, retry_failed: bool = False, concurrency: int | None = None,
            cpus_per_model: float = 1.0, address: str | None = None) -> dict:
    """Compress every model of the zoo (see the module docstring); returns the manifest rows in order."""
    import ray

    from swm_ray.config import RayConfig
    from swm_ray.jobs.runtime import init_ray

    if concurrency is not None and concurrency < 1:  # a limit below 1 would start no model and wait forever
        raise UserError(f"--concurrency {concurrency}: models at once must be at least 1")
    if cpus_per_model <= 0:
        raise UserError(f"--cpus-per-model {cpus_per_model:g}: give a positive number of CPUs")
    entries, opts = load_zoo(zoo_path, prefix)
    order = [e.name for e in entries]
    previous = read_manifest(prefix)
    if retry_failed and not previous:
        raise UserError(f"--retry-failed: no earlier zoo run at {prefix} (no manifest.json) to retry: run without "
                        f"--retry-failed, or give the --out of that run")
    rows: dict[str, dict] = {}
    todo: list[Entry] = []
    evaluate: set[str] = set()  # entries of `todo` whose folder is only evaluated again
    notes: list[str] = []
    for e in entries:
        before = previous.get(e.name)
        state, why, found = _state(e)
        if retry_failed and before is not None and before.get("status") != "error":
            rows[e.name] = _kept_row(e, found, before) if state == KEEP else before
            notes.append(f"  {e.name}: kept (--retry-failed; {why})")
            continue
        if state == KEEP:
            rows[e.name] = _kept_row(e, found, before)
            notes.append(f"  {e.name}: kept ({why})")
            continue
        todo.append(e)
        if state == EVALUATE:
            evaluate.add(e.name)
            rows[e.name] = _kept_row(e, found, before)  # the folder's model, without numbers until evaluated
            notes.append(f"  {e.name}: to evaluate again ({why}; the model is kept)")
        else:
            notes.append(f"  {e.name}: to build ({why})")
            if before is not None:  # its row still describes what is on disk until this run replaces it
                rows[e.name] = before
    for e in todo:
        sources = [] if e.name in evaluate else [e.cfg.model.source, e.cfg.data.source]
        check_run_paths(e.cfg.out, True, sources)
    con = console()
    con.print(f"[bold]zoo[/]: {len(entries)} models, {len(todo) - len(evaluate)} to build, {len(evaluate)} to "
              f"evaluate again, {len(entries) - len(todo)} kept")
    for note in notes:
        con.print(note)
    if todo:
        init_ray(RayConfig(address=address))
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        remote = ray.remote(_task)
        limit = concurrency or opts["concurrency"] or len(todo)
        pending: dict = {}
        queue = list(todo)
        started: dict[str, float] = {}
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    e = queue.pop(0)
                    res = _resources(e, has_gpus, opts["gpu_memory_gb"], cpus_per_model)
                    threads = max(1, int(res["num_cpus"]))
                    ref = remote.options(**res, max_retries=0).remote(e.cfg.model_dump(mode="json"), e.raw, threads,
                                                                      e.name in evaluate)
                    pending[ref] = e
                    started[e.name] = time.perf_counter()
                    gpus = f", {res['num_gpus']} GPU" if res["num_gpus"] else ""
                    what = "evaluation" if e.name in evaluate else e.cfg.select.method
                    con.print(f"  {e.name}: started ({what}, {res['num_cpus']:g} CPU{gpus}; {len(queue)} waiting)")
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    e = pending.pop(ref)
                    result, error = None, None
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - one model's failure is its row, the others go on
                        error = _one_line(exc)
                    rows[e.name] = _row(e, result, error, time.perf_counter() - started[e.name])
                    write_manifest(prefix, rows, order)
                    row = rows[e.name]
                    if error is None:
                        ppl = f", perplexity {row['ppl']:.2f}" if row.get("ppl") is not None else ""
                        con.print(f"  {e.name}: [green]ok[/] in {row['seconds']:.0f} s, {row['layers_before']} -> "
                                  f"{row['layers_after']} layers{ppl}")
                    else:
                        con.print(f"  {e.name}: [red]error[/] after {row['seconds']:.0f} s: {error}")
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            write_manifest(prefix, rows, order)
            raise
    write_manifest(prefix, rows, order)
    return {"rows": [rows[n] for n in order if n in rows], "ran": len(todo), "kept": len(entries) - len(todo),
            "rebuilt": [e.name for e in todo if e.name not in evaluate],
            "reevaluated": [e.name for e in todo if e.name in evaluate],
            "errors": sum(1 for n in order if rows.get(n, {}).get("status") == "error")}


def _one_line(exc: BaseException) -> str:
    from swm_ray.errors import find_user_error

    user = find_user_error(exc)
    if user is not None:
        return str(user)
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1][:300] if text else ''}"


