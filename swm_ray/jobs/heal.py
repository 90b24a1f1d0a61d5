"""`swm-ray heal`: recovery training of a compressed model folder -> a healed model folder.

- `lora`: the training examples are tokenized once on the driver and put into the object store; Ray Train's
  `TorchTrainer` runs `heal.workers` data-parallel workers (one GPU each where the cluster has GPUs, CPU
  workers otherwise), each loading the model and training the same LoRA adapter on its share of every global
  batch (gradients summed over the workers). Rank 0 checkpoints the adapter, the optimizer and the step
  every `heal.checkpoint_every` steps into the run's own folder `heal-<hash>/` (named by the run's
  fingerprint and output) under `heal.checkpoints` (local or s3://, a folder that may be shared by heal runs
  and holds nothing else; default `.<out-name>.heal/` beside the output); a stopped run re-run with
  `--resume` finds its folder there and continues from the last checkpoint. The driver then merges the
  adapter into the weights, writes the folder and removes the run's checkpoint folder (only that).
- `local`: runs in this process: the compressed model in memory, the original one as a `LayerStack`
  (streamed one layer at a time when it does not fit); see `heal/local.py`.

`run_compress_and_heal` chains compress -> heal -> eval (`compress --heal MODE`); `--resume` continues the
stage that was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from swm_ray.compute.memory import return_freed
from swm_ray.config import WIDTH_METHODS, RunConfig, dump_yaml
from swm_ray.errors import UserError, find_user_error
from swm_ray.io import fs as storage
from swm_ray.io.probes import check_run_paths
from swm_ray.io.remote import arrow_filesystem, is_remote
from swm_ray.jobs.console import console

MARKER = "heal-run.json"  # in a run's checkpoint folder: which run (fingerprint, output) the checkpoints belong to
RUN_PREFIX = "heal-"  # a run's checkpoint folder is <root>/heal-<hash>
RUN_NAME = "lora"  # Ray Train's run folder inside the run's checkpoint folder


def run_heal(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Heal `cfg.model.source` (a folder written by compress or apply) in `cfg.heal.mode`; write `cfg.out`."""
    from swm_ray.io.models import resolve_model_path

    h = cfg.heal
    out = cfg.out or "swm-ray-healed"
    data = h.data or cfg.data.source
    check_run_paths(out, cfg.overwrite, [cfg.model.source, data])
    if h.mode == "lora":
        _check_checkpoints_outside(cfg, out)
    m = cfg.model
    path = resolve_model_path(m.source, m.revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    plan = _read_plan(path, m.source, required=h.mode == "local")
    t0 = time.perf_counter()
    own = None  # a LoRA run's checkpoint folder, claimed before it trains (named by the source's weights)
    with tempfile.TemporaryDirectory(prefix="swm-ray-adapter-") as tmp:
        adapter_dir = Path(tmp) if h.mode == "lora" and h.keep_adapter else None
        if h.mode == "local":
            model, tok, record = _heal_local(cfg, path, plan, data)
        else:
            model, tok, record, own = _heal_lora(cfg, path, data, out, adapter_dir)
        record.seconds = round(time.perf_counter() - t0, 2)
        _cast_to_saved_dtype(model, path)
        written = _write(model, tok, out, plan, record, raw_yaml, cfg, adapter_dir)
        del model  # written: the evaluation loads the folder, not this copy
        return_freed()
    if own is not None:  # the run is complete: nothing to resume. The folder claimed, not one named now: a
        _release_checkpoints(cfg, out, own)  # heal written onto its own source changed the source's weights
    metrics = None
    if cfg.eval.enabled:
        metrics = _evaluate(cfg, written, plan, record)
    return {"out": written, "record": record, "metrics": metrics, "seconds": record.seconds}


def _write(model, tok, out, plan, record, raw_yaml, cfg, adapter_dir):
    from swm_ray.heal.folder import write_healed_folder

    return write_healed_folder(model, tok, out, plan=plan, record=record, raw_yaml=raw_yaml,
                               resolved_yaml=dump_yaml(cfg), overwrite=cfg.overwrite, adapter_dir=adapter_dir)


def _read_plan(path: str, source: str, required: bool):
    """The folder's plan.json; without one, a plan of no windows (lora) or a one-line error (local)."""
    from swm_ray.io.models import check_decoder
    from swm_ray.plan.plan import Plan

    f = Path(path) / "plan.json"
    if f.exists():
        return Plan.load(f)
    if required:
        raise UserError(f"model {source}: no plan.json, so --mode local cannot tell which layers were merged; heal "
                        f"a folder written by `swm-ray compress` or `apply`, or use --mode lora")
    n = check_decoder(path)
    return Plan(windows=[], num_layers_before=n, merge="none", source_model=source, method="none")


def _cast_to_saved_dtype(model, path: str) -> None:
    """Training ran in float32 (or the workers' dtype); the folder keeps the dtype its weights were saved in."""
    from swm_ray.io.checkpoint import Checkpoint

    dtypes = [i.torch_dtype for i in Checkpoint(path).infos.values() if i.torch_dtype.is_floating_point]
    if dtypes and next(model.parameters()).dtype != dtypes[0]:
        model.to(dtypes[0])


def _evaluate(cfg: RunConfig, out: str, plan, record) -> dict:
    from swm_ray.heal.folder import update_healed_metrics
    from swm_ray.jobs.eval import run_eval

    on_out = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": out, "revision": None})})
    metrics = run_eval(on_out, [out])[out]
    update_healed_metrics(out, plan, record, metrics, resolved_yaml=dump_yaml(cfg))
    return metrics


# -- local ---------------------------------------------------------------------------------------------------------
def _heal_local(cfg: RunConfig, path: str, plan, data: str):
    from swm_ray.compute.stack import StackSpec, open_stack
    from swm_ray.heal.folder import HealRecord
    from swm_ray.heal.local import local_settings
    from swm_ray.io.models import load_config, load_model, pick_device, resolve_model_path

    h, m = cfg.heal, cfg.model
    if not plan.windows:
        raise UserError(f"model {m.source}: its plan.json merges no window: --mode local has nothing to refit")
    source = h.source or plan.source_model
    if not source:
        raise UserError(f"model {m.source}: plan.json names no source model; give the original with "
                        f"--set heal.source=...")
    try:
        src_path = resolve_model_path(source, None if h.source else plan.source_revision,
                                      allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    except UserError as e:
        raise UserError(f"--mode local fits against the original model ({source}, named by "
                        f"{'heal.source' if h.source else 'plan.json'}): {e}") from None
    dev = pick_device(m.device)
    model, tok = load_model(path, device=dev, dtype="float32", allow_pickle=m.allow_pickle,
                            trust_remote_code=m.trust_remote_code)
    model_type = getattr(load_config(path, m.trust_remote_code), "model_type", None)
    ls = local_settings(cfg, tok, model_type, data)
    calib, steps, lr = ls.calib, ls.steps, ls.lr
    stack = open_stack(StackSpec(src_path, device=dev, dtype="float32", stream=m.stream, max_memory=m.max_memory,
                                 allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code),
                       rows=h.micro_batch_size, seq_len=h.local_seq_len)
    con = console()
    con.print(f"[bold]healing locally[/]: {len(plan.windows)} merged layer(s), {steps} Adam steps each at lr {lr}, "
              f"{calib.input_ids.shape[0]} × {calib.input_ids.shape[1]} tokens of {data}, original model "
              f"{source} ({'streamed' if stack.streaming else 'in memory'})")

    def on_fit(fit) -> None:
        con.print(f"  layers {fit.window[0]:>3}–{fit.window[1]:<3} relative error {fit.error_before:.4f} -> "
                  f"{fit.error_after:.4f}   ({fit.seconds:.0f} s)")

    fits = ls.run(model, stack, plan, on_fit=on_fit)
    model.eval()
    record = HealRecord("local", m.source, data, ls.record(source), steps=steps, fits=[asdict(f) for f in fits])
    return model, tok, record


# -- lora ----------------------------------------------------------------------------------------------------------
def _heal_lora(cfg: RunConfig, path: str, data: str, out: str, adapter_dir: Path | None):
    from swm_ray.heal.folder import HealRecord
    from swm_ray.heal.lora import DEFAULT_LR, lora_data, merge_adapter
    from swm_ray.io.models import load_config, load_model, load_tokenizer
    from swm_ray.jobs.runtime import init_ray

    h, m = cfg.heal, cfg.model
    tok = load_tokenizer(path, m.trust_remote_code)
    config = load_config(path, m.trust_remote_code)
    _check_targets(config, h, m.trust_remote_code)
    examples, schedule = lora_data(cfg, tok, getattr(config, "model_type", None), data)
    root = _claim_checkpoints(cfg, out)
    init_ray(cfg.ray, h.workers)
    workers = worker_count(cfg)
    con = console()
    con.print(f"[bold]healing with LoRA[/]: {len(examples)} {examples.kind} examples ({examples.tokens:,} tokens) "
              f"of {data}, {schedule.total_steps} steps of {h.batch_size}, {workers} Ray Train worker(s); "
              f"checkpoints in {root}")
    if examples.skipped:
        con.print(f"note: {examples.skipped} record(s) left out: the cutoff ({h.cutoff} tokens) cut their whole "
                  f"response")
    if schedule.warmup_steps >= schedule.total_steps:
        con.print(f"note: the run has {schedule.total_steps} steps, fewer than the {schedule.warmup_steps} warm-up "
                  f"steps: the learning rate never reaches {h.lr or DEFAULT_LR['lora']}")
    fit = fit_lora(cfg, path, examples, schedule, root, workers, pad_id=tok.pad_token_id)
    base, _ = load_model(path, device="cpu", dtype="float32", allow_pickle=m.allow_pickle,
                         trust_remote_code=m.trust_remote_code, with_tokenizer=False)
    model = merge_adapter(base, fit["adapter"], h, adapter_dir=adapter_dir).eval()
    history = fit["state"]["history"]
    measured = [x for x in history if x.get("seconds")]
    tps = sum(x["tokens"] for x in measured) / max(1e-9, sum(x["seconds"] for x in measured)) if measured else None
    settings = {k: v for k, v in h.model_dump(mode="json").items()
                if k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "batch_size", "micro_batch_size",
                         "cutoff", "warmup_steps", "epochs", "seed")}
    settings.update(lr=h.lr or DEFAULT_LR["lora"], total_steps=schedule.total_steps, kind=examples.kind)
    record = HealRecord("lora", m.source, data, settings, steps=schedule.total_steps, examples=len(examples),
                        loss_first=history[0]["loss"] if history else None,
                        loss_last=history[-1]["loss"] if history else None,
                        tokens_per_s=round(tps, 1) if tps else None, workers=workers,
                        resumed_from_step=fit["state"].get("resumed_from"), history=history)
    return model, tok, record, root


def _check_targets(config, h, trust_remote_code: bool) -> None:
    """The LoRA targets exist in the architecture (checked on the meta device, before any worker starts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from swm_ray.heal.lora import lora_targets

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    lora_targets(skeleton, h.target_modules)


def worker_count(cfg: RunConfig) -> int:
    """`heal.workers`, else one per GPU of the Ray cluster, else 1."""
    import ray

    if cfg.heal.workers:
        return cfg.heal.workers
    return max(1, int(ray.cluster_resources().get("GPU", 0)))


def _checkpoint_root(cfg: RunConfig, out: str) -> str:
    """The folder of heal runs' checkpoint folders: `heal.checkpoints` (may be shared by many runs and hold
    nothing else) or the hidden sibling `.<out-name>.heal/`."""
    return (cfg.heal.checkpoints or storage.sibling(out, ".heal")).rstrip("/")


def fingerprint(cfg: RunConfig) -> str:
    """Hash of what decides a LoRA run's result (not how many workers compute it, nor where it is kept)."""
    ignore = {"workers", "cpus_per_worker", "checkpoints", "log_every", "keep_adapter", "after_compress",
              "checkpoint_every"}
    keep = {"model": [cfg.model.source, cfg.model.revision], "data": [cfg.data.text_column, cfg.data.bos],
            "heal": {k: v for k, v in cfg.heal.model_dump(mode="json").items() if k not in ignore}}
    keep["heal"]["data"] = cfg.heal.data or cfg.data.source
    from swm_ray.io.checkpoint import local_weights_identity

    weights = local_weights_identity(cfg.model.source)  # a local folder rewritten in place is another model
    if weights is not None:
        keep["weights"] = weights
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:20]


def _output_id(out: str) -> str:
    return out if is_remote(out) else str(Path(out).resolve())


def run_folder(cfg: RunConfig, out: str) -> str:
    """This run's own checkpoint folder, `<root>/heal-<hash of its fingerprint and output>`: the only place it
    writes checkpoints to and the only one it removes, so runs sharing a root never touch each other's."""
    key = hashlib.sha256(f"{fingerprint(cfg)}\n{_output_id(out)}".encode()).hexdigest()[:20]
    return f"{_checkpoint_root(cfg, out)}/{RUN_PREFIX}{key}"


def _runs_in(cfg: RunConfig, root: str, own: str) -> dict[str, dict]:
    """{folder: its marker} of the heal runs kept at `root`. A run writes only into a folder that holds nothing
    but heal runs' folders: anything else there is a one-line error (never deleted, never written beside)."""
    runs = {}
    for name, is_folder in sorted(storage.list_folder(root).items()):
        folder = f"{root}/{name}"
        run_like = is_folder and re.fullmatch(RUN_PREFIX + "[0-9a-f]{20}", name) is not None
        if run_like and storage.exists(f"{folder}/{MARKER}"):
            runs[folder] = _read_marker(f"{folder}/{MARKER}")
        elif folder == own:
            raise UserError(f"the checkpoint folder {own} has no {MARKER}, so it is not this run's to continue or "
                            f"remove: remove it yourself to start again")
        elif not run_like and cfg.heal.checkpoints:  # a run's folder without its marker yet: a run starting
            raise UserError(f"--checkpoints {root} holds {name}, which is not a heal run's folder: give an empty "
                            f"folder or one that only swm-ray heal runs use")
        elif not run_like:
            raise UserError(f"the checkpoint folder {root} holds {name}, which is not a heal run's folder: "
                            f"remove {folder}, or give --checkpoints another folder")
    return runs


def _read_marker(path: str) -> dict:
    try:
        saved = json.loads(storage.read_bytes(path))
    except ValueError:  # unreadable: another run's all the same, left alone
        return {}
    return saved if isinstance(saved, dict) else {}


def _claim_checkpoints(cfg: RunConfig, out: str) -> str:
    """Start a fresh run in its own folder under the checkpoint root, or with --resume continue the interrupted
    one found there by its fingerprint (one-line errors for a missing, foreign or unclaimed run, as for
    compress). Returns the run's folder."""
    root, own, fp, out_id = _checkpoint_root(cfg, out), run_folder(cfg, out), fingerprint(cfg), _output_id(out)
    runs = _runs_in(cfg, root, own)
    others = [f for f, m in runs.items() if f != own and m.get("out") == out_id]
    if own in runs:
        if not cfg.resume:
            raise UserError(f"an interrupted heal of {out} left its checkpoints at {own}: add --resume to continue "
                            f"it, or remove that folder to start again")
        return own
    if others and cfg.resume:
        raise UserError(f"--resume: the interrupted heal of {out} at {others[0]} had other settings; run the "
                        f"identical command, or remove that folder to start again")
    if others:
        raise UserError(f"an interrupted heal of {out} with other settings left its checkpoints at {others[0]}: "
                        f"rerun its command with --resume to continue it, or remove that folder to start again")
    if cfg.resume:
        raise UserError(f"--resume: no interrupted heal of {out} to continue (nothing at {own}); run without "
                        f"--resume")
    storage.replace_file(f"{own}/{MARKER}", (json.dumps({"fingerprint": fp, "out": out_id}) + "\n").encode())
    return own


def _interrupted(cfg: RunConfig, out: str) -> bool:
    """Whether an interrupted LoRA heal of `out` with these settings left checkpoints to continue."""
    return storage.exists(f"{run_folder(cfg, out)}/{MARKER}")


def _check_checkpoints_outside(cfg: RunConfig, out: str) -> None:
    """--checkpoints at or inside --out would make --out a folder swm-ray did not write, refused only after the
    run trained: refused here, before anything loads."""
    root = cfg.heal.checkpoints
    if not root:
        return
    a, b = (p.rstrip("/") if is_remote(p) else str(Path(p).resolve()) for p in (root, out))
    if a == b or a.startswith(b + "/"):
        raise UserError(f"--checkpoints {root} is inside --out {out}: the output folder is written whole at the "
                        f"end; keep checkpoints elsewhere (or leave --checkpoints out: beside the output)")


def _release_checkpoints(cfg: RunConfig, out: str, own: str) -> None:
    """The run is complete: remove its own folder `own` (nothing else), and the default root once it is
    empty."""
    storage.remove_tree(own)
    root = _checkpoint_root(cfg, out)
    if not cfg.heal.checkpoints and not is_remote(root):
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only when empty: it holds no other run's folder


def _storage_for(root: str):
    """(storage_path, storage_filesystem) for Ray Train: S3 through the project's one pyarrow filesystem."""
    if is_remote(root):
        fs, path = arrow_filesystem(root)
        return path, fs
    return str(Path(root).resolve()), None


def fit_lora(cfg: RunConfig, path: str, examples, schedule, root: str, workers: int, pad_id: int,
             stop_at: int | None = None) -> dict:
    """Train the adapter with Ray Train (see the module docstring); returns {"adapter": tensors, "state": the
    last checkpoint's trainer.json}. A run whose checkpoints are at `root` continues from the last one.
    `stop_at`: stop (with a checkpoint) after this step instead of the schedule's last, e.g. to train a long
    schedule in stages."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from swm_ray.jobs.runtime import actor_cpus

    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    cpus = actor_cpus(cfg.ray.model_copy(update={"cpus_per_actor": cfg.heal.cpus_per_worker}), workers)
    local = Path(cfg.model.source).expanduser()
    loop_config = {
        "source": path if local.exists() else cfg.model.source,  # remote sources resolve on each worker's node
        "model": cfg.model.model_dump(mode="json"), "heal": cfg.heal, "schedule": schedule,
        "examples": ray.put(examples), "pad_id": int(pad_id), "threads": max(1, int(cpus)),
        "end": min(schedule.total_steps, stop_at or schedule.total_steps),
    }
    storage_path, fs = _storage_for(root)
    trainer = TorchTrainer(
        _train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_restarts)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - a worker's UserError comes back wrapped
        for failure in getattr(e, "worker_failures", {}).values():
            cause = find_user_error(failure)
            if cause is not None:
                raise cause from None
        raise
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        adapter = load_file(str(Path(d) / "adapter.safetensors"))
        state = json.loads((Path(d) / "trainer.json").read_text())
    return {"adapter": adapter, "state": state}


def _train_loop(config: dict) -> None:
    """One Ray Train worker: load the model, add the adapter (or the last checkpoint's), run the steps."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device
    from safetensors.torch import load_file, save_file

    from swm_ray.heal.lora import LoraTrainer, adapter_state, apply_lora, load_adapter_state
    from swm_ray.io.models import load_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    h, schedule, mc = config["heal"], config["schedule"], config["model"]
    examples = ray.get(config["examples"])
    device = get_device()
    model, _ = load_model(config["source"], device=str(device), dtype=mc["dtype"], allow_pickle=mc["allow_pickle"],
                          trust_remote_code=mc["trust_remote_code"], revision=mc["revision"], with_tokenizer=False)
    model.config.use_cache = False
    peft_model = apply_lora(model, h, seed=h.seed)
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce(t: torch.Tensor) -> None:
        if distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    trainer = LoraTrainer(peft_model, examples, schedule, h, device=device, pad_id=config["pad_id"], rank=rank,
                          world=world, all_reduce=all_reduce)
    start, history, resumed = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_adapter_state(peft_model, load_file(str(Path(d) / "adapter.safetensors"), device=str(device)))
            trainer.optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", map_location=device,
                                                         weights_only=True))
            state = json.loads((Path(d) / "trainer.json").read_text())
        start, history, resumed = state["step"], state["history"], state["step"]
    elif distributed:
        for p in trainer.params:  # the same initial adapter everywhere
            dist.broadcast(p.data, src=0)
    window_tokens, window_s = 0, 0.0
    for step in range(start, config["end"]):
        t0 = time.perf_counter()
        metrics = trainer.step(step)
        dt = time.perf_counter() - t0
        history.append({"step": step + 1, "loss": round(metrics["loss"], 6), "lr": metrics["lr"],
                        "tokens": metrics["tokens"], "seconds": round(dt, 4)})
        window_tokens, window_s = window_tokens + metrics["tokens"], window_s + dt
        last = step + 1 == config["end"]
        if rank == 0 and ((step + 1) % h.log_every == 0 or last or step == start):
            # written, not printed: Ray Train's print patch would log each line twice
            sys.stdout.write(f"heal step {step + 1}/{schedule.total_steps}  loss {metrics['loss']:.4f}  "
                             f"lr {metrics['lr']:.2e}  {window_tokens / max(window_s, 1e-9):,.0f} tokens/s "
                             f"({world} worker(s))\n")
            sys.stdout.flush()
            window_tokens, window_s = 0, 0.0
        if (step + 1) % h.checkpoint_every == 0 or last:
            report = {"step": step + 1, "loss": metrics["loss"]}
            with tempfile.TemporaryDirectory(prefix="swm-ray-heal-ckpt-") as d:
                if rank == 0:
                    save_file(adapter_state(peft_model), os.path.join(d, "adapter.safetensors"))
                    torch.save(trainer.optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                    state = {"step": step + 1, "history": history, "resumed_from": resumed}
                    Path(d, "trainer.json").write_text(json.dumps(state))
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(report)


# -- compress -> heal -> eval ---------------------------------------------------------------------------------------
def run_compress_and_heal(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """`compress --heal MODE`: compress into a hidden sibling of `out` (`.<name>.unhealed`), heal it into `out`
    (and evaluate the healed folder when eval.enabled), then remove the sibling. Returns compress's summary with
    the heal's. With --resume it continues the stage that was interrupted: an unfinished compression from its
    partial state, then the heal; a finished one (the sibling complete, with these settings) is not redone and
    the heal continues from its checkpoints (or starts, when it left none)."""
    from swm_ray.io.runstate import RunState
    from swm_ray.jobs.compress import run_compress

    out = cfg.out or "swm-ray-compressed"
    check_run_paths(out, cfg.overwrite, [cfg.heal.data])
    staging = storage.sibling(out, ".unhealed")
    mode = cfg.heal.after_compress
    if mode == "lora":
        _check_checkpoints_outside(cfg, out)
    if mode == "local" and cfg.select.method in WIDTH_METHODS:  # refused before the compress, not after it
        raise UserError(f"--heal local refits merged layers, and --method {cfg.select.method} merges none: use "
                        f"--heal lora")
    compress_cfg = cfg.model_copy(update={"out": staging, "overwrite": True,
                                          "eval": cfg.eval.model_copy(update={"enabled": False})})
    heal_cfg = cfg.model_copy(update={
        "out": out,
        "model": cfg.model.model_copy(update={"source": staging, "revision": None}),
        "heal": cfg.heal.model_copy(update={"mode": mode}),
    })
    compressed = _compressed(staging, compress_cfg)
    healing = mode == "lora" and _interrupted(heal_cfg, out)  # a heal of the folder at `staging` was stopped
    if compressed is not None and not cfg.resume:
        raise UserError(f"an interrupted compress --heal of {out} left its compressed model at {staging}: add "
                        f"--resume to heal it, or remove that folder to start again")
    if compressed is None and healing:
        raise UserError(f"the heal checkpoints at {run_folder(heal_cfg, out)} belong to an interrupted compress "
                        f"--heal of {out} whose compressed model is gone or had other settings: rerun that "
                        f"command with --resume, or remove that folder to start again")
    if compressed is None and cfg.resume and RunState(staging, "compress", "").load_json("state.json") is None:
        raise UserError(f"--resume: no interrupted compress --heal of {out} with these settings to continue; run "
                        f"without --resume")
    if compressed is None:
        res = run_compress(compress_cfg, raw_yaml)  # with --resume: continues from its partial state
    else:
        console().print(f"resuming: the compressed model at {staging} is complete; healing it")
        res = {"out": staging, "plan": compressed, "note": (compressed.get("extra") or {}).get("note"),
               "metrics": None, "seconds": 0.0}
    healed = run_heal(heal_cfg.model_copy(update={"resume": healing}), raw_yaml)
    storage.remove_tree(staging)
    return {**res, "out": healed["out"], "metrics": healed["metrics"], "heal": healed["record"],
            "seconds": res["seconds"] + healed["seconds"]}


def _compressed(staging: str, compress_cfg: RunConfig):
    """plan.json (as a dict) of the compressed folder at `staging` when it is complete (swm-ray's owner mark is
    written last) and was compressed with the settings of `compress_cfg`; None otherwise."""
    import yaml

    from swm_ray.io.runstate import fingerprint as compress_fingerprint

    folder = staging.rstrip("/")
    if not storage.exists(f"{folder}/{storage.OWNER_MARK}"):
        return None
    try:
        saved = RunConfig.model_validate(yaml.safe_load(storage.read_bytes(f"{folder}/config.resolved.yaml")))
        plan = json.loads(storage.read_bytes(f"{folder}/plan.json"))
    except (UserError, ValueError, TypeError, yaml.YAMLError):  # unreadable or of another version: compress again
        return None
    same = isinstance(plan, dict) and compress_fingerprint(saved) == compress_fingerprint(compress_cfg)
    return plan if same else None
